"""One figure per analysis (matplotlib, no pyplot state): labelled axes, colour bars, one palette.

Every ``plot_*`` function returns the :class:`matplotlib.figure.Figure`; with ``path`` (a file stem or a
name with a suffix) it also writes ``<stem>.png`` and ``<stem>.svg`` atomically. Colours: ``PALETTE``
(Paul Tol's "bright", colour-blind safe; its last colour is a neutral grey) for lines and bars, ``COLORS``
(``color(i)``: 12 distinct colours, one per model of a study), ``SEQUENTIAL``
for non-negative maps, ``DIVERGING`` (centred on 0) for signed maps such as patching scores. The building
blocks (``save_figure``, ``heatmap``, ``image_overlay``, ``color``) draw the study report's figures, which are
the public functions at the end of this module (``robustness_heatmap`` ... ``cka_curves``): the study's steps call
them with their analysis results, and a notebook can call them with the same results. The numbers a figure writes
(cell annotations, titles, legend entries) follow the study's rounding rule (:mod:`mechvit._numbers`, through
``number_format`` for a ``fmt`` string: half up on the decimal value, never ``-0``); the tick labels matplotlib
draws itself keep matplotlib's own formatting.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from mechvit._io import atomic_write
from mechvit._numbers import fmt_fixed, fmt_sig

PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB")
# One colour per model (or group) of a figure: Tol's "bright" without its grey (the neutral colour of reference
# lines), then Tol's vibrant orange and teal and muted indigo, wine and olive, and a dark grey: 12 distinct
# colours, so a study of up to 12 models gives each its own (the default has 8).
COLORS = (*PALETTE[:6], "#EE7733", "#009988", "#332288", "#882255", "#999933", "#555555")
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
FORMATS = ("png", "svg")


def color(i: int) -> str:
    """The ``i``-th colour of ``COLORS`` (12 distinct, never the neutral grey of ``PALETTE``), cycling."""
    return COLORS[i % len(COLORS)]


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


def _scalar(t):
    """A 0-dim tensor, array or number as a number :mod:`mechvit._numbers` takes, at its own precision (a float32
    value as a float32, whose shortest repr is its decimal value, not as the float64 it converts to)."""
    if isinstance(t, torch.Tensor):
        return _np(t).reshape(())[()]
    return np.asarray(t).reshape(())[()] if isinstance(t, np.ndarray) else t


# a format field the study's rounding rule writes: [sign][,].N then f (fixed), g (significant digits) or % (x 100)
_RULE_SPEC = re.compile(r"(?P<sign>[-+ ]?)(?P<group>,?)\.(?P<n>\d+)(?P<kind>[fg%])")


def number_format(fmt: str | Callable[[object], str] | None) -> Callable[[object], str] | None:
    """The text of a number for an annotation, from ``fmt``: a callable as it is; a format string such as
    ``"{:.2f}"`` on the study's rounding rule (:mod:`mechvit._numbers`: half up on the decimal value, never
    ``-0``) when each of its fields is ``.Nf`` (``fmt_fixed(x, N)``; ``,`` groups thousands), ``.Ng``
    (``fmt_sig(x, N)``) or ``.N%`` (``fmt_fixed(x, N, 100)`` and ``%``), with an optional sign flag (``+``: ``+``
    for a value that does not print negative, ``0.00`` included); any other format string (and a value that is
    not a real number) as ``str.format`` writes it; None stays None."""
    if fmt is None or callable(fmt):
        return fmt
    parts = list(string.Formatter().parse(fmt))
    specs = [None if field is None else _RULE_SPEC.fullmatch(spec or "") for _, field, spec, _ in parts]
    fields = [field for _, field, _, _ in parts if field is not None]
    ok = (fields == [""] or set(fields) == {"0"}) and all(  # one value: "{:.2f}", or "{0:.2f} ({0:.0%})"
        field is None or (not conv and m is not None and not (m["group"] and m["kind"] == "g"))
        for (_, field, _, conv), m in zip(parts, specs, strict=True)
    )
    if not ok:
        return fmt.format

    def text(x) -> str:
        x = _scalar(x)
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            return fmt.format(x)
        out = []
        for (literal, field, _, _), m in zip(parts, specs, strict=True):
            out.append(literal)
            if field is None:
                continue
            n, kind = int(m["n"]), m["kind"]
            t = fmt_sig(x, n) if kind == "g" else fmt_fixed(x, n, 100 if kind == "%" else 1, bool(m["group"]))
            out.append(t if t.startswith("-") or m["sign"] in ("", "-") else m["sign"] + t)
            if kind == "%":
                out.append("%")
        return "".join(out)

    return text


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
    fmt: str | Callable[[object], str] | None = None,
    marks=None,
    max_ticks: int = 25,
    xrotation: float | None = None,
    cbar_kw: dict | None = None,
):
    """``values [rows, cols]`` as a labelled image with a colour bar (none when ``cbar_label`` is None).

    A ``DIVERGING`` map without ``vmin`` is centred on 0. ``fmt`` (e.g. ``"{:.2f}"``, or a callable: value ->
    text) writes each value in its cell (up to 400 cells), on the study's rounding rule (``number_format``:
    0.125 with ``"{:.2f}"`` reads 0.13, -0.001 reads 0.00); ``marks`` (bool ``[rows, cols]``) outlines cells;
    an axis with more than ``max_ticks`` labels shows every n-th; x labels turn by ``xrotation`` degrees, aligned at their right
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
        cell_text = number_format(fmt)
        # the texts at the values' own precision (a float32 value by its float32 repr; _np makes an array float64,
        # a tensor float32)
        raw = v if isinstance(values, torch.Tensor) else np.asarray(values)
        raw = raw if raw.dtype.kind == "f" and raw.shape == v.shape else v
        lo, hi = im.get_clim()
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                dark = (x - lo) / ((hi - lo) or 1) < 0.55 if cmap == SEQUENTIAL else abs(x) > 0.6 * hi
                ax.text(
                    j,
                    i,
                    cell_text(raw[i, j]),
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
        pre = ", ".join(f"{k} {fmt_fixed(p[i], 2)}" for k, p in prefix.items())
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
                label=f"{label} (first {fmt_fixed(res.mean_first_correct_block, 2)})",
            )
            ax.set_xticks(list(x))
            ax.set_xticklabels(res.layers)
            ax.set_xlabel("layer (residual stream after block)")
            ax.set_ylabel(name)
    axes[0, 0].legend(
        fontsize=7, title="run (mean first-correct block, embed row left out)", title_fontsize=7
    )
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
            label=f"{s.label or i} (mean {fmt_fixed(s.mean, 3)}, n={s.cosines.numel()})",
        )
    ax.set_xlabel("cosine(code clean, code corrupted)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _finish(fig, path)


__all__ = [
    "DIVERGING",
    "COLORS",
    "PALETTE",
    "SEQUENTIAL",
    "code_cosine_controls_figure",
    "overlap_controls_figure",
    "robustness_group_bars",
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


# ----------------------------------------------------------------------------------------------
# The study report's figures: one public function per figure, called by the study's steps with the
# analysis results (and callable from a notebook with the same results). Each returns a Figure drawn in the
# report's style (constrained layout, small fonts, PALETTE as the colour cycle); write it with save_figure.
# ----------------------------------------------------------------------------------------------

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
    "svg.fonttype": "path", "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}  # fmt: skip
# one line style per input of a figure (colour is the model): 8 distinct dash patterns
_LINES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (8, 2, 2, 2)), (0, (2, 4)))
BAND_ALPHA = 0.15  # the fill of a 95% CI band, in its line's colour


