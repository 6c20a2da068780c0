"""Recipe loading: inheritance, overrides, strict typing, error messages, cross-field rules and the
YAML round trip of every shipped recipe."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    BACKBONE_NAMES,
    Recipe,
    RecipeError,
    apply_overrides,
    dump_recipe,
    input_stride,
    load_recipe,
    recipe_from_dict,
    recipe_hash,
    save_recipe,
    to_dict,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(p for p in RECIPES.rglob("*.yaml") if "_base" not in p.parts)

MINIMAL = """
run: {name: test}
data: {train: {shards: data/train}}
model: {backbone: vit_base_patch16}
method: {name: dino}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def minimal(tmp_path: Path, extra: str = "", name: str = "r.yaml") -> Path:
    """A recipe `name` that adds `extra` over the minimal valid recipe (its base)."""
    write(tmp_path, "minimal.yaml", MINIMAL)
    return write(tmp_path, name, "base: minimal.yaml\n" + textwrap.dedent(extra))


def error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# --- inheritance ----------------------------------------------------------------------------


def test_minimal_recipe_is_valid_with_defaults(tmp_path):
    recipe = load_recipe(minimal(tmp_path))
    assert recipe.run.dir == "runs" and recipe.train.epochs == 100 and recipe.stages == ["pretrain"]
    assert recipe.data.crops.global_scale == (0.32, 1.0)


def test_three_level_inheritance_deep_merges_dicts_and_replaces_lists(tmp_path):
    grand = """
        run: {name: test}
        data: {train: {shards: data/train}, val: {shards: data/val}}
        model: {backbone: vit_base_patch16}
        method: {name: dino}
        optim: {lr: 0.001, weight_decay: 0.1}
        eval: {knn: {k: [10, 20, 100], temperature: 0.05}}
        stages: [pretrain, knn, linear]
    """
    write(tmp_path, "base/grand.yaml", grand)
    write(tmp_path, "base/parent.yaml", "base: grand.yaml\noptim: {lr: 0.002}\nrun: {seed: 7}\n")
    child = write(
        tmp_path,
        "child.yaml",
        "base: base/parent.yaml\neval: {knn: {k: [5]}}\nstages: [pretrain]\nrun: {name: kid}\n",
    )
    recipe = load_recipe(child)
    assert recipe.optim.lr == 0.002 and recipe.optim.weight_decay == 0.1  # merged, not replaced
    assert recipe.run.name == "kid" and recipe.run.seed == 7
    assert recipe.eval.knn.k == [5] and recipe.eval.knn.temperature == 0.05  # list replaced
    assert recipe.stages == ["pretrain"]
    assert "base" not in yaml.safe_load(dump_recipe(recipe))


def test_base_cycle_names_the_files(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    message = error(b)
    assert "cycle" in message and "a.yaml" in message and "b.yaml" in message


def test_missing_base_names_the_referring_file(tmp_path):
    path = write(tmp_path, "sub/child.yaml", "base: ../nowhere.yaml\n")
    message = error(path)
    assert "child.yaml" in message and "nowhere.yaml" in message and "does not exist" in message


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL.replace("run: {name: test}", ""))
    message = error(path)
    assert "`run.name`" in message and "required" in message and "r.yaml" in message


def test_duplicate_yaml_key_fails(tmp_path):
    path = write(tmp_path, "r.yaml", MINIMAL + "optim: {lr: 0.1}\noptim: {lr: 0.2}\n")
    assert "duplicate key 'optim'" in error(path)


# --- overrides ------------------------------------------------------------------------------


def test_overrides_are_parsed_and_typed(tmp_path):
    recipe = load_recipe(
        minimal(tmp_path, "data: {val: {shards: v}}\n"),
        [
            "optim.lr=1",  # int where a float is expected
            "optim.min_lr=3e-7",  # YAML 1.2 float without a dot
            "stages=[pretrain,knn]",
            "run.name=foo",
            "model.overrides.depth=6",
            "data.crops.global_scale=[0.4,1.0]",
            "train.epochs=null",
            "train.steps=50",
        ],
    )
    assert recipe.optim.lr == 1.0 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.min_lr == 3e-7
    assert recipe.stages == ["pretrain", "knn"] and recipe.run.name == "foo"
    assert recipe.model.overrides == {"depth": 6}
    assert recipe.data.crops.global_scale == (0.4, 1.0)
    assert recipe.train.steps == 50 and recipe.train.epochs is None


def test_override_of_unknown_key_suggests_and_names_command_line(tmp_path):
    message = error(minimal(tmp_path), ("optim.lrr=0.1",))
    assert "`optim.lrr`" in message and "command line" in message and "`optim.lr`" in message
    message = error(minimal(tmp_path), ("optimm.lr=0.1",))
    assert "`optimm`" in message and "`optim`" in message and "command line" in message


