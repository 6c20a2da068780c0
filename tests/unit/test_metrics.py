"""metrics.jsonl after a torn write: the resume drops the broken record, warns, and goes on."""

from __future__ import annotations

import json
import logging

from pipeline.train.metrics import MetricsWriter, SampleLog, truncate_metrics


def _lines(steps: range) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_torn_last_line_is_dropped_with_a_warning_and_the_resume_goes_on(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(range(1, 5)) + '{"step": 5, "lo')  # killed mid-write of step 5
    caplog.set_level(logging.WARNING)
    writer = MetricsWriter(
        tmp_path, enabled=True, total_steps=10, start_step=4, tensorboard=False, progress=False
    )
    writer.step(5, {"step": 5, "loss": 0.2})
    writer.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert "metrics.jsonl:5: dropping an unreadable record" in caplog.text


def test_a_record_glued_to_a_torn_one_is_dropped_and_later_steps_cut(tmp_path, caplog):
    # A torn step-3 line followed by an append: the two records share one line.
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(range(1, 3)) + '{"step": 3, "lo' + _lines(range(3, 7)))
    caplog.set_level(logging.WARNING)
    truncate_metrics(path, 5)
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 4, 5]
    assert "metrics.jsonl:3:" in caplog.text


def test_sample_log_survives_a_torn_line_too(tmp_path, caplog):
    path = tmp_path / "samples-rank00000.jsonl"
    path.write_text('{"step": 1, "ids": [1, 2]}\n{"step": 2, "ids": [3,')
    caplog.set_level(logging.WARNING)
    log = SampleLog(tmp_path, 0, enabled=True, start_step=1)
    log.write(2, [3, 4, -1])
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{"step": 1, "ids": [1, 2]}, {"step": 2, "ids": [3, 4]}]
    assert "dropping an unreadable record" in caplog.text
