"""Blur family: defocus, glass, motion, zoom, gaussian. Parameters of ImageNet-C (imagecorruptions 1.1.2).

Size rule. By default (``corrupt(..., reference_size=None)``) sizes are in pixels exactly as in the reference, which does
not rescale them with the image (the ImageNet-C values were chosen for 224 px): gaussian and glass blur sigmas,
the glass-blur shift distance, the defocus disk radius and the motion-blur length are the same at 28 px as at
224 px, so a 28 px image is blurred far more, relative to its size, than an ImageNet image (gaussian_blur
severity 4, sigma 4 px, leaves a 28 px Fashion-MNIST item recognisable but soft). Zoom blur is relative (zoom
factors) and scale-free. With ``reference_size=224`` the defocus, glass, motion and gaussian blurs are
applied to the image resized to 224 px on its short side and their *change* is resized back (area average)
and added, i.e. a 28 px image gets the blur a 224 px image would get, seen 8x smaller; at 28 px that makes
severities 1-2 of gaussian blur nearly invisible (see docs/corruptions.md).
"""

from __future__ import annotations

from functools import lru_cache, wraps

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mechvit.corruptions._kernels import clamp01_, clipped_zoom, disk_kernel, filter2d, reference_size
from mechvit.corruptions._kernels import gaussian_blur as _gauss
from mechvit.corruptions._kernels import motion_blur as _motion

GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma in pixels
GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max shift, iterations
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, anti-alias sigma
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius (length 2r+1), sigma of the weights
MOTION_ANGLE = (-45.0, 45.0)  # uniform, degrees, one per image
ZOOM_BLUR = (
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02),
    np.arange(1, 1.31, 0.03),
)


def _size_rule(fn):
    """Apply ``fn`` at the reference size (short side) and add its resized change to the image."""

    @wraps(fn)
    def wrapped(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
        h, w = x.shape[-2:]
        ref = reference_size()
        if ref is None or min(h, w) == ref:
            return fn(x, severity, generator)
        s = ref / min(h, w)
        size = (max(round(h * s), 1), max(round(w * s), 1))
        big = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
        change = fn(big, severity, generator) - big
        if s > 1:
            change = F.interpolate(change, size=(h, w), mode="area")
        else:
            change = F.interpolate(change, size=(h, w), mode="bilinear", align_corners=False)
        return clamp01_(change.add_(x))

    return wrapped


@_size_rule
def gaussian_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    return clamp01_(_gauss(x, GAUSSIAN_BLUR[severity - 1]))


@_size_rule
def defocus_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    return clamp01_(filter2d(x, _defocus_kernel(radius, alias_blur), mode="reflect"))


@lru_cache(maxsize=16)
def _defocus_kernel(radius: float, alias_blur: float) -> Tensor:
    """The reference's disk kernel without its all-zero outer rings (e.g. 9x9 of 17x17 at severity 1, 15x15 at
    severity 3): the same correlation, with up to 3.5x fewer taps."""
    k = disk_kernel(radius, alias_blur)
    c = k.shape[0] // 2
    nz = k.nonzero()
    r = int((nz - c).abs().max()) if len(nz) else 0
    return k[c - r : c + r + 1, c - r : c + r + 1].contiguous()


@_size_rule
def motion_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    radius, sigma = MOTION_BLUR[severity - 1]
    lo, hi = MOTION_ANGLE
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=torch.float64)
    return clamp01_(_motion(x, radius, sigma, lo + (hi - lo) * u))


def zoom_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    factors = ZOOM_BLUR[severity - 1]
    out = x.clone()
    for z in factors:
        out += clipped_zoom(x, float(z))
    return clamp01_(out.div_(len(factors) + 1))


@lru_cache(maxsize=32)
def _glass_schedule(h: int, w: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Wavefront schedule of the reference's pixel loop (rows h = H-d..d+1, then columns w = W-d..d+1, both
    descending). A step writes pixel (h, w) from a neighbour within [-d, d-1] in each axis, so two steps can
    interact only if they are less than 2d rows and 2d columns apart; ordering step (i, j) (i-th row, j-th
    column of the loop) by the wave number 2d*i + j keeps every such pair in loop order and puts no two
    interacting steps in the same wave, so doing each wave at once gives exactly the sequential result.
    Returns the loop-order step ids sorted by wave, their flat pixel positions, and the wave boundaries."""
    hs, ws = np.arange(h - d, d, -1), np.arange(w - d, d, -1)
    i, j = np.meshgrid(np.arange(len(hs)), np.arange(len(ws)), indexing="ij")
    wave = (2 * d * i + j).ravel()
    order = np.argsort(wave, kind="stable")
    pos = (hs[i] * w + ws[j]).ravel()[order]
    bounds = np.concatenate([[0], np.cumsum(np.bincount(wave))])
    return order, pos, bounds


@_size_rule
def glass_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian blur, quantise to 8 bits, locally shuffle pixels, blur again. As in the reference on RGB
    images (and hence in ImageNet-C), the "swap" of each loop step copies the neighbour onto the pixel and
    leaves the neighbour unchanged (numpy views); we reproduce that, exactly, with independent draws per image."""
    sigma, d, iterations = GLASS_BLUR[severity - 1]
    n, c, h, w = x.shape
    x = clamp01_(_gauss(x, sigma)).mul_(255).floor_().div_(255)
    order, pos, bounds = _glass_schedule(h, w, d)
    if len(order):
        dev = x.device
        src = torch.arange(h * w, device=dev).expand(n, -1).clone()  # which input pixel sits at each position
        pos_t = torch.from_numpy(pos).to(dev)
        order_t = torch.from_numpy(order).to(dev)
        for _ in range(iterations):
            # the reference draws (dx, dy) = randint(-d, d, size=2) per step
            dxy = torch.randint(-d, d, (2, n, len(order)), generator=generator, device=dev)
            nbr = pos_t[None] + dxy[1][:, order_t] * w + dxy[0][:, order_t]  # [n, steps] in wave order
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                src.scatter_(1, pos_t[a:b].expand(n, -1), torch.gather(src, 1, nbr[:, a:b]))
        x = torch.gather(x.reshape(n, c, h * w), 2, src[:, None].expand(n, c, h * w)).reshape(n, c, h, w)
    return clamp01_(_gauss(x, sigma))
