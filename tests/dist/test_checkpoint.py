"""Checkpoints: atomic commit, pointer, pruning and fall-back; resume on real DeepSpeed engines.

Unit tests (no processes) drive `CheckpointManager` with a stand-in engine that writes one file
per save. The spawned tests run real DeepSpeed engines in 2 gloo processes (plus 1 and 3 for the
world-size change), one process group per story; the story functions run inside the workers and
raise on failure, which reaches pytest as a ProcessRaisedException.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipeline.fileio import file_digest
from pipeline.train.checkpoint import (
    COMMIT_FILE,
    POINTER_FILE,
    CheckpointError,
    CheckpointManager,
    rng_state,
    set_rng_state,
    validate,
)
from pipeline.train.distributed import finish_and_exit, free_port, rank_environ

# --------------------------------------------------------------------------- unit level


class FakeEngine:
    """What the manager needs of a DeepSpeed engine, writing one model-state file per tag."""

    def __init__(self, stage: int = 2, universal: bool = False) -> None:
        self.stage = stage
        self.universal = universal
        self.device = "cpu"

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_universal_checkpoint(self) -> bool:
        return self.universal

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        path = Path(save_dir, tag)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": torch.zeros(64), **client_state}, path / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_optimizer_states, load_lr_scheduler_states):
        saved = torch.load(Path(load_dir, tag, "mp_rank_00_model_states.pt"), weights_only=False)
        return str(Path(load_dir, tag)), {"module": None, **saved}


def _save(mgr: CheckpointManager, engine: FakeEngine, step: int) -> Path:
    return mgr.save(
        engine,
        step,
        client_state={"step": step},
        rank_state={"pos": step * 10},
        shared={"teacher": {"w": torch.full((3,), float(step))}},
    )


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def test_latest_is_none_without_checkpoints(tmp_path):
    assert CheckpointManager(tmp_path / "absent", rank=0, world_size=1).latest() is None
    assert CheckpointManager(tmp_path, rank=0, world_size=1).latest() is None


def test_save_commits_prunes_and_round_trips(tmp_path):
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1, keep=2, recipe_hash="r1")
    engine = FakeEngine()
    for step in (1, 2, 3):
        tag_dir = _save(mgr, engine, step)
    assert tag_dir == tmp_path / "step-00000003"
    assert (tmp_path / POINTER_FILE).read_text().strip() == "step-00000003"
    assert not (tmp_path / "latest").exists()  # DeepSpeed's pointer is never written
    assert _tags(tmp_path) == ["step-00000002", "step-00000003"]
    record = json.loads((tag_dir / COMMIT_FILE).read_text())
    assert record["world_size"] == 1 and record["zero_stage"] == 2 and record["step"] == 3
    assert record["recipe_hash"] == "r1" and record["client_keys"] == ["step"]
    assert set(record["files"]) == {
        "mp_rank_00_model_states.pt",
        "rank-00000.pt",
        "shared-teacher.pt",
    }
    for name, entry in record["files"].items():  # recorded while written, equal to a re-read
        assert (entry["size"], entry["sha256"]) == file_digest(tag_dir / name), name
    assert not [p for p in tag_dir.iterdir() if p.name.startswith(".")]  # no temporaries left

    assert mgr.latest() == tag_dir
    client, rank_states, shared = mgr.load(engine, tag_dir)
    assert client == {"step": 3}
    assert list(rank_states) == [{"pos": 30}]
    assert torch.equal(shared["teacher"]["w"], torch.full((3,), 3.0))


def test_validation_catches_missing_and_truncated_files(tmp_path):
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1)
    tag_dir = _save(mgr, FakeEngine(), 4)
    assert validate(tag_dir) is None

    model = tag_dir / "mp_rank_00_model_states.pt"
    data = model.read_bytes()
    model.write_bytes(data[:-10])
    assert "bytes" in validate(tag_dir)
    model.unlink()
    assert "missing" in validate(tag_dir)
    model.write_bytes(data)
    assert validate(tag_dir) is None
    (tag_dir / COMMIT_FILE).unlink()
    assert COMMIT_FILE in validate(tag_dir)
    assert mgr.latest() is None  # never a tag without commit.json
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        mgr.load(FakeEngine(), tag_dir)


def test_crash_before_commit_and_broken_pointers_fall_back(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1, keep=2)
    engine = FakeEngine()
    good = _save(mgr, engine, 2)

    # Crash after DeepSpeed's and our files, before commit.json.
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(CheckpointManager, "_write_commit", crash)
    with pytest.raises(CheckpointError, match="simulated crash"):
        _save(mgr, engine, 3)
    monkeypatch.undo()
    assert (tmp_path / "step-00000003" / "rank-00000.pt").is_file()
    assert mgr.latest() == good

    # DeepSpeed's `latest` naming the broken tag is ignored.
    (tmp_path / "latest").write_text("step-00000003")
    assert mgr.latest() == good

    # Our pointer naming a committed tag whose file was truncated afterwards: fall back.
    bad = tmp_path / "step-00000004"
    shutil.copytree(good, bad)
    record = json.loads((bad / COMMIT_FILE).read_text())
    (bad / COMMIT_FILE).write_text(json.dumps({**record, "tag": bad.name, "step": 4}))
    (tmp_path / POINTER_FILE).write_text(bad.name)
    assert mgr.latest() == bad
    with open(bad / "rank-00000.pt", "r+b") as f:
        f.truncate(5)
    assert mgr.latest() == good

    # Re-saving step 3 replaces the leftover; step 4 (newer than the new pointer) is left alone.
    _save(mgr, engine, 3)
    assert mgr.latest() == tmp_path / "step-00000003"
    assert _tags(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]
    # A later save removes the older incomplete tag and prunes beyond keep.
    _save(mgr, engine, 5)
    assert _tags(tmp_path) == ["step-00000003", "step-00000005"]


def test_save_failure_of_a_shared_entry_is_not_committed(tmp_path):
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1)
    with pytest.raises(CheckpointError):
        mgr.save(FakeEngine(), 1, client_state={}, rank_state={}, shared={"x": lambda: 0})
    assert mgr.latest() is None


def _hand_commit(root: Path, *, world_size: int, stage: int) -> Path:
    tag_dir = root / "step-00000009"
    tag_dir.mkdir(parents=True)
    record = {"tag": tag_dir.name, "step": 9, "world_size": world_size, "zero_stage": stage}
    (tag_dir / COMMIT_FILE).write_text(json.dumps({**record, "files": {}, "shared": []}))
    return tag_dir


def test_unsupported_loads_name_world_sizes_and_stage(tmp_path):
    tag_dir = _hand_commit(tmp_path, world_size=2, stage=3)
    mgr = CheckpointManager(tmp_path, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match=r"world size 2, ZeRO-3; now world size 1, ZeRO-3"):
        mgr.load(FakeEngine(stage=3), tag_dir)
    with pytest.raises(CheckpointError, match="across ZeRO-3 and ZeRO-1/2"):
        mgr.load(FakeEngine(stage=2), tag_dir)
    with pytest.raises(CheckpointError, match="universal loading under ZeRO-3"):
        mgr.load(FakeEngine(stage=3, universal=True), tag_dir, load_optimizer=False)


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()

    def draws():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()

    first = draws()
    set_rng_state(state)
    assert draws() == first
    set_rng_state({})  # nothing saved: nothing changed
    assert draws() != first


# --------------------------------------------------------------------------- real engines


def _worker(rank: int, world_size: int, port: int, story, args: tuple) -> None:
    os.environ.update(rank_environ(rank, world_size, port), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    story(rank, world_size, *args)
    finish_and_exit()


def _spawn(story, world_size: int, *args, timeout: float = 240.0) -> None:
    """Runs `story(rank, world_size, *args)` in `world_size` fresh processes; a hang fails."""
    ctx = mp.start_processes(
        _worker,
        args=(world_size, free_port(), story, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{story.__name__} did not finish within {timeout} s")


def _engine(stage: int, grad_accum: int = 1):
    import deepspeed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    return engine


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1000 * step + rank))


def _train(engine, steps: range, rank: int) -> None:
    for step in steps:
        loss = engine(_batch(step, rank)).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _params(engine) -> list[torch.Tensor]:
    """Full parameters (gathered under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _assert_params(engine, expected: list[torch.Tensor], what: str) -> None:
    got = _params(engine)
    if not all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)):
        raise AssertionError(f"{what}: parameters differ")


