"""Digital family: brightness, contrast, elastic_transform, pixelate, jpeg_compression, saturate.

Parameters of ImageNet-C as implemented by ``imagecorruptions`` 1.1.2 (the reference). All six are scale-free
or scaled by the reference itself (pixelate and elastic_transform use fractions of the image size), so they
need no size rule. On 1-channel images each corruption does what the reference's own grayscale code path
does (the function called on a mode-"L" image): brightness and contrast act on the gray value, saturate is
the identity, pixelate and JPEG act on the single channel (JPEG of a gray image is its luma-only JPEG).
See ``docs/corruptions_weather_digital.md``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechvit.corruptions._kernels import clamp01_, gaussian_kernel1d, separable_filter, uniform

BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to the HSV value channel
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # (x - channel mean) * c + channel mean
SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))  # HSV s -> s * a + b
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # PIL BOX down-scale factor, then NEAREST back up
JPEG_QUALITY = (25, 18, 15, 10, 7)  # PIL / libjpeg quality
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)  # displacement gain
ELASTIC_SIGMA = 0.01  # Gaussian smoothing of the displacement field, fraction of the image side
ELASTIC_MAX = 0.005  # uniform raw displacement in [-m, m] * H pixels (both axes use H, as the reference)


def _check_rgb(x: Tensor, name: str) -> None:
    if x.shape[1] != 3:
        raise ValueError(f"{name} needs 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")


# ---------------------------------------------------------------- brightness, contrast, saturate


def brightness(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Add ``c`` to the HSV value (max over channels). Hue and saturation are kept, so every channel is scaled
    by ``v' / v`` (HSV -> RGB is linear in v); black pixels (v = 0, hue 0, s = 0) become gray ``v'``."""
    c = BRIGHTNESS[severity - 1]
    if x.shape[1] == 1:
        return clamp01_(x + c)
    _check_rgb(x, "brightness")
    v = x.amax(1, keepdim=True)
    v_new = clamp01_(v + c)
    scaled = x * (v_new / v.clamp_min(torch.finfo(x.dtype).tiny))
    # where v = 0 every channel is 0, so adding v_new there (and 0 elsewhere) sets them to gray v_new
    return clamp01_(scaled.add_(torch.where(v > 0, 0.0, v_new)))