def line_style(j: int):
    """The ``j``-th of 8 distinct line styles (one per input of a figure), cycling."""
    return _LINES[j % len(_LINES)]


def styled(fn):
    """Run a figure function under the report's :data:`STYLE` (rcParams are read when artists are made)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(nrows: int = 1, ncols: int = 1, *, w: float = 4.2, h: float = 3.0, **kw):
    """A constrained-layout ``Figure`` (no pyplot state) and its ``[nrows, ncols]`` axes array."""
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_report_figure(fig: Figure, path: str | os.PathLike) -> list[Path]:
    """``stem.png`` (150 dpi) and ``stem.svg`` at the figure's own (constrained-layout) size."""
    with matplotlib.rc_context(STYLE):
        return save_figure(fig, path, bbox_inches=None)


def _report_heatmap(
    ax, mat, xlabels, ylabels, *, cbar_label: str, fmt: str | Callable[[object], str] | None = "{:.0f}", **kw
):
    im = heatmap(
        ax, mat, xlabels, ylabels, cbar_label=cbar_label, fmt=fmt, xrotation=60,
        cbar_kw={"fraction": 0.046, "pad": 0.03}, **kw,
    )  # fmt: skip
    ax.tick_params(labelsize=STYLE["xtick.labelsize"])
    return im


