"""Launchers: local processes (`local.py`) and SLURM through submitit (`slurm.py`)."""