def contrast(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Shrink each channel towards its own mean over the image."""
    c = CONTRAST[severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    # c x + (1 - c) mean: one pass over the image (was three)
    return clamp01_(torch.add(means * (1 - c), x, alpha=c))


def saturate(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """HSV saturation ``s -> clip(s * a + b)`` with hue and value kept (exactly skimage's rgb2hsv/hsv2rgb
    round trip, done in closed form). Gray pixels have hue 0 (red) in skimage, so ``b > 0`` tints them red,
    as in the reference. The identity on 1-channel images (the reference's grayscale path keeps channel 0,
    which is the value)."""
    a, b = SATURATE[severity - 1]
    if x.shape[1] == 1:
        return x.clone()
    _check_rgb(x, "saturate")
    v = x.amax(1, keepdim=True)
    delta = v - x.amin(1, keepdim=True)
    s = torch.where(v > 0, delta / v.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(v))
    s_new = clamp01_(s * a + b)
    # channel = v * (1 - s * k) with k = (v - channel) / delta fixed by the hue (in place on one temporary)
    colour = torch.sub(v, x).mul_(s_new * v).div_(delta.clamp_min(torch.finfo(x.dtype).tiny)).neg_().add_(v)
    # gray pixels (delta = 0): hue 0, i.e. (v, v (1 - s'), v (1 - s')); channel 0 is already v there
    torch.where(delta > 0, colour[:, 1:], v * (1 - s_new), out=colour[:, 1:])
    return clamp01_(colour)


# ---------------------------------------------------------------- pixelate (PIL BOX down, NEAREST up)


@lru_cache(maxsize=64)
def _pil_box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's resample coefficients for the BOX filter (``precompute_coeffs``), as an [n_out, n_in] matrix."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = np.zeros((n_out, n_in))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        t = (np.arange(xmin, xmax) - center + 0.5) / filterscale
        w = ((t > -0.5) & (t <= 0.5)).astype(np.float64)
        if w.sum() > 0:
            m[xx, xmin:xmax] = w / w.sum()
    return m


@lru_cache(maxsize=64)
def _pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel of Pillow's NEAREST resize (``ImagingScaleAffine``): the coordinate
    starts at ``scale / 2`` and ``scale`` is added per pixel in float64, then truncated (the running sum
    matters: ``(18 + 0.5) * 14 / 37`` gives 7 but the sum gives 6.999...)."""
    scale = n_in / n_out
    coord = np.cumsum(np.concatenate([[scale * 0.5], np.full(n_out - 1, scale)]))
    return coord.astype(np.int64).clip(0, n_in - 1)


@lru_cache(maxsize=64)
def _pil_box_windows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each output pixel's window in ``_pil_box_matrix`` (its rows are 0/1 over one
    contiguous range, all weights equal)."""
    nz = _pil_box_matrix(n_in, n_out) > 0
    return nz.argmax(1), nz.sum(1)


def _box_rows(y: Tensor, n_out: int) -> Tensor:
    """Pillow's BOX resample along dim 2 (rows) of ``[N, C, H, W]``: the mean of each window, as a sum of
    whole-row copies (``index_select`` of rows is a contiguous copy; along the last dim it is ~3x slower)."""
    lo, cnt = _pil_box_windows(y.shape[2], n_out)
    dev = y.device
    out = y.index_select(2, torch.from_numpy(lo).to(dev))
    for k in range(1, int(cnt.max())):
        sel = np.flatnonzero(cnt > k)
        idx = torch.from_numpy(lo[sel] + k).to(dev)
        if len(sel) == n_out:
            out += y.index_select(2, idx)
        else:
            out.index_add_(2, torch.from_numpy(sel).to(dev), y.index_select(2, idx))
    return out.div_(torch.from_numpy(cnt.astype(np.float32)).to(y).view(1, 1, -1, 1))


def _pil_round_(x: Tensor) -> Tensor:
    """Round to 8-bit levels in place (values already in [0, 255])."""
    return x.add_(0.5).floor_()


def _pil_round(x: Tensor) -> Tensor:
    return torch.floor(x + 0.5).clamp(0, 255)


def pixelate(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """``PIL.resize((int(W * c), int(H * c)), BOX)`` then ``resize((W, H), NEAREST)``, on the 8-bit image
    (Pillow resamples horizontally, rounds to 8 bits, then vertically). Both box passes run along rows of a
    transposed copy (one transpose of the image, one of the narrow intermediate): 5x faster on CPU than
    cumulative sums or gathers along the last dim at 224 px (measured 60 -> 12 ms for 32 images)."""
    c = PIXELATE[severity - 1]
    n, ch, h, w = x.shape
    sh, sw = max(int(h * c), 1), max(int(w * c), 1)
    y = torch.empty((n, ch, w, h), dtype=x.dtype, device=x.device)  # transposed and scaled in one pass
    y = _pil_round_(torch.mul(x.transpose(2, 3), 255, out=y))  # [n, ch, w, h], 8-bit levels
    y = _pil_round_(_box_rows(y, sw)).transpose(2, 3).contiguous()  # horizontal pass -> [n, ch, h, sw]
    y = _pil_round_(_box_rows(y, sh)).div_(255)  # vertical pass -> [n, ch, sh, sw]
    dev = y.device.type
    if (
        h * w >= 64 * 64
        and _torch_nearest_is_pillows(sh, h, y.dtype, dev)
        and _torch_nearest_is_pillows(sw, w, y.dtype, dev)
    ):
        # torch's "nearest-exact" picks the same source pixels for these sizes (checked): 2x faster at 224 px
        return F.interpolate(y, size=(h, w), mode="nearest-exact")
    rows = torch.from_numpy(np.bincount(_pil_nearest_index(sh, h), minlength=sh)).to(x.device)
    cols = torch.from_numpy(np.bincount(_pil_nearest_index(sw, w), minlength=sw)).to(x.device)
    # NEAREST enlargement: the indices are non-decreasing, so it is a repeat of each row / column
    return y.repeat_interleave(cols, dim=3, output_size=w).repeat_interleave(rows, dim=2, output_size=h)


@lru_cache(maxsize=256)
def _torch_nearest_is_pillows(n_in: int, n_out: int, dtype: torch.dtype, device: str) -> bool:
    """Whether ``F.interpolate(mode="nearest-exact")`` from ``n_in`` to ``n_out`` pixels picks Pillow's NEAREST
    source pixels (its float32 ``floor((j + 0.5) * scale)`` differs from Pillow's running sum for some sizes)."""
    ramp = torch.arange(n_in, dtype=dtype, device=device).view(1, 1, 1, n_in)
    idx = F.interpolate(ramp, size=(1, n_out), mode="nearest-exact").view(-1).long().cpu().numpy()
    return bool(np.array_equal(idx, _pil_nearest_index(n_in, n_out)))


# ---------------------------------------------------------------- JPEG (libjpeg baseline, as Pillow saves)

_LUMA_QT = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
])  # fmt: skip
_CHROMA_QT = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
])  # fmt: skip


