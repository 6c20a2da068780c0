"""Image views: uint8 crops on the CPU workers, batched colour augmentation on the device.

CPU side (loader workers; numpy `Generator` randomness): `decode`, the view makers `DinoCrops`,
`MaeCrop`, `EvalCrop` and `ResizeTo`, each taking the encoded bytes of one image and returning a
list of (H, W, 4) uint8 RGBX C-contiguous arrays, and `collate_views`, which stacks view i of
every sample into one (B, 4, H, W) uint8 tensor. RGBX (the fourth byte is padding) is Pillow's own
layout: the decoded pixels are used where Pillow put them, and the crops run on whole 32-bit
pixels; the padding goes to the device with them and is dropped there. Every crop box is sampled
first, from the size in the image header, so that the JPEG decoder can downscale (`draft`) when
every box allows it; the image is then decoded once and each box is cut and resized straight to
its output size. Built with `on_device=True`, `DinoCrops`, `MaeCrop` and `EvalCrop` stop after
the decode and return a `device_crops.Decoded` (pixels, the same boxes and flips) for the
training device to cut (`data.crops.on_device`).

Device side (`torch.Generator` randomness): `DeviceAugment` (DINO's colour jitter, grayscale,
Gaussian blur and solarisation, vectorised over the batch with per-image masks and factors) and
`normalize`. Both take RGB or RGBX uint8 and return float32 (B, 3, H, W) contiguous tensors.

Not here: which resolution bucket a sample goes to (buckets.py), shard reading and worker
seeding (stream.py), NaViT packing (packing.py). No torchvision: torch and Pillow do the work.
"""

from __future__ import annotations

import ctypes
import io
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ColorConfig, CropsConfig
from pipeline.data.device_crops import Decoded

__all__ = [
    "DeviceAugment",
    "DinoCrops",
    "EvalCrop",
    "MaeCrop",
    "ResizeTo",
    "collate_views",
    "decode",
    "draft_factor",
    "normalize",
    "sample_boxes",
]

_TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
_DRAFT_SCALES = (8, 4, 2)  # reductions libjpeg's DCT scaling offers through Pillow's draft()

# ------------------------------------------------------------------------------------------------
# CPU side: decode, boxes, crop + resize
# ------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end exclusive


def _as_rgb(img: Image.Image) -> Image.Image:
    """Load `img` (decoding it) and return it in RGB mode."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale has no direct RGB conversion; scale to 8 bits first.
        arr = np.asarray(img.convert("I"), dtype=np.float32)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def decode(data: bytes, *, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB image.

    With `min_size` (h, w), a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling via
    `draft`) when the reduced image is still at least `min_size` in both dimensions.
    """
    img = Image.open(io.BytesIO(data))
    if min_size is not None and img.format == "JPEG":
        h, w = min_size
        img.draft("RGB", (max(1, w), max(1, h)))  # Pillow keeps the result >= the request
    return _as_rgb(img)