def test_override_without_equals_fails(tmp_path):
    message = error(minimal(tmp_path), ("optim.lr",))
    assert "'optim.lr'" in message and "key.sub=value" in message


def test_override_replacing_a_section_is_blamed_for_its_missing_keys(tmp_path):
    message = error(minimal(tmp_path), ("data.train=null",))
    assert "`data.train.shards` is required" in message and "command line" in message


def test_override_below_a_value_fails(tmp_path):
    assert "optim.lr" in error(minimal(tmp_path), ("optim.lr.x=1",))


def test_override_with_wrong_type_names_command_line(tmp_path):
    message = error(minimal(tmp_path), ("optim.lr=abc",))
    assert message == "optim.lr: expected float, got 'abc' (str) on the command line."


def test_apply_overrides_to_a_recipe(tmp_path):
    recipe = load_recipe(minimal(tmp_path))
    changed = apply_overrides(recipe, ["launch.nodes=4"])
    assert changed.launch.nodes == 4 and recipe.launch.nodes == 1
    with pytest.raises(RecipeError, match=r"launch\.nodess"):
        apply_overrides(recipe, ["launch.nodess=4"])


# --- unknown keys and types -----------------------------------------------------------------


def test_unknown_key_in_file_names_path_file_and_suggestion(tmp_path):
    path = minimal(tmp_path, "optim: {lrr: 0.1}\n", name="x.yaml")
    message = error(path)
    assert (
        "`optim.lrr`" in message and "x.yaml" in message and "did you mean `optim.lr`?" in message
    )


def test_unknown_key_is_blamed_on_the_base_file_that_set_it(tmp_path):
    write(tmp_path, "parent.yaml", MINIMAL.replace("data: {", "data: {crops: {global_sise: 9}, "))
    child = write(tmp_path, "child.yaml", "base: parent.yaml\noptim: {lr: 0.1}\n")
    message = error(child)
    assert "parent.yaml" in message and "child.yaml" not in message
    assert "`data.crops.global_size`" in message


def test_unknown_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    message = error(minimal(tmp_path, "optim: {epochs: 10}\n"))
    assert "`optim.epochs`" in message and "`train.epochs`" in message
    message = error(minimal(tmp_path, "eval: {linear: {lr: 0.1}}\n"))  # a typo beats a move
    assert "`eval.linear.lrs`" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("optim: {lr: fast}", "optim.lr: expected float, got 'fast' (str) in "),
        ("train: {batch_size: 8.5}", "train.batch_size: expected int, got 8.5 (float)"),
        ("train: {batch_size: true}", "train.batch_size: expected int, got True (bool)"),
        ("optim: {lr: true}", "optim.lr: expected float, got True (bool)"),
        ("log: {tensorboard: 1}", "log.tensorboard: expected bool, got 1 (int)"),
        ("run: {name: 7}", "run.name: expected str, got 7 (int)"),
        ("optim: {betas: [0.9]}", "optim.betas: expected a list [float, float]"),
        ("eval: {knn: {k: [10, x]}}", "eval.knn.k[1]: expected int, got 'x' (str)"),
        ("method: {name: mea}", "did you mean 'mae'?"),
        ("stages: [pretrain, knnn]", "stages[1]: expected one of 'pretrain'"),
        ("data: {crops: 5}", "data.crops: expected a mapping"),
        ("model: {overrides: {depth: {a: 1}}}", "model.overrides.depth: expected bool or int"),
    ],
)
def test_wrong_type_names_key_value_type_and_file(tmp_path, extra, expected):
    message = error(minimal(tmp_path, extra + "\n", name="x.yaml"))
    assert expected in message and "x.yaml" in message