def _ci_values(ci, key: str, scale: float = 1.0) -> np.ndarray:
    return scale * np.array([np.nan if v is None else v for v in ci[key]], dtype=float)


def ci_band(ax, x, ci, col: str, scale: float = 1.0):
    """A 95% CI band under a line: ``ci`` is ``{"low": [...], "high": [...]}`` with one value per ``x`` (a
    ``None``/NaN bound leaves a gap), drawn in the line's colour ``col``, each bound times ``scale``; None
    draws nothing. Returns the band (a ``PolyCollection``) or None."""
    if not ci:
        return None
    lo, hi = _ci_values(ci, "low", scale), _ci_values(ci, "high", scale)
    return ax.fill_between(x, lo, hi, color=col, alpha=BAND_ALPHA, lw=0, zorder=1)


def _key_legends(fig, models, colours, inputs=(), styles=(), *, input_title: str = "input") -> None:
    """The figure's keys, outside every axes and inside the figure (constrained layout makes room): colour =
    model beside the axes (upper right), line style = input under them."""
    kw = {"frameon": False, "fontsize": 7, "title_fontsize": 7}
    fig.legend(
        [Line2D([], [], color=c, marker="o", ms=3, lw=1.4) for c in colours], list(models), title="model",
        loc="outside right upper", **kw,
    )  # fmt: skip
    if len(inputs):
        fig.legend(
            [Line2D([], [], color="0.3", ls=s, lw=1.2) for s in styles], list(inputs), title=input_title,
            loc="outside lower center", ncols=min(len(inputs), 4), **kw,
        )  # fmt: skip


def _colour_of(models: Sequence[str]):
    """``model -> colour``: the model's place in ``models`` (the study's order), the colours of every report
    figure."""
    order = list(models)
    return lambda n: color(order.index(n))


@styled
def robustness_heatmap(rows: list[dict], models: Sequence[str], corruptions: Sequence[str], seen, severities):
    """Top-1 (%) per model x corruption (mean over ``severities``; at the one severity when there is one) from
    ``robustness_matrix`` rows; the cells of the corruptions in ``seen[model]`` are outlined."""
    cols = ["clean", *corruptions]
    mat = 100 * np.array(
        [
            [np.mean([q["top1"] for q in rows if q["model"] == n and q["corruption"] == c]) for c in cols]
            for n in models
        ]
    )
    marks = np.array([[c in seen[n] for c in cols] for n in models])
    fig, ax = new_figure(w=max(5.0, 0.42 * len(cols) + 2.5), h=1.1 + 0.45 * len(models))
    _report_heatmap(
        ax[0, 0], mat, cols, list(models), cbar_label="top-1 accuracy (%)", vmin=0, vmax=100, marks=marks
    )
    sev = list(severities)
    ax[0, 0].set_xlabel(
        f"corruption (at severity {sev[0]})"
        if len(sev) == 1
        else "corruption (mean over severities " + ", ".join(map(str, sev)) + ")"
    )
    ax[0, 0].set_ylabel("model")
    return fig


