"""tools/bench_loader.py --on-device end to end: real JPEG shards, spawned workers, the CPU side
(decode + boxes) against decode only, the device side cutting the views, bytes moved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_loader_on_device_reports_cpu_side_device_side_and_bytes(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "on_device.json"
    bench = [sys.executable, str(ROOT / "tools" / "bench_loader.py")]
    made = subprocess.run([*bench, "--make-photos", str(photos), "--count", "4"], cwd=ROOT)
    assert made.returncode == 0
    run = subprocess.run(
        [*bench, str(photos), "--mode", "dino", "--on-device", "--workers", "1", "--rounds", "1",
         "--chunk", "2", "--batch", "2", "--device-iters", "1", "--phases", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "CPU side (dino on device: decode+boxes)" in run.stdout
    assert "ratio CPU side / decode" in run.stdout and "device crops + colour" in run.stdout
    r = json.loads(out.read_text())
    assert r["on_device"] is True
    for key in ("decode_per_core", "transform_per_core", "ratio_cpu", "device_aug_per_s"):
        assert r[key] > 0, key
    # Every 500x375 photo ships whole (no draft: the local boxes do not allow it), as RGBX.
    assert r["pixel_bytes_per_image"] == 500 * 375 * 4
    assert r["bytes_per_image"] >= r["pixel_bytes_per_image"]
    assert r["cpu_views_bytes_per_image"] == 2 * 224 * 224 * 4 + 10 * 96 * 96 * 4
    assert r["views"] == [[4, 224, 224]] * 2 + [[4, 96, 96]] * 10
    assert set(r["phases_us"]) >= {"decode only", "batch copy", "transform"}