class _ArrowArray(ctypes.Structure):
    """`struct ArrowArray` of the Arrow C data interface (a stable ABI), as Pillow exports it."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _shared_pixels(img: Image.Image) -> np.ndarray | None:
    """Pillow's own memory of a loaded RGB image as an (H, W, 4) RGBX array, without a copy, or
    None where Pillow cannot export it (before 11.2; images spread over several blocks, i.e.
    larger than Pillow's 16 MB block).

    Pillow keeps RGB images as 4 bytes per pixel (the fourth is 255) and exports that memory as
    an Arrow array of 4-byte fixed-size lists; the export holds a reference to the memory, and
    the returned array holds the export, so the pixels stay valid after `img.close()`."""
    try:
        schema, array = img.__arrow_c_array__()
    except (AttributeError, ValueError):
        return None
    exported = _ArrowArray.from_address(_capsule_pointer(array, b"arrow_array"))
    width, height = img.size
    if exported.n_children != 1 or exported.offset != 0 or exported.length != width * height:
        return None
    values = exported.children[0].contents  # the uint8 child: 4 per pixel
    if values.n_buffers != 2 or values.offset != 0 or values.length != 4 * width * height:
        return None
    memory = (ctypes.c_uint8 * (4 * width * height)).from_address(values.buffers[1])
    memory.export = (schema, array)  # released (Pillow's reference dropped) with the array
    return np.frombuffer(memory, dtype=np.uint8).reshape(height, width, 4)


def _pixels(img: Image.Image) -> np.ndarray:
    """(H, W, 4) uint8 RGBX pixels of a loaded RGB image: Pillow's own memory where it can be
    shared (see _shared_pixels), else a copy; the fourth channel is padding."""
    shared = _shared_pixels(img)
    if shared is not None:
        return shared
    width, height = img.size
    # One call of Pillow's raw encoder for the whole image. `tobytes` (and so np.asarray)
    # encodes 64 KiB chunks and joins them: an extra copy and many short-lived allocations.
    encoder = Image._getencoder("RGB", "raw", "RGBX")
    try:
        encoder.setimage(img.im, (0, 0, width, height))
        _, status, raw = encoder.encode(width * height * 4)
    finally:
        encoder.cleanup()
    if status < 0 or len(raw) != width * height * 4:
        raise RuntimeError("Pillow's raw encoder did not return the whole image")
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 4)


def sample_boxes(
    rng: np.random.Generator,
    size: tuple[int, int],
    scales: Sequence[tuple[float, float]],
    log_ratios: Sequence[tuple[float, float]],
    hflip: float,
) -> tuple[list[Box], list[bool]]:
    """Random-resized-crop boxes for len(scales) crops of one image, and their flip flags.

    size: (height, width) of the image; scales: per crop, the range of the box's area as a
    fraction of the image; log_ratios: per crop, the range of log(width / height). As
    torchvision's RandomResizedCrop: up to 10 tries of (uniform area, log-uniform aspect), the
    first box that fits wins, else the whole image cut to the nearest allowed aspect, centred.
    """
    height, width = size
    area = height * width
    # One draw of a fixed amount per crop, so a seed fixes every crop of the image. Plain Python
    # floats from here on: for a dozen crops that beats numpy's per-call overhead.
    draws = rng.random((len(scales), 2 * _TRIES + 3)).tolist()
    boxes, flips = [], []
    for u, (s_lo, s_hi), (r_lo, r_hi) in zip(draws, scales, log_ratios, strict=True):
        for t in range(_TRIES):
            target = area * (s_lo + (s_hi - s_lo) * u[t])
            aspect = math.exp(r_lo + (r_hi - r_lo) * u[_TRIES + t])
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x = int(u[-3] * (width - w + 1))
                y = int(u[-2] * (height - h + 1))
                break
        else:
            aspect = width / height
            w, h = width, height
            if aspect < math.exp(r_lo):
                h = min(height, max(1, round(width / math.exp(r_lo))))
            elif aspect > math.exp(r_hi):
                w = min(width, max(1, round(height * math.exp(r_hi))))
            x, y = (width - w) // 2, (height - h) // 2
        boxes.append((x, y, x + w, y + h))
        flips.append(u[-1] < hflip)
    return boxes, flips


def draft_factor(boxes: Sequence[Box], out_hw: Sequence[tuple[int, int]]) -> int:
    """Largest JPEG draft reduction (8, 4, 2, else 1) that keeps every box at least as large as
    its output (h, w); boxes in full-resolution pixels."""
    fit = min(
        min((x1 - x0) / w, (y1 - y0) / h)
        for (x0, y0, x1, y1), (h, w) in zip(boxes, out_hw, strict=True)
    )
    for s in _DRAFT_SCALES:
        if fit >= s:
            return s
    return 1


def _shrink_boxes(boxes: Sequence[Box], s: int, size: tuple[int, int]) -> list[Box]:
    """Boxes in the coordinates of the image reduced s times (now (height, width) = size).

    Reduced pixel i covers full-resolution pixels [i*s, (i+1)*s): floor the start, ceil the end,
    so every mapped box still holds at least its output size."""
    dh, dw = size
    return [
        (x0 // s, y0 // s, min(-(-x1 // s), dw), min(-(-y1 // s), dh)) for x0, y0, x1, y1 in boxes
    ]


def _decode_for_boxes(
    img: Image.Image,
    boxes: list[Box],
    out_hw: Sequence[tuple[int, int]],
    max_side: int | None = None,
) -> tuple[np.ndarray, list[Box]]:
    """Decode `img` (opened, not loaded) at the largest draft scale the boxes allow.

    With `max_side`, the longer side is brought to at most `max_side` whatever the boxes need (a
    larger draft scale, then Pillow's box-average `reduce` by a whole factor): it bounds the bytes
    of every image, and a box left smaller than its output is then upsampled.
    Returns the (H', W', 4) uint8 RGBX pixels and the boxes in their coordinates."""
    width, height = img.size
    s = draft_factor(boxes, out_hw) if img.format == "JPEG" else 1
    if max_side is not None and img.format == "JPEG":
        s = max(s, next((f for f in (1, 2, 4) if -(-max(width, height) // f) <= max_side), 8))
    if s > 1:
        # Asking for exactly size // s makes Pillow pick reduction s (see JpegImageFile.draft).
        got = img.draft("RGB", (max(1, width // s), max(1, height // s)))
        s = round(width / got[1][2]) if got is not None else 1
    rgb = _as_rgb(img)
    if s > 1:
        boxes = _shrink_boxes(boxes, s, rgb.size[::-1])
    if max_side is not None and max(rgb.size) > max_side:
        # A whole factor, so the boxes stay whole pixels (and the CPU path can cut the same).
        r = -(-max(rgb.size) // max_side)
        reduced = rgb.reduce(r)
        rgb.close()
        rgb = reduced
        boxes = _shrink_boxes(boxes, r, rgb.size[::-1])
    pixels = _pixels(rgb)
    # Pillow's memory is shared with `pixels` where it can be (then close() only drops the
    # file), else it is freed here, before the views are allocated.
    img.close()
    rgb.close()
    return pixels, boxes


# The op behind F.interpolate(mode="bilinear", antialias=True), called directly: it spares the
# Python wrapper's argument checks (a few microseconds on each of the ~20 calls per image) and
# takes `out=`, so each view is written straight into the sample's buffer.
_resize_aa = torch._C._nn._upsample_bilinear2d_aa


# Per-thread reusable crop buffers (see _scratch). They grow to the largest box seen (a few MB
# for photos) and stay for the life of the thread: one loader worker, one set.
_SCRATCH = threading.local()
_MAX_CACHED_VIEWS = 4096


def _scratch(name: str, nbytes: int) -> torch.Tensor:
    """A reusable uint8 buffer of at least `nbytes`: a fresh large allocation per crop costs
    page faults; a worker thread reuses the same few buffers for every image."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
        setattr(_SCRATCH, name, buf)
        _SCRATCH.views = {}  # views of the old buffer must not be handed out again
    return buf


def _image_view(buf: torch.Tensor, h: int, w: int, offset: int = 0) -> torch.Tensor:
    """(1, 4, h, w) view of h*w*4 bytes of `buf` at `offset` laid out as (h, w, 4): channels-last
    strides, which is what selects torch's vectorised uint8 resampling kernel."""
    return buf.as_strided((1, 4, h, w), (h * w * 4, 1, w * 4, 4), offset)


def _scratch_view(name: str, h: int, w: int) -> torch.Tensor:
    """_image_view of the start of scratch buffer `name`, which must already hold h*w*4 bytes
    (see _scratch). Cached per shape: a strided view costs ~1.7 us to build, ~30 per image, and
    the shapes of the intermediate and mirrored views recur image after image."""
    views = _SCRATCH.__dict__.setdefault("views", {})
    view = views.get((name, h, w))
    if view is None:
        if len(views) >= _MAX_CACHED_VIEWS:
            views.clear()
        view = views[(name, h, w)] = _image_view(getattr(_SCRATCH, name), h, w)
    return view


# When to run the vertical pass as a call of its own, before the horizontal one. The horizontal
# pass costs ~3x the vertical one per output pixel, so shrinking rows first saves it
# (box rows - output rows) x output width pixels, but the extra call costs ~5 us. Measured
# break-even (torch 2.13, one thread): ~1.4x shrink for a 96 px view, ~1.1x for a 224 px one,
# i.e. (hin - h) * w ~ 3500 for both.
_SPLIT_WORK = 3500


def _crop_resize(
    pixels: np.ndarray,
    boxes: Sequence[Box],
    out_hw: Sequence[tuple[int, int]],
    flips: Sequence[bool],
) -> list[np.ndarray]:
    """Cut each box out of `pixels` (H, W, 4) RGBX, resize it to its (h, w), flip it if asked.

    The resize is torch's antialiased bilinear on channels-last uint8 (`_upsample_bilinear2d_aa`,
    what F.interpolate(mode="bilinear", antialias=True) runs): a vectorised port of Pillow's
    resampling, so like Pillow's BILINEAR it widens its filter when it downsamples and crops do
    not alias, and it is several times faster than Pillow's own resize(box=...). It runs on 4
    channels, Pillow's own layout: the decoded image needs no repacking, and copies and flips
    move whole 32-bit pixels. When a box shrinks enough vertically (see _SPLIT_WORK), the
    vertical pass runs first as its own call: the horizontal pass is the slower one per pixel,
    and this way it runs over the output rows instead of the box rows. All views of one image
    are written into one buffer and returned as (h, w, 4) numpy views of it.
    """
    total = sum(h * w for h, w in out_hw)
    out = torch.empty(total * 4, dtype=torch.uint8)
    out_np = out.numpy()
    # int32 views, one element per pixel: copies and flips move whole pixels.
    out_px = out_np.view(np.int32)
    image_px = pixels.view(np.int32)[..., 0]
    src = _scratch("src", max((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes) * 4)
    src_px = src.numpy().view(np.int32)
    mid_size = max(h * (x1 - x0) for (x0, _, x1, _), (h, _) in zip(boxes, out_hw, strict=True))
    _scratch("mid", mid_size * 4)  # grown here, used through _scratch_view
    mirror = _scratch("mirror", max(h * w for h, w in out_hw) * 4)
    mirror_px = mirror.numpy().view(np.int32)
    resize, views, offset = _resize_aa, [], 0
    for (x0, y0, x1, y1), (h, w), flip in zip(boxes, out_hw, flips, strict=True):
        hin, win = y1 - y0, x1 - x0
        # The kernel wants dense input: copy the box (row memcpy) into the scratch buffer.
        np.copyto(src_px[: hin * win].reshape(hin, win), image_px[y0:y1, x0:x1])
        x = _image_view(src, hin, win)
        if (hin - h) * w > _SPLIT_WORK and win != w:
            x = resize(x, (h, win), False, None, None, out=_scratch_view("mid", h, win))
        if flip:
            # Resize next door, then copy the rows back mirrored, a 32-bit pixel at a time.
            resize(x, (h, w), False, None, None, out=_scratch_view("mirror", h, w))
            np.copyto(
                out_px[offset : offset + h * w].reshape(h, w),
                mirror_px[: h * w].reshape(h, w)[:, ::-1],
            )
        else:
            resize(x, (h, w), False, None, None, out=_image_view(out, h, w, offset * 4))
        views.append(out_np[offset * 4 : (offset + h * w) * 4].reshape(h, w, 4))
        offset += h * w
    return views


def _ratio_range(ratio: tuple[float, float], out_hw: tuple[int, int]) -> tuple[float, float]:
    """log(w/h) range of crops for an output of shape out_hw: the configured range is about a
    square, so it is centred on the output's aspect ratio (a bucketed 2:1 view gets ~2:1 boxes
    and is not stretched)."""
    shift = math.log(out_hw[1] / out_hw[0])
    return math.log(ratio[0]) + shift, math.log(ratio[1]) + shift


def _views(
    img: Image.Image,
    boxes: list[Box],
    out_hw: list[tuple[int, int]],
    flips: list[bool],
    on_device: bool,
    max_side: int | None,
) -> list[np.ndarray] | Decoded:
    """Decode `img` for its boxes, then cut the views here, or (on_device) ship the pixels and
    boxes for the device to cut (`device_crops.cut_views`)."""
    if on_device:
        pixels, boxes = _decode_for_boxes(img, boxes, out_hw, max_side)
        return Decoded(pixels, boxes, flips, out_hw)
    pixels, boxes = _decode_for_boxes(img, boxes, out_hw)
    return _crop_resize(pixels, boxes, out_hw, flips)


class DinoCrops:
    """DINO multicrop: 2 global views then `local_number` local views of one image.

    With `on_device`, the views are not cut here: the call returns a `Decoded` (the pixels, at
    most `max_side` on the longer side where the boxes allow, and the same seeded boxes and
    flips), for `collate_decoded` and the device's `cut_views`."""

    def __init__(self, crops: CropsConfig, *, on_device: bool = False):
        self.crops = crops
        self.on_device = on_device
        self.num_views = 2 + crops.local_number
        self._scales = [crops.global_scale] * 2 + [crops.local_scale] * crops.local_number

    def __call__(
        self,
        data: bytes,
        rng: np.random.Generator,
        global_hw: tuple[int, int] | None = None,
        local_hw: tuple[int, int] | None = None,
    ) -> list[np.ndarray] | Decoded:
        """Views as (H, W, 4) uint8 RGBX arrays: global_hw (default square global_size) twice, then
        local_hw (default square local_size) local_number times (on_device: a `Decoded`)."""
        c = self.crops
        global_hw = tuple(global_hw or (c.global_size, c.global_size))
        local_hw = tuple(local_hw or (c.local_size, c.local_size))
        out_hw = [global_hw] * 2 + [local_hw] * c.local_number
        log_ratios = [_ratio_range(c.ratio, global_hw)] * 2 + [
            _ratio_range(c.ratio, local_hw)
        ] * c.local_number
        img = Image.open(io.BytesIO(data))  # header only: the size, no pixels yet
        boxes, flips = sample_boxes(rng, img.size[::-1], self._scales, log_ratios, c.hflip)
        return _views(img, boxes, out_hw, flips, self.on_device, c.device_max_side)


class MaeCrop:
    """MAE / SimMIM view: one random resized crop (mae_scale, ratio) with a flip (on_device: a
    `Decoded` for the device to cut, as DinoCrops)."""

    def __init__(self, crops: CropsConfig, *, on_device: bool = False):
        self.crops = crops
        self.on_device = on_device
        self.num_views = 1

    def __call__(
        self, data: bytes, rng: np.random.Generator, hw: tuple[int, int] | None = None
    ) -> list[np.ndarray] | Decoded:
        """One (H, W, 4) uint8 RGBX view; hw defaults to square mae_size."""
        c = self.crops
        hw = tuple(hw or (c.mae_size, c.mae_size))
        img = Image.open(io.BytesIO(data))
        boxes, flips = sample_boxes(
            rng, img.size[::-1], [c.mae_scale], [_ratio_range(c.ratio, hw)], c.hflip
        )
        return _views(img, boxes, [hw], flips, self.on_device, c.device_max_side)


class EvalCrop:
    """Evaluation view: resize the shorter side to `resize`, then take the centre `crop`.

    Done as one crop-then-resize: the centre box is computed in the original image (the
    largest box of the output's shape, shrunk by crop/resize) and resized once. With
    `on_device`, returns a `Decoded` for the device to cut (longer side capped at `max_side`
    where the box allows)."""

    def __init__(
        self, resize: int, crop: int, *, on_device: bool = False, max_side: int | None = None
    ):
        if not 0 < crop <= resize:
            raise ValueError(f"EvalCrop needs 0 < crop <= resize, got crop={crop}, resize={resize}")
        self.resize, self.crop = resize, crop
        self.on_device, self.max_side = on_device, max_side
        self.num_views = 1

    def __call__(
        self, data: bytes, rng: np.random.Generator | None = None, hw: tuple[int, int] | None = None
    ) -> list[np.ndarray] | Decoded:
        """One (H, W, 4) uint8 RGBX view; hw defaults to (crop, crop). `rng` is unused."""
        hw = tuple(hw or (self.crop, self.crop))
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        # Largest box of aspect hw inside the image, then shrunk as the resize + crop would.
        fit = min(width / hw[1], height / hw[0]) * self.crop / self.resize
        bw = max(1, min(width, round(hw[1] * fit)))
        bh = max(1, min(height, round(hw[0] * fit)))
        x0, y0 = (width - bw) // 2, (height - bh) // 2
        box = [(x0, y0, x0 + bw, y0 + bh)]
        return _views(img, box, [hw], [False], self.on_device, self.max_side)


class ResizeTo:
    """NaViT view: the whole image resized to exactly hw, flipped with probability `hflip`."""

    def __init__(self, hflip: float = 0.5):
        self.hflip = hflip
        self.num_views = 1

    def __call__(
        self, data: bytes, rng: np.random.Generator, hw: tuple[int, int]
    ) -> list[np.ndarray]:
        """One (H, W, 4) uint8 RGBX view of shape hw."""
        hw = tuple(hw)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        flip = bool(rng.random() < self.hflip)
        pixels, boxes = _decode_for_boxes(img, [(0, 0, width, height)], [hw])
        return _crop_resize(pixels, boxes, [hw], [flip])


def collate_views(samples: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """Stack view i of every sample: a list of (B, 4, H, W) uint8 RGBX tensors.

    The tensors have channels-first shape over channels-last memory (a permuted view of the
    stacked (B, H, W, 4) arrays): no transpose on the CPU, and a dense block to pin and copy to
    the device, where `normalize` and `DeviceAugment` drop the padding channel."""
    if not samples:
        return []
    return [
        torch.from_numpy(np.stack([s[i] for s in samples])).permute(0, 3, 1, 2)
        for i in range(len(samples[0]))
    ]


# ------------------------------------------------------------------------------------------------
# Device side: batched colour augmentation and normalisation
# ------------------------------------------------------------------------------------------------


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3 or 4, H, W) RGB or RGBX -> float32 RGB in [0, 1], contiguous NCHW."""
    return x[:, :3].to(torch.float32).div_(255.0).contiguous()


def _normalize_float(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def normalize(
    views: list[torch.Tensor], mean: Sequence[float], std: Sequence[float]
) -> list[torch.Tensor]:
    """uint8 (B, 3, H, W) RGB or (B, 4, H, W) RGBX views -> float32 (B, 3, H, W)
    (x / 255 - mean) / std, on the views' device."""
    out = []
    for v in views:
        x = _to_float(v)
        out.append(_normalize_float(x, _stats(mean, x), _stats(std, x)))
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, ITU-R 601-2 weights (as Pillow's convert('L'))."""
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's `_blend`)."""
    f = _per_image(factor)
    return (f * x + (1 - f) * other).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) RGB in [0, 1] -> hue, saturation, value, each (B, H, W) in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, 1.0)
    d = torch.where(delta > 0, delta, 1.0)  # grey pixels: every difference below is 0 -> hue 0
    h = torch.where(
        maxc == r, (g - b) / d, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4)
    )
    return (h / 6).remainder_(1.0), s, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of `_rgb_to_hsv`, as channel n of (r, g, b) = v - v*s*clamp(min(k, 4-k), 0, 1)
    with k = (n + 6h) mod 6 and n = 5, 3, 1: no per-sector branching."""
    h6, vs = h * 6, v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(v - vs * torch.minimum(k, 4 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by shift[i] turns (torchvision's adjust_hue, batched)."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift.view(-1, 1, 1)).remainder_(1.0), s, v)


def _blur_kernel_size(hw: tuple[int, int]) -> int:
    """Odd kernel size ~10% of the shorter side: 23 at 224 (DINO's choice), 11 at 96."""
    return 2 * max(1, round(0.05 * min(hw))) + 1


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image: a grouped conv over B*3 channels."""
    bsz, ch, height, width = x.shape
    k = min(_blur_kernel_size((height, width)), 2 * min(height, width) - 1)
    radius = k // 2
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)  # (B, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(ch, dim=0)  # (B*3, k)
    y = x.reshape(1, bsz * ch, height, width)
    pad = min(radius, height - 1, width - 1)  # reflect padding needs pad < size
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    if pad < radius:
        y = F.pad(y, (radius - pad,) * 4, mode="replicate")
    y = F.conv2d(y, kernel.view(bsz * ch, 1, 1, k), groups=bsz * ch)
    y = F.conv2d(y, kernel.view(bsz * ch, 1, k, 1), groups=bsz * ch)
    return y.view(bsz, ch, height, width)


class DeviceAugment:
    """DINO's colour recipe on uint8 batches, then normalisation; per-image random decisions.

    Per view kind (first global, second global, locals; ColorConfig's 3-tuples) and per image:
    colour jitter with probability jitter_p (brightness, contrast, saturation, hue, in this
    fixed order; the first three commute up to clamping, so the order mostly places hue), then
    grayscale (grayscale_p), Gaussian blur (blur_p, sigma ~ U[0.1, 2.0], kernel ~10% of the
    shorter side), solarisation (solarize_p, threshold 128/255), then (x - mean) / std.
    With `color.enabled` False it only normalises. Random numbers come from the generator on
    the generator's device and move to the views' device.
    """

    def __init__(self, color: ColorConfig, num_global: int = 2):
        self.color = color
        self.num_global = num_global

    def _kind(self, index: int) -> int:
        if index == 0:
            return 0
        return 1 if index < self.num_global else 2

    def augment(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """The colour-augmented views as float32 in [0, 1], not normalised."""
        out = []
        for i, v in enumerate(views):
            x = _to_float(v)
            if self.color.enabled:
                x = self._augment_one(x, self._kind(i), generator)
            out.append(x)
        return out

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """uint8 (B, 3, H, W) RGB or (B, 4, H, W) RGBX views -> float32 (B, 3, H, W) normalised
        views."""
        xs = self.augment(views, generator)
        if not xs:
            return xs
        mean, std = _stats(self.color.mean, xs[0]), _stats(self.color.std, xs[0])
        return [_normalize_float(x, mean, std) for x in xs]

    def view(self, view: torch.Tensor, index: int, generator: torch.Generator) -> torch.Tensor:
        """View `index` of a batch's list on its own (its kind from the index), as `__call__`
        treats it: uint8 (B, 3 or 4, H, W) -> float32 normalised (B, 3, H, W). Packed (NaViT)
        views run it once per image shape."""
        x = _to_float(view)
        if self.color.enabled:
            x = self._augment_one(x, self._kind(index), generator)
        return _normalize_float(x, _stats(self.color.mean, x), _stats(self.color.std, x))

    def _augment_one(self, x: torch.Tensor, kind: int, generator: torch.Generator) -> torch.Tensor:
        c = self.color
        bsz = x.shape[0]
        # All of this view's random numbers in one draw: 9 uniforms per image.
        u = torch.rand((bsz, 9), generator=generator, device=generator.device).to(x.device)

        def span(col: int, lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * u[:, col]

        def pick(col: int, p: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            """a for the images whose draw in column col is < p, else b (no sync, no gather)."""
            return a if p >= 1 else torch.where(_per_image(u[:, col] < p), a, b)

        if c.jitter_p > 0:
            b = span(1, max(0.0, 1 - c.brightness), 1 + c.brightness)
            k = span(2, max(0.0, 1 - c.contrast), 1 + c.contrast)
            s = span(3, max(0.0, 1 - c.saturation), 1 + c.saturation)
            h = span(4, -c.hue, c.hue)
            y = _blend(x, torch.zeros_like(x[:, :1]), b)
            y = _blend(y, _gray(y).mean(dim=(2, 3), keepdim=True), k)
            y = _blend(y, _gray(y), s)
            if c.hue > 0:
                y = _adjust_hue(y, h)
            x = pick(0, c.jitter_p, y, x)
        if c.grayscale_p > 0:
            x = pick(5, c.grayscale_p, _gray(x).expand_as(x), x)
        if c.blur_p[kind] > 0:
            x = pick(6, c.blur_p[kind], _gaussian_blur(x, span(7, 0.1, 2.0)), x)
        if c.solarize_p[kind] > 0:
            # Solarise at 128 on the uint8 scale: x >= 128/255 becomes 1 - x. The test is against
            # 127.5/255, which is the same for uint8 levels and immune to float rounding at 128.
            solar = torch.where(x >= 127.5 / 255, 1.0 - x, x)
            x = pick(8, c.solarize_p[kind], solar, x)
        return x.contiguous()
