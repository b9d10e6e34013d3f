"""Fidelity of the noise and blur families to the reference implementation (imagecorruptions 1.1.2).

Real images: Fashion-MNIST test images upscaled to 32 and 64 px, and scikit-image sample photographs resized
to 96 px. Deterministic corruptions must reach PSNR >= 30 dB to the reference output; random ones must match
the reference's mean absolute change within 10% and its per-pixel change distribution (two-sample KS test).
The reference is called per image through its own corruption functions (float output, no uint8 truncation);
its use of ``skimage.filters.gaussian(multichannel=True)``, which scikit-image >= 0.19 removed, is patched here.
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pytest
import torch
from scipy import stats

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    R = pytest.importorskip("imagecorruptions.corruptions")
PIL = pytest.importorskip("PIL.Image")
skdata = pytest.importorskip("skimage.data")
sktransform = pytest.importorskip("skimage.transform")
skfilters = pytest.importorskip("skimage.filters")

from mechvit.corruptions import _kernels, blur, corrupt  # noqa: E402
from mechvit.data.fashion_mnist import DEFAULT_ROOT  # noqa: E402

DETERMINISTIC = ("gaussian_blur", "defocus_blur", "zoom_blur")
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur")
IMAGE_SETS = ("fmnist32", "fmnist64", "photos96")


@cache
def image_set(name: str) -> np.ndarray:
    """uint8 [N, H, W, 3]."""
    if name.startswith("fmnist"):
        from mechvit.data import load_fashion_mnist

        try:
            x, _ = load_fashion_mnist("test", root=DEFAULT_ROOT)
        except FileNotFoundError:
            pytest.skip("dataset-fashion-mnist not installed")
        size = int(name[len("fmnist") :])
        x = x[:6:1]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
        return x.permute(0, 2, 3, 1).numpy()
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    out = []
    for p in photos:
        s = min(p.shape[:2])
        p = p[:s, :s]
        r = sktransform.resize(p, (96, 96), anti_aliasing=True)
        out.append((r * 255).round().astype(np.uint8))
    return np.stack(out)


def _gaussian_compat(image, sigma=1, multichannel=None, **kw):
    if multichannel:
        kw["channel_axis"] = -1
    return skfilters.gaussian(image, sigma=sigma, **kw)


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(R, "gaussian", _gaussian_compat)
    # the reference's impulse_noise calls skimage's random_noise without a generator, i.e. from fresh OS entropy,
    # which made its statistics test flaky (~5% of runs at severity 1 on 6 images); draw its generator's seed
    # from numpy's global state, which run_reference seeds, so every test compares against a fixed draw
    random_noise = R.sk.util.random_noise

    def seeded_random_noise(image, mode="gaussian", rng=None, **kw):
        if rng is None:
            rng = np.random.default_rng(np.random.randint(2**31))
        return random_noise(image, mode=mode, rng=rng, **kw)

    monkeypatch.setattr(R.sk.util, "random_noise", seeded_random_noise)
    return R


def run_reference(ref, name: str, imgs: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    np.random.seed(seed)
    fn = getattr(ref, name)
    outs = []
    for im in imgs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = np.asarray(fn(PIL.fromarray(im), severity), dtype=np.float64) / 255.0
        assert y.shape == im.shape, (name, y.shape)
        outs.append(y)
    return np.stack(outs)


def run_ours(name: str, imgs: np.ndarray, severity: int, seed: int = 0, dtype=torch.float64) -> np.ndarray:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(dtype) / 255.0
    y = corrupt(x, name, severity, seed=seed)
    return y.permute(0, 2, 3, 1).double().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("images", IMAGE_SETS)
@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_deterministic_matches_reference(reference, name, images, severity):
    imgs = image_set(images)
    ref = run_reference(reference, name, imgs, severity)
    ours = run_ours(name, imgs, severity)
    assert psnr(ours, ref) >= 30.0
    # float32 gives the same answer as float64 to well within the tolerance
    assert psnr(run_ours(name, imgs, severity, dtype=torch.float32), ref) >= 30.0


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_grayscale_equals_each_channel_of_rgb(name):
    imgs = image_set("fmnist32")  # three equal channels
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).double() / 255.0
    rgb = corrupt(x, name, 3, seed=0)
    gray = corrupt(x[:, :1], name, 3, seed=0)
    torch.testing.assert_close(gray, rgb[:, :1])


@pytest.mark.parametrize("images", IMAGE_SETS)
@pytest.mark.parametrize("name", RANDOM)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_random_matches_reference_statistics(reference, name, images, severity):
    imgs = image_set(images)
    clean = imgs.astype(np.float64) / 255.0
    # the noises are per pixel and cheap: pool 8 seeded draws on each side. A single draw of impulse noise at
    # severity 1 on 6 images of 32 px changes ~550 values, so its mean change has a 6% standard deviation
    # between draws (measured over 40 seeds, ours and the reference's alike) and one draw against one would
    # miss the 10% bound in ~1 seed of 9; pooled, the bound is > 3 standard deviations of the difference.
    seeds = range(8) if name.endswith("_noise") else range(1)
    ref = np.concatenate([run_reference(reference, name, imgs, severity, seed=s) - clean for s in seeds])
    ours = np.concatenate([run_ours(name, imgs, severity, seed=s) - clean for s in seeds])
    m_ref, m_ours = np.abs(ref).mean(), np.abs(ours).mean()
    assert abs(m_ours - m_ref) <= 0.10 * m_ref, (m_ours, m_ref)
    # per-pixel change distributions: two-sample KS on a fixed subsample (the statistic, an effect size, must
    # be small; with thousands of samples the p-value rejects differences far below what matters)
    rng = np.random.default_rng(0)
    a = rng.choice(ref.ravel(), size=min(ref.size, 20_000), replace=False)
    b = rng.choice(ours.ravel(), size=min(ours.size, 20_000), replace=False)
    res = stats.ks_2samp(a, b)
    assert res.statistic < 0.05, (res.statistic, res.pvalue)


def test_motion_blur_kernel_matches_reference_at_fixed_angles():
    imgs = image_set("photos96").astype(np.float64)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    for radius, sigma in blur.MOTION_BLUR:
        for angle in (-45.0, -30.0, -7.5, 0.0, 22.0, 45.0):
            ref = np.stack([R._motion_blur(im, radius=radius, sigma=sigma, angle=angle) for im in imgs])
            ours = _kernels.motion_blur(
                x, radius, sigma, torch.full((len(imgs),), angle, dtype=torch.float64)
            )
            np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-9)


@pytest.mark.parametrize("severity", [1, 2, 5])
def test_glass_blur_matches_reference_given_the_same_shuffle(reference, monkeypatch, severity):
    """With the reference's random offsets fed to both, our wavefront shuffle reproduces its pixel loop."""
    imgs = image_set("photos96")[:1]
    h, w = imgs.shape[1:3]
    _, d, iterations = blur.GLASS_BLUR[severity - 1]
    steps = len(range(h - d, d, -1)) * len(range(w - d, d, -1))
    offsets = np.random.default_rng(severity).integers(-d, d, size=(iterations, steps, 2))  # (dx, dy)
    it = iter(offsets.reshape(-1, 2))
    monkeypatch.setattr(np.random, "randint", lambda lo, hi, size=None: next(it))
    ref = run_reference(reference, "glass_blur", imgs, severity)
    calls = iter(offsets)
    real_randint = torch.randint

    def fake_randint(low, high, size, generator=None, device=None):
        if tuple(size[:1]) != (2,):
            return real_randint(low, high, size, generator=generator, device=device)
        o = torch.from_numpy(next(calls))  # [steps, 2] in loop order
        return o.T[:, None, :].to(device)  # [2 (dx, dy), n=1, steps]

    monkeypatch.setattr(torch, "randint", fake_randint)
    ours = run_ours("glass_blur", imgs, severity)
    assert psnr(ours, ref) >= 45.0


