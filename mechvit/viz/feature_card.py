"""Publication "feature card" of one SAE latent: its top images with the per-patch activation as a heatmap
(and, given the corrupted images, a row of its top corrupted images, each titled with its condition), the
automatic label, density and mean activation, the classes of its top images and its direct logit effect.
A latent that fires only on corrupted images has its label and classes from its top corrupted images, marked
"(corrupted images)" (``FeatureStats.label_set``).

One call: ``feature_card(stats, feature, images, class_names, path="card.png")`` writes ``card.png`` (300
dpi) and ``card.svg`` (text kept as text) and returns the matplotlib ``Figure``. ``stats`` is the
:class:`~mechvit.analysis.features.FeatureStats` the explorer shows, so the card and the page agree. With more
than ``max_classes`` classes (ImageNet's 1,000) the two bar charts show the ``max_classes`` leading ones: the
most frequent classes among the top images, and the largest logit effects by magnitude. The direct logit effect
is computed at the latent's mean activation on the clean tokens where it fires; for a latent that never fires on
a clean token, at its mean on the corrupted ones, and the card says so; for one that never fires, the card says
it was not measured (``FeatureStats.effect_basis``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mechvit._numbers import fmt_fixed, fmt_sig

__all__ = ["feature_card", "heat_cmap"]


def heat_cmap():
    """The explorer's heatmap colours (transparent -> orange -> yellow, alpha growing with activation)."""
    from matplotlib.colors import ListedColormap

    t = np.linspace(0, 1, 256)
    rgba = np.stack([np.ones_like(t), (60 + 180 * t) / 255, 20 * (1 - t) / 255, 0.1 + 0.65 * t], axis=1)
    rgba[0, 3] = 0.0  # an inactive patch leaves the image as it is
    return ListedColormap(rgba, name="mechvit_heat")


