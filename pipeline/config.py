"""Recipes: YAML loading with `base:` inheritance, dotted overrides, strict typing, dumping.

A recipe is a YAML file whose top-level sections mirror the dataclasses of `pipeline.config_schema`
(re-exported here). This module holds

- a small strict converter from plain YAML data to those dataclasses: no silent coercion (an int is
  accepted where a float is expected, nothing else), unknown keys fail with a did-you-mean;
- loading: `base:` chains (dicts deep-merge, lists and scalars replace) and `key.sub=value`
  overrides, remembering which file (or the command line) set every key so errors say where to fix;
- the dump of a resolved recipe, which loads back to an equal `Recipe`, and its content hash.

It imports nothing else from `pipeline` but the schema: config sits at the bottom of the imports.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import os
import re
import types
import typing
from collections.abc import Hashable, Sequence
from dataclasses import MISSING
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config_schema import (
    BACKBONE_NAMES,
    HIERARCHICAL_MASK_STRIDE,
    STAGES,
    BucketsConfig,
    CheckpointConfig,
    ColorConfig,
    CropsConfig,
    DataConfig,
    DeepSpeedConfig,
    DinoConfig,
    EvalConfig,
    FinetuneConfig,
    KnnConfig,
    LaunchConfig,
    LinearConfig,
    LogConfig,
    MaeConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    RecipeError,
    RunConfig,
    TrainConfig,
    TrainShards,
    ValShards,
    _check,
    input_stride,
    is_hierarchical,
)
from pipeline.fileio import write_atomic

__all__ = [
    "BACKBONE_NAMES",
    "HIERARCHICAL_MASK_STRIDE",
    "RESUMABLE_KEYS",
    "STAGES",
    "BucketsConfig",
    "CheckpointConfig",
    "ColorConfig",
    "CropsConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "DinoConfig",
    "EvalConfig",
    "FinetuneConfig",
    "KnnConfig",
    "LaunchConfig",
    "LinearConfig",
    "LogConfig",
    "MaeConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "RunConfig",
    "TrainConfig",
    "TrainShards",
    "ValShards",
    "apply_overrides",
    "dump_recipe",
    "input_stride",
    "is_hierarchical",
    "key_source",
    "load_recipe",
    "recipe_changes",
    "recipe_from_dict",
    "recipe_hash",
    "save_recipe",
    "to_dict",
    "unsafe_changes",
]

# ---------------------------------------------------------------------------------------------
# Strict conversion of plain data to the schema.

_CLI = "<command line>"
Sources = dict[tuple[Any, ...], str]  # key path -> recipe file (or _CLI) that set it


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _where(sources: Sources, path: tuple[Any, ...]) -> str:
    """' in FILE' / ' on the command line' for the nearest key on `path` with a known source."""
    for i in range(len(path), -1, -1):
        source = sources.get(path[:i])
        if source is not None:
            return " on the command line" if source == _CLI else f" in {source}"
    return ""


def _show(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list or (origin is tuple and args[-1] is Ellipsis):
        return f"a list of {_type_name(args[0])}"
    if origin is tuple:
        return "a list [" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"a mapping of str to {_type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (a recipe section)"
    return tp.__name__


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@cache
def _schema_paths(cls: type = Recipe, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key the schema knows, sections included (for did-you-mean)."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        path, tp = prefix + f.name, _hints(cls)[f.name]
        out.append(path)
        if dataclasses.is_dataclass(tp):
            out.extend(_schema_paths(tp, path + "."))
    return tuple(out)


def _unknown_key(path: tuple[Any, ...], cls: type, sources: Sources) -> RecipeError:
    key, prefix = str(path[-1]), _dotted(path[:-1])
    names = [f.name for f in dataclasses.fields(cls)]
    everywhere = _schema_paths()

    # A near-certain typo here, else a known key in the wrong section (`optim.epochs` ->
    # `train.epochs`), else a weaker typo here, else anything alike.
    def here(cutoff: float) -> list[str]:
        close = difflib.get_close_matches(key, names, n=1, cutoff=cutoff)
        return [f"{prefix}.{c}" if prefix else c for c in close]

    guesses = here(0.8) or [p for p in everywhere if p.rsplit(".", 1)[-1] == key] or here(0.6)
    guesses = guesses or difflib.get_close_matches(_dotted(path), everywhere, n=1)
    hint = f"did you mean `{guesses[0]}`?" if guesses else f"valid keys here: {', '.join(names)}."
    return RecipeError(f"unknown key `{_dotted(path)}`{_where(sources, path)}; {hint}")


def _convert(value: Any, tp: Any, path: tuple[Any, ...], sources: Sources) -> Any:
    """`value` as type `tp`, or a RecipeError naming the key, the value, the type and the file."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(extra: str = "") -> RecipeError:
        where = _where(sources, path)
        expected = f"expected {_type_name(tp)}, got {_show(value)}"
        end = "" if extra.endswith("?") else "."
        return RecipeError(f"{_dotted(path)}: {expected}{where}{extra}{end}")

    if dataclasses.is_dataclass(tp):
        return _to_dataclass({} if value is None else value, tp, path, sources)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        raise fail(f"; did you mean {close[0]!r}?" if close else "")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # X | None: let X's precise error through
            return _convert(value, members[0], path, sources)
        for member in members:
            try:
                return _convert(value, member, path, sources)
            except RecipeError:
                pass
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is list or args[-1] is Ellipsis:
            return origin(_convert(v, args[0], (*path, i), sources) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f" (length {len(value)}, not {len(args)})")
        return tuple(
            _convert(v, t, (*path, i), sources)
            for i, (v, t) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise fail()
        return {k: _convert(v, args[1], (*path, k), sources) for k, v in value.items()}
    if tp is float and type(value) in (int, float):  # YAML writes 1 for 1.0; bool is not a number
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp in (int, float, str, bool):
        raise fail()
    raise TypeError(f"schema type {tp!r} at {_dotted(path)} is not supported by the converter")


def _to_dataclass(value: Any, cls: type, path: tuple[Any, ...], sources: Sources) -> Any:
    if not isinstance(value, dict):
        where = _where(sources, path)
        raise RecipeError(
            f"{_dotted(path)}: expected a mapping (a recipe section), got {_show(value)}{where}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            raise _unknown_key((*path, key), cls, sources)
    kwargs = {}
    for name, f in fields.items():
        tp, key_path = _hints(cls)[name], (*path, name)
        if name in value or dataclasses.is_dataclass(tp):  # absent sections still check their keys
            kwargs[name] = _convert(value.get(name), tp, key_path, sources)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RecipeError(
                f"`{_dotted(key_path)}` is required but not set{_where(sources, key_path)}."
            )
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML reading, `base:` chains and overrides.


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-4` as a float (YAML 1.2) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes lists of scalars on one line and quotes strings like '3e-4'."""

    def represent_list(self, data: list) -> yaml.Node:
        flow = all(not isinstance(v, (list, dict)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)
# PyYAML follows YAML 1.1, where a float needs a dot (`3e-4` is a string); read it as YAML 1.2.
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{origin} is not valid YAML{at}: {problem}.") from None


def _record(data: dict, source: str, sources: Sources, prefix: tuple[Any, ...] = ()) -> None:
    """Remember `source` as the origin of every key in `data`."""
    sources[prefix] = source
    for key, value in data.items():
        _set_source(sources, (*prefix, key), source, replaces=not isinstance(value, dict))
        if isinstance(value, dict):
            _record(value, source, sources, (*prefix, key))


def _set_source(sources: Sources, path: tuple[Any, ...], source: str, replaces: bool) -> None:
    """Record `source` for `path`; a value that replaces a whole subtree drops its keys' sources."""
    if replaces:
        for stale in [p for p in sources if p[: len(path)] == path and len(p) > len(path)]:
            del sources[stale]
    sources[path] = source


def _merge(base: dict, over: dict) -> dict:
    """Deep merge: dicts merge key by key, lists and scalars from `over` replace."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else copy.deepcopy(value)
    return out


def _load_chain(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, Sources]:
    """The recipe at `path` merged over its `base:` chain, and where each key came from."""
    shown = os.path.normpath(path)
    if path.resolve() in [p.resolve() for p in chain]:
        cycle = " -> ".join(os.path.normpath(p) for p in (*chain, path))
        raise RecipeError(f"recipe bases form a cycle: {cycle}.")
    data = _parse_yaml(path.read_text(), shown)
    data = {} if data is None else data
    _check(isinstance(data, dict), f"{shown} must hold a mapping of sections, not {_show(data)}.")
    merged, sources = {}, {}
    base = data.pop("base", None)
    if base is not None:
        _check(isinstance(base, str), f"base: in {shown} must be a file path, not {_show(base)}.")
        base_path = path.parent / base
        _check(
            base_path.is_file(),
            f"{shown} names base {base!r}, but {os.path.normpath(base_path)} does not exist.",
        )
        merged, sources = _load_chain(base_path, (*chain, path))
    _record(data, shown, sources)
    return _merge(merged, data), sources


def _set_overrides(data: dict, overrides: Sequence[str], sources: Sources) -> dict:
    """Apply `key.sub=value` strings to plain recipe data; values are parsed as YAML."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        _check(
            bool(sep) and all(parts),
            f"override {item!r} is not of the form key.sub=value (e.g. optim.lr=3e-4).",
        )
        value = _parse_yaml(text, f"the value of override {item!r}")
        node = data
        for i, part in enumerate(parts[:-1]):
            prefix = tuple(parts[: i + 1])
            sources.setdefault(prefix, _CLI)
            if node.get(part) is None:
                node[part] = {}
            _check(
                isinstance(node[part], dict),
                f"override {item!r} cannot set a key under `{'.'.join(prefix)}`, "
                f"which holds the value {_show(node[part])}, not a section.",
            )
            node = node[part]
        node[parts[-1]] = value
        _set_source(sources, tuple(parts), _CLI, replaces=True)
    return data


def _build(data: dict, sources: Sources) -> Recipe:
    return _convert(_migrate(data), Recipe, (), sources)


def _migrate(data: dict) -> dict:
    """Keys of older run directories' config.yaml, in today's terms: `eval.random_baseline`
    (false dropped random_init from what is now `eval.baselines`)."""
    ev = data.get("eval")
    if isinstance(ev, dict) and "random_baseline" in ev:
        keep = ev.pop("random_baseline")
        baselines = ev.get("baselines", ["random_init", "pixels"])
        others = [b for b in baselines if b != "random_init"]
        ev["baselines"] = ["random_init", *others] if keep else others
    return data


# ---------------------------------------------------------------------------------------------
# Public API.


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    """Validate plain recipe data (no `base:`); errors name `source` as the file."""
    _check(isinstance(data, dict), f"{source} must hold a mapping of sections.")
    _check("base" not in data, f"base: in {source} is only resolved by load_recipe(path).")
    sources: Sources = {}
    _record(data, source, sources)
    return _build(copy.deepcopy(data), sources)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file with its `base:` chain, apply `key.sub=value` overrides, validate."""
    path = Path(path)
    _check(path.is_file(), f"recipe file {os.path.normpath(path)} does not exist.")
    data, sources = _load_chain(path)
    return _build(_set_overrides(data, overrides, sources), sources)


def apply_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """A new, validated recipe with `key.sub=value` overrides applied (the input is unchanged)."""
    sources: Sources = {}
    data = to_dict(recipe)
    _record(data, "the resolved recipe", sources)
    return _build(_set_overrides(data, overrides, sources), sources)


def to_dict(recipe: Any) -> Any:
    """Plain YAML/JSON data: sections become dicts, tuples become lists."""
    if dataclasses.is_dataclass(recipe):
        return {f.name: to_dict(getattr(recipe, f.name)) for f in dataclasses.fields(recipe)}
    if isinstance(recipe, (list, tuple)):
        return [to_dict(v) for v in recipe]
    if isinstance(recipe, dict):
        return {k: to_dict(v) for k, v in recipe.items()}
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (no `base:`); `load_recipe` reads it back to an equal Recipe."""
    body = yaml.dump(to_dict(recipe), Dumper=_Dumper, sort_keys=False, width=100)
    return "# Resolved recipe: every base and override applied.\n" + body


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write `dump_recipe(recipe)` to `path` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dump_recipe(recipe))


def recipe_hash(recipe: Recipe, exclude: Sequence[str] = ("launch",)) -> str:
    """sha256 of the canonical dump, without the `exclude` sections.

    `launch` is left out by default: a run may resume on a different allocation (node count,
    partition), which changes where it runs, not what it computes."""
    data = {k: v for k, v in to_dict(recipe).items() if k not in exclude}
    return hashlib.sha256(yaml.dump(data, Dumper=_Dumper, sort_keys=True).encode()).hexdigest()


# Keys a run directory accepts changed between launches: where the run goes (run.dir/run.name of
# a moved directory), where and how it runs (launch), which stages run and what they evaluate
# (stages, eval, data.val), how it logs and checkpoints, how long it trains, and a few knobs
# that change speed or failure handling but not the numbers (data.workers: the stream re-lays
# out what is left of the epoch; model.grad_checkpointing: recomputes the same activations). Any
# other change (model, method, optimizer, precision, training data, seed) would resume a
# checkpoint under a different recipe, and is refused.
RESUMABLE_KEYS: tuple[str, ...] = (
    "run.dir",
    "run.name",
    "launch",
    "stages",
    "eval",
    "log",
    "checkpoint",
    "train.epochs",
    "train.steps",
    # How long the wsd cool-down is, like how long the run is: a run held at its peak (wsd) is
    # extended and annealed by resuming it with a longer train.epochs and a decay_fraction whose
    # cool-down starts after the resumed step (optim.schedule itself stays).
    "optim.decay_fraction",
    # Per-rank batch and accumulation may change with the world size as long as their product
    # with it, the global batch, stays: tools/launch.py adjusts grad_accum to keep it, and the
    # trainer refuses a resume at another global batch.
    "train.batch_size",
    "train.grad_accum",
    "train.nan_policy",
    "data.val",
    "data.workers",
    "data.max_bad_fraction",
    "model.grad_checkpointing",
)


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every scalar or list in nested dicts."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every key whose value differs."""
    a, b = _leaves(to_dict(old)), _leaves(to_dict(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def unsafe_changes(
    old: Recipe, new: Recipe, safe: Sequence[str] = RESUMABLE_KEYS
) -> dict[str, tuple[Any, Any]]:
    """The changes of `recipe_changes` that a run directory must refuse (outside `safe`)."""
    return {
        key: change
        for key, change in recipe_changes(old, new).items()
        if not any(key == s or key.startswith(s + ".") for s in safe)
    }


def key_source(path: str | Path, key: str, overrides: Sequence[str] = ()) -> str | None:
    """Where the value of dotted `key` comes from: the recipe file of `path`'s `base:` chain
    that sets it last, `<command line>` for an override, or None for the schema's default."""
    data, sources = _load_chain(Path(path))
    _set_overrides(data, overrides, sources)
    return sources.get(tuple(key.split(".")))