def _resume_story(rank: int, world_size: int, root: Path, stage: int) -> None:
    mgr = CheckpointManager(root, rank=rank, world_size=world_size, keep=2, recipe_hash="h")
    engine = _engine(stage)

    def save(step: int) -> Path:
        return mgr.save(
            engine,
            step,
            client_state={"step": step},
            rank_state={"rank": rank, "rng": rng_state(), "data": {"pos": step * 4}},
            shared={"extra": {"w": torch.arange(6.0) * step}},
        )

    _train(engine, range(0, 1), rank)
    save(1)
    _train(engine, range(1, 3), rank)
    save(3)
    _train(engine, range(3, 5), rank)
    torch.manual_seed(100 + rank)
    tag_dir = save(5)
    after_save = torch.rand(3)  # the draw a resumed rank must reproduce
    at_save = _params(engine)
    _train(engine, range(5, 6), rank)
    one_more = _params(engine)
    torch.distributed.barrier()

    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000003", "step-00000005"]
    assert (root / POINTER_FILE).read_text().strip() == "step-00000005"
    assert not (root / "latest").exists()
    record = json.loads((tag_dir / COMMIT_FILE).read_text())
    assert (record["world_size"], record["zero_stage"], record["step"]) == (2, stage, 5)
    assert {"rank-00000.pt", "rank-00001.pt", "shared-extra.pt"} <= set(record["files"])
    assert any(f.endswith("optim_states.pt") for f in record["files"])
    assert mgr.latest() == tag_dir

    resumed = _engine(stage)
    client, rank_states, shared = mgr.load(resumed, mgr.latest())
    assert client == {"step": 5}
    assert [s["rank"] for s in rank_states] == [0, 1]
    assert rank_states[rank]["data"] == {"pos": 20}
    assert torch.equal(shared["extra"]["w"], torch.arange(6.0) * 5)
    set_rng_state(rank_states[rank]["rng"])
    assert torch.equal(torch.rand(3), after_save)
    _assert_params(resumed, at_save, "after load")
    _train(resumed, range(5, 6), rank)  # the optimizer continues: same Adam moments and step
    _assert_params(resumed, one_more, "one step after load")

    weights_only = _engine(stage)  # under ZeRO-3 through the throw-away `latest` directory
    client, _, _ = mgr.load(weights_only, tag_dir, load_optimizer=False)
    assert client == {"step": 5}
    _assert_params(weights_only, at_save, "weights-only load")
    torch.distributed.barrier()  # rank 0 removes the throw-away directory after the load
    assert not list(root.glob(".ds-load-*")) and not (root / "latest").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_training_exactly(tmp_path, stage):
    _spawn(_resume_story, 2, tmp_path, stage)


