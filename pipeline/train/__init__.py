"""Training: DeepSpeed engine set-up and the step loop, schedules, checkpoints, distributed glue."""
