"""Weather family: snow, frost, fog, spatter. Parameters of ImageNet-C as implemented by ``imagecorruptions``
1.1.2 (the reference), batched in torch with independent draws per image.

Size rule. Fog is scale-free in the reference (its fractal map is the next power of two above the image side).
Snow, frost and spatter have parameters in pixels that the reference does not rescale (snow-flake zoom,
motion-blur length, spatter blur sigmas, Canny / distance thresholds, frost photographs at their native
resolution), chosen for 224 px ImageNet images. We render their random layer (snow layer, frost crop, spatter
mask), with ``corrupt(..., reference_size=224)``, at the size the image would have at 224 px on its short
side, with the reference's pixel parameters, and resize the layer to the image (area average when shrinking, antialiased bilinear when
enlarging; frost resizes the photograph once instead). At 224 px this is exactly the reference; a 28 px image
gets the same corruption as a 224 px image viewed 8x smaller. The default, ``reference_size=None``, uses the
reference's pixel parameters at every size (imagecorruptions' own behaviour, used by the fidelity tests at
32 and 64 px), as the blur family does. See ``docs/corruptions_weather_digital.md``.

On 1-channel images each corruption follows the reference's own grayscale code path (the function called on
a mode-"L" image): snow brightens with the gray value itself, frost and spatter add the gray version of their
colour layer (with the reference's weights, which for frost are applied to the photo in BGR order).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from mechvit.corruptions._kernels import (
    GRAY_WEIGHTS,
    clamp01,
    clamp01_,
    clipped_zoom,
    gaussian_blur,
    motion_blur,
    pad2d,
    reference_size,
    uniform,
)

# loc, scale, zoom, threshold, blur radius, blur sigma, keep
SNOW = (
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
SNOW_ANGLE = (-135.0, -45.0)  # uniform, degrees, one per image
FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
# The reference draws randint(5) over frost1..frost6, so frost6 is never used; frost3.png is pixel-identical
# to frost2.png, so we ship it once. Photos from the imagecorruptions package (Apache-2.0), see assets/README.md.
FROST_FILES = ("frost1.jpg", "frost2.jpg", "frost2.jpg", "frost4.jpg", "frost5.jpg")
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # fractal weight, wibble decay
# loc, scale, blur sigma, threshold, strength (water) or mask sigma (mud), mud?
SPATTER = (
    (0.65, 0.3, 4, 0.69, 0.6, 0),
    (0.65, 0.3, 3, 0.68, 0.6, 0),
    (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1),
    (0.67, 0.4, 1, 0.65, 1.5, 1),
)
WATER_RGB = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
MUD_RGB = (63 / 255, 42 / 255, 20 / 255)  # mud brown
CV2_GRAY = (0.299, 0.587, 0.114)  # cv2.COLOR_RGB2GRAY, used by the reference's snow
ASSETS = Path(__file__).parent / "assets"


# ---------------------------------------------------------------- size rule


def layer_size(h: int, w: int) -> tuple[int, int]:
    """Size at which a ``[h, w]`` image's random layer is rendered (see the module docstring)."""
    ref = reference_size()
    if ref is None:
        return h, w
    s = ref / min(h, w)
    return max(round(h * s), 1), max(round(w * s), 1)