def _crash_story(rank: int, world_size: int, root: Path) -> None:
    mgr = CheckpointManager(root, rank=rank, world_size=world_size, keep=2)
    engine = _engine(3)

    def save(step: int) -> Path:
        return mgr.save(engine, step, client_state={"step": step}, rank_state={"rank": rank})

    _train(engine, range(0, 2), rank)
    good = save(2)
    at_good = _params(engine)
    _train(engine, range(2, 3), rank)

    original = CheckpointManager._write_commit

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    CheckpointManager._write_commit = crash  # rank 0 dies after every shard is on disk
    try:
        save(3)
        raise AssertionError("save did not fail")
    except CheckpointError as e:
        assert ("simulated crash" in str(e)) == (rank == 0), e
    finally:
        CheckpointManager._write_commit = original
    broken = root / "step-00000003"
    assert (broken / "rank-00001.pt").is_file() and not (broken / COMMIT_FILE).exists()
    assert any(broken.glob("*optim_states.pt"))
    assert mgr.latest() == good
    torch.distributed.barrier()
    if rank == 0:
        (root / "latest").write_text(broken.name)  # DeepSpeed's pointer to the broken tag
    torch.distributed.barrier()
    assert mgr.latest() == good

    resumed = _engine(3)
    client, rank_states, _ = mgr.load(resumed, mgr.latest())
    assert client == {"step": 2} and [s["rank"] for s in rank_states] == [0, 1]
    _assert_params(resumed, at_good, "load after a crashed save")
    engine = resumed
    _train(engine, range(2, 3), rank)
    assert save(3) == broken and mgr.latest() == broken  # the leftover is replaced


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    _spawn(_crash_story, 2, tmp_path)


