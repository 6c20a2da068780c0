"""The shard stream: exact epochs across ranks and workers, resume, corrupt data, resampling.

Ranks are separate `ShardLoader`s in one process (the stream has no collectives), each with real
DataLoader worker processes reading real tar shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from pipeline.data.stream import DataError, ShardLoader, ShardRef, plan_epoch, resolve_shards

SHARD_SIZES = [7, 13, 1, 20, 9]  # 50 samples, uneven on purpose


def write_shards(folder: Path, sizes=SHARD_SIZES, manifest: bool = True) -> list[Path]:
    """Shards whose 'image' bytes encode the global id; optional manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, gid, entries = [], 0, []
    for i, n in enumerate(sizes):
        path = folder / f"shard-{i:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as sink:
            for _ in range(n):
                sink.write({"__key__": f"{gid:09d}", "jpg": f"img-{gid}".encode(), "cls": gid % 3})
                gid += 1
        paths.append(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        size = path.stat().st_size
        entries.append({"name": path.name, "samples": n, "bytes": size, "sha256": digest})
    if manifest:
        (folder / "manifest.json").write_text(
            json.dumps(
                {
                    "version": 1,
                    "shards": entries,
                    "total_samples": gid,
                    "total_bytes": sum(e["bytes"] for e in entries),
                    "classes": None,
                    "inputs": gid,
                    "rejected": 0,
                    "args": {},
                }
            )
        )
    return paths


def id_view(data: bytes, rng: np.random.Generator) -> list[np.ndarray]:
    """A 'crop' that keeps the id readable and depends on the rng (so resume checks the RNG)."""
    gid = int(data.decode().split("-")[1])
    return [np.array([[[gid % 256, gid // 256, rng.integers(256)]]], dtype=np.uint8)]


def collate(views: list[list[np.ndarray]]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.stack([v[0] for v in views]))]


def loader(shards, rank=0, world_size=1, workers=2, batch_size=4, **kw) -> ShardLoader:
    return ShardLoader(
        shards,
        transform=id_view,
        collate=collate,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        workers=workers,
        seed=7,
        shuffle_buffer=kw.pop("shuffle_buffer", 8),
        **kw,
    )


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b["id"].tolist() if i >= 0]


@pytest.fixture
def shards(tmp_path) -> str:
    write_shards(tmp_path / "shards")
    return str(tmp_path / "shards")


def test_plan_gives_every_rank_the_same_batches_and_covers_all_samples():
    offsets = np.cumsum([0, *SHARD_SIZES[:-1]])
    shard_refs = [
        ShardRef(f"s{i}", n, int(o))
        for i, (n, o) in enumerate(zip(SHARD_SIZES, offsets, strict=True))
    ]
    for world_size, workers, batch in [(2, 2, 4), (3, 1, 5), (4, 3, 2), (1, 4, 50)]:
        plans = [
            plan_epoch(
                shard_refs,
                seed=0,
                epoch=1,
                rank=r,
                world_size=world_size,
                workers=workers,
                batch_size=batch,
            )
            for r in range(world_size)
        ]
        assert len({p.batches for p in plans}) == 1
        assert len({p.real + p.padding for p in plans}) == 1
        assert sum(p.real for p in plans) == 50
        covered = []
        for p in plans:
            assert sorted(s for w in p.workers for s in w.slots) == list(range(p.batches))
            for w in p.workers:
                for shard, first, end in w.segments:
                    covered += [shard_refs[shard].offset + i for i in range(first, end)]
        assert sorted(covered) == list(range(50))


def test_exact_epoch_two_ranks_two_workers_sees_every_sample_once(shards):
    ranks = [loader(shards, rank=r, world_size=2) for r in range(2)]
    epochs = []
    for _ in range(2):
        per_rank = [list(ld) for ld in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 7  # ceil(25 / 4)
        for a, b in zip(*per_rank, strict=True):  # lockstep shapes: no rank waits on another
            assert a["views"][0].shape == b["views"][0].shape
        seen = ids_of(per_rank[0]) + ids_of(per_rank[1])
        assert sorted(seen) == list(range(50))
        epochs.append(seen)
        labels = torch.cat([b["label"] for b in per_rank[0]])
        ids = torch.cat([b["id"] for b in per_rank[0]])
        assert (labels[ids >= 0] == ids[ids >= 0] % 3).all()
    assert epochs[0] != epochs[1], "each epoch reshuffles"
    assert all(ld.epoch == 2 for ld in ranks)


def test_exact_epoch_is_deterministic(shards):
    def views(**kw):
        return [b["views"][0] for b in loader(shards, **kw)]

    for a, b in zip(views(workers=2), views(workers=2), strict=True):
        assert torch.equal(a, b)
    # No worker processes runs the one logical worker in-process, with the same output.
    for a, b in zip(views(workers=1), views(workers=0), strict=True):
        assert torch.equal(a, b)


def test_resume_same_layout_is_bitwise(shards):
    full = [[b for b in loader(shards, rank=r, world_size=2)] for r in range(2)]
    first = [loader(shards, rank=r, world_size=2) for r in range(2)]
    for ld in first:
        it = iter(ld)
        for _ in range(3):
            next(it)
    states = [ld.state_dict() for ld in first]
    for r in range(2):
        resumed = loader(shards, rank=r, world_size=2)
        resumed.load_state_dict(states)
        assert len(resumed) == len(full[r]) - 3
        rest = list(resumed)
        for a, b in zip(rest, full[r][3:], strict=True):
            assert torch.equal(a["id"], b["id"])
            assert torch.equal(a["views"][0], b["views"][0])


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 3), (2, 3)])
def test_resume_at_another_world_size_sees_every_sample_once(shards, before, after):
    seen = []
    old = [loader(shards, rank=r, world_size=before, workers=2) for r in range(before)]
    for ld in old:
        it = iter(ld)
        seen += ids_of(next(it) for _ in range(2))
    states = [ld.state_dict() for ld in old]
    new = [loader(shards, rank=r, world_size=after, workers=1) for r in range(after)]
    for ld in new:
        ld.load_state_dict(states)
    rests = [list(ld) for ld in new]
    assert len({len(r) for r in rests}) == 1
    for r in rests:
        seen += ids_of(r)
    assert sorted(seen) == list(range(50))
    # The next epoch is whole again, at the new world size.
    assert sorted(ids_of(b for ld in new for b in ld)) == list(range(50))


def test_iterating_again_mid_epoch_continues_where_it_stopped(shards):
    ld = loader(shards)
    it = iter(ld)
    head = [next(it) for _ in range(4)]
    del it
    tail = list(ld)
    assert sorted(ids_of(head) + ids_of(tail)) == list(range(50))


def test_corrupt_samples_are_counted_and_skipped(tmp_path, caplog):
    paths = write_shards(tmp_path / "s", manifest=True)
    # Shard 3 (20 samples) loses its second half; shard 0 gets a sample with no image.
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])
    with wds.TarWriter(str(paths[0]), mtime=0) as sink:
        for gid in range(7):
            sample = {"__key__": f"{gid:09d}", "cls": 0}
            if gid != 2:
                sample["jpg"] = f"img-{gid}".encode()
            sink.write(sample)
    caplog.set_level(logging.WARNING)
    ld = loader(str(tmp_path / "s"), max_bad_fraction=0.5)
    batches = list(ld)
    stats = ld.stats
    good = ids_of(batches)
    assert len(good) == len(set(good)) == stats["samples"]
    assert stats["samples"] + stats["bad"] == 50
    assert stats["bad:shard-000000.tar"] == 1
    assert stats["bad:shard-000003.tar"] >= 5  # the cut loses the second half
    assert "truncated" in caplog.text
    assert "shard-000003.tar" in caplog.text and "000000002" in caplog.text

    strict = loader(str(tmp_path / "s"), max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"data.max_bad_fraction=0.05.*most in shard-000003.tar"):
        list(strict)