@styled
def seen_unseen_bars(summary: list[dict]):
    """Clean, seen and unseen top-1 per model (``seen_unseen_summary`` rows)."""
    fig, ax = new_figure(w=max(4.5, 1.1 * len(summary) + 1.5))
    width = 0.27
    for i, (key, lab) in enumerate(
        (("clean_top1", "clean"), ("seen_top1", "seen"), ("unseen_top1", "unseen"))
    ):
        vals = [100 * s[key] if s[key] == s[key] else 0 for s in summary]
        ax[0, 0].bar(np.arange(len(summary)) + (i - 1) * width, vals, width, label=lab, color=color(i))
    ax[0, 0].set_xticks(range(len(summary)), [s["model"] for s in summary], rotation=20, ha="right")
    ax[0, 0].set_ylabel("top-1 accuracy (%)")
    ax[0, 0].set_ylim(0, 100)
    ax[0, 0].legend(frameon=False, ncols=3, loc="lower right")
    return fig


@styled
def logit_lens_curves(
    results: Mapping[tuple[str, str], object], models: Sequence[str], inputs: Sequence[str], bands=None
):
    """Mean correct-class probability and top-1 per layer; ``results[(model, input)]`` is a
    ``LogitLensResult``; one column per input, one colour per model. ``bands[(model, input)]`` (optional):
    ``{"correct_prob": ci, "top1_acc": ci}``, each ``{"low": [...], "high": [...]}`` per layer (top-1 as a
    fraction), drawn as bands (the study's 95% CIs over images)."""
    layers = list(next(iter(results.values())).layers)
    x = np.arange(len(layers))
    fig, ax = new_figure(2, len(inputs), w=3.4, h=2.8, sharey="row")
    for j, lab in enumerate(inputs):
        for i, n in enumerate(models):
            r, b = results[(n, lab)].summary(), (bands or {}).get((n, lab)) or {}
            kw = {"color": color(i), "marker": "o", "ms": 3, "label": n}
            ax[0, j].plot(x, _np(r["correct_prob"]), **kw)
            ci_band(ax[0, j], x, b.get("correct_prob"), color(i))
            ax[1, j].plot(x, 100 * _np(r["top1_acc"]), **kw)
            ci_band(ax[1, j], x, b.get("top1_acc"), color(i), 100)
        ax[0, j].set_title(lab)
        ax[1, j].set_xlabel("layer (residual stream after block)")
        for a in ax[:, j]:
            a.set_xticks(x, layers)
    ax[0, 0].set_ylabel("mean correct-class prob.")
    ax[1, 0].set_ylabel("logit-lens top-1 (%)")
    _key_legends(fig, models, [color(i) for i in range(len(models))])
    return fig


@styled
def attention_change_curves(
    paired: Mapping[tuple[str, str], object], models: Sequence[str], conditions, bands=None
):
    """Per layer: entropy change, mean squared difference and cosine of each model's attention maps, clean vs
    corrupted (``paired[(model, condition)]`` is a ``PairedAttention``; colour: model, line style: condition).
    ``bands[(model, condition)]`` (optional): ``{"entropy_diff" | "mse" | "cosine": {"low", "high"}}`` per
    layer, drawn as bands."""
    conditions = list(conditions)
    fig, ax = new_figure(1, 3, w=3.6, h=2.9)
    panels = (
        ("entropy_diff", "entropy change (nats)"),
        ("mse", "mean squared diff."),
        ("cosine", "cosine similarity"),
    )
    for k, (key, ylabel) in enumerate(panels):
        for i, n in enumerate(models):
            for j, lab in enumerate(conditions):
                v = _np(paired[(n, lab)].per_layer()[key])
                x = np.arange(len(v))
                ax[0, k].plot(x, v, color=color(i), ls=line_style(j), marker="o", ms=3, label=f"{n}, {lab}")
                ci_band(ax[0, k], x, ((bands or {}).get((n, lab)) or {}).get(key), color(i))
        ax[0, k].set_xlabel("layer")
        ax[0, k].set_ylabel(ylabel)
    ax[0, 0].axhline(0, color=PALETTE[6], lw=0.8, ls=":")
    fig.suptitle("Attention maps, clean vs corrupted copy of each image (head mean)")
    _key_legends(
        fig, models, [color(i) for i in range(len(models))], conditions,
        [line_style(j) for j in range(len(conditions))], input_title="corrupted copy",
    )  # fmt: skip
    return fig


