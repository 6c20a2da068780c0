"""What the launcher checks on the login node before anything is submitted or started.

A mistyped shard path or an unreachable controller costs nothing here; found after the queue
wait, on every rank, it costs the wait. Every check raises `LaunchError` with one line that names
the problem; `submit_checked` turns a failing `sbatch` into one line with sbatch's own message.

Only cheap checks: file existence and a manifest (no shard is opened), `scontrol ping`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import Recipe

PING_TIMEOUT_S = 15  # slurmctld's default MessageTimeout is 10 s


class LaunchError(RuntimeError):
    """The launch cannot go ahead; the message is one line that says why."""


def _check_shard_spec(key: str, spec: str) -> None:
    """A shard folder with manifest.json, a manifest file, or a brace pattern of files."""
    from braceexpand import braceexpand  # what webdataset expands with, without its imports

    path = Path(spec)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise LaunchError(
                f"{key}={spec}: the folder holds no manifest.json (write the shards with "
                f"tools/make_shards.py, or name them with a brace pattern)"
            )
        return
    if path.name == "manifest.json" and path.is_file():
        return
    try:
        urls = [url for part in spec.split("::") for url in braceexpand(part)]  # as webdataset
    except ValueError as e:
        raise LaunchError(f"{key}={spec}: not a shard folder nor a brace pattern ({e})") from None
    missing = [u for u in urls if not Path(u).is_file()]
    if len(urls) == 1 and missing:
        raise LaunchError(f"{key}={spec}: no such shard folder or file")
    if missing:
        raise LaunchError(
            f"{key}={spec}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}"
        )


def check_data(recipe: Recipe, stages: list[str]) -> None:
    """The training shards, and the validation shards where an evaluation stage reads them."""
    _check_shard_spec("data.train.shards", recipe.data.train.shards)
    evaluates = any(s != "pretrain" for s in stages)
    if evaluates and recipe.data.val.shards:
        _check_shard_spec("data.val.shards", recipe.data.val.shards)


def check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must be writable."""
    here = Path(run_dir).absolute()
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise LaunchError(f"cannot create run directory {run_dir}: {here} is not a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        what = "run directory" if here == Path(run_dir).absolute() else "folder above it"
        raise LaunchError(f"run directory {run_dir}: the {what} {here} is not writable")


def check_controller() -> None:
    """The SLURM controller answers (`scontrol ping`), or LaunchError with what it said."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise LaunchError(f"SLURM_CONF={conf} is not a file: no cluster configuration")
    if shutil.which("scontrol") is None:
        return  # sbatch's own error, if any, is reported by submit_checked
    try:
        out = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=PING_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"the SLURM controller did not answer `scontrol ping` within {PING_TIMEOUT_S} s "
            f"(no cluster configuration, or an unreachable controller); nothing submitted"
        ) from None
    text = " ".join((out.stdout + " " + out.stderr).split())
    if " is UP" in text:
        return
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines()]
    said = (
        "; ".join(ln for ln in lines if ln and not ln.startswith("*")) or f"exit {out.returncode}"
    )
    raise LaunchError(
        f"the SLURM controller does not answer (scontrol ping: {said}); nothing submitted"
    )


def _sbatch_message(stderr: str) -> str:
    """sbatch's error lines, prefixes and repeats dropped, as one line."""
    said: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        for prefix in ("sbatch: error: ", "sbatch: fatal: ", "error: ", "fatal: "):
            if line.startswith(prefix):
                line = line[len(prefix) :]
                break
        else:
            if "error" not in line.lower() and "fatal" not in line.lower():
                continue
        if line and line not in said:
            said.append(line)
    return "; ".join(said) or stderr.strip().replace("\n", "; ") or "no message"


def submit_checked(recipe: Recipe, run_dir: Path, config: Path, stages: list[str] | None) -> Any:
    """`pipeline.launch.slurm.submit`, with a failing `sbatch` raised as one-line LaunchError."""
    from submitit.core.utils import FailedJobError

    from pipeline.launch.slurm import submit

    # submitit prints sbatch's stderr itself before raising: keep it for our one line instead.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return submit(recipe, run_dir, config, stages)
    except FailedJobError as e:
        cause = e.__cause__
        stderr = getattr(cause, "stderr", None) or str(e) or captured.getvalue()
        raise LaunchError(f"sbatch failed: {_sbatch_message(stderr)}; nothing submitted") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"sbatch could not run: {e}; nothing submitted") from None
    except RuntimeError as e:  # submitit's own checks, e.g. no `srun` on PATH
        raise LaunchError(f"cannot submit: {e}; nothing submitted") from None