def _drop_images(path: Path, first_gid: int, n: int, missing: set[int]) -> None:
    """Rewrite one shard of `write_shards` with the samples in `missing` holding no image."""
    with wds.TarWriter(str(path), mtime=0) as sink:
        for gid in range(first_gid, first_gid + n):
            sample = {"__key__": f"{gid:09d}", "cls": 0}
            if gid not in missing:
                sample["jpg"] = f"img-{gid}".encode()
            sink.write(sample)


def test_bad_sample_budget_is_per_epoch(tmp_path):
    """One corrupt image comes back every epoch: 1 of 50 is within a 3% budget each epoch,
    although 2 and 3 over the run are not; 2 in one epoch are still refused."""
    paths = write_shards(tmp_path / "one", manifest=True)
    _drop_images(paths[0], 0, 7, {2})
    ld = loader(str(tmp_path / "one"), max_bad_fraction=0.03)  # 1.5 bad samples per epoch
    for epoch in range(3):
        assert sorted(ids_of(ld)) == [g for g in range(50) if g != 2], epoch
    assert ld.epoch == 3 and ld.stats["bad"] == 3

    paths = write_shards(tmp_path / "two", manifest=True)
    _drop_images(paths[0], 0, 7, {2, 5})
    with pytest.raises(DataError, match=r"^2 bad samples in epoch 0 on rank 0.*shard-000000"):
        list(loader(str(tmp_path / "two"), max_bad_fraction=0.03))