@styled
def attention_layer_stats(stats: Mapping[str, object], bands=None):
    """Attention entropy and mean attention distance per layer (head mean) of each model's ``AttentionStats``
    (colour: model, in the order of ``stats``). ``bands[model]`` (optional): ``{"entropy" | "distance_px":
    {"low", "high"}}`` per layer, drawn as bands."""
    fig, ax = new_figure(1, 2, w=3.8, h=2.9)
    for i, (n, s) in enumerate(stats.items()):
        b = (bands or {}).get(n) or {}
        for a, (key, v) in zip(
            ax[0],
            (("entropy", _np(s.entropy.mean(1))), ("distance_px", _np(s.distance.mean(1)))),
            strict=True,
        ):
            x = np.arange(len(v))
            a.plot(x, v, color=color(i), marker="o", ms=3, label=n)
            ci_band(a, x, b.get(key), color(i))
    ax[0, 0].set(xlabel="layer", ylabel="attention entropy (nats)")
    ax[0, 1].set(xlabel="layer", ylabel="mean attention distance (px)")
    _key_legends(fig, list(stats), [color(i) for i in range(len(stats))])
    return fig


@styled
def attention_between_models(
    between: Mapping[tuple[str, str], object], models: Sequence[str], inputs, base: str, bands=None
):
    """Each fine-tuned model's attention maps against ``base``'s on the same images, per layer
    (``between[(model, input)]`` is a ``PairedAttention``). Colour: model, its place in ``models`` (the
    study's models, ``base`` first; a list without ``base`` is taken to follow it), the colours of every
    report figure; line style: input. ``bands[(model, input)]`` (optional): ``{"cosine" | "entropy_diff":
    {"low", "high"}}`` per layer, drawn as bands."""
    order = list(models) if base in models else [base, *models]
    colour = _colour_of(order)
    inputs = list(inputs)
    fig, ax = new_figure(1, 2, w=3.8, h=2.9)
    for (n, lab), p in between.items():
        kw = {"color": colour(n), "ls": line_style(inputs.index(lab)), "marker": "o", "ms": 3}
        per, b = p.per_layer(), (bands or {}).get((n, lab)) or {}
        for a, key in zip(ax[0], ("cosine", "entropy_diff"), strict=True):
            x = np.arange(len(per[key]))
            a.plot(x, _np(per[key]), label=f"{n}, {lab}", **kw)
            ci_band(a, x, b.get(key), colour(n))
    ax[0, 0].set(xlabel="layer", ylabel=f"cosine to {base}'s maps")
    ax[0, 1].set(xlabel="layer", ylabel=f"entropy minus {base}'s (nats)")
    ax[0, 1].axhline(0, color=PALETTE[6], lw=0.8, ls=":")
    shown = [n for n in order if any(m == n for m, _ in between)]
    _key_legends(fig, shown, [colour(n) for n in shown], inputs, [line_style(j) for j in range(len(inputs))])
    return fig


