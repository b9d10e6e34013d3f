"""Shared batched building blocks for the corruptions (torch, any device).

Padding modes are named after torch/cv2/scipy as follows:
``"reflect"`` = cv2 BORDER_REFLECT_101 = numpy/torch "reflect" (edge pixel not repeated: dcb|abcd|cba);
``"symmetric"`` = cv2 BORDER_REFLECT = scipy.ndimage "reflect" (edge repeated: cba|abcd|dcb);
``"replicate"`` = scipy.ndimage "nearest" = cv2 BORDER_REPLICATE; ``"wrap"``; ``"constant"`` (zeros).
Unlike ``torch.nn.functional.pad`` these work for any pad width, however small the image.
"""

from __future__ import annotations

import math
from contextvars import ContextVar

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

PAD_MODES = ("reflect", "symmetric", "replicate", "wrap", "constant")

# ITU-R 601 luma weights, as used by the reference (imagecorruptions.rgb2gray).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def clamp01(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0)


def clamp01_(x: Tensor) -> Tensor:
    """Clamp to [0, 1] in place (for temporaries: a fresh full-size tensor costs page faults on CPU, a 224 px
    batch of 32 ~5 ms, as much as the clamp itself)."""
    return x.clamp_(0.0, 1.0)


_SFC64_MIN = 1 << 16  # below this many values, keying a new SFC64 stream costs more than it saves


def random_bits(n: int, generator: torch.Generator, device=None) -> Tensor:
    """``n`` random int64 values, all 64 bits uniformly random, drawn from ``generator``.

    On CPU the bits come from numpy's SFC64 generator seeded by two draws of ``generator``: torch's CPU
    generator hands out values one call at a time (measured ~8 ns per int64 with ``random_``, 3-8x slower than
    SFC64's ``random_raw``, and ``torch.rand`` ~12 ns per float32), which bounds every noise corruption at 224
    px. The stream is still a deterministic function of ``generator``'s state. On other devices torch's own
    generator (Philox on CUDA) is fast and is used directly, and so it is for small draws (< 65536 values),
    where keying a new stream would cost more than it saves (fog's coarse fractal levels)."""
    device = torch.device(device) if device is not None else torch.device(generator.device)
    if device.type != "cpu" or n < _SFC64_MIN:
        return torch.empty(n, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    key = torch.randint(0, 2**62, (2,), generator=generator, device=generator.device).tolist()
    raw = np.random.SFC64(np.random.SeedSequence(key)).random_raw(n)
    return torch.from_numpy(raw.view(np.int64))


def uniform31(shape, generator: torch.Generator, device=None) -> Tensor:
    """One uniform integer in [0, 2**31) per element (int32): the two 32-bit halves of ``random_bits``, top
    bit masked off. 3-4x faster than ``torch.rand`` on CPU even from torch's own generator (one call per two
    values), faster still from SFC64 (``random_bits``), and finer (31 bits against float32's 24)."""
    n = math.prod(shape)
    bits = random_bits((n + 1) // 2, generator, device)
    return bits.view(torch.int32)[:n].bitwise_and_(0x7FFFFFFF).view(shape)


def uniform(shape, generator: torch.Generator, dtype=torch.float32, device=None) -> Tensor:
    """Uniform [0, 1) like ``torch.rand`` (24 random bits for float32, 53 for float64), from ``random_bits``
    (for float32 two values per draw): ~2x faster than ``torch.rand`` on CPU from torch's generator, more
    from SFC64."""
    if dtype == torch.float64:
        bits = random_bits(math.prod(shape), generator, device)
        return bits.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1).to(dtype).mul_(2.0**-53).view(shape)
    u = uniform31(shape, generator, device).bitwise_right_shift_(7)  # bits 7..30
    return u.to(torch.float32).mul_(2.0**-24).to(dtype)  # via float32: 2**24 overflows float16


def rgb_to_gray(x: Float[Tensor, "n 3 h w"]) -> Float[Tensor, "n 1 h w"]:
    """Luma with the reference's weights (0.2989, 0.5870, 0.1140); a 1-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def pad_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source indices (into an axis of length ``n``) of a padded axis; -1 marks a constant (zero) cell."""
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    i = np.arange(-before, n + after)
    if mode == "replicate":
        return np.clip(i, 0, n - 1)
    if mode == "wrap":
        return np.mod(i, n)
    if mode == "constant":
        return np.where((i >= 0) & (i < n), i, -1)
    if mode == "reflect":
        if n == 1:
            return np.zeros_like(i)
        period = 2 * (n - 1)
        i = np.mod(i, period)
        return np.where(i < n, i, period - i)
    period = 2 * n  # symmetric
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i)


