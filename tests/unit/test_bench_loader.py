"""tools/bench_loader.py end to end: real JPEG shards, spawned workers, printed + JSON figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_loader.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_loader_prints_and_writes_the_figures(tmp_path):
    photos = tmp_path / "photos"
    made = _bench("--make-photos", photos, "--count", "6")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in photos.iterdir()) == ["shard-000000.tar"]

    out = tmp_path / "dino.json"
    run = _bench(
        photos, "--mode", "dino", "--workers", "1", "--rounds", "1", "--chunk", "3",
        "--repeat", "2", "--batch", "2", "--device-iters", "1", "--phases", "--json", out,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "images/s per core" in run.stdout and "ratio views / decode" in run.stdout
    r = json.loads(out.read_text())
    assert r["images"] == 6 and r["mean_size_wh"] == [500.0, 375.0]
    assert r["images_timed"] == 6 * 2  # one round over 6 images, twice
    for key in ("decode_per_core", "transform_per_core", "ratio", "ratio_cpu", "device_aug_per_s"):
        assert r[key] > 0, key
    # Multicrop decodes too, then cuts 12 views: it cannot be faster than decoding alone.
    assert r["ratio_cpu"] < 1
    assert len(r["ratio_cpu_per_repeat"]) == 2
    assert {k: len(v) for k, v in r["cpu_us_per_process"].items()} == {"decode": 2, "transform": 2}
    assert r["views"] == [[4, 224, 224]] * 2 + [[4, 96, 96]] * 10
    assert set(r["phases_us"]) >= {"decode only", "crop + resize", "transform"}


def test_bench_loader_decode_mode_and_missing_shards(tmp_path):
    photos = tmp_path / "photos"
    assert _bench("--make-photos", photos, "--count", "2").returncode == 0
    run = _bench(photos, "--mode", "decode", "--workers", "2", "--rounds", "1", "--chunk", "1")
    assert run.returncode == 0, run.stderr
    assert "decode only" in run.stdout and "CPU views" not in run.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = _bench(empty, "--mode", "decode")
    assert missing.returncode != 0 and f"no .tar shards in {empty}" in missing.stderr