def test_bad_sample_count_of_the_epoch_survives_a_resume(tmp_path):
    paths = write_shards(tmp_path / "s", manifest=True)
    _drop_images(paths[0], 0, 7, {2})
    ld = loader(str(tmp_path / "s"), workers=1, max_bad_fraction=0.5)
    it = iter(ld)
    while not ld.stats.get("bad"):
        next(it)
    state = ld.state_dict()
    assert state["bad"] == {"shard-000000.tar": 1}
    again = loader(str(tmp_path / "s"), workers=1, max_bad_fraction=0.5)
    again.load_state_dict(state)
    assert again.state_dict()["bad"] == {"shard-000000.tar": 1}
    list(again)  # the epoch ends: the next one starts with a fresh budget
    assert again.state_dict()["bad"] == {}


def test_resampled_mode_is_endless_and_seeded(shards):
    a = loader(shards, mode="resampled", steps_per_epoch=20, workers=1)
    b = loader(shards, mode="resampled", steps_per_epoch=20, workers=1)
    batches_a, batches_b = list(a), list(b)
    assert len(batches_a) == 20  # 80 draws from 50 samples: repeats by design
    for x, y in zip(batches_a, batches_b, strict=True):
        assert torch.equal(x["id"], y["id"])
    assert len(list(a)) == 20 and a.epoch == 2


def test_resolve_brace_pattern_with_and_without_manifest(tmp_path):
    write_shards(tmp_path / "with")
    write_shards(tmp_path / "without", manifest=False)
    for name in ("with", "without"):
        refs = resolve_shards(str(tmp_path / name / "shard-{000000..000004}.tar"))
        assert [r.samples for r in refs] == SHARD_SIZES
        assert [r.offset for r in refs] == [0, 7, 20, 21, 41]
    with pytest.raises(DataError, match="do not exist"):
        resolve_shards(str(tmp_path / "with" / "shard-{000000..000009}.tar"))


def test_changed_shards_refuse_an_old_position(tmp_path, shards):
    ld = loader(shards)
    next(iter(ld))
    state = ld.state_dict()
    write_shards(tmp_path / "other", sizes=[5, 5])
    with pytest.raises(DataError, match="covers 50 samples but the shards now hold 10"):
        loader(str(tmp_path / "other")).load_state_dict([state])


def test_state_is_small_and_serialisable(shards):
    ld = loader(shards)
    next(iter(ld))
    buf = io.BytesIO()
    torch.save(ld.state_dict(), buf)
    assert buf.tell() < 4096