def _save_for_resharding(rank: int, world_size: int, root: Path) -> None:
    for stage in (2, 3):
        mgr = CheckpointManager(root / f"z{stage}", rank=rank, world_size=world_size)
        engine = _engine(stage)
        _train(engine, range(0, 3), rank)
        mgr.save(engine, 3, client_state={"step": 3}, rank_state={"rank": rank})
        at_save = _params(engine)
        _train(engine, range(3, 4), rank)
        if rank == 0:
            torch.save({"at_save": at_save, "one_more": _params(engine)}, root / f"ref{stage}.pt")
        else:
            _params(engine)  # the gather is collective


def _load_resharded(rank: int, world_size: int, root: Path) -> None:
    z2 = CheckpointManager(root / "z2", rank=rank, world_size=world_size)
    z3 = CheckpointManager(root / "z3", rank=rank, world_size=world_size)
    ref2, ref3 = (torch.load(root / f"ref{s}.pt") for s in (2, 3))

    # ZeRO-2 with optimizer state: through DeepSpeed's universal format.
    engine = _engine(2, grad_accum=2 if world_size == 1 else 1)
    client, rank_states, _ = z2.load(engine, z2.latest())
    assert client == {"step": 3} and [s["rank"] for s in rank_states] == [0, 1]
    assert (z2.latest() / "universal").is_dir() and z2.latest() == root / "z2" / "step-00000003"
    _assert_params(engine, ref2["at_save"], "ZeRO-2 universal load")
    if world_size == 1:  # the two saved ranks' batches as two micro-steps: the same update
        _train(engine, range(3, 4), 0)
        _train(engine, range(3, 4), 1)
        got = _params(engine)
        for a, b in zip(got, ref2["one_more"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not engine.load_universal_checkpoint()  # switched on for the load only

    # ZeRO-2 weights only: DeepSpeed's own path.
    engine = _engine(2)
    z2.load(engine, z2.latest(), load_optimizer=False)
    _assert_params(engine, ref2["at_save"], "ZeRO-2 weights-only load")

    # ZeRO-3: the optimizer state is refused, the weights load.
    engine = _engine(3)
    try:
        z3.load(engine, z3.latest())
        raise AssertionError("ZeRO-3 resharded optimizer load did not fail")
    except CheckpointError as e:
        assert f"saved at world size 2, ZeRO-3; now world size {world_size}" in str(e), e
    client, _, _ = z3.load(engine, z3.latest(), load_optimizer=False)
    assert client == {"step": 3}
    _assert_params(engine, ref3["at_save"], "ZeRO-3 weights-only load")


@pytest.mark.slow
def test_world_size_change(tmp_path):
    _spawn(_save_for_resharding, 2, tmp_path)
    _spawn(_load_resharded, 1, tmp_path)
    _spawn(_load_resharded, 3, tmp_path)
