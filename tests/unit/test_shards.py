"""Shard writing, manifest, verification and resume (`pipeline.data.shards`, `tools/make_shards.py`)
on small real images written to tmp_path, read back with tarfile, Pillow and webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import (
    ShardsError,
    load_manifest,
    read_source,
    verify_shards,
    write_shards,
)
from tools.make_shards import main

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "dog", "eel")
CORRUPT = {"cat/truncated.jpg", "dog/random.jpg", "eel/empty.jpg", "eel/text.png"}


def save_image(path: Path, rng: np.random.Generator, fmt: str, size: tuple[int, int] | None = None):
    """A small noisy image of one random colour, saved in `fmt`."""
    w, h = size or (int(rng.integers(32, 65)), int(rng.integers(32, 65)))
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)


def make_class_tree(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """Three class folders of JPEG/PNG/WebP, a BMP, a GIF, four corrupt files and a stray .txt."""
    rng = np.random.default_rng(seed)
    formats = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
    for c in CLASSES:
        for i in range(per_class):
            fmt, ext = formats[i % 3]
            save_image(root / c / f"{i:02d}.{ext}", rng, fmt)
    save_image(root / "cat" / "bitmap.bmp", rng, "BMP")
    save_image(root / "dog" / "anim.gif", rng, "GIF")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "dog" / "random.jpg").write_bytes(rng.bytes(500))
    (root / "eel" / "empty.jpg").write_bytes(b"")
    (root / "eel" / "text.png").write_text("not an image\n")
    (root / "eel" / "notes.txt").write_text("ignored: not an image extension\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_tree(tmp_path_factory.mktemp("src") / "tree")


@pytest.fixture(scope="module")
def written(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The class tree written once with small shards; tests must not modify it."""
    out = tmp_path_factory.mktemp("out") / "shards"
    write_shards(tree, out, shard_size=5, progress=False)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(out.glob("shard-*.tar"))}


def read_samples(where: Path) -> list[dict[str, bytes]]:
    """Every sample of one shard or of a folder's shards, in order: {"__key__": key, ext: data}."""
    paths = [where] if where.is_file() else sorted(where.glob("shard-*.tar"))
    samples: list[dict[str, bytes]] = []
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if not samples or samples[-1]["__key__"] != key.encode():
                    samples.append({"__key__": key.encode()})
                samples[-1][ext] = tar.extractfile(m).read()
    return samples


def member_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def image_ext(sample: dict[str, bytes]) -> str:
    (ext,) = [e for e in ("jpg", "png", "webp") if e in sample]
    return ext


# ---------------------------------------------------------------------------------------------


def test_class_tree_totals_rejected_and_verify(tree: Path, written: Path, capsys) -> None:
    manifest = json.loads((written / "manifest.json").read_text())
    inputs = len(read_source(tree).items)
    assert inputs == 3 * 8 + 2 + len(CORRUPT)  # the stray .txt is not an input
    assert manifest["inputs"] == inputs
    assert manifest["rejected"] == len(CORRUPT)
    assert manifest["total_samples"] + manifest["rejected"] == inputs
    assert manifest["total_samples"] == sum(s["samples"] for s in manifest["shards"])
    assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"])
    assert manifest["classes"] == list(CLASSES)
    for s in manifest["shards"]:
        assert (written / s["name"]).stat().st_size == s["bytes"]
        assert sha(written / s["name"]) == s["sha256"]

    lines = (written / "rejected.txt").read_text().splitlines()
    rejected = dict(line.split("\t") for line in lines)
    assert set(rejected) == CORRUPT
    assert all(reason.strip() for reason in rejected.values())
    assert "truncated" in rejected["cat/truncated.jpg"].lower()
    assert rejected["eel/empty.jpg"] == "empty file"

    loaded = load_manifest(written)
    assert loaded.classes == CLASSES and loaded.total_samples == manifest["total_samples"]
    assert Path(loaded.path(loaded.shards[0])) == (written / "shard-000000.tar").absolute()
    assert load_manifest(written / "manifest.json") == loaded

    assert verify_shards(written) == []
    assert main(["--verify", str(written)]) == 0
    n = len(manifest["shards"])
    assert f"OK: {n} shards, {manifest['total_samples']} samples" in capsys.readouterr().out


