"""One figure per analysis (matplotlib, no pyplot state): labelled axes, colour bars, one palette.

Every ``plot_*`` function returns the :class:`matplotlib.figure.Figure`; with ``path`` (a file stem or a
name with a suffix) it also writes ``<stem>.png`` and ``<stem>.svg`` atomically. Colours: ``PALETTE``
(Paul Tol's "bright", colour-blind safe; its last colour is a neutral grey) for lines and bars, ``SEQUENTIAL``
for non-negative maps, ``DIVERGING`` (centred on 0) for signed maps such as patching scores. The building
blocks (``save_figure``, ``heatmap``, ``image_overlay``, ``color``) also draw the study's figures
(``mechvit.study.plots``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mechvit._io import atomic_write

PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB")
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
FORMATS = ("png", "svg")


def color(i: int) -> str:
    """The ``i``-th colour of ``PALETTE``, cycling."""
    return PALETTE[i % len(PALETTE)]


def save_figure(
    fig: Figure,
    path: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    dpi: int = 150,
    bbox_inches: str | None = "tight",
) -> list[Path]:
    """Write ``fig`` as ``<stem>.<fmt>`` for each format, atomically; returns the paths written.

    ``bbox_inches=None`` keeps the figure's own size (for figures with a constrained layout)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lstrip(".") in ("png", "svg", "pdf") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = stem.parent / f"{stem.name}.{fmt}"
        atomic_write(target, lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches=bbox_inches))
        out.append(target)
    return out


def _finish(fig: Figure, path) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=float)


def _sym(values: np.ndarray) -> float:
    m = float(np.nanmax(np.abs(values))) if values.size and np.isfinite(values).any() else 1.0
    return m if m > 0 else 1.0


def heatmap(
    ax,
    values,
    xlabels: Sequence[str],
    ylabels: Sequence[str],
    *,
    cbar_label: str | None = None,
    cmap: str = SEQUENTIAL,
    vmin: float | None = None,
    vmax: float | None = None,
    xlabel: str = "",
    ylabel: str = "",
    fmt: str | None = None,
    marks=None,
    max_ticks: int = 25,
    xrotation: float | None = None,
    cbar_kw: dict | None = None,
):
    """``values [rows, cols]`` as a labelled image with a colour bar (none when ``cbar_label`` is None).

    A ``DIVERGING`` map without ``vmin`` is centred on 0. ``fmt`` (e.g. ``"{:.2f}"``) writes each value in
    its cell (up to 400 cells); ``marks`` (bool ``[rows, cols]``) outlines cells; an axis with more than
    ``max_ticks`` labels shows every n-th; x labels turn by ``xrotation`` degrees, aligned at their right
    end (default: upright, or 90 with more than 8 labels). ``cbar_kw`` goes to ``colorbar``."""
    v = _np(values)
    if cmap == DIVERGING and vmin is None:
        vmin, vmax = -_sym(v), _sym(v)
    im = ax.imshow(v, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    xtext = (
        {"rotation": xrotation, "ha": "right"}
        if xrotation is not None
        else {"rotation": 90 if len(xlabels) > 8 else 0}
    )
    for labels, set_ticks, text in ((xlabels, ax.set_xticks, xtext), (ylabels, ax.set_yticks, {})):
        ticks = list(range(0, len(labels), max(1, math.ceil(len(labels) / max_ticks))))
        set_ticks(ticks, [labels[i] for i in ticks], fontsize=7, **text)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if fmt is not None and v.size <= 400:
        lo, hi = im.get_clim()
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                dark = (x - lo) / ((hi - lo) or 1) < 0.55 if cmap == SEQUENTIAL else abs(x) > 0.6 * hi
                ax.text(
                    j,
                    i,
                    fmt.format(x),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if dark else "black",
                )
    if marks is not None:
        for i, j in zip(*np.nonzero(marks), strict=True):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=PALETTE[1], lw=1.6))
    if cbar_label is not None:
        ax.figure.colorbar(im, ax=ax, label=cbar_label, **(cbar_kw or {}))
    return im