def quant_table(quality: int, chroma: bool = False) -> np.ndarray:
    """libjpeg's ``jpeg_set_quality(quality, force_baseline=TRUE)`` table (Annex K base, 8x8, natural order)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = _CHROMA_QT if chroma else _LUMA_QT
    return np.clip((base * scale + 50) // 100, 1, 255).reshape(8, 8)


@lru_cache(maxsize=4)
def _dct_matrix(device: str) -> Tensor:
    k = np.arange(8)
    d = np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return torch.from_numpy(d).float().to(device)  # orthonormal DCT-II = JPEG's FDCT


# JPEG runs in float32 throughout: every value of libjpeg's integer arithmetic below is an integer under 2**24,
# so float32 holds it exactly, and a shift right by k is ``floor(v * 2**-k)`` (also exact). The integer
# version spent most of its time converting dtypes (measured 118 -> 35 ms for 32 images at 224 px).


def _shr_(v: Tensor, bits: int) -> Tensor:
    """``v >> bits`` (arithmetic shift, i.e. floor division) on integer-valued float32, in place."""
    return v.mul_(2.0**-bits).floor_()


def _jpeg_plane(p: Float[Tensor, "n h w"], qt: np.ndarray) -> Tensor:
    """Level shift, 8x8 DCT, quantise (round half away from zero), dequantise, inverse DCT, round, clip, in
    place on ``p`` (float32 8-bit values, sides divisible by 8). Each 1-D transform is one matrix product
    with the 8x8 DCT matrix: along rows of each 8-row band, then along each 8-column block."""
    n, h, w = p.shape
    d = _dct_matrix(str(p.device))
    q = torch.from_numpy(qt).float().to(p.device).view(1, 1, 8, 1, 8)
    # two buffers, ping-ponged through matmul(out=): fewer live full-size temporaries
    a = p.sub_(128)
    b = torch.matmul(d, a.view(n * h // 8, 8, w))  # DCT along rows of each block
    torch.matmul(b.view(-1, 8), d.T, out=a.view(-1, 8))  # along columns: coefficients (u, v)
    coef = a.view(n, h // 8, 8, w // 8, 8)
    torch.abs(coef, out=b.view(coef.shape)).div_(q).add_(0.5).floor_().mul_(q).copysign_(coef)
    torch.matmul(d.T, b.view(n * h // 8, 8, w), out=a.view(n * h // 8, 8, w))
    torch.matmul(a.view(-1, 8), d, out=b.view(-1, 8))
    return b.view(n, h, w).add_(128.5).floor_().clamp_(0, 255)


def _fix(v: float) -> int:
    return int(v * 65536 + 0.5)


def _rgb_to_ycbcr(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """libjpeg's fixed-point RGB -> YCbCr (jccolor.c) on 8-bit values in float32 [n, 3, h, w]."""
    r, g, b = rgb.unbind(1)
    half, off = 1 << 15, 128 << 16
    y = _shr_((r * _fix(0.299)).add_(g, alpha=_fix(0.587)).add_(b, alpha=_fix(0.114)).add_(half), 16)
    cb = (r * -_fix(0.16874)).add_(g, alpha=-_fix(0.33126)).add_(b, alpha=_fix(0.5)).add_(off + half - 1)
    cr = (r * _fix(0.5)).add_(g, alpha=-_fix(0.41869)).add_(b, alpha=-_fix(0.08131)).add_(off + half - 1)
    return y, _shr_(cb, 16), _shr_(cr, 16)