def feature_card(
    stats: Any,
    feature: int,
    images,
    class_names: Sequence[str],
    *,
    path: str | os.PathLike | None = None,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 300,
    n_images: int = 6,
    corrupted=None,
    corrupted_groups: Sequence[tuple[str, int]] | None = None,
    title: str | None = None,
    max_classes: int = 12,
):
    """Draw latent ``feature`` of ``stats`` (a ``FeatureStats``); ``images`` are the clean images [N, C, H, W]
    in [0, 1] the stats were computed on (and ``corrupted`` the corrupted ones, adding a second row of the
    latent's top corrupted images; ``corrupted_groups`` ``[(condition, count), ...]`` says which consecutive
    corrupted images came from which condition, written above each image). A latent that never fires on a
    clean image says so in the clean row. With ``path``, the card is saved once per format in ``formats``
    (``path`` with that suffix). Up to ``max_classes`` classes every class is drawn in class order; beyond,
    each bar chart draws its ``max_classes`` leading classes (by count, by absolute logit effect; ties: class
    order), largest first."""
    from matplotlib.figure import Figure

    f = int(feature)
    if max_classes < 1:
        raise ValueError(f"max_classes must be >= 1, got {max_classes}")
    if not 0 <= f < stats.d_sae:
        raise ValueError(f"feature must be in [0, {stats.d_sae}), got {feature}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) != stats.n_images:
        raise ValueError(
            f"expected the {stats.n_images} images [N, C, H, W] the stats were computed on, got {images.shape}"
        )
    sets = [("clean", images, stats.top_idx[f], stats.top_maps[f])]
    if corrupted is not None and stats.top_idx_corrupted is not None:
        corrupted = np.asarray(corrupted, np.float32)
        if corrupted.ndim != 4 or len(corrupted) != stats.n_corrupted:
            raise ValueError(
                f"expected the {stats.n_corrupted} corrupted images [M, C, H, W] the stats were computed on, got "
                f"{corrupted.shape}"
            )
        sets.append(("corrupted", corrupted, stats.top_idx_corrupted[f], stats.top_maps_corrupted[f]))
    starts, group_names = np.zeros(0, np.int64), []
    if corrupted_groups is not None:
        group_names = [str(g) for g, _ in corrupted_groups]
        starts = np.cumsum([0] + [int(c) for _, c in corrupted_groups])[:-1]
    k = max(1, min(n_images, stats.top_idx.shape[1]))
    C = len(class_names)
    vmax = float(stats.max_act[f]) or 1.0
    cmap = heat_cmap()
    fig = Figure(figsize=(7.0, 1.35 * len(sets) + 1.9), dpi=dpi, layout="constrained")
    gs = fig.add_gridspec(
        len(sets) + 1, k + 1, height_ratios=[1.0] * len(sets) + [1.25], width_ratios=[1] * k + [0.08]
    )
    im = None
    for r, (name, imgs, idx, maps) in enumerate(sets):
        for j in range(k):
            ax = fig.add_subplot(gs[r, j])
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(idx) or idx[j] < 0:
                if j == 0:  # no image at all in this row: say why instead of an empty row
                    ax.text(
                        0,
                        0.5,
                        f"never active on the {name} images",
                        fontsize=7,
                        va="center",
                        transform=ax.transAxes,
                    )
                ax.axis("off")
                continue
            img = imgs[idx[j]]
            h, w = img.shape[-2:]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            im = ax.imshow(
                maps[j],
                cmap=cmap,
                vmin=0,
                vmax=vmax,
                extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                interpolation="nearest",
            )
            value = fmt_fixed(
                float(stats.top_val[f, j] if name == "clean" else stats.top_val_corrupted[f, j]), 2
            )
            if name == "corrupted" and group_names:  # the condition this corrupted image came from
                value = f"{group_names[int(np.searchsorted(starts, idx[j], side='right')) - 1]}\n{value}"
            ax.set_title(value, fontsize=6, pad=1.5)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
        if im is not None:
            cax = fig.add_subplot(gs[r, k])
            cb = fig.colorbar(im, cax=cax)
            cb.ax.tick_params(labelsize=5)
    # bottom row: classes of the top images | direct logit effect (the leading max_classes of many classes)
    counts = stats.class_counts[f]
    eff = np.asarray(stats.logit_effect[f], dtype=np.float64)
    basis = str(stats.basis[f])
    if not np.isfinite(eff).all():
        basis = "none"
    show_c = show_e = np.arange(C)
    if C > max_classes:
        show_c = np.argsort(-counts, kind="stable")[:max_classes]
        show_e = np.argsort(-np.abs(eff), kind="stable")[:max_classes]
    names = list(class_names)
    ax1 = fig.add_subplot(gs[-1, : k // 2])
    ax1.barh(np.arange(len(show_c)), counts[show_c], color="#7a9c5a")
    ax1.set_yticks(np.arange(len(show_c)), [names[c] for c in show_c], fontsize=6)
    ax1.invert_yaxis()
    ax1.tick_params(axis="x", labelsize=6)
    lead = "" if C <= max_classes else f" (leading {len(show_c)} of {C} classes)"
    n_top = int(counts.sum())
    # a latent that fires only on corrupted images: the classes (and label) of its top corrupted images
    which = " corrupted" if str(stats.labelled_on[f]) == "corrupted" else ""
    ax1.set_title(
        f"classes of top {n_top}{which} images{lead}"
        if n_top
        else "classes of top images: none (never on clean)",
        fontsize=7,
    )
    ax2 = fig.add_subplot(gs[-1, k // 2 : k])
    if basis == "none":  # never fires: its effect was not measured (not a measured 0)
        ax2.set_xticks([])
        ax2.set_yticks([])
        ax2.text(
            0.5, 0.5, "not measured\n(never fires on clean images)", ha="center", va="center", fontsize=7
        )
        ax2.set_title("direct logit effect", fontsize=7)
    else:
        ax2.barh(
            np.arange(len(show_e)),
            eff[show_e],
            color=["#d0674f" if v >= 0 else "#6d8fc7" for v in eff[show_e]],
        )
        ax2.axvline(0, color="#888", lw=0.6)
        ax2.set_yticks(np.arange(len(show_e)), [names[c] for c in show_e], fontsize=6)
        ax2.invert_yaxis()
        ax2.tick_params(axis="x", labelsize=6)
        lead = "" if C <= max_classes else f" (largest {len(show_e)} of {C})"
        # never fires on a clean token: the effect is at its mean activation on the corrupted tokens
        at = "corrupted-image mean act" if basis == "corrupted" else "mean act"
        ax2.set_title(f"direct logit effect ({at} × decoder dir.){lead}", fontsize=7)
    for ax in (ax1, ax2):
        for s in ("top", "right"):
            ax.spines[s].set_visible(False)
    head = title or f"latent #{f}"
    mean = _g(stats.mean_act[f])
    mean_c = getattr(stats, "mean_act_corrupted", None)
    if basis == "corrupted" and mean_c is not None:
        mean += f" (corrupted {_g(mean_c[f])})"
    fig.suptitle(
        f"{head} — {stats.shown_label(f)}\ndensity {fmt_sig(float(stats.density[f]), 3, 100)}% · mean act "
        f"{mean} · max {fmt_sig(float(vmax), 3)} · hook {stats.hook}",
        fontsize=8,
    )
    if path is not None:
        from mechvit._io import atomic_write

        stem = Path(path)
        for fmt in formats:
            target = stem.with_suffix("." + fmt)
            with _svg_text():
                atomic_write(target, lambda fh, fmt=fmt: fig.savefig(fh, format=fmt, dpi=dpi))
    return fig


def _g(v) -> str:
    """A number to 3 significant digits; "–" for NaN (e.g. the mean activation of a latent that never fires)."""
    v = float(v)
    return fmt_sig(v, 3) if np.isfinite(v) else "–"


class _svg_text:
    """Keep text as text in SVG (editable in a vector editor) while saving."""

    def __enter__(self):
        import matplotlib

        self._ctx = matplotlib.rc_context({"svg.fonttype": "none"})
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
