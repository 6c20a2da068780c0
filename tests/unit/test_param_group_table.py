"""The start-up parameter-group table: counts in the log, the full name lists in a file."""

from __future__ import annotations

from pathlib import Path

from pipeline.models import build_backbone
from pipeline.train.engine import param_group_table, param_groups


def test_table_counts_and_names_file(tmp_path: Path) -> None:
    vit = build_backbone("vit_tiny_patch8", embed_dim=32, depth=2, num_heads=2)
    groups = param_groups(vit, 0.05)
    table = param_group_table(groups, tmp_path / "param_groups.txt")
    lines = table.splitlines()
    assert all(len(line) < 100 for line in lines[:-1]), table  # no line of dozens of names
    assert "no weight decay on:" in table and "bias x" in table and "pos_embed" in table
    names = (tmp_path / "param_groups.txt").read_text().splitlines()
    total = sum(len(g["names"]) for g in groups)
    assert len(names) == total + len(groups)  # a header per group, then one name per line
    assert "blocks.0.attn.qkv.weight" in names
    assert "names of every group" not in param_group_table(groups)  # no file: not mentioned