def _ycbcr_to_rgb(y: Tensor, cb: Tensor, cr: Tensor) -> Tensor:
    """libjpeg's fixed-point YCbCr -> RGB (jdcolor.c) on float32 [n, h, w] -> [n, 3, h, w] clipped to 0..255."""
    half = 1 << 15
    cb, cr = cb.sub_(128), cr.sub_(128)
    out = torch.empty((y.shape[0], 3, *y.shape[1:]), dtype=y.dtype, device=y.device)
    r, g, b = out.unbind(1)
    _shr_(torch.mul(cr, _fix(1.40200), out=r).add_(half), 16).add_(y)
    _shr_(torch.mul(cb, -_fix(0.34414), out=g).add_(cr, alpha=-_fix(0.71414)).add_(half), 16).add_(y)
    _shr_(torch.mul(cb, _fix(1.77200), out=b).add_(half), 16).add_(y)
    return out.clamp_(0, 255)


def _downsample_h2v2(p: Tensor) -> Tensor:
    """libjpeg's 2x2 chroma average with the alternating rounding bias 1, 2, 1, 2, ... (jcsample.c)."""
    n, h, w = p.shape
    s = p[:, 0::2] + p[:, 1::2]
    s = s[..., 0::2] + s[..., 1::2]
    bias = 1 + (torch.arange(w // 2, device=p.device, dtype=p.dtype) % 2)
    return _shr_(s.add_(bias), 2)


def _upsample_h2v2_fancy(p: Tensor) -> Tensor:
    """libjpeg's "fancy" (triangle) 2x chroma upsampling with the edges repeated (jdsample.c)."""
    n, h, w = p.shape
    p3 = p * 3
    rows = torch.empty(
        (n, h, 2, w), dtype=p.dtype, device=p.device
    )  # column sums of the output rows 2i, 2i+1
    torch.add(p3[:, 1:], p[:, :-1], out=rows[:, 1:, 0])
    torch.add(p3[:, :-1], p[:, 1:], out=rows[:, :-1, 1])
    rows[:, 0, 0] = p3[:, 0] + p[:, 0]
    rows[:, -1, 1] = p3[:, -1] + p[:, -1]
    rows = rows.view(n, 2 * h, w)
    r3 = rows * 3
    out = torch.empty((n, 2 * h, w, 2), dtype=p.dtype, device=p.device)
    torch.add(r3[..., 1:], rows[..., :-1], out=out[..., 1:, 0])
    torch.add(r3[..., :-1], rows[..., 1:], out=out[..., :-1, 1])
    out[..., 0, 0] = r3[..., 0] + rows[..., 0]
    out[..., -1, 1] = r3[..., -1] + rows[..., -1]
    out[..., 0].add_(8)
    out[..., 1].add_(7)
    return _shr_(out, 4).view(n, 2 * h, 2 * w)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Baseline JPEG at ``quality`` as Pillow saves and reads it (libjpeg: YCbCr, 4:2:0 chroma subsampling,
    Annex K tables scaled by quality, fancy upsampling), batched. 1-channel images are coded luma-only, which
    is what Pillow does to a mode-"L" image converted to RGB and back. Returns 8-bit levels / 255.

    On CPU: torchvision's libjpeg-turbo codec (``encode_jpeg``/``decode_jpeg`` on the list of images), the
    library Pillow itself links, so the output equals Pillow's bit for bit (tested) and runs at its speed; the
    torch version below (``jpeg_torch``, >= 30 dB to Pillow, ~3% of values off by more than a level) runs
    elsewhere (GPU), where it stays on the device."""
    if x.device.type == "cpu":
        return _jpeg_libjpeg(x, quality)
    return jpeg_torch(x, quality)


def _jpeg_libjpeg(x: Tensor, quality: int) -> Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if x.shape[1] != 1:
        _check_rgb(x, "jpeg_compression")
    # 8-bit levels floor(255 x + 0.5): 255 x + 0.5 lies in [0.5, 255.5] and the uint8 cast truncates, so no
    # floor or clamp pass is needed (3 passes over the batch instead of 5)
    q = torch.mul(x, 255).add_(0.5).to(torch.uint8)
    out = torch.stack(decode_jpeg(encode_jpeg(list(q), quality=quality), mode=ImageReadMode.UNCHANGED))
    if x.dtype == torch.get_default_dtype():  # uint8 -> float and the division in one pass (the same k / 255)
        return torch.div(out, 255)
    return out.to(x.dtype).div_(255)


def jpeg_torch(x: Tensor, quality: int) -> Tensor:
    """The JPEG pipeline of ``jpeg`` in torch ops (float32 arithmetic that reproduces libjpeg's integer steps
    up to its DCT rounding), for images on any device."""
    n, c, h, w = x.shape
    q = _pil_round_(x.float() * 255).clamp_(0, 255)
    ph, pw = -h % 16, -w % 16  # libjpeg repeats the last row / column to fill whole MCUs
    q = F.pad(q, (0, pw, 0, ph), mode="replicate") if ph or pw else q
    if c == 1:
        return (_jpeg_plane(q[:, 0].contiguous(), quant_table(quality))[:, :h, :w] / 255)[:, None].to(x.dtype)
    _check_rgb(x, "jpeg_compression")
    y, cb, cr = _rgb_to_ycbcr(q)
    del q
    y = _jpeg_plane(y, quant_table(quality))
    hc, wc = math.ceil(h / 2), math.ceil(w / 2)
    chroma = []
    for p in (cb, cr):
        p = _jpeg_plane(_downsample_h2v2(p), quant_table(quality, chroma=True))
        chroma.append(_upsample_h2v2_fancy(p[:, :hc, :wc])[:, :h, :w])
    rgb = _ycbcr_to_rgb(y[:, :h, :w], *chroma)
    return rgb.div_(255).to(x.dtype)


def jpeg_compression(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    return jpeg(x, JPEG_QUALITY[severity - 1])


# ---------------------------------------------------------------- elastic transform


def elastic_transform(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """The reference's elastic transform: a displacement field drawn uniform in ``[-0.005 H, 0.005 H]`` per
    pixel and axis, smoothed by a Gaussian of sigma ``0.01 * (H, W)`` (truncate 3, scipy "reflect"), times
    ``alpha``; then bilinear resampling with reflected borders (``map_coordinates(order=1, mode='reflect')``,
    which is ``grid_sample(padding_mode='reflection', align_corners=False)``). One field per image."""
    alpha = ELASTIC_ALPHA[severity - 1]
    n, c, h, w = x.shape
    max_d = h * ELASTIC_MAX
    u = uniform((n, 2, h, w), generator, x.dtype, x.device).mul_(2 * max_d).sub_(max_d)
    ky = gaussian_kernel1d(h * ELASTIC_SIGMA, truncate=3.0, dtype=x.dtype, device=x.device)
    kx = gaussian_kernel1d(w * ELASTIC_SIGMA, truncate=3.0, dtype=x.dtype, device=x.device)
    dx, dy = separable_filter(u, ky, kx, mode="symmetric").unbind(1)  # reference draws dx first
    # grid_sample's normalised coordinates, (2 * (j + alpha * dx) + 1) / w - 1, written straight into the grid
    grid = torch.empty((n, h, w, 2), device=x.device, dtype=x.dtype)  # [n, h, w, (x, y)]
    cols = (2 * torch.arange(w, device=x.device, dtype=x.dtype) + 1) / w - 1
    rows = (2 * torch.arange(h, device=x.device, dtype=x.dtype)[:, None] + 1) / h - 1
    torch.add(cols, dx, alpha=2 * alpha / w, out=grid[..., 0])
    torch.add(rows, dy, alpha=2 * alpha / h, out=grid[..., 1])
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return clamp01_(out)