def _resize(layer: Tensor, h: int, w: int) -> Tensor:
    lh, lw = layer.shape[-2:]
    if (lh, lw) == (h, w):
        return layer
    if lh >= h and lw >= w:
        return F.interpolate(layer, size=(h, w), mode="area")
    return F.interpolate(layer, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def _weights(values: tuple[float, ...], x: Tensor) -> Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def _randn(shape, generator: torch.Generator, x: Tensor) -> Tensor:
    """Standard normal draws made in float32 whatever ``x``'s dtype, then cast to it: a seed gives float64
    input the same layer as float32 input (float32: the same draws as before, bit for bit)."""
    return torch.randn(shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)


# ---------------------------------------------------------------- snow


def snow(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Gaussian noise, zoomed (flake size), thresholded, motion-blurred along a random angle, rounded to 8 bits,
    added twice (as is and rotated 180 degrees) to the image brightened towards ``max(x, 1.5 gray + 0.5)``."""
    loc, scale, zoom, threshold, radius, sigma, keep = SNOW[severity - 1]
    n, c, h, w = x.shape
    lh, lw = layer_size(h, w)
    layer = loc + scale * _randn((n, 1, lh, lw), generator, x)
    layer = clipped_zoom(layer, zoom)
    layer = clamp01(torch.where(layer < threshold, torch.zeros_like(layer), layer))
    layer = motion_blur(layer, radius, sigma, _uniform(n, *SNOW_ANGLE, generator, x.device))
    layer = torch.round(layer * 255) / 255
    layer = _resize(layer + layer.flip(-2, -1), h, w)
    if c == 1:
        bright = x * 1.5 + 0.5
    else:  # the gray value (cv2 weights), 1.5 gray + 0.5, in place on one [n, 1, h, w] plane
        r, g, b = x.unbind(1)
        bright = (r * (1.5 * CV2_GRAY[0])).add_(g, alpha=1.5 * CV2_GRAY[1]).add_(b, alpha=1.5 * CV2_GRAY[2])
        bright = bright.add_(0.5)[:, None]
    out = torch.maximum(x, bright).mul_(1 - keep).add_(x, alpha=keep)
    return out.add_(layer).clamp_(0.0, 1.0)


# ---------------------------------------------------------------- frost


@lru_cache(maxsize=8)
def _frost_photo(file: str) -> Tensor:
    with Image.open(ASSETS / file) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # uint8 [3, H, W]


@lru_cache(maxsize=64)
def _frost_scaled(file: str, h: int, w: int, lh: int, lw: int, device: str) -> Tensor:
    """The frost photo resized as the reference does for an image of the layer size ``[lh, lw]`` (enlarged to
    cover it if needed, then x1.1, cv2 INTER_CUBIC), then by image / layer size. float [3, H', W'] in [0, 255].
    The layer size (which the size rule in force decides) is an argument, so it is part of the cache key."""
    photo = _frost_photo(file)
    fh, fw = photo.shape[-2:]
    factor = 1.0
    if fh < lh and fw >= lw:
        factor = lh / fh
    elif fh >= lh and fw < lw:
        factor = lw / fw
    elif fh < lh and fw < lw:
        factor = max(lh / fh, lw / fw)
    factor *= 1.1
    size = (round(math.ceil(fh * factor) * h / lh), round(math.ceil(fw * factor) * w / lw))
    shrink = size[0] < fh
    out = F.interpolate(photo[None].float().to(device), size=size, mode="bicubic", antialias=shrink)
    return torch.round(out[0]).clamp(0, 255)


def frost(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """``a * x + b * crop`` with a random crop of one of five frost photographs (one photo and crop per image)."""
    a, b = FROST[severity - 1]
    n, c, h, w = x.shape
    idx = torch.randint(len(FROST_FILES), (n,), generator=generator, device=x.device)
    u = torch.rand((2, n), generator=generator, device=x.device, dtype=torch.float64)
    layer = torch.empty((n, 3, h, w), dtype=x.dtype, device=x.device)
    lh, lw = layer_size(h, w)
    for i in idx.unique().tolist():
        photo = _frost_scaled(FROST_FILES[i], h, w, lh, lw, str(x.device)).to(x.dtype)
        sel = (idx == i).nonzero().squeeze(1)
        top = (u[0, sel] * (photo.shape[1] - h)).long()  # randint(0, H' - h)
        left = (u[1, sel] * (photo.shape[2] - w)).long()
        if h * w >= 64 * 64:  # large crops: one slice copy per image beats a gather
            for j, t, lf in zip(sel.tolist(), top.tolist(), left.tolist(), strict=True):
                layer[j] = photo[:, t : t + h, lf : lf + w]
            continue
        rows = top[:, None] + torch.arange(h, device=x.device)
        cols = left[:, None] + torch.arange(w, device=x.device)
        layer[sel] = photo[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)
    if c == 1:  # the reference's rgb2gray on cv2's BGR array: weights applied to (B, G, R)
        layer = (layer.flip(1) * _weights(GRAY_WEIGHTS, x)).sum(1, keepdim=True)
    return clamp01_(layer.mul_(b / 255).add_(x, alpha=a))


# ---------------------------------------------------------------- fog


def plasma_fractal(
    n: int, mapsize: int, wibbledecay: float, generator: torch.Generator, device=None, dtype=torch.float32
) -> Float[Tensor, "n m m"]:
    """The reference's diamond-square height map (``plasma_fractal``), batched: ``n`` maps of side ``mapsize``
    (a power of two), each normalised to [0, 1]. As in the reference, the random term is ``wibble * U(-wibble,
    wibble)`` (so its scale is ``wibble**2``), with ``wibble`` starting at 100 and divided by ``wibbledecay``
    at each level."""
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    # The points known at each level (spacing ``step``) are kept as one contiguous [n, k, k] grid, and the
    # level's new points (square centres, then the two diamond sets, drawn in the reference's order) are
    # interleaved into the next grid: the same sums in the same order as computing them on strided views of
    # the full map and its rolls, which were slow (measured 24 -> 9 ms for 16 maps of 256 px, 1 thread;
    # bit-identical maps).
    g = torch.zeros((n, 1, 1), device=device, dtype=dtype)  # corner (0, 0); the map wraps around
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: Tensor) -> Tensor:
        # drawn in float32 whatever ``dtype`` (float64 maps get the float32 maps' draws; float32 unchanged)
        noise = uniform(total.shape, generator, torch.float32, device).to(dtype).mul_(2 * wibble).sub_(wibble)
        return noise.mul_(wibble).add_(total.div_(4))

    while step >= 2:
        k = g.shape[1]
        squares = _add_rolled(g, g, -1, 1)
        centres = wibbled_mean(_add_rolled(squares, squares, -1, 2))  # at (i + 1/2, j + 1/2) steps
        across = _add_rolled(_add_rolled(centres, centres, 1, 1).add_(g), g, -1, 2)
        across = wibbled_mean(across)  # at (i, j + 1/2)
        down = _add_rolled(_add_rolled(centres, centres, 1, 2).add_(g), g, -1, 1)
        down = wibbled_mean(down)  # at (i + 1/2, j)
        nxt = torch.empty((n, k, 2, k, 2), device=device, dtype=dtype)  # rows (i, a), columns (j, b)
        for a, b, part in ((0, 0, g), (0, 1, across), (1, 0, down), (1, 1, centres)):
            nxt[:, :, a, :, b] = part  # one strided copy each (torch.stack twice: 10x slower)
        g = nxt.view(n, 2 * k, 2 * k)
        step //= 2
        wibble /= wibbledecay
    flat = g.view(n, -1)
    lo, hi = flat.amin(1), flat.amax(1)  # over flat maps: 15x faster than aminmax(dim=1) or amin((1, 2))
    g.sub_(lo.view(n, 1, 1))
    return g.div_((hi - lo).view(n, 1, 1))  # the maximum of m - min, as the reference divides by


def _add_rolled(a: Tensor, b: Tensor, shift: int, dim: int) -> Tensor:
    """``a + b.roll(shift, dim)`` for ``shift`` = +-1 as two slice adds into a new tensor (``roll`` copies ``b``
    first, slowly along the last dim); ``a`` may be a temporary, which is then reused."""
    out = a if a is not b else torch.empty_like(a)
    k = a.shape[dim]
    first, rest = a.narrow(dim, 0, 1), a.narrow(dim, 1, k - 1)
    if shift == -1:  # out[i] = a[i] + b[i + 1]
        torch.add(a.narrow(dim, 0, k - 1), b.narrow(dim, 1, k - 1), out=out.narrow(dim, 0, k - 1))
        torch.add(a.narrow(dim, k - 1, 1), b.narrow(dim, 0, 1), out=out.narrow(dim, k - 1, 1))
    else:  # out[i] = a[i] + b[i - 1]
        torch.add(rest, b.narrow(dim, 0, k - 1), out=out.narrow(dim, 1, k - 1))
        torch.add(first, b.narrow(dim, k - 1, 1), out=out.narrow(dim, 0, 1))
    return out


def fog(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Add ``c * plasma fractal`` (map side: next power of two >= the image's longer side, cropped top-left),
    then rescale by ``max / (max + c)`` with the image's maximum. Scale-free, as in the reference."""
    c, decay = FOG[severity - 1]
    n, ch, h, w = x.shape
    mapsize = max(2, 1 << (max(h, w) - 1).bit_length())
    frac = plasma_fractal(n, mapsize, decay, generator, x.device, x.dtype)[:, None, :h, :w]
    max_val = x.amax((1, 2, 3), keepdim=True)
    scale = max_val / (max_val + c)  # per image; (x + c frac) * scale as x * scale + (c scale) frac
    return clamp01_(torch.mul(x, scale).addcmul_(frac, scale * c))


# ---------------------------------------------------------------- spatter


def _correlate3(img: Tensor, kernel, mode: str) -> Tensor:
    """3x3 correlation (``cv2.filter2D``) as shifted in-place adds; much faster than a 1-channel conv2d on CPU."""
    h, w = img.shape[-2:]
    p = pad2d(img, (1, 1, 1, 1), mode)
    out = None
    for i in range(3):
        for j in range(3):
            if kernel[i][j]:
                tap = p[..., i : i + h, j : j + w]
                out = tap * kernel[i][j] if out is None else out.add_(tap, alpha=kernel[i][j])
    return torch.zeros_like(img) if out is None else out


def _separable3(img: Tensor, k_rows, k_cols, mode: str) -> Tensor:
    """3x3 correlation with the separable kernel ``outer(k_rows, k_cols)``: 4-6 shifted adds instead of 9."""
    h, w = img.shape[-2:]
    p = pad2d(img, (1, 1, 1, 1), mode)
    v = None
    for i, k in enumerate(k_rows):
        if k:
            v = p[..., i : i + h, :] * k if v is None else v.add_(p[..., i : i + h, :], alpha=k)
    out = None
    for j, k in enumerate(k_cols):
        if k:
            out = v[..., j : j + w] * k if out is None else out.add_(v[..., j : j + w], alpha=k)
    return out


def _canny(img: Tensor, low: float, high: float) -> Tensor:
    """``cv2.Canny(img, low, high)`` (aperture 3, L1 gradient) on 8-bit values [n, 1, H, W] -> bool edges:
    Sobel with repeated borders, non-maximum suppression in four directions, hysteresis (8-connected)."""
    h, w = img.shape[-2:]
    gx = _separable3(img, (1, 2, 1), (-1, 0, 1), "replicate")  # Sobel (exact: integer values)
    gy = _separable3(img, (-1, 0, 1), (1, 2, 1), "replicate")
    ax, ay = gx.abs(), gy.abs()
    mag = ax + ay
    mp = F.pad(mag, (1, 1, 1, 1))  # neighbours outside the image count as 0

    def at(dy: int, dx: int) -> Tensor:
        return mp[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    tg22 = math.tan(math.pi / 8)
    horizontal = ay < ax * tg22
    vertical = ay > ax * (tg22 + 2)  # tan(67.5 deg) = tan(22.5 deg) + 2
    same_sign = (gx < 0) == (gy < 0)  # OpenCV: s = (dx ^ dy) < 0 ? -1 : 1
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d_pos = (mag > at(-1, -1)) & (mag > at(1, 1))
    keep_d_neg = (mag > at(-1, 1)) & (mag > at(1, -1))
    keep_d = torch.where(same_sign, keep_d_pos, keep_d_neg)
    candidate = (mag > math.floor(low)) & torch.where(
        horizontal, keep_h, torch.where(vertical, keep_v, keep_d)
    )
    edges = candidate & (mag > math.floor(high))
    while True:  # hysteresis: grow strong edges through weak candidates
        grown = candidate & _dilate3(edges)
        # grown contains edges (edges lie in candidate and in their own dilation): equal iff as many pixels,
        # and a count is ~3x cheaper than torch.equal on bool masks
        if int(grown.count_nonzero()) == int(edges.count_nonzero()):
            return edges
        edges = grown


def _dilate3(m: Tensor) -> Tensor:
    """3x3 binary dilation (8-connected) of a bool mask, zeros outside: four shifted ORs (bool ops instead of a
    float max_pool2d: measured 35 -> ~1 ms on 32 masks of 224 x 224)."""
    r = m.clone()
    r[..., 1:] |= m[..., :-1]
    r[..., :-1] |= m[..., 1:]
    out = r.clone()
    out[..., 1:, :] |= r[..., :-1, :]
    out[..., :-1, :] |= r[..., 1:, :]
    return out


def _edge_distance(edges: Tensor, cap: int) -> Tensor:
    """Euclidean distance to the nearest edge pixel, truncated at ``cap`` (``cv2.distanceTransform(255 - edges,
    DIST_L2, 5)`` then ``THRESH_TRUNC``; OpenCV's 5x5 chamfer approximates this exact distance within 2%)."""
    w = edges.shape[-1]
    inf = float("inf")
    idx = torch.arange(w, device=edges.device, dtype=torch.float32).expand_as(edges)
    last = torch.where(edges, idx, idx.new_full((), -inf)).cummax(-1).values
    # next edge at or right of j: the last edge of the mirrored row (a cummax like the one above), mirrored
    nxt = (
        torch.where(edges.flip(-1), idx, idx.new_full((), -inf)).cummax(-1).values.flip(-1).neg_().add_(w - 1)
    )
    g2 = torch.minimum(idx - last, nxt - idx).clamp_(max=cap + 1).square_()  # within-row distance, squared
    # column pass in int16 (squared distances <= (cap + 1)**2 + cap**2 fit; half the memory traffic of float32)
    g2 = g2.to(torch.int16)
    d2 = g2.clone()
    for k in range(1, min(cap, edges.shape[-2] - 1) + 1):  # exact up to the cap
        lower, upper = d2[..., k:, :], d2[..., :-k, :]
        torch.minimum(lower, g2[..., :-k, :] + k * k, out=lower)
        torch.minimum(upper, g2[..., k:, :] + k * k, out=upper)
    return d2.float().sqrt_().clamp_(max=cap)


def _equalize_hist(img: Tensor) -> Tensor:
    """``cv2.equalizeHist`` per image on 8-bit values [n, 1, H, W]."""
    n = img.shape[0]
    flat = img.reshape(n, -1).long()
    hist = torch.zeros((n, 256), device=img.device, dtype=torch.float32)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    first = (hist > 0).float().argmax(1, keepdim=True)
    h0 = hist.gather(1, first)
    total = hist.sum(1, keepdim=True)
    lut = torch.round((hist.cumsum(1) - h0) * (255.0 / (total - h0).clamp_min(1)))
    lut = torch.where(total == h0, first.float().expand_as(lut), lut.clamp(0, 255))
    return lut.gather(1, flat).reshape(img.shape).to(img.dtype)


def _box3(img: Tensor) -> Tensor:
    """``cv2.blur(img, (3, 3))`` (border BORDER_REFLECT_101)."""
    return _separable3(img, (1, 1, 1), (1, 1, 1), "reflect").div_(9)


def _water(liquid: Tensor) -> Tensor:
    """The reference's water-drop shading: Canny edges of the 8-bit liquid layer, distance to them (<= 20),
    blur, histogram equalisation, an emboss filter, blur; times the liquid layer, normalised to max 1."""
    u8 = (liquid * 255).floor_().clamp_(0, 255)
    dist = _edge_distance(_canny(u8, 50, 150), cap=20)
    dist = _equalize_hist(_box3(dist).floor_())
    dist = _correlate3(dist, ((-2, -1, 0), (-1, 1, 1), (0, 1, 2)), "reflect").clamp_(0, 255)  # emboss
    m = u8.mul_(_box3(dist).round_())
    return m.div_(m.amax((2, 3), keepdim=True).clamp_min(1e-12))


def _zero_below_(t: Tensor, threshold: float) -> Tensor:
    """``t[t < threshold] = 0`` in place, as ``F.threshold_`` (zero where ``t <= th``) with ``th`` the next
    value of ``t``'s dtype below ``threshold`` (as ``t < threshold`` compares, in that dtype): measured 18x
    faster than ``masked_fill_`` with the comparison's mask on CPU."""
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(t.dtype, np.float32)
    th = np_dtype(threshold)
    return F.threshold_(t, float(np.nextafter(th, np_dtype(-np.inf))), 0.0)


def spatter(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    """Blurred Gaussian noise, thresholded into blobs: water drops (severities 1-3: shaded pale turquoise,
    added) or mud (4-5: smoothed mask, brown, replacing the image)."""
    loc, scale, sigma, threshold, strength, mud = SPATTER[severity - 1]
    n, c, h, w = x.shape
    lh, lw = layer_size(h, w)
    liquid = loc + scale * _randn((n, 1, lh, lw), generator, x)
    liquid = gaussian_blur(liquid, sigma, mode="replicate")
    liquid = _zero_below_(liquid, threshold)
    colour = _weights(MUD_RGB if mud else WATER_RGB, x)
    if c == 1:
        colour = (colour * _weights(GRAY_WEIGHTS, x)).sum(1, keepdim=True)
    if not mud:
        m = _resize(_water(liquid) * strength, h, w)
        return clamp01_((m * colour).add_(x))
    m = gaussian_blur((liquid > threshold).to(x.dtype), strength, mode="replicate")
    m = _resize(_zero_below_(m, 0.8), h, w)
    return clamp01_((x * (1 - m)).addcmul_(m, colour))