def test_verify_names_a_tampered_shard(written: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "copy"
    out.mkdir()
    for p in written.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    target = out / "shard-000002.tar"
    data = bytearray(target.read_bytes())
    data[700] ^= 0xFF  # inside the first image's payload
    target.write_bytes(bytes(data))
    problems = verify_shards(out)
    assert problems and all("shard-000002.tar" in p for p in problems)
    assert main(["--verify", str(out)]) == 1
    assert "shard-000002.tar: sha256 differs" in capsys.readouterr().out

    (out / "shard-000001.tar").unlink()
    assert any("shard-000001.tar: missing" in p for p in verify_shards(out))
    assert "no shard manifest" in verify_shards(tmp_path / "nowhere")[0]


# make_shards with the writer held half-way through its third shard (after touching a marker
# file), so the test can kill it there for real.
_HELD_AT_THIRD_SHARD = """
import sys, time
from pathlib import Path
import pipeline.data.shards as shards
from tools.make_shards import main

write = shards._write_shard

def held(out, index, shard, images):
    def images_then_hold():
        for i, image in enumerate(images):
            if index == 2 and i == len(shard) // 2:
                Path(sys.argv[1]).touch()
                time.sleep(600)
            yield image
    return write(out, index, shard, images_then_hold())

shards._write_shard = held
sys.exit(main(sys.argv[2:]))
"""


def test_interrupted_run_resumes_byte_identical(tree: Path, written: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    marker = tmp_path / "third-shard-half-written"
    cmd = [sys.executable, "-c", _HELD_AT_THIRD_SHARD, str(marker), str(tree), str(out),
           "--shard-size", "5"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "make_shards never reached its third shard"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a real kill, mid-shard
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert (out / "shard-000002.tar.tmp").exists()
    assert not (out / "manifest.json").exists()

    with pytest.raises(ShardsError, match="unfinished run with other arguments"):
        write_shards(tree, out, shard_size=5, seed=1, progress=False)
    # A complete shard that no longer matches its sidecar is redone, not kept.
    damaged = out / "shard-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x01")
    summary = write_shards(tree, out, shard_size=5, progress=False)
    assert summary.reused == 1
    assert not list(out.glob("*.tmp"))
    assert shard_hashes(out) == shard_hashes(written)
    assert sha(out / "manifest.json") == sha(written / "manifest.json")
    assert verify_shards(out) == []


def test_rerun_same_args_is_up_to_date(tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main([str(tree), str(out), "--shard-size", "5", "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert re.fullmatch(r"written 26, rejected 4, shards 6, bytes \d+, \d+ images/s\n", first), (
        first
    )
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([str(tree), str(out), "--shard-size", "5", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # Other arguments into the same folder: a clear error, unless --force.
    assert main([str(tree), str(out), "--shard-size", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "shard_size=7 here, 5 there" in err and "--force" in err
    assert main([str(tree), str(out), "--shard-size", "7", "--force", "--no-progress"]) == 0
    assert len(list(out.glob("shard-*.tar"))) == 4
    assert not (out / "shard-000004.tar.sha256").exists()


def test_shard_limits_and_class_mixing(tree: Path, tmp_path: Path) -> None:
    by_count = write_shards(tree, tmp_path / "count", shard_size=7, progress=False)
    counts = [
        s["samples"] for s in json.loads((tmp_path / "count/manifest.json").read_text())["shards"]
    ]
    assert counts == [7, 7, 7, 5] and by_count.shards == 4
    for path in sorted((tmp_path / "count").glob("shard-*.tar")):
        labels = {s["cls"] for s in read_samples(path)}
        assert len(labels) >= 2, f"{path.name} holds one class only"

    limit = 30_000
    write_shards(tree, tmp_path / "bytes", shard_size=1000, shard_bytes=limit, progress=False)
    manifest = json.loads((tmp_path / "bytes/manifest.json").read_text())
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) > 1 and all(size <= limit for size in sizes)
    assert manifest["total_samples"] == 26

    # Both limits: whichever is reached first closes the shard.
    write_shards(tree, tmp_path / "both", shard_size=3, shard_bytes=limit, progress=False)
    both = json.loads((tmp_path / "both/manifest.json").read_text())["shards"]
    assert all(s["samples"] <= 3 and s["bytes"] <= limit for s in both)

    other_seed = write_shards(tree, tmp_path / "seed1", shard_size=7, seed=1, progress=False)
    assert other_seed.written == by_count.written
    assert shard_hashes(tmp_path / "seed1") != shard_hashes(tmp_path / "count")


def test_workers_two_same_bytes_as_one(tree: Path, written: Path, tmp_path: Path) -> None:
    summary = write_shards(tree, tmp_path / "w2", shard_size=5, workers=2, progress=False)
    assert summary.written == 26 and summary.rejected == 4
    assert shard_hashes(tmp_path / "w2") == shard_hashes(written)
    assert (tmp_path / "w2/rejected.txt").read_text() == (written / "rejected.txt").read_text()


def test_sample_members_json_and_stored_bytes(tree: Path, written: Path) -> None:
    samples = read_samples(written)
    assert [s["__key__"].decode() for s in samples] == [f"{i:09d}" for i in range(26)]
    first = member_names(written / "shard-000000.tar")[:3]
    assert [n.split(".")[1] for n in first][1:] == ["cls", "json"]  # image, cls, json
    seen_paths = set()
    for s in samples:
        meta = json.loads(s["json"])
        source = tree / meta["path"]
        seen_paths.add(meta["path"])
        assert int(s["cls"].decode()) == CLASSES.index(meta["path"].split("/")[0])
        with Image.open(source) as original:
            assert (meta["width"], meta["height"]) == original.size
            fmt = original.format
        assert "stored_width" not in meta
        ext = image_ext(s)
        if fmt in ("JPEG", "PNG", "WEBP"):
            assert s[ext] == source.read_bytes()  # stored exactly as in the source file
        else:  # BMP and GIF are re-encoded as JPEG
            assert ext == "jpg" and s[ext] != source.read_bytes()
            with Image.open(io.BytesIO(s[ext])) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == original.size
    assert {"cat/bitmap.bmp", "dog/anim.gif", "cat/00.jpg"} <= seen_paths


def test_max_side_shrinks_and_records_stored_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "big"
    save_image(src / "wide.jpg", rng, "JPEG", (200, 100))
    save_image(src / "tall.png", rng, "PNG", (60, 150))
    save_image(src / "small.jpg", rng, "JPEG", (40, 30))
    write_shards(src, tmp_path / "out", max_side=50, progress=False)
    by_path = {json.loads(s["json"])["path"]: s for s in read_samples(tmp_path / "out")}
    expected = {"wide.jpg": ((200, 100), (50, 25)), "tall.png": ((60, 150), (20, 50))}
    for name, (original, stored) in expected.items():
        s = by_path[name]
        meta = json.loads(s["json"])
        assert (meta["width"], meta["height"]) == original
        assert (meta["stored_width"], meta["stored_height"]) == stored
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.format == "JPEG" and im.size == stored
    small = by_path["small.jpg"]
    assert small["jpg"] == (src / "small.jpg").read_bytes()
    assert "stored_width" not in json.loads(small["json"])


def test_webdataset_reads_the_shards(written: Path) -> None:
    import webdataset as wds

    manifest = load_manifest(written)
    urls = [manifest.path(s) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == manifest.total_samples
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(samples))]
    for s in samples:
        assert sum(e in s for e in ("jpg", "png", "webp")) == 1
        assert int(s["cls"]) in range(len(CLASSES))
        assert {"width", "height", "path"} <= set(json.loads(s["json"]))


def test_unlabelled_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "flat"
    for i in range(4):
        save_image(src / f"{i}.jpg", rng, "JPEG")
    save_image(src / "nested" / "deep" / "x.png", rng, "PNG")
    summary = write_shards(src, tmp_path / "out", progress=False)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert summary.written == 5 and manifest["classes"] is None
    samples = read_samples(tmp_path / "out")
    assert all("cls" not in s for s in samples)
    assert "nested/deep/x.png" in {json.loads(s["json"])["path"] for s in samples}
    assert load_manifest(tmp_path / "out").classes is None


def test_txt_and_csv_sources(tree: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    rels = ["cat/00.jpg", "dog/01.png", "eel/02.webp", "cat/truncated.jpg", "cat/missing.jpg"]
    # Relative paths resolve against the list's own folder, not the working directory.
    rel_prefix = os.path.relpath(tree, lists)
    listed = [f"{rel_prefix}/{r}" for r in rels]
    (lists / "files.txt").write_text("# a comment\n" + "\n".join(listed) + "\n\n")
    s = write_shards(lists / "files.txt", tmp_path / "txt", progress=False)
    assert (s.written, s.rejected) == (3, 2)
    rejected = (tmp_path / "txt/rejected.txt").read_text()
    assert f"{rel_prefix}/cat/missing.jpg\tunreadable" in rejected
    assert all("cls" not in x for x in read_samples(tmp_path / "txt"))

    rows = "".join(f"{p},{n}\n" for p, n in zip(listed[:3], ["zebra", "ant", "zebra"], strict=True))
    (lists / "named.csv").write_text("path,label\n" + rows)
    write_shards(lists / "named.csv", tmp_path / "named", progress=False)
    manifest = json.loads((tmp_path / "named/manifest.json").read_text())
    assert manifest["classes"] == ["ant", "zebra"]
    got = {json.loads(x["json"])["path"]: int(x["cls"]) for x in read_samples(tmp_path / "named")}
    assert got == {listed[0]: 1, listed[1]: 0, listed[2]: 1}

    ints = "".join(f"{p},{i}\n" for i, p in enumerate(listed[:3]))  # no header
    (lists / "ints.csv").write_text(ints)
    write_shards(lists / "ints.csv", tmp_path / "ints", progress=False)
    assert json.loads((tmp_path / "ints/manifest.json").read_text())["classes"] is None
    got = {json.loads(x["json"])["path"]: int(x["cls"]) for x in read_samples(tmp_path / "ints")}
    assert got == {p: i for i, p in enumerate(listed[:3])}

    (lists / "bad.csv").write_text(f"path,label\n{listed[0]},1\n{listed[1]},cat\n")
    with pytest.raises(ShardsError, match=r"bad\.csv line 3"):
        read_source(lists / "bad.csv")
    (lists / "short.csv").write_text(f"{listed[0]},1\n{listed[1]}\n")
    with pytest.raises(ShardsError, match=r"short\.csv line 2"):
        read_source(lists / "short.csv")


def test_input_errors_name_the_path(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        write_shards(missing, tmp_path / "out", progress=False)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "readme.md").write_text("x")
    with pytest.raises(ShardsError, match=f"no images found in {empty}"):
        write_shards(empty, tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert main([str(tmp_path / "empty.txt"), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no images listed in" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"version": 1, "shards": [{"name": "../x"}]}')
    with pytest.raises(ShardsError, match=r"manifest\.json: invalid manifest: shards\[0\]\.name"):
        load_manifest(tmp_path)


def test_progress_bar_draws_only_on_a_terminal(tmp_path: Path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(2)
    for i in range(3):
        save_image(tmp_path / "src" / f"{i}.png", rng, "PNG")
    write_shards(tmp_path / "src", tmp_path / "quiet", progress=True)
    assert capsys.readouterr().err == ""  # captured stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    write_shards(tmp_path / "src", tmp_path / "bar", progress=True)
    err = capsys.readouterr().err
    assert "\rcheck [" in err and "3/3" in err and "\rwrite [" in err