@styled
def cls_attention_grid(
    maps: Mapping[tuple[str, str], object], images: Mapping[str, object], models: Sequence[str]
):
    """CLS-to-patch attention over the images: ``maps[(model, input)]`` is ``[views, gh, gw]``, ``images[input]``
    the ``[views, C, H, W]`` images; rows: models, columns: inputs x views."""
    inputs = list(images)
    n_views = len(next(iter(images.values())))
    fig, ax = new_figure(len(models), len(inputs) * n_views, w=1.45, h=1.55)
    vmax = max(float(_np(v).max()) for v in maps.values())
    for i, n in enumerate(models):
        for j, lab in enumerate(inputs):
            for v in range(n_views):
                im = image_overlay(
                    ax[i, j * n_views + v], images[lab][v], maps[(n, lab)][v], vmax=vmax,
                    title=f"{lab} #{v}" if i == 0 else "",
                )  # fmt: skip
        ax[i, 0].set_ylabel(n, fontsize=7)
    fig.colorbar(im, ax=ax.ravel().tolist(), label="CLS attention (last layer, head mean)", fraction=0.02)
    return fig


@styled
def patching_grids(results: Mapping[str, object], title: str):
    """Position-patching scores on the patch grid, one row per ``PatchingResult`` (by layer x position), one
    column per layer; the prefix tokens' scores are in the titles."""
    keys = list(results)
    L = results[keys[0]].values.shape[0]
    lim = max(float(r.values.abs().max()) for r in results.values()) or 1.0
    fig, ax = new_figure(len(keys), L, w=1.7, h=1.9)
    for i, k in enumerate(keys):
        prefix, g = results[k].on_grid()
        for layer in range(L):
            im = ax[i, layer].imshow(_np(g[layer]), cmap=DIVERGING, vmin=-lim, vmax=lim)
            pre = ", ".join(f"{t} {fmt_fixed(_scalar(v[layer]), 2)}" for t, v in prefix.items())
            ax[i, layer].set_title(f"layer {layer}" + (f"\n{pre}" if pre else ""), fontsize=7)
            ax[i, layer].set_xticks([])
            ax[i, layer].set_yticks([])
        ax[i, 0].set_ylabel(k, fontsize=7)
    fig.colorbar(im, ax=ax.ravel().tolist(), label="normalised logit difference restored", fraction=0.02)
    fig.suptitle(title, fontsize=9)
    return fig


@styled
def patching_head_maps(results: Mapping[str, object]):
    """Head-patching scores (layer x head), one panel per ``PatchingResult``."""
    keys = list(results)
    fig, ax = new_figure(1, len(keys), w=3.4, h=2.8)
    for j, k in enumerate(keys):
        r = results[k]
        _report_heatmap(
            ax[0, j], _np(r.values), r.labels["head"], r.labels["layer"], cbar_label="restored", cmap=DIVERGING,
            fmt="{:.2f}",
        )  # fmt: skip
        ax[0, j].set(title=k, xlabel="head", ylabel="layer")
    return fig