def test_glass_blur_schedule_is_the_sequential_loop():
    """Wavefront order vs the reference's sequential loop on index maps, for several sizes and distances."""
    rng = np.random.default_rng(1)
    for h, w, d in [(20, 23, 1), (20, 23, 2), (25, 21, 4), (12, 12, 3), (9, 9, 4)]:
        order, pos, bounds = blur._glass_schedule(h, w, d)
        offs = rng.integers(-d, d, size=(len(order), 2))
        seq = np.arange(h * w)
        k = 0
        for hh in range(h - d, d, -1):
            for ww in range(w - d, d, -1):
                dx, dy = offs[k]
                k += 1
                seq[hh * w + ww] = seq[(hh + dy) * w + ww + dx]
        par = np.arange(h * w)
        nbr = pos + offs[order, 1] * w + offs[order, 0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            par[pos[a:b]] = par[nbr[a:b]]
        np.testing.assert_array_equal(par, seq)


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "motion_blur", "glass_blur"])
def test_size_rule(monkeypatch, name):
    """reference_size=224: unchanged at 224 px; at 28 px the change is that of the 224 px image, resized."""
    x224 = torch.from_numpy(image_set("photos96")[:1]).permute(0, 3, 1, 2).float() / 255
    x224 = torch.nn.functional.interpolate(x224, size=(224, 224), mode="bilinear", align_corners=False)
    off = corrupt(x224, name, 2, seed=0)
    torch.testing.assert_close(corrupt(x224, name, 2, seed=0, reference_size=224), off)
    small = torch.nn.functional.interpolate(x224, size=(28, 28), mode="area")
    on = corrupt(small, name, 2, seed=0, reference_size=224)
    raw = corrupt(small, name, 2, seed=0)
    assert on.shape == small.shape and float(on.min()) >= 0 and float(on.max()) <= 1
    assert 0 < float((on - small).abs().mean()) < 0.5 * float((raw - small).abs().mean())
