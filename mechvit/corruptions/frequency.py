"""Low- vs high-frequency corruption groups, decided by measurement.

For a corruption, the *high-frequency share* is the fraction of the energy of its change to the image spectrum,
``|FFT(corrupted) - FFT(clean)|^2``, that lies above half the Nyquist frequency (radial frequency
``sqrt(fx^2 + fy^2) > 0.25`` cycles per pixel), pooled over images and channels. A corruption is
*high-frequency* when its share, averaged over severities 1..5, exceeds ``THRESHOLD``, else *low-frequency*.
White noise puts 80% of its energy there (the area outside the disk), an ideal low-pass nothing.

``LOW_FREQUENCY`` and ``HIGH_FREQUENCY`` below were measured with ``frequency_table`` on the first 256
Fashion-MNIST test images at 28 px (seed 0); the table is in ``docs/corruptions.md`` and
``tests/test_corruptions.py`` re-derives the groups. The grouping depends on the images: on photographs,
whose spectra hold more high-frequency energy, elastic_transform and jpeg_compression come out low.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

CUTOFF = 0.25  # cycles per pixel: half the Nyquist frequency
THRESHOLD = 0.5  # mean high-frequency share above which a corruption counts as high-frequency

# Measured (see docs/corruptions.md): mean share on Fashion-MNIST, e.g. gaussian_noise 0.70, gaussian_blur 0.36.
HIGH_FREQUENCY: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
# saturate does not change grey images (share undefined on Fashion-MNIST); on colour photographs its share is
# 0.01, so it is low-frequency.
LOW_FREQUENCY: tuple[str, ...] = (
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur",
    "snow", "frost", "fog", "spatter", "brightness", "contrast", "saturate",
)  # fmt: skip
MEASURED_ON = (
    "Fashion-MNIST test images 0..255 at 28 px (saturate: 5 scikit-image photographs at 96 px), seed 0"
)


def high_frequency_share(
    clean: Float[Tensor, "n c h w"], corrupted: Float[Tensor, "n c h w"], cutoff: float = CUTOFF
) -> float:
    """Fraction of the energy of ``FFT(corrupted) - FFT(clean)`` at radial frequency above ``cutoff``
    (NaN when nothing changed, e.g. ``saturate`` on grey images)."""
    if clean.shape != corrupted.shape or clean.ndim != 4:
        raise ValueError(
            f"expected two [N, C, H, W] tensors of one shape, got {clean.shape} and {corrupted.shape}"
        )
    diff = (corrupted - clean).double()
    power = torch.fft.fft2(diff).abs().pow(2).sum(dim=(0, 1))  # [H, W]
    h, w = power.shape
    fy = torch.fft.fftfreq(h, dtype=torch.float64, device=power.device)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64, device=power.device)[None, :]
    high = (fy**2 + fx**2).sqrt() > cutoff
    total = float(power.sum())
    return float(power[high].sum()) / total if total > 0 else float("nan")


def frequency_table(
    images: Tensor,
    names: Iterable[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    cutoff: float = CUTOFF,
) -> dict[str, list[float]]:
    """High-frequency share of each corruption's change at each severity: ``{name: [share per severity]}``."""
    from mechvit.corruptions import CORRUPTIONS, corrupt

    out = {}
    for name in names if names is not None else CORRUPTIONS:
        out[name] = [
            high_frequency_share(images, corrupt(images, name, s, seed=seed + s), cutoff) for s in severities
        ]
    return out


def split_by_frequency(
    table: dict[str, Sequence[float]], threshold: float = THRESHOLD
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(low, high)`` name tuples from a ``frequency_table`` (mean share over severities vs ``threshold``).
    Names whose change is undefined (NaN: the corruption changed nothing) are in neither."""
    means = {n: sum(v) / len(v) for n, v in table.items()}
    low = tuple(n for n, m in means.items() if m <= threshold)
    high = tuple(n for n, m in means.items() if m > threshold)
    return low, high


def format_table(tables: dict[str, dict[str, Sequence[float]]]) -> str:
    """A markdown table of one or more ``frequency_table`` results (one column block per image set)."""
    sets = list(tables)
    names = list(tables[sets[0]])
    head = "| corruption | " + " | ".join(f"{s}: sev 1..5 | {s}: mean" for s in sets) + " | group |"
    lines = [head, "|" + "---|" * (2 + 2 * len(sets))]
    for n in names:
        cells = []
        for s in sets:
            v = tables[s][n]
            cells += [" ".join(f"{x:.2f}" for x in v), f"{sum(v) / len(v):.2f}"]
        group = "high" if n in HIGH_FREQUENCY else "low" if n in LOW_FREQUENCY else "?"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {group} |")
    return "\n".join(lines)
