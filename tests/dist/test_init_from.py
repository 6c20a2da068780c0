"""Continuing from an export: the whole method (student with its heads or decoder, DINO's teacher
and centre) exported from a ZeRO-3 run on 2 ranks starts a new run on 1 rank (`model.init_from`)
whose first step sees exactly the networks the first run ended with.

The runs are real `pretrain` calls in spawned gloo processes. The test's windows on them: the
student engine (wrapping `deepspeed.initialize`), the teacher (wrapping `build_teacher`), and, in
the new run, the moment before its first step (wrapping `train_step`). At both points every rank
computes the networks' outputs on one fixed batch (collectives under ZeRO-3) and rank 0 saves them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.config import load_recipe
from pipeline.eval.export import export_method, read_exported_config
from pipeline.train.distributed import finish_and_exit, free_port, rank_environ
from pipeline.train.weights import WeightsError, init_method, method_weights

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "debug"
RECIPE = {"dino": "dino_tiny.yaml", "mae": "mae_tiny.yaml"}


def fixed_outputs(method: str, student, teacher) -> dict[str, torch.Tensor]:
    """The networks' outputs on one fixed batch (eval mode, no grad)."""
    g = torch.Generator().manual_seed(7)
    student.eval()
    with torch.no_grad():
        if method == "mae":
            images = torch.randn(3, 3, 32, 32, generator=g)
            out = student(images, torch.Generator().manual_seed(3))
            return {"loss": out["loss"].detach(), "pred": out["pred"].detach()}
        views = [torch.randn(3, 3, 32, 32, generator=g) for _ in range(2)]
        views += [torch.randn(3, 3, 16, 16, generator=g) for _ in range(2)]
        outs = {f"student{i}": t.detach() for i, t in enumerate(student.embed(views))}
        outs.update({f"teacher{i}": t.detach() for i, t in enumerate(teacher.forward(views[:2]))})
        outs["center"] = student.criterion.center.detach().clone()
        return outs


def _worker(rank: int, world_size: int, port: int, method: str, overrides: list, out: str) -> None:
    os.environ.update(rank_environ(rank, world_size, port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed

    import pipeline.train.engine as engine_mod
    import pipeline.train.objectives as objectives_mod
    from pipeline.train.distributed import DistEnv

    engines, teachers = [], []
    initialize, build_teacher, train_step = (
        deepspeed.initialize,
        objectives_mod.build_teacher,
        engine_mod.train_step,
    )

    def capture_engine(*args, **kwargs):
        result = initialize(*args, **kwargs)
        engines.append(result[0])
        return result

    def capture_teacher(*args, **kwargs):
        teachers.append(build_teacher(*args, **kwargs))
        return teachers[-1]

    def first_step(engine, batch, values, ctx):
        if not (Path(out) / "start.pt").exists() and values["step"] == 0:
            outs = fixed_outputs(method, engine.module, getattr(ctx.objective, "teacher", None))
            engine.module.train()
            if rank == 0:
                torch.save(outs, Path(out) / "start.pt")
        return train_step(engine, batch, values, ctx)

    deepspeed.initialize = capture_engine
    objectives_mod.build_teacher = capture_teacher
    engine_mod.train_step = first_step
    recipe = load_recipe(RECIPES / RECIPE[method], overrides)
    run_dir = Path(out) / "run"
    engine_mod.pretrain(recipe, DistEnv(rank, rank, world_size), run_dir, progress=False)
    outs = fixed_outputs(method, engines[0].module, teachers[0] if teachers else None)
    if rank == 0:
        torch.save(outs, Path(out) / "end.pt")
    finish_and_exit()


def run(world_size: int, method: str, overrides: list, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, free_port(), method, overrides, str(out)),
             nprocs=world_size, join=True)  # fmt: skip


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_whole_method_export_continues_exactly(tmp_path, image_shards, method):
    shards = image_shards(classes=2, shard_size=8)
    common = [f"data.train.shards={shards}", "data.workers=0", "train.batch_size=4",
              "log.tensorboard=false", "checkpoint.every_steps=3"]  # fmt: skip
    first = tmp_path / "first"
    run(2, method, [*common, "deepspeed.zero_stage=3", "train.steps=3"], first)

    export = tmp_path / "method.safetensors"
    export_method(first / "run", export)
    config = read_exported_config(export)
    assert config["contents"] == "method" and config["zero_stage"] == 3
    assert config["world_size"] == 2 and config["step"] == 3

    second = tmp_path / "second"
    run(1, method, [*common, "deepspeed.zero_stage=0", "train.steps=1",
                    f"model.init_from={export}"], second)  # fmt: skip
    end, start = torch.load(first / "end.pt"), torch.load(second / "start.pt")
    assert set(end) == set(start)
    for key in end:
        torch.testing.assert_close(start[key], end[key], rtol=1e-5, atol=1e-6, msg=key)
    if method == "dino":  # the centre has moved away from its zero start: a real check
        assert end["center"].abs().sum() > 0


def test_init_from_names_every_missing_and_unexpected_key(tmp_path):
    from pipeline.train.engine import build_method

    dino = load_recipe(RECIPES / "dino_tiny.yaml")
    mae = load_recipe(RECIPES / "mae_tiny.yaml")
    student, _ = build_method(mae)
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    dino_student, dino_teacher = build_method(dino)
    with pytest.raises(WeightsError) as info:
        init_method(dino_student, dino_teacher, state, ignore=[], source="mae.safetensors")
    message = str(info.value)
    assert "missing: student.head." in message and "unexpected: student.decoder." in message

    # Ignoring the decoder and the head: the backbone loads, the teacher copies the student.
    init_method(dino_student, dino_teacher, state, source="mae.safetensors",
                ignore=["student.decoder.*", "student.head.*", "student.criterion.*"])  # fmt: skip
    torch.testing.assert_close(
        dino_student.backbone.state_dict(), student.backbone.state_dict(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        dino_teacher.backbone.state_dict(), student.backbone.state_dict(), rtol=0, atol=0
    )

    bad = dict(state)
    bad["student.backbone.pos_embed"] = torch.zeros(1, 3, 5)
    with pytest.raises(WeightsError, match=r"shape differs.*student\.backbone\.pos_embed"):
        init_method(student, None, bad, ignore=[], source="x")


def test_init_from_a_backbone_export_fills_the_student_backbone(tmp_path):
    from safetensors.torch import save_file

    from pipeline.train.engine import build_method

    recipe = load_recipe(RECIPES / "dino_tiny.yaml")
    source, _ = build_method(recipe)
    weights = tmp_path / "bb.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(weights))
    (tmp_path / "bb.json").write_text('{"contents": "backbone"}')
    state = method_weights(weights)
    assert all(k.startswith("student.backbone.") for k in state)
    torch.manual_seed(1)
    student, teacher = build_method(recipe)
    with pytest.raises(WeightsError, match=r"missing: student\.head"):
        init_method(student, teacher, state, ignore=[], source=str(weights))
    init_method(student, teacher, state, ignore=["student.head.*", "student.criterion.*"],
                source=str(weights))  # fmt: skip
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(student.backbone.state_dict()[key], value), key
        assert torch.equal(teacher.backbone.state_dict()[key], value), key