def test_two_changes_of_world_size_in_one_epoch_see_every_sample_once(shards):
    seen: list[int] = []
    ranks = [loader(shards, rank=r, world_size=2, shuffle_buffer=6) for r in range(2)]
    for world_size in (3, 1):
        for ld in ranks:
            it = iter(ld)
            seen += ids_of(next(it) for _ in range(2))
        states = [ld.state_dict() for ld in ranks]
        ranks = [loader(shards, rank=r, world_size=world_size) for r in range(world_size)]
        for ld in ranks:
            ld.load_state_dict(states)
    seen += ids_of(b for ld in ranks for b in ld)
    assert sorted(seen) == list(range(50))


def test_consumed_shards_are_not_read_again_on_resume(tmp_path):
    """A same-layout resume replays the shuffle with placeholders for what was consumed: a shard
    wholly consumed before the save is never opened again (here it is damaged afterwards)."""
    paths = write_shards(tmp_path / "s", sizes=[10] * 6)
    kw = dict(workers=1, shuffle_buffer=3)
    full = list(loader(str(tmp_path / "s"), **kw))
    first = loader(str(tmp_path / "s"), **kw)
    it = iter(first)
    head = [next(it) for _ in range(9)]  # 36 of 60 samples
    state = first.state_dict()
    order = [s for s, _, _ in first.plan().workers[0].segments]
    consumed = set(ids_of(head))
    whole = [s for s in order if set(range(10 * s, 10 * s + 10)) <= consumed]
    assert whole  # the test needs a shard consumed entirely
    paths[whole[0]].write_bytes(b"not a tar any more")
    resumed = loader(str(tmp_path / "s"), **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert resumed.stats.get("bad", 0) == 0
    for a, b in zip(rest, full[9:], strict=True):
        assert torch.equal(a["id"], b["id"])
        assert torch.equal(a["views"][0], b["views"][0])


def test_state_does_not_grow_with_the_data_set(tmp_path):
    sizes = []
    for n in (50, 5000):
        write_shards(tmp_path / str(n), sizes=[n // 5] * 5)
        ld = loader(str(tmp_path / str(n)), world_size=2, workers=2, batch_size=4)
        it = iter(ld)
        for _ in range(3):
            next(it)
        buf = io.BytesIO()
        torch.save(ld.state_dict(), buf)
        sizes.append(buf.tell())
    assert sizes[1] <= sizes[0] + 64


def test_a_position_saved_as_bitmaps_still_resumes(shards):
    """Checkpoints written before positions were intervals hold a bitmap per rank."""
    old = loader(shards)
    it = iter(old)
    head = ids_of(next(it) for _ in range(3))
    consumed = np.zeros(50, dtype=bool)
    consumed[head] = True
    state = {
        **{k: v for k, v in old.state_dict().items() if k not in ("done", "read", "pending")},
        "version": 1,
        "excluded": None,
        "consumed": np.packbits(consumed).tobytes(),
    }
    new = loader(shards)
    new.load_state_dict([state])
    assert sorted(head + ids_of(new)) == list(range(50))


def parity_buckets(items):
    """A grouper that holds samples back: two buckets by id parity, each emitted at 3."""
    held: dict[int, list] = {0: [], 1: []}
    for item in items:
        bucket = held[item["__gid__"] % 2]
        bucket.append((item, {}))
        if len(bucket) == 3:
            yield list(bucket)
            bucket.clear()
    yield from (b for b in held.values() if b)


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1)])
def test_grouped_resume_sees_every_sample_once(shards, before, after):
    kw = dict(grouper=parity_buckets, shuffle_buffer=5)
    seen = []
    old = [loader(shards, rank=r, world_size=before, **kw) for r in range(before)]
    for ld in old:
        it = iter(ld)
        seen += ids_of(next(it) for _ in range(3))
    states = [ld.state_dict() for ld in old]
    new = [loader(shards, rank=r, world_size=after, **kw) for r in range(after)]
    for ld in new:
        ld.load_state_dict(states)
    rest = ids_of(b for ld in new for b in ld)
    assert sorted(seen + rest) == list(range(50))
    # Iterating again mid-epoch (a break in the loop) also continues where it stopped.
    again = loader(shards, **kw)
    it = iter(again)
    head = ids_of(next(it) for _ in range(4))
    del it
    assert sorted(head + ids_of(again)) == list(range(50))