# --- cross-field rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["data.crops.global_size=225"],
            "data.crops.global_size=225 is not divisible by the input stride 16 of "
            "model.backbone=vit_base_patch16",
        ),
        (["data.eval_crop=200", "data.eval_resize=256"], "data.eval_crop=200"),
        (
            ["model.backbone=vit_small_patch14"],  # 224 fits 14, the 96-pixel local crop does not
            "data.crops.local_size=96 is not divisible by the input stride 14",
        ),
        (["train.steps=10"], "train.epochs=100 and train.steps=10"),
        (["train.epochs=null"], "exactly one of train.epochs"),
        (["model.backbone=vit_bsae_patch16"], "did you mean 'vit_base_patch16'?"),
        (
            ["method.name=mae", "model.backbone=swin_tiny", "data.crops.mae_size=208"],
            "data.crops.mae_size=208 is not divisible by 32",
        ),
        (
            ["method.name=mae", "model.backbone=twins_svt_small", "data.crops.mae_size=240"],
            "model.backbone=twins_svt_small",
        ),
        (["method.name=mae", "method.mae.mask_patch_size=24"], "method.mae.mask_patch_size=24"),
        (
            ["method.name=mae", "method.mae.mask_patch_size=32", "data.crops.mae_size=208"],
            "data.crops.mae_size=208 is not divisible by 32",
        ),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4 must be 0..3"),
        (["stages=[pretrain,pretrain]"], "lists pretrain more than once"),
        (["stages=[pretrain,knn]"], "needs data.val.shards"),
        (["checkpoint.every_steps=0"], "checkpoint.every_steps=0 must be >= 1"),
        (["log.every_steps=0"], "log.every_steps=0 must be >= 1"),
        (["optim.lr=0"], "optim.lr=0.0 must be positive"),
        (["optim.warmup_epochs=200"], "optim.warmup_epochs=200.0 exceeds train.epochs=100"),
        (["data.crops.global_scale=[0.5,0.2]"], "data.crops.global_scale=[0.5, 0.2]"),
        (
            ["model.backbone=swin_tiny", "data.buckets.navit=true"],
            "data.buckets.navit=true packs ViT token sequences; model.backbone=swin_tiny",
        ),
        (["data.buckets.navit=true", "data.buckets.max_side=500"], "data.buckets.max_side=500"),
        (
            ["method.name=mae", "data.buckets.navit=true", "method.mae.mask_patch_size=32"],
            "method.mae.mask_patch_size=32 with data.buckets.navit=true",
        ),
        (["optim.layer_decay=0.75"], "optim.layer_decay=0.75 does not apply to pretraining"),
    ],
)
def test_cross_field_rules_name_the_keys(tmp_path, overrides, expected):
    assert expected in error(minimal(tmp_path), tuple(overrides))


def test_mae_on_swin_with_multiples_of_32_is_valid(tmp_path):
    recipe = load_recipe(
        minimal(tmp_path),
        ["method.name=mae", "model.backbone=swin_tiny", "data.crops.mae_size=192"],
    )
    assert recipe.data.crops.mae_size == 192


def test_backbone_names_and_strides():
    assert len(BACKBONE_NAMES) == len(set(BACKBONE_NAMES)) == 23
    assert input_stride("vit_tiny_patch4") == 4
    assert input_stride("vit_large_patch14") == 14 and input_stride("vit_tiny_patch8") == 8
    assert input_stride("swin_base") == 4 and input_stride("twins_svt_large") == 4
    with pytest.raises(RecipeError, match="did you mean 'swin_tiny'"):
        input_stride("swin_tiyn")


# --- dump, round trip, hash -----------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_shipped_recipe_validates_and_round_trips(tmp_path, path):
    recipe = load_recipe(path)
    text = dump_recipe(recipe)
    assert "base" not in yaml.safe_load(text)
    dumped = tmp_path / "config.yaml"
    save_recipe(recipe, dumped)
    again = load_recipe(dumped)
    assert again == recipe
    assert isinstance(again.data.crops.global_scale, tuple) and isinstance(again.optim.betas, tuple)
    assert recipe_hash(again) == recipe_hash(recipe)
    assert dump_recipe(again) == text


def test_all_shipped_recipes_are_found():
    names = {str(p.relative_to(RECIPES)) for p in SHIPPED}
    assert {"dino_vits16.yaml", "mae_vitl16.yaml", "debug/dino_tiny.yaml"} <= names
    assert len(names) == 12 and {"quickstart.yaml", "dinov2_vits14.yaml"} <= names


def test_hash_tracks_content_but_not_placement(tmp_path):
    recipe = load_recipe(minimal(tmp_path))
    assert recipe_hash(apply_overrides(recipe, ["launch.nodes=8"])) == recipe_hash(recipe)
    assert recipe_hash(apply_overrides(recipe, ["optim.lr=0.1"])) != recipe_hash(recipe)
    assert len(recipe_hash(recipe)) == 64


def test_to_dict_is_plain_data_and_recipe_from_dict_inverts_it(tmp_path):
    recipe = load_recipe(minimal(tmp_path))
    data = to_dict(recipe)
    assert json.loads(json.dumps(data)) == data
    assert recipe_from_dict(data) == recipe
    with pytest.raises(RecipeError, match=r"unknown key `runn` in mine"):
        recipe_from_dict({**data, "runn": {}}, source="mine")


def test_every_schema_field_is_documented():
    seen = []

    def walk(cls: type) -> None:
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(Recipe)
    assert len(seen) >= 20  # every section was visited


def test_dump_is_yaml_with_flow_lists(tmp_path):
    text = dump_recipe(load_recipe(minimal(tmp_path)))
    assert "global_scale: [0.32, 1.0]" in text
    assert yaml.safe_load(text)["run"]["name"] == "test"


def test_nan_skip_with_accumulation_is_refused_naming_both_keys():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "debug" / "dino_tiny.yaml"
    with pytest.raises(RecipeError, match=r"train\.nan_policy=skip needs train\.grad_accum=1"):
        load_recipe(recipe, ["train.nan_policy=skip", "train.grad_accum=2"])
    assert load_recipe(recipe, ["train.nan_policy=skip"]).train.nan_policy == "skip"