def pad2d(x: Tensor, pad: tuple[int, int, int, int], mode: str) -> Tensor:
    """Pad the last two dims by ``(left, right, top, bottom)`` with ``mode`` (see module docstring)."""
    left, right, top, bottom = pad
    if mode == "constant":
        return F.pad(x, (left, right, top, bottom))
    h, w = x.shape[-2:]
    torch_mode = {"reflect": "reflect", "replicate": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode and x.ndim >= 2 and max(left, right) < w and max(top, bottom) < h and x.numel() > 0:
        # torch's own padding where it applies (pad narrower than the image): measured 5-11x faster than index_select
        y = F.pad(x.reshape(-1, 1, h, w), (left, right, top, bottom), mode=torch_mode)
        return y.reshape(*x.shape[:-2], *y.shape[-2:])
    if mode == "symmetric" and max(left, right) <= w and max(top, bottom) <= h and x.numel() > 0:
        # edge-repeating mirror as flipped strips (measured 3-5x faster than index_select)
        x = (
            torch.cat([x[..., :top, :].flip(-2), x, x[..., h - bottom :, :].flip(-2)], dim=-2)
            if top or bottom
            else x
        )
        return (
            torch.cat([x[..., :left].flip(-1), x, x[..., w - right :].flip(-1)], dim=-1)
            if left or right
            else x
        )
    rows = torch.from_numpy(pad_index(h, top, bottom, mode)).to(x.device)
    cols = torch.from_numpy(pad_index(w, left, right, mode)).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, dtype=torch.float32, device=None) -> Tensor:
    """scipy.ndimage's Gaussian kernel: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def cv2_gaussian_kernel1d(ksize: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(ksize, sigma)`` for sigma > 0 (float64 numpy)."""
    t = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _flat(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """All images and channels as the channels of one image: a depthwise (grouped) convolution over
    ``[1, N*C, H, W]`` is several times faster on CPU than a 1-channel convolution over ``[N*C, 1, H, W]``."""
    return x.reshape(1, -1, *x.shape[-2:]), x.shape


def _depthwise(y: Tensor, kernel: Tensor) -> Tensor:
    m = y.shape[1]
    return F.conv2d(y, kernel.to(y).expand(m, 1, *kernel.shape[-2:]).contiguous(), groups=m)


def filter_matrix(n: int, kernel: Tensor, mode: str) -> Tensor:
    """The ``[n, n]`` matrix of "pad an axis of length ``n`` by ``len(kernel) // 2`` with ``mode``, then
    correlate with ``kernel``" (valid part): ``filter_matrix(n, k, mode) @ v`` filters ``v``."""
    k = kernel.detach().cpu().double().numpy()
    r = len(k) // 2
    src = pad_index(n, r, r, mode)
    m = np.zeros((n, n))
    for j, kj in enumerate(k):
        cols = src[j : j + n]
        ok = cols >= 0
        np.add.at(m, (np.arange(n)[ok], cols[ok]), kj)
    return torch.from_numpy(m).to(device=kernel.device, dtype=kernel.dtype)


SMALL_SIDE = 96  # up to this side, separable filters run as two small matrix products (faster on CPU)


def separable_filter(x: Tensor, k_rows: Tensor, k_cols: Tensor, mode: str = "replicate") -> Tensor:
    """Correlate every channel with ``k_rows`` (along H) then ``k_cols`` (along W); odd kernel lengths."""
    h, w = x.shape[-2:]
    if h <= SMALL_SIDE and w <= SMALL_SIDE:
        my = filter_matrix(h, k_rows.to(x), mode)
        mx = filter_matrix(w, k_cols.to(x), mode)
        return torch.matmul(torch.matmul(my, x), mx.T)
    y, shape = _flat(x)
    ry, rx = k_rows.numel() // 2, k_cols.numel() // 2
    y = pad2d(y, (rx, rx, ry, ry), mode)
    y = _depthwise(y, k_rows.view(-1, 1))
    y = _depthwise(y, k_cols.view(1, -1))
    return y.reshape(shape)


def gaussian_blur(x: Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> Tensor:
    """``skimage.filters.gaussian(x, sigma, mode='nearest', channel_axis=...)`` per channel (scipy kernel)."""
    k = gaussian_kernel1d(sigma, truncate, dtype=x.dtype, device=x.device)
    return separable_filter(x, k, k, mode)


def filter2d(x: Tensor, kernel: Tensor, mode: str = "reflect", fft: bool | None = None) -> Tensor:
    """``cv2.filter2D(x, -1, kernel)`` per channel: correlation with an odd ``[kh, kw]`` kernel anchored at its
    centre, border ``mode`` (cv2's default is BORDER_REFLECT_101 = ``"reflect"``). Kernels over 32x32 use the FFT."""
    kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sides must be odd, got {tuple(kernel.shape)}")
    y, shape = _flat(x)
    h, w = y.shape[-2:]
    y = pad2d(y, (kw // 2, kw // 2, kh // 2, kh // 2), mode)
    kernel = kernel.to(y)
    if fft is None:
        fft = kh * kw > 32 * 32
    if not fft:
        return _depthwise(y, kernel).reshape(shape)
    ph, pw = y.shape[-2:]
    spec = torch.fft.rfft2(y) * torch.fft.rfft2(kernel, s=(ph, pw)).conj()
    return torch.fft.irfft2(spec, s=(ph, pw))[..., :h, :w].reshape(shape)


def disk_kernel(radius: float, alias_blur: float = 0.1) -> Tensor:
    """The reference's anti-aliased disk (imagecorruptions.disk): a binary disk normalised to sum 1, then
    ``cv2.GaussianBlur`` with a 3x3 (radius <= 8) or 5x5 kernel of sigma ``alias_blur`` (float32, CPU)."""
    if radius <= 8:
        size, ksize = 8, 3
    else:
        size, ksize = int(radius), 5
    t = np.arange(-size, size + 1)
    xx, yy = np.meshgrid(t, t)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = torch.from_numpy(cv2_gaussian_kernel1d(ksize, alias_blur))
    out = separable_filter(torch.from_numpy(disk)[None, None], g, g, mode="reflect")[0, 0]
    return out.float()


def shift_replicate(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Shift each image ``n`` by integer ``(dy[n], dx[n])`` pixels (down/right positive), repeating the edge:
    ``out[n, :, i, j] = x[n, :, clamp(i - dy[n]), clamp(j - dx[n])]`` (the reference's ``shift``)."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None] - dy.to(x.device).long()[:, None]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device)[None] - dx.to(x.device).long()[:, None]).clamp(0, w - 1)
    out = torch.gather(x, 2, rows[:, None, :, None].expand(n, c, h, w))
    return torch.gather(out, 3, cols[:, None, None, :].expand(n, c, h, w))


def motion_blur(x: Float[Tensor, "n c h w"], radius: int, sigma: float, angle_deg: Tensor) -> Tensor:
    """The reference's ``_motion_blur``: a one-sided Gaussian-weighted sum of ``2 * radius + 1`` copies of the
    image shifted along ``angle_deg[n]`` (degrees, one per image), edges repeated. Steps whose shift leaves the
    image are dropped, as in the reference (their weight is lost)."""
    width = 2 * radius + 1
    k = torch.exp(-(torch.arange(width, dtype=torch.float64) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(device=x.device)
    # offsets in float64 numpy, in the reference's exact arithmetic (ceil is sensitive to the last bit)
    theta = np.deg2rad(angle_deg.detach().cpu().double().numpy())[:, None]
    py, px = width * np.sin(theta), width * np.cos(theta)
    hypot = np.hypot(py, px)
    i = np.arange(width)[None]
    dy = torch.from_numpy(-np.ceil((i * py) / hypot - 0.5)).to(x.device)
    dx = torch.from_numpy(-np.ceil((i * px) / hypot - 0.5)).to(x.device)
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    inside = ((dy.abs() < h) & (dx.abs() < w)).to(torch.int64).cumprod(1).bool()  # reference breaks out
    if h * w < 64 * 64:  # small images: whole-batch gathers beat per-image slicing
        # one gather per step from the flattened images (2 gathers + a multiply-add before: 3x slower)
        wts = (k[None] * inside).to(x.dtype)
        c = x.shape[1]
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        flat = x.reshape(n, c, h * w)
        out = torch.zeros_like(flat)
        for s in range(width):
            if bool(inside[:, s].any()):
                rows = (ar_h[None] - dy[:, s].long()[:, None]).clamp_(0, h - 1)
                cols = (ar_w[None] - dx[:, s].long()[:, None]).clamp_(0, w - 1)
                idx = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
                out.addcmul_(torch.gather(flat, 2, idx), wts[:, s, None, None])
        return out.view(x.shape)
    weights = (k[None] * inside).tolist()  # [n][width]
    # large images: shift by slicing a replicate-padded copy: xp[i + p - dy, j + p - dx] = x[clamp(i - dy), clamp(j - dx)]
    p = width
    xp = pad2d(x, (p, p, p, p), "replicate")
    out = torch.zeros_like(x)
    oy, ox = (p - dy).long().tolist(), (p - dx).long().tolist()
    for i in range(n):
        for s in range(width):
            if weights[i][s] == 0.0:
                continue
            out[i].add_(xp[i, :, oy[i][s] : oy[i][s] + h, ox[i][s] : ox[i][s] + w], alpha=weights[i][s])
    return out


def clipped_zoom(x: Tensor, zoom: float) -> Tensor:
    """The reference's ``clipped_zoom`` cropped back to ``[H, W]``: crop the centre ``ceil(H / zoom)`` rows
    (and columns) and enlarge by ``zoom`` with ``scipy.ndimage.zoom(order=1)`` (linear, corner-aligned grid),
    which is ``F.interpolate(bilinear, align_corners=True)`` to ``round(crop * zoom)`` pixels, then keep the
    top-left ``[H, W]``. (interpolate is 4.7x faster than the former two index_select/lerp passes at 224 px;
    it computes source coordinates in the input's precision: float32 differs by < 2e-5, float64 by < 1e-13.)"""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / float(zoom)), math.ceil(w / float(zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    size = (round(ch * float(zoom)), round(cw * float(zoom)))
    crop = x[..., top : top + ch, left : left + cw]
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)[..., :h, :w]


# ---------------------------------------------------------------- size rule
# Short side (px) at which the ImageNet-C pixel parameters apply; None: the reference's pixels at every size.
# Set per call by ``corrupt(..., reference_size=...)``; a context variable, so it never leaks between calls.
_REFERENCE_SIZE: ContextVar[int | None] = ContextVar("mechvit_reference_size", default=None)


def reference_size() -> int | None:
    """The size rule in force for the corruption being computed (see ``corrupt``)."""
    return _REFERENCE_SIZE.get()
