"""The study's figures: matplotlib, labelled axes, colour bars, one palette, PNG and SVG (vector) output.

One palette for the whole report: Paul Tol's "bright" qualitative colours for lines and bars (colour-blind
safe), ``viridis`` for magnitudes, ``RdBu_r`` centred on 0 for signed differences.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB")
SEQUENTIAL = "viridis"
DIVERGING = "RdBu_r"
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
    "svg.fonttype": "path", "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}  # fmt: skip


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def new_figure(nrows: int = 1, ncols: int = 1, *, w: float = 4.2, h: float = 3.0, **kw):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained",
                                 **kw)
    return fig, axes


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_figure(fig, writer, stem: str, caption: str) -> dict[str, str]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg`` atomically via the step writer; close the figure."""
    out = {"caption": caption}
    with plt.rc_context(STYLE):
        for fmt, kw in (("png", {"dpi": 150}), ("svg", {})):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, **kw)
            _atomic_bytes(writer.path(f"{stem}.{fmt}"), buf.getvalue())
            out[fmt] = writer.rel(f"{stem}.{fmt}")
    plt.close(fig)
    return out


def heatmap(ax, mat: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str], *, cbar_label: str,
            cmap: str = SEQUENTIAL, vmin=None, vmax=None, fmt: str | None = "{:.0f}", marks=None):
    """An annotated heatmap with a colour bar; ``marks`` (bool array) outlines cells (e.g. seen corruptions)."""
    if cmap == DIVERGING and vmin is None:
        lim = float(np.nanmax(np.abs(mat))) or 1.0
        vmin, vmax = -lim, lim
    im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    if fmt is not None and mat.size <= 400:
        lo, hi = im.get_clim()
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat[i, j]
                if np.isfinite(v):
                    dark = (v - lo) / ((hi - lo) or 1) < 0.55 if cmap == SEQUENTIAL else abs(v) > 0.6 * hi
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    if marks is not None:
        for i, j in zip(*np.nonzero(marks), strict=True):
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec=PALETTE[1], lw=1.6))
    ax.figure.colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.03)
    return im


def lines(ax, xs, series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str = "",
          styles: dict[str, dict] | None = None, hline: float | None = None):
    for i, (label, ys) in enumerate(series.items()):
        kw = {"color": color(i), "marker": "o", "ms": 3, "lw": 1.4, **((styles or {}).get(label, {}))}
        ax.plot(list(xs), list(ys), label=label, **kw)
    if hline is not None:
        ax.axhline(hline, color=PALETTE[6], lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if series:
        ax.legend(frameon=False)


def image_overlay(ax, image: np.ndarray, grid: np.ndarray | None, *, vmax: float | None = None, alpha: float = 0.55,
                  title: str = "", cmap: str = "inferno"):
    """An image (``[C, H, W]`` in [0, 1]) with a per-patch map ``grid [gh, gw]`` drawn over it."""
    img = np.asarray(image)
    img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    im = None
    if grid is not None:
        h, w = img.shape[:2]
        im = ax.imshow(np.asarray(grid), cmap=cmap, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                       vmin=0, vmax=vmax if vmax else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)
    return im