@styled
def cka_curves(
    groups: Mapping[str, Mapping[object, object]],
    ylabel: str,
    xlabel: str = "layer",
    *,
    models: Sequence[str] | None = None,
    inputs: Sequence[str] | None = None,
    ncols: int | None = None,
):
    """Linear CKA per layer with its 95% CI band (the result's ``linear_ci``, where it has one): one panel per
    group (title -> {(model, input): ``CKAResult``}), ``ncols`` panels a row (default: all in one row; the
    panels fill the rows in order and the slots left over stay empty). Colour: model, its place in ``models``
    (the study's models: the colours of every report figure); line style: input, its place in ``inputs`` (the
    same style for an input in every panel). A plain string key is a model of its own, drawn solid."""
    keys = [k if isinstance(k, tuple) else (k, None) for g in groups.values() for k in g]
    models = list(models) if models is not None else list(dict.fromkeys(m for m, _ in keys))
    inputs = list(inputs) if inputs is not None else list(dict.fromkeys(i for _, i in keys if i is not None))
    colour = _colour_of(models)
    ncols = len(groups) if ncols is None else int(ncols)
    if not 1 <= ncols <= max(1, len(groups)):
        raise ValueError(f"ncols must be in 1..{len(groups)} (the number of panels), got {ncols}")
    nrows = -(-len(groups) // ncols)
    fig, axes = new_figure(nrows, ncols, w=3.9, h=3.0, sharey=True)
    for k in range(len(groups), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    ax = axes.reshape(1, -1)  # panel j is ax[0, j], row by row
    for j, (title, group) in enumerate(groups.items()):
        for key, r in group.items():
            n, lab = key if isinstance(key, tuple) else (key, None)
            x = np.arange(len(r.layers))
            ls = line_style(inputs.index(lab)) if lab is not None else "-"
            ax[0, j].plot(x, _np(r.linear), color=colour(n), ls=ls, marker="o", ms=3, label=f"{n}, {lab}")
            if r.linear_ci is not None:
                ci = {"low": _np(r.linear_ci[0]).tolist(), "high": _np(r.linear_ci[1]).tolist()}
                ci_band(ax[0, j], x, ci, colour(n))
            ax[0, j].set_xticks(x, list(r.layers))
        ax[0, j].set(title=title, xlabel=xlabel)
    for row in axes:
        row[0].set_ylabel(ylabel)
    shown = [m for m in models if any(k[0] == m for k in keys)]
    used = [i for i in inputs if any(k[1] == i for k in keys)]
    _key_legends(fig, shown, [colour(m) for m in shown], used, [line_style(inputs.index(i)) for i in used])
    return fig


def _ci_bar(ax, x: float, e, col: str, width: float, label: str | None = None) -> None:
    """One bar at ``x`` for an Estimate-like (``estimate``/``low``/``high`` attributes or keys), CI whiskers."""
    if e is None:
        return
    get = (lambda k: e[k]) if isinstance(e, Mapping) else (lambda k: getattr(e, k))
    m, lo, hi = get("estimate"), get("low"), get("high")
    if m is None or m != m:
        return
    ax.bar(x, m, width, color=col, label=label)
    if lo is not None and hi is not None and lo == lo and hi == hi:
        ax.errorbar(x, m, yerr=[[m - lo], [hi - m]], color="black", lw=0.8, capsize=2)


_CONTROL_GROUPS = (("within_reference", "within base"), ("within_other", "within other"),
                   ("between", "between"), ("floor", "floor (random rows)"))  # fmt: skip


@styled
def overlap_controls_figure(
    summary: Mapping[str, Mapping[str, Mapping[str, object]]], labels: Mapping[str, str]
):
    """SAE overlap against its controls (``OverlapControls.summary``): one panel per metric, one group of
    bars per comparison (within base, within other, between, floor; mean and 95% CI over seed pairs)."""
    metrics = list(labels)
    comps = list(summary)
    ncols = min(3, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, ax = new_figure(nrows, ncols, w=max(3.2, 1.1 * len(comps) + 1.2), h=2.7)
    width = 0.8 / len(_CONTROL_GROUPS)
    for k, metric in enumerate(metrics):
        a = ax[k // ncols, k % ncols]
        for i, comp in enumerate(comps):
            s = summary[comp].get(metric) or {}
            for j, (key, name) in enumerate(_CONTROL_GROUPS):
                _ci_bar(a, i + (j - 1.5) * width, s.get(key), color(j), width, name if i == 0 else None)
            t = s.get("test")
            p = getattr(t, "p_value", None) if t is not None else None
            if p is not None:
                a.annotate(
                    f"p={fmt_sig(_scalar(p), 2)}",
                    (i, 1.0),
                    xycoords=("data", "axes fraction"),
                    ha="center",
                    va="top",
                    fontsize=6,
                )
        a.set_xticks(range(len(comps)))
        a.set_xticklabels([c.split(" vs ")[-1] for c in comps], rotation=30, ha="right")
        a.set_title(labels[metric], fontsize=8)
        lo, hi = a.get_ylim()
        a.set_ylim(lo, hi + 0.12 * (hi - lo))  # headroom: the p-values sit above the bars, not on them
    for k in range(len(metrics), nrows * ncols):
        ax[k // ncols, k % ncols].set_visible(False)
    fig.suptitle("base vs each model: SAE overlap against seed-noise ceiling and random floor", fontsize=9)
    # one key for every panel, beside them (never over a bar)
    handles, names = {}, []
    for a in ax.ravel():
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                names.append(lab)
    fig.legend([handles[n] for n in names], names, loc="outside right upper", frameon=False, fontsize=7)
    return fig


@styled
def code_cosine_controls_figure(
    code: Mapping[str, Mapping], architectures: Sequence[str], conditions: Sequence[str]
):
    """The seed paper's code cosine with its controls (``CodeCosineControls.to_dict()`` under keys
    ``"arch|model|sae_of|condition"``): per architecture x condition, each model's code cosine with its own
    SAEs, the raw-activation cosine and the mismatched-patch baseline, 95% CI over images."""
    n_models = len({k.split("|")[1] for k in code})
    fig, ax = new_figure(len(architectures), len(conditions), w=max(3.8, 0.55 * n_models + 0.8), h=2.8)
    groups = (
        ("code", "code cosine (own SAEs)"),
        ("raw", "raw activation cosine"),
        ("mismatched", "mismatched patch"),
    )
    width = 0.8 / len(groups)
    for i, a in enumerate(architectures):
        for j, cond in enumerate(conditions):
            keys = [
                k
                for k in code
                if k.startswith(f"{a}|") and k.endswith(f"|{cond}") and k.split("|")[1] == k.split("|")[2]
            ]
            models = [k.split("|")[1] for k in keys]
            for x, k in enumerate(keys):
                for g, (name, lab) in enumerate(groups):
                    _ci_bar(ax[i, j], x + (g - 1) * width, code[k][name]["over_images"], color(g), width,
                            lab if x == 0 else None)  # fmt: skip
            ax[i, j].set_xticks(range(len(models)))
            ax[i, j].set_xticklabels(models, rotation=30, ha="right")
            ax[i, j].set(title=f"{a}, {cond}", ylabel="cosine")
    # one key for every panel, beside them (inside the axes it covered the first model's bars)
    fig.legend(*ax[0, 0].get_legend_handles_labels(), loc="outside right upper", frameon=False, fontsize=7)
    return fig


@styled
def robustness_group_bars(estimates: Mapping[str, Mapping], models: Sequence[str], groups: Mapping[str, str]):
    """Top-1 per model and group of cells with 95% CI whiskers (the robustness step's ``estimates``:
    ``{model: {"accuracy": {group: Estimate dict}}}``); ``groups`` maps a group key to its legend label."""
    keys = [g for g in groups if any(g in estimates[m]["accuracy"] for m in models)]
    fig, ax = new_figure(w=max(5.5, 1.2 * len(models) + 3.0))
    width = 0.8 / max(1, len(keys))
    for j, g in enumerate(keys):
        first = next(m for m in models if g in estimates[m]["accuracy"])  # the legend entry of group g
        for i, m in enumerate(models):
            e = estimates[m]["accuracy"].get(g)
            if e is not None:
                e = {k: 100 * e[k] for k in ("estimate", "low", "high")}
            _ci_bar(
                ax[0, 0],
                i + (j - (len(keys) - 1) / 2) * width,
                e,
                color(j),
                width,
                groups[g] if m == first else None,
            )
    ax[0, 0].set_xticks(range(len(models)), list(models), rotation=20, ha="right")
    ax[0, 0].set_ylabel("top-1 accuracy (%)")
    ax[0, 0].set_ylim(0, 100)
    # beside the axes, never over the bars
    fig.legend(*ax[0, 0].get_legend_handles_labels(), loc="outside right upper", frameon=False, fontsize=7)
    return fig
