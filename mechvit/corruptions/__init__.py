"""The 19 ImageNet-C corruptions (15 benchmark + 4 extra), batched in torch.

``corrupt(images, name, severity, seed=...)`` takes float images ``[N, C, H, W]`` in [0, 1] (C = 1 or 3) on any
device and returns corrupted images of the same shape, dtype and device. Parameters follow the ImageNet-C
definitions as implemented by the ``imagecorruptions`` package (the reference); see ``docs/corruptions.md``.

Each corruption is a function named after it in the family module (``noise.py``, ``blur.py``, ``weather.py``,
``digital.py``) with the signature ``fn(x, severity, generator) -> Tensor``: ``x`` float ``[N, C, H, W]`` in [0, 1],
``severity`` an int in 1..5 (already validated), ``generator`` a ``torch.Generator`` on ``x.device``; it returns
a tensor of the same shape, dtype and device, clamped to [0, 1], drawing every random number from ``generator``
(independently per image).
"""

from __future__ import annotations

import difflib
import importlib
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from mechvit._checks import SEVERITIES, severity_problem  # one rule with mechvit.data (a sibling layer)
from mechvit.corruptions._kernels import _REFERENCE_SIZE

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "spatter"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur",
    "snow", "frost", "fog", "spatter",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate",
)  # fmt: skip

FAMILY_OF: dict[str, str] = {name: fam for fam, names in FAMILIES.items() for name in names}

# The corruptions whose draws for an image depend on how many images are corrupted at once (with the same
# seed, corrupt(x)[:k] != corrupt(x[:k])): their random layers or per-image streams are drawn for the whole
# batch. Every other corruption gives the first k images the same output whatever follows them
# (tests/test_corruptions.py checks this split at every severity). The study hashes the corrupted-set size
# only for these (mechvit.study.runner.step_hash).
BATCH_DEPENDENT: frozenset[str] = frozenset({"shot_noise", "glass_blur", "snow", "frost", "fog"})
MIN_SIZE = 8  # smallest accepted image side in pixels
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts

assert set(CORRUPTIONS) == set(FAMILY_OF) and len(CORRUPTIONS) == 19

from mechvit.corruptions.frequency import HIGH_FREQUENCY, LOW_FREQUENCY  # noqa: E402


def corruption_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a corruption name, or ``None`` when it is one of :data:`CORRUPTIONS`.

    The one wording of this check: :func:`corrupt` raises it as it is; the study and training configs prefix
    it with the key and raise it as their own error type. A misspelt name gets the closest names::

        unknown corruption 'gausian_blur'; expected one of gaussian_noise, ..., saturate; did you mean
        'gaussian_blur' or 'glass_blur'?
    """
    if isinstance(name, str) and name in FAMILY_OF:
        return None
    message = f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}"
    close = difflib.get_close_matches(name, CORRUPTIONS, n=2) if isinstance(name, str) else []
    return message + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")


def get_corruption(name: str) -> Callable[[Tensor, int, torch.Generator], Tensor]:
    """The function implementing ``name`` (imported lazily from its family module)."""
    if (problem := corruption_problem(name)) is not None:
        raise ValueError(problem)
    module_name = f"mechvit.corruptions.{FAMILY_OF[name]}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise NotImplementedError(
            f"corruption {name!r} lives in {module_name}, which is not written yet"
        ) from e
    fn = getattr(module, name, None)
    if fn is None:
        raise NotImplementedError(f"corruption {name!r} is not implemented in {module_name} yet")
    return fn


def _validate(images, name, severity) -> None:
    for problem in (corruption_problem(name), severity_problem(severity)):
        if problem is not None:
            raise ValueError(problem)
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape [N, C, H, W] (4 dimensions), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor (float16, bfloat16, float32 or float64) in [0, 1], got {images.dtype}"
        )
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(
            f"images must have 1 or 3 channels (dim 1 of [N, C, H, W]), got {c} (shape {tuple(images.shape)})"
        )
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {h}x{w}")
    if n > 0:
        lo, hi = torch.aminmax(images)
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"images must lie in [0, 1] (finite), got values in [{lo}, {hi}]")


def corrupt(
    images: Tensor,
    name: str,
    severity: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    reference_size: int | None = None,
) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a batch of images ``[N, C, H, W]`` in [0, 1].

    Size rule: with ``reference_size=None`` (default) the pixel parameters of ImageNet-C (blur sigmas and
    radii, snow/frost/spatter layers) apply in pixels at every image size, as in the ``imagecorruptions``
    reference; with ``reference_size=224`` they apply at 224 px on the short side and a smaller image gets
    that corruption seen smaller (docs/corruptions.md has the measured effect at 28 px).

    ``reference_size`` is ``None`` or an integer >= ``MIN_SIZE`` (8 px, the smallest image ``corrupt`` accepts:
    the rule computes the corruption on an image of that short side).

    Randomness comes from ``generator`` if given, else from a fresh generator seeded with ``seed`` (an integer
    in ``[-2**63, 2**64)``, the range of torch's 64-bit generator seed), else from one seeded from torch's
    global RNG (so ``torch.manual_seed`` makes it reproducible). Every image of the batch gets its own random
    draws. Half-precision inputs are processed in float32 and cast back. The random draws do not depend on
    the dtype: they are made in float32 (cast to float64 for float64 input), so a seed gives a float64 batch
    the same noise, snow, spatter, fog and elastic fields as its float32 copy; the outputs then differ only
    by the rounding of the arithmetic after the draws.

    A corruption is a data transform, not a differentiable layer (most are piecewise constant: quantisation,
    JPEG, pixelation, thresholds): the images are detached first, so inputs that require gradients are
    accepted and the output never requires a gradient.
    """
    if isinstance(images, Tensor):
        images = images.detach()  # a data transform: no gradient flows through it (see the docstring)
    _validate(images, name, severity)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not SEED_RANGE[0] <= int(seed) < SEED_RANGE[1]:
            raise ValueError(
                f"seed must be an integer in [-2**63, 2**64) (a 64-bit torch.Generator seed), got {seed!r}"
            )
        generator = torch.Generator(device=images.device)
        generator.manual_seed(int(seed))
    elif not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    elif torch.device(generator.device).type != images.device.type:
        raise ValueError(f"generator is on {generator.device} but images are on {images.device}")
    if reference_size is not None and (
        isinstance(reference_size, bool)
        or not isinstance(reference_size, numbers.Integral)
        or reference_size < MIN_SIZE
    ):
        raise ValueError(
            f"reference_size must be None (the reference's pixel parameters at every size) or an integer >= "
            f"{MIN_SIZE} (the short side, in pixels, at which they apply, e.g. 224), got {reference_size!r}"
        )
    fn = get_corruption(name)
    if images.shape[0] == 0:
        return images.clone()
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    token = _REFERENCE_SIZE.set(None if reference_size is None else int(reference_size))
    try:
        out = fn(x, int(severity), generator)
    finally:
        _REFERENCE_SIZE.reset(token)
    if out.shape != images.shape:
        raise RuntimeError(f"{name} returned shape {tuple(out.shape)} for input {tuple(images.shape)}")
    return out.to(images.dtype)


__all__ = [
    "BATCH_DEPENDENT",
    "CORRUPTIONS",
    "FAMILIES",
    "FAMILY_OF",
    "HIGH_FREQUENCY",
    "LOW_FREQUENCY",
    "SEVERITIES",
    "corrupt",
    "corruption_problem",
    "get_corruption",
    "severity_problem",
]