def image_overlay(
    ax,
    image,
    grid=None,
    *,
    vmin: float = 0.0,
    vmax: float | None = None,
    alpha: float = 0.55,
    title: str = "",
    cmap: str = "inferno",
):
    """``image [C, H, W]`` (in [0, 1]) with a per-patch map ``grid [gh, gw]`` stretched over it; returns the
    map's image (for a colour bar), None without ``grid``."""
    img = _np(image)
    img = img[0] if img.shape[0] == 1 else np.clip(np.moveaxis(img, 0, -1), 0, 1)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    im = None
    if grid is not None:
        h, w = img.shape[:2]
        im = ax.imshow(
            _np(grid),
            cmap=cmap,
            alpha=alpha,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            vmin=vmin,
            vmax=vmax or None,
            interpolation="nearest",
        )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
    return im


# ----------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------


def plot_patching(result, path=None, *, title: str | None = None) -> Figure:
    """Patching scores: a heatmap over the result's dims, plus patch-grid maps when positions are complete."""
    dims, lab = tuple(result.dims), result.labels
    v = _np(result.values)
    title = title or f"{result.component} patching ({result.direction.replace('_', ' ')})"
    cbar = "normalised logit diff (0 corrupted, 1 clean)"
    gh, gw = result.grid_size
    full_positions = "position" in dims and len(lab["position"]) == result.n_prefix_tokens + gh * gw
    if len(dims) == 1:
        fig = Figure(figsize=(max(4, 0.3 * len(v) + 2), 3.2))
        ax = fig.add_subplot()
        ax.bar(range(len(v)), v, color=PALETTE[0])
        ax.set_xticks(range(len(v)))
        ax.set_xticklabels(lab[dims[0]], rotation=90 if len(v) > 12 else 0, fontsize=7)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel(dims[0])
        ax.set_ylabel(cbar)
        ax.set_title(title)
        return _finish(fig, path)
    if len(dims) == 2 and not (full_positions and dims[-1] == "position"):
        fig = Figure(figsize=(max(4, 0.25 * v.shape[1] + 3), max(3, 0.35 * v.shape[0] + 1.5)))
        ax = fig.add_subplot()
        heatmap(
            ax, v, lab[dims[1]], lab[dims[0]], xlabel=dims[1], ylabel=dims[0], cbar_label=cbar, cmap=DIVERGING
        )
        ax.set_title(title)
        return _finish(fig, path)
    if not full_positions:
        raise ValueError(f"plot_patching draws 3-dim results only with every position, got dims {dims}")
    prefix, grid = result.on_grid()
    grid = _np(grid).reshape(-1, gh, gw)
    rows_lab = [lab[dims[0]][i] for i in range(v.shape[0])]
    if len(dims) == 3:
        rows_lab = [f"{dims[0]} {a} {dims[1]} {b}" for a in lab[dims[0]] for b in lab[dims[1]]]
        prefix = {k: _np(p).reshape(-1) for k, p in prefix.items()}
    else:
        rows_lab = [f"{dims[0]} {a}" for a in rows_lab]
        prefix = {k: _np(p) for k, p in prefix.items()}
    n = grid.shape[0]
    ncol = min(n, 6)
    nrow_grid = math.ceil(n / ncol)
    top = 1 if len(dims) == 2 else 0
    fig = Figure(figsize=(2.3 * ncol + 1.5, 2.6 * nrow_grid + (3.5 if top else 0.6)))
    gs = fig.add_gridspec(top + nrow_grid, ncol, height_ratios=[1.5] * top + [1] * nrow_grid, hspace=0.7)
    vmax = _sym(v)
    if top:
        ax = fig.add_subplot(gs[0, :])
        heatmap(ax, v, lab["position"], lab[dims[0]], xlabel="position", ylabel=dims[0], cmap=DIVERGING)
        ax.set_title(title)
    im = None
    for i in range(n):
        ax = fig.add_subplot(gs[top + i // ncol, i % ncol])
        im = ax.imshow(grid[i], cmap=DIVERGING, vmin=-vmax, vmax=vmax, interpolation="nearest")
        pre = ", ".join(f"{k} {p[i]:.2f}" for k, p in prefix.items())
        ax.set_title(f"{rows_lab[i]}" + (f"\n{pre}" if pre else ""), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=fig.axes, label=cbar, shrink=0.8)
    if not top:
        fig.suptitle(title)
    return _finish(fig, path)


# ----------------------------------------------------------------------------------------------
# Logit lens
# ----------------------------------------------------------------------------------------------

_LENS_PANELS = (
    ("top1_acc", "top-1 accuracy"),
    ("correct_prob", "mean correct-class probability"),
    ("kl_to_final", "KL(final || layer) [nats]"),
    ("entropy", "entropy [nats]"),
)


def plot_logit_lens(results, path=None, *, title: str = "Logit lens") -> Figure:
    """Per-layer logit-lens curves; ``results`` is a LogitLensSweep, a dict label -> result, or a list."""
    if hasattr(results, "results"):
        results = {"/".join(k): r for k, r in results.results.items()}
    elif not isinstance(results, Mapping):
        results = {"/".join(str(v) for v in r.meta.values()) or f"run {i}": r for i, r in enumerate(results)}
    fig = Figure(figsize=(11, 7))
    axes = fig.subplots(2, 2)
    linestyles = ("-", "--", ":", "-.")
    models = sorted({lab.split("/")[0] for lab in results})
    for i, (label, res) in enumerate(results.items()):
        s = res.summary()
        x = range(len(res.layers))
        c = color(i)
        style = linestyles[models.index(label.split("/")[0]) % len(linestyles)]
        for ax, (key, name) in zip(axes.flat, _LENS_PANELS, strict=True):
            ax.plot(
                x,
                _np(s[key]),
                style,
                marker="o",
                ms=3,
                color=c,
                label=f"{label} (first {res.mean_first_correct:.2f})",
            )
            ax.set_xticks(list(x))
            ax.set_xticklabels(res.layers)
            ax.set_xlabel("layer (residual stream after block)")
            ax.set_ylabel(name)
    axes[0, 0].legend(fontsize=7, title="run (mean first-correct layer)", title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def plot_attention_stats(stats, path=None, *, title: str = "Attention per layer and head") -> Figure:
    """Heatmaps (layer x head) of attention entropy and mean attention distance."""
    fig = Figure(figsize=(10, 0.35 * stats.entropy.shape[0] + 2.5))
    a1, a2 = fig.subplots(1, 2)
    n_layers, n_heads = stats.entropy.shape
    layers, heads = [str(i) for i in range(n_layers)], [str(h) for h in range(n_heads)]
    for ax, values, label in (
        (a1, stats.entropy, "entropy [nats]"),
        (a2, stats.distance, "mean attention distance [px]"),
    ):
        heatmap(ax, values, heads, layers, xlabel="head", ylabel="layer", cbar_label=label)
    a1.set_title("entropy")
    a2.set_title("mean attention distance")
    fig.suptitle(title)
    return _finish(fig, path)


def plot_paired_attention(
    paired, path=None, *, title: str = "Attention: paired comparison per layer"
) -> Figure:
    """Per-layer entropy difference, mean squared difference and cosine similarity of attention maps.

    ``paired``: a PairedAttention or a dict label -> PairedAttention (e.g. one per corruption or model)."""
    if not isinstance(paired, Mapping):
        paired = {" vs ".join(paired.labels): paired}
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    names = (
        ("entropy_diff", "entropy difference (b - a) [nats]"),
        ("mse", "mean squared difference"),
        ("cosine", "cosine similarity of maps"),
    )
    for i, (label, p) in enumerate(paired.items()):
        per = p.per_layer()
        for ax, (key, name) in zip(axes, names, strict=True):
            ax.plot(range(len(per[key])), _np(per[key]), marker="o", ms=3, color=color(i), label=label)
            ax.set_xlabel("layer")
            ax.set_ylabel(name)
    axes[0].axhline(0, color="black", lw=0.6)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def plot_attention_overlay(
    image,
    maps,
    path=None,
    *,
    titles: Sequence[str] | None = None,
    title: str = "CLS attention to patches",
    alpha: float = 0.55,
) -> Figure:
    """Attention maps on the patch grid (``[gh, gw]`` or ``[n, gh, gw]``) over ``image [C, H, W]``.

    Use with ``model_cls_attention`` (one map per layer or head) or a rollout's CLS row."""
    img = _np(image)
    if img.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got shape {img.shape}")
    maps = _np(maps)
    maps = maps[None] if maps.ndim == 2 else maps
    if maps.ndim != 3:
        raise ValueError(f"maps must be [gh, gw] or [n, gh, gw], got shape {maps.shape}")
    n = maps.shape[0]
    ncol = min(n, 6)
    fig = Figure(figsize=(2.4 * ncol + 1, 2.5 * math.ceil(n / ncol) + 0.4))
    vmin, vmax = (float(maps.min()), float(maps.max())) if maps.size else (0.0, 1.0)
    im = None
    for i in range(n):
        ax = fig.add_subplot(math.ceil(n / ncol), ncol, i + 1)
        im = image_overlay(ax, img, maps[i], vmin=vmin, vmax=vmax, alpha=alpha, cmap=SEQUENTIAL)
        ax.set_title(titles[i] if titles else f"{i}", fontsize=8)
    fig.colorbar(im, ax=fig.axes, label="attention weight", shrink=0.8)
    fig.suptitle(title)
    return _finish(fig, path)


# ----------------------------------------------------------------------------------------------
# CKA, features
# ----------------------------------------------------------------------------------------------


def plot_cka(results, path=None, *, title: str = "Linear CKA per layer") -> Figure:
    """Per-layer CKA (solid: linear, dashed: debiased); ``results`` is a CKAResult or dict label -> CKAResult."""
    if not isinstance(results, Mapping):
        results = {"": results}
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for i, (label, r) in enumerate(results.items()):
        c = color(i)
        ax.plot(range(len(r.layers)), _np(r.linear), "-o", ms=3, color=c, label=f"{label} linear".strip())
        ax.plot(
            range(len(r.layers)), _np(r.debiased), "--s", ms=3, color=c, label=f"{label} debiased".strip()
        )
        ax.set_xticks(range(len(r.layers)))
        ax.set_xticklabels(r.layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("CKA")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _finish(fig, path)


def plot_feature_overlap(overlap, path=None, *, title: str = "SAE feature overlap") -> Figure:
    """Matched decoder cosines with the class thresholds, class counts, and (if measured) activation
    correlation and top-k Jaccard of matched pairs."""
    extra = [t for t in (overlap.act_corr, overlap.topk_jaccard) if t is not None]
    fig = Figure(figsize=(4.2 * (2 + len(extra)), 3.6))
    axes = fig.subplots(1, 2 + len(extra))
    ax = axes[0]
    ax.hist(_np(overlap.matched_cos), bins=40, range=(-1, 1), color=PALETTE[0])
    for thr, name in ((overlap.config.persistent_cos, "persistent"), (overlap.config.shifted_cos, "shifted")):
        ax.axvline(thr, color=PALETTE[1], ls="--", lw=1)
        ax.text(thr, ax.get_ylim()[1] * 0.95, f" {name}", fontsize=7, color=PALETTE[1], va="top")
    ax.set_xlabel("signed decoder cosine of matched pair")
    ax.set_ylabel("pairs")
    counts = overlap.counts()
    axes[1].bar(list(counts), list(counts.values()), color=[PALETTE[i] for i in range(4)])
    axes[1].set_ylabel("features")
    axes[1].set_xlabel("class")
    for ax, t, name in zip(axes[2:], extra, ("activation correlation", "top-k Jaccard"), strict=False):
        vals = _np(t)
        ax.hist(vals[np.isfinite(vals)], bins=30, color=PALETTE[2])
        ax.set_xlabel(f"{name} of matched pair")
        ax.set_ylabel("pairs")
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def plot_code_similarity(
    sims, path=None, *, title: str = "SAE code cosine: clean vs corrupted tokens"
) -> Figure:
    """Histograms (as densities) of the clean-vs-corrupted code cosine, one per model (CodeSimilarity list)."""
    sims = (
        list(sims.values())
        if isinstance(sims, Mapping)
        else [sims]
        if hasattr(sims, "cosines")
        else list(sims)
    )
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for i, s in enumerate(sims):
        c = color(i)
        ax.hist(
            _np(s.cosines),
            bins=_np(s.edges),
            density=True,
            histtype="step",
            lw=1.6,
            color=c,
            label=f"{s.label or i} (mean {s.mean:.3f}, n={s.cosines.numel()})",
        )
    ax.set_xlabel("cosine(code clean, code corrupted)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _finish(fig, path)


__all__ = [
    "DIVERGING",
    "PALETTE",
    "SEQUENTIAL",
    "color",
    "heatmap",
    "image_overlay",
    "plot_attention_overlay",
    "plot_attention_stats",
    "plot_cka",
    "plot_code_similarity",
    "plot_feature_overlap",
    "plot_logit_lens",
    "plot_paired_attention",
    "plot_patching",
    "save_figure",
]
