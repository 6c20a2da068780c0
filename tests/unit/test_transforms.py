"""CPU views (decode, crops, draft, collate) and the batched device-side colour augmentation."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

import pipeline.data.transforms as T
from pipeline.config import ColorConfig, CropsConfig

SMALL = CropsConfig(global_size=32, local_size=16, local_number=4)
OFF = ColorConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful image with some texture: JPEG-friendly, not flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 17.0 + 1.0),
            128 + 100 * np.cos(yy / 11.0),
            128 + 100 * np.sin((xx + yy) / 23.0),
        ],
        axis=-1,
    )
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return _encode(_photo(120, 90))


@pytest.fixture(scope="module")
def mid_jpeg() -> bytes:
    return _encode(_photo(320, 240, seed=1))


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return _encode(_photo(1600, 1200))


# ------------------------------------------------------------------------------------------------
# CPU side
# ------------------------------------------------------------------------------------------------


def _check_views(views: list[np.ndarray], shapes: list[tuple[int, int]]) -> None:
    assert [v.shape for v in views] == [(h, w, 4) for h, w in shapes]
    for v in views:
        assert v.dtype == np.uint8
        assert v.flags.c_contiguous
        assert (v[..., 3] == 255).all()  # Pillow's padding byte, resized: channels line up


def test_dino_crops_shapes_default_and_explicit(jpeg):
    crops = T.DinoCrops(SMALL)
    rng = np.random.default_rng(0)
    _check_views(crops(jpeg, rng), [(32, 32)] * 2 + [(16, 16)] * 4)
    views = crops(jpeg, rng, global_hw=(24, 40), local_hw=(20, 12))
    _check_views(views, [(24, 40)] * 2 + [(20, 12)] * 4)
    assert crops.num_views == 6


def test_dino_crops_deterministic_per_seed(jpeg):
    crops = T.DinoCrops(SMALL)
    a = crops(jpeg, np.random.default_rng(7))
    b = crops(jpeg, np.random.default_rng(7))
    c = crops(jpeg, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _reference(pixels: np.ndarray, box: T.Box, hw: tuple[int, int], flip: bool) -> np.ndarray:
    """Slow reference view (RGB): crop, float F.interpolate(antialias=True), mirror if asked."""
    x0, y0, x1, y1 = box
    crop = torch.from_numpy(pixels[y0:y1, x0:x1, :3].copy()).permute(2, 0, 1)[None].float()
    ref = torch.nn.functional.interpolate(crop, hw, mode="bilinear", antialias=True)
    ref = ref[0].permute(1, 2, 0).numpy()
    return ref[:, ::-1] if flip else ref


def test_crop_matches_reference_resize(mid_jpeg):
    """The fast path (scratch buffers, separate vertical pass or one call, out=) equals cropping
    the decoded image and calling F.interpolate(antialias=True), up to intermediate rounding."""
    pixels = T._pixels(T.decode(mid_jpeg))
    boxes = [
        (5, 3, 300, 230),
        (40, 10, 60, 30),
        (0, 0, 320, 240),
        (10, 10, 110, 110),
        (100, 20, 200, 230),
    ]
    out_hw = [(64, 64), (16, 24), (240, 50), (80, 80), (40, 48)]
    flips = [True, True, False, False, True]
    # Both code paths are covered: a separate vertical pass (first and last box), and one call
    # (upscaling, horizontal only, and a slight shrink of both sides).
    split = [
        (y1 - y0 - h) * w > T._SPLIT_WORK
        for (_, y0, _, y1), (h, w) in zip(boxes, out_hw, strict=True)
    ]
    assert split == [True, False, False, False, True]
    views = T._crop_resize(pixels, boxes, out_hw, flips)
    _check_views(views, out_hw)
    for box, hw, flip, view in zip(boxes, out_hw, flips, views, strict=True):
        ref = _reference(pixels, box, hw, flip)
        assert np.abs(view[..., :3].astype(np.float32) - ref).max() <= 2.0


def test_scratch_buffers_grow_without_stale_views(mid_jpeg, big_jpeg):
    """The per-thread scratch buffers grow for a larger image; views cached for the old ones are
    dropped with them, so the same crops give the same views before and after."""
    small = T._pixels(T.decode(mid_jpeg))
    boxes, out_hw, flips = (
        [(10, 5, 250, 200), (30, 30, 130, 90)],
        [(64, 64), (24, 32)],
        [True, True],
    )
    before = [v.copy() for v in T._crop_resize(small, boxes, out_hw, flips)]
    large = T._pixels(T.decode(big_jpeg))
    wide = [(0, 0, 1600, 1200), (100, 50, 1500, 1150)]
    T._crop_resize(large, wide, [(1100, 1500), (1000, 1300)], [True, True])
    after = T._crop_resize(small, boxes, out_hw, flips)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_dino_views_are_the_sampled_boxes(mid_jpeg, monkeypatch):
    """End to end: each view is the reference crop + resize of the box that sample_boxes draws
    from the same seed (in original-image coordinates), mirrored when its flip is drawn."""
    monkeypatch.setattr(T, "draft_factor", lambda boxes, out_hw: 1)  # full-size decode, as ref
    crops = CropsConfig(global_size=64, local_size=32, local_number=6)
    dino = T.DinoCrops(crops)
    pixels = np.asarray(T.decode(mid_jpeg))
    out_hw = [(64, 64)] * 2 + [(32, 32)] * 6
    log_ratios = [T._ratio_range(crops.ratio, hw) for hw in out_hw]
    for seed in range(4):
        views = dino(mid_jpeg, np.random.default_rng(seed))
        boxes, flips = T.sample_boxes(
            np.random.default_rng(seed), (240, 320), dino._scales, log_ratios, crops.hflip
        )
        _check_views(views, out_hw)
        for box, hw, flip, view in zip(boxes, out_hw, flips, views, strict=True):
            ref = _reference(pixels, box, hw, flip)
            assert np.abs(view[..., :3].astype(np.float32) - ref).max() <= 2


def test_sample_boxes_inside_image_and_fallback():
    rng = np.random.default_rng(0)
    for height, width in [(90, 120), (300, 40), (7, 5), (1, 1)]:
        for scale, ratio in [((0.05, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (2.0, 3.0))]:
            log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
            boxes, flips = T.sample_boxes(rng, (height, width), [scale] * 50, [log_ratio] * 50, 0.5)
            assert len(boxes) == len(flips) == 50
            for x0, y0, x1, y1 in boxes:
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    # Nothing fits a 2:1..3:1 box of the full area in a square: centred fallback at ratio 2.
    boxes, _ = T.sample_boxes(rng, (100, 100), [(1.0, 1.0)], [(np.log(2), np.log(3))], 0.5)
    assert boxes == [(0, 25, 100, 75)]


def test_flip_rate_and_flip_mirrors(jpeg):
    rng = np.random.default_rng(0)
    _, flips = T.sample_boxes(rng, (90, 120), [(0.2, 1.0)] * 2000, [(-0.3, 0.3)] * 2000, 0.3)
    assert 0.25 < np.mean(flips) < 0.35
    never = T.DinoCrops(dataclasses.replace(SMALL, hflip=0.0))(jpeg, np.random.default_rng(3))
    always = T.DinoCrops(dataclasses.replace(SMALL, hflip=1.0))(jpeg, np.random.default_rng(3))
    for a, b in zip(never, always, strict=True):  # same boxes (same draws), mirrored
        assert np.array_equal(a[:, ::-1], b)


def test_draft_path_for_large_jpeg(big_jpeg, monkeypatch):
    crops = CropsConfig(
        global_size=32, global_scale=(0.3, 0.6), local_number=3, local_size=16,
        local_scale=(0.05, 0.1),
    )  # fmt: skip
    seen, drafts = [], []
    pixels_of = T._pixels
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(T, "_pixels", lambda img: seen.append(img.size) or pixels_of(img))
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: drafts.append(size) or draft(self, mode, size),
    )
    views = T.DinoCrops(crops)(big_jpeg, np.random.default_rng(0))
    _check_views(views, [(32, 32)] * 2 + [(16, 16)] * 3)
    # Every box is >= sqrt(0.05 * 1600 * 1200 * 3/4) ~ 270 px > 8 * 16: decoded at 1/8 scale.
    assert drafts == [(200, 150)] and seen == [(200, 150)]
    # Same boxes from the full-resolution decode look alike (DCT scaling vs resampling).
    monkeypatch.setattr(T, "draft_factor", lambda boxes, out_hw: 1)
    full = T.DinoCrops(crops)(big_jpeg, np.random.default_rng(0))
    assert seen[-1] == (1600, 1200)
    for a, b in zip(views, full, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 12


def test_pixels_are_pillows_memory_and_outlive_close(jpeg):
    """The decoded image is used where Pillow put it (RGBX, no copy), and stays valid after
    the image is closed and its memory could be reused."""
    img = T.decode(jpeg)
    pixels = T._pixels(img)
    assert pixels.shape == (90, 120, 4) and (pixels[..., 3] == 255).all()
    assert np.array_equal(pixels[..., :3], np.asarray(img))
    img.putpixel((5, 7), (1, 2, 3))  # a write through Pillow shows: the same memory
    assert tuple(pixels[7, 5, :3]) == (1, 2, 3)
    kept = pixels.copy()
    img.close()
    del img
    others = [T.decode(jpeg) for _ in range(8)]
    assert np.array_equal(pixels, kept) and len(others) == 8


def test_pixels_copy_where_pillow_cannot_share(jpeg, monkeypatch):
    # Larger than Pillow's 16 MB block: its rows are not one array, and it is copied.
    big = Image.new("RGB", (2100, 2100), (10, 20, 30))
    assert T._shared_pixels(big) is None
    pixels = T._pixels(big)
    assert pixels.shape == (2100, 2100, 4) and tuple(pixels[-1, -1]) == (10, 20, 30, 255)
    # Every view is the same either way.
    shared = T.DinoCrops(SMALL)(jpeg, np.random.default_rng(5))
    monkeypatch.setattr(T, "_shared_pixels", lambda img: None)
    copied = T.DinoCrops(SMALL)(jpeg, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(shared, copied, strict=True))


def test_draft_factor():
    assert T.draft_factor([(0, 0, 800, 800)], [(100, 100)]) == 8
    assert T.draft_factor([(0, 0, 800, 390)], [(100, 100)]) == 2
    assert T.draft_factor([(0, 0, 800, 800), (0, 0, 150, 150)], [(100, 100), (100, 100)]) == 1


def test_decode_min_size(big_jpeg, jpeg):
    img = T.decode(big_jpeg, min_size=(300, 400))
    assert img.mode == "RGB" and img.size == (400, 300)
    assert T.decode(big_jpeg, min_size=(301, 400)).size == (800, 600)
    assert T.decode(big_jpeg).size == (1600, 1200)
    gray = io.BytesIO()
    Image.fromarray(_photo(40, 30)[..., 0]).save(gray, "JPEG")
    assert T.decode(gray.getvalue()).mode == "RGB"


def test_mae_crop_and_resize_to(jpeg):
    mae = T.MaeCrop(SMALL)
    _check_views(mae(jpeg, np.random.default_rng(0)), [(SMALL.mae_size, SMALL.mae_size)])
    _check_views(mae(jpeg, np.random.default_rng(0), hw=(48, 64)), [(48, 64)])
    resize = T.ResizeTo(hflip=0.0)
    (view,) = resize(jpeg, np.random.default_rng(0), (45, 60))
    _check_views([view], [(45, 60)])
    (mirrored,) = T.ResizeTo(hflip=1.0)(jpeg, np.random.default_rng(0), (45, 60))
    assert np.array_equal(view[:, ::-1], mirrored)


def test_eval_crop_takes_the_centre():
    # 400 x 100: red on the left half, blue on the right; PNG so colours are exact.
    arr = np.zeros((100, 400, 3), np.uint8)
    arr[:, :200, 0] = 255
    arr[:, 200:, 2] = 255
    (view,) = T.EvalCrop(resize=100, crop=80)(_encode(arr, "PNG"))
    _check_views([view], [(80, 80)])
    # Shorter side 100 -> 100 (no scaling), centre 80 x 80 = columns 160..240: red | blue.
    assert np.array_equal(view[:, :38, :3], np.broadcast_to([255, 0, 0], (80, 38, 3)))
    assert np.array_equal(view[:, 42:, :3], np.broadcast_to([0, 0, 255], (80, 38, 3)))
    (half,) = T.EvalCrop(resize=50, crop=40)(_encode(arr, "PNG"))  # downscaled by 2
    assert half.shape == (40, 40, 4) and half[0, 0, 0] == 255 and half[0, -1, 2] == 255
    with pytest.raises(ValueError, match="crop <= resize"):
        T.EvalCrop(resize=10, crop=20)


def test_collate_views(jpeg):
    crops = T.DinoCrops(SMALL)
    samples = [crops(jpeg, np.random.default_rng(i)) for i in range(3)]
    batch = T.collate_views(samples)
    assert [tuple(b.shape) for b in batch] == [(3, 4, 32, 32)] * 2 + [(3, 4, 16, 16)] * 4
    assert all(b.dtype == torch.uint8 for b in batch)
    assert torch.equal(batch[2][1], torch.from_numpy(samples[1][2]).permute(2, 0, 1))
    assert T.collate_views([]) == []


# ------------------------------------------------------------------------------------------------
# Device side
# ------------------------------------------------------------------------------------------------


def _views(batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [32, 32, 16, 16]
    return [torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8) for s in sizes]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_device_augment_shapes_finite_and_seeded():
    views = _views()
    aug = T.DeviceAugment(ColorConfig())
    out = aug(views, _gen(1))
    assert [o.shape for o in out] == [v.shape for v in views]
    assert all(o.dtype == torch.float32 and o.is_contiguous() for o in out)
    assert all(torch.isfinite(o).all() for o in out)
    again = aug(views, _gen(1))
    other = aug(views, _gen(2))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(out, other, strict=True))


def test_disabled_or_zero_probabilities_is_normalize():
    views = _views()
    color = ColorConfig()
    expected = T.normalize(views, color.mean, color.std)
    off = T.DeviceAugment(dataclasses.replace(color, enabled=False))(views, _gen())
    zero = T.DeviceAugment(OFF)(views, _gen())
    for e, a, b in zip(expected, off, zero, strict=True):
        assert torch.equal(e, a) and torch.equal(e, b)
    # normalize() itself: (x / 255 - mean) / std
    ref = (views[0].float() / 255 - torch.tensor(color.mean).view(1, 3, 1, 1)) / torch.tensor(
        color.std
    ).view(1, 3, 1, 1)
    assert torch.allclose(expected[0], ref, atol=1e-6)


def test_rgbx_views_give_the_rgb_results():
    """The loader's RGBX batches: the padding channel is dropped, nothing else changes."""
    views = _views()
    padded = [torch.cat([v, torch.full_like(v[:, :1], 255)], 1) for v in views]
    padded = [p.contiguous(memory_format=torch.channels_last) for p in padded]
    color = ColorConfig()
    for a, b in zip(
        T.normalize(views, color.mean, color.std),
        T.normalize(padded, color.mean, color.std),
        strict=True,
    ):
        assert a.shape == b.shape and torch.equal(a, b)
    aug = T.DeviceAugment(color)
    for a, b in zip(aug(views, _gen(3)), aug(padded, _gen(3)), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


def test_grayscale_all():
    out = T.DeviceAugment(dataclasses.replace(OFF, grayscale_p=1.0)).augment(_views(), _gen())
    for o in out:
        assert torch.equal(o[:, 0], o[:, 1]) and torch.equal(o[:, 1], o[:, 2])


def test_solarize_second_view_only():
    views = _views()
    out = T.DeviceAugment(dataclasses.replace(OFF, solarize_p=(0.0, 1.0, 0.0))).augment(
        views, _gen()
    )
    x = views[1].float()
    assert torch.allclose(out[1] * 255, torch.where(x >= 128, 255 - x, x), atol=1e-4)
    assert torch.allclose(out[0] * 255, views[0].float(), atol=1e-4)  # view 0 untouched


def test_blur_reduces_high_frequencies():
    checker = (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2 * 255
    views = [checker.to(torch.uint8).expand(4, 3, 32, 32).contiguous()]
    out = T.DeviceAugment(dataclasses.replace(OFF, blur_p=(1.0, 1.0, 1.0))).augment(views, _gen())

    def hf(x: torch.Tensor) -> float:
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()

    assert hf(out[0]) < 0.5 * hf(views[0].float() / 255)
    assert torch.allclose(out[0].mean(), torch.tensor(0.5), atol=0.02)  # mass preserved


def test_brightness_factor_per_image_and_hue_keeps_value():
    views = _views(batch=16)
    bright = dataclasses.replace(OFF, jitter_p=1.0, contrast=0.0, saturation=0.0, hue=0.0)
    out = T.DeviceAugment(bright).augment(views[:1], _gen())[0]
    x = views[0].float() / 255
    keep = x * 1.4 < 1  # unclamped pixels: out = factor * x
    ratio = torch.where(keep & (x > 0.05), out / x.clamp_min(1e-6), torch.nan)
    per_image = ratio.flatten(1).nanmedian(dim=1).values
    assert ((per_image > 0.6 - 1e-4) & (per_image < 1.4 + 1e-4)).all()
    assert per_image.std() > 0.05  # each image gets its own factor
    hue = dataclasses.replace(OFF, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    out = T.DeviceAugment(hue).augment(views[:1], _gen())[0]
    assert torch.allclose(out.amax(1), x.amax(1), atol=1e-5)  # hue rotation keeps max and min
    assert torch.allclose(out.amin(1), x.amin(1), atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


def test_decisions_are_per_image():
    views = [torch.randint(0, 256, (64, 3, 8, 8), generator=_gen(), dtype=torch.uint8)]
    out = T.DeviceAugment(dataclasses.replace(OFF, grayscale_p=0.5)).augment(views, _gen())[0]
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 10 < int(gray.sum()) < 54


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_augment_on_cuda_matches_cpu():
    views = _views()
    aug = T.DeviceAugment(ColorConfig())
    cpu = aug(views, _gen(3))
    gpu = aug([v.cuda() for v in views], _gen(3))  # CPU generator, CUDA views
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda
        assert torch.allclose(a, b.cpu(), atol=1e-3)
    on_device = aug([v.cuda() for v in views], torch.Generator("cuda").manual_seed(3))
    assert all(o.is_cuda and torch.isfinite(o).all() for o in on_device)
