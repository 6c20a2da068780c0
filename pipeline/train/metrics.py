"""Where training figures go: `metrics.jsonl`, TensorBoard events and a progress bar (rank 0).

`metrics.jsonl` holds one JSON object per logged step and is the record the plots, the tests and
the resume logic read. On resume, records past the resumed step are dropped (those steps are
trained again, and each step is logged once). TensorBoard gets the same scalars under
`run_dir/tensorboard`; its events are append-only, so TensorBoard itself shows the newest value
of a re-trained step.

Not here: what the figures are (the engine computes them) or any collective.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.fileio import write_atomic

log = logging.getLogger(__name__)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, else the CPU resident set (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The (line, record) pairs of a JSON-lines file of step records, skipping unreadable lines.

    A process killed mid-write, or a full disk, leaves a torn last line; a later append can glue
    the next record to it. Such a line is dropped with a warning naming the file and line number,
    so that one lost record does not block every later resume.
    """
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            shown = line if len(line) <= 80 else line[:77] + "..."
            log.warning("%s:%d: dropping an unreadable record (torn write?): %s",
                        path, number, shown)  # fmt: skip
            continue
        records.append((line, record))
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step`, and unreadable ones, atomically: a resumed run trains those
    steps again."""
    if not path.is_file():
        return
    kept = [line for line, record in read_records(path) if record["step"] <= step]
    write_atomic(path, "".join(line + "\n" for line in kept))


class SampleLog:
    """Per-rank audit of data order: `samples-rank{r}.jsonl`, one `{"step", "ids"}` per step.

    Global sample ids (index in the manifest order) let a test, or a worried user, check that
    an epoch saw every sample once across ranks, resumes and world-size changes.
    """

    def __init__(
        self, run_dir: Path, rank: int, *, enabled: bool, start_step: int, world_size: int = 1
    ) -> None:
        self.file = None
        if enabled:
            path = run_dir / f"samples-rank{rank:05d}.jsonl"
            run_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(path, start_step)
            if rank == 0:  # ranks of a larger earlier world logged steps this run trains again
                for other in run_dir.glob("samples-rank*.jsonl"):
                    if int(other.stem.removeprefix("samples-rank")) >= world_size:
                        truncate_metrics(other, start_step)
            self.file = path.open("a")

    def write(self, step: int, ids: list[int]) -> None:
        """Record the real samples (padding repeats have negative ids) of one optimizer step."""
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "ids": [i for i in ids if i >= 0]}) + "\n")
            self.file.flush()

    def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()


class MetricsWriter:
    """Rank 0's sink for per-step records; every method is a no-op on other ranks."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        truncate_metrics(path, start_step)
        self.file = path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            # On a terminal a live bar; in a SLURM log file a line every minute at most.
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 60.0,
                file=sys.stderr,
            )

    def step(self, step: int, record: dict[str, Any] | None) -> None:
        """Advance the bar to `step`; write `record` (a logged step) everywhere."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if record is not None and "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if record is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close every sink."""
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
