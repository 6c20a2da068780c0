"""The fine-tune keeps its global batch at another world size, or says what to set."""

from __future__ import annotations

import json

import pytest

from pipeline.eval.finetune import kept_grad_accum


def committed(root, global_batch: int) -> None:
    tag = root / "step-00000006"
    tag.mkdir(parents=True)
    record = {"tag": tag.name, "step": 6, "world_size": 2, "zero_stage": 2, "files": {},
              "progress": {"global_batch": global_batch}}  # fmt: skip
    (tag / "commit.json").write_text(json.dumps(record))
    (root / "committed").write_text(tag.name + "\n")


def test_accumulation_makes_up_the_saved_global_batch(tmp_path):
    assert kept_grad_accum(tmp_path, 16, 1) == 1  # nothing committed yet
    committed(tmp_path, 32)
    assert kept_grad_accum(tmp_path, 16, 2) == 1
    assert kept_grad_accum(tmp_path, 16, 1) == 2
    assert kept_grad_accum(tmp_path, 4, 2) == 4


def test_a_batch_accumulation_cannot_make_up_is_refused_with_what_to_set(tmp_path):
    committed(tmp_path, 32)
    with pytest.raises(ValueError, match=r"eval.finetune.batch_size=12 on 1 ranks .* divides 32"):
        kept_grad_accum(tmp_path, 12, 1)
