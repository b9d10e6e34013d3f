"""The study's figures: :mod:`mechvit.viz.figures` (palette, heatmaps, image overlays, atomic PNG + SVG) with
the report's look: pyplot figures with a constrained layout, small fonts, the palette as the colour cycle.

One palette for the whole report: Paul Tol's "bright" qualitative colours for lines and bars (colour-blind
safe), ``viridis`` for magnitudes, ``RdBu_r`` centred on 0 for signed differences.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechvit.viz import figures  # noqa: E402
from mechvit.viz.figures import DIVERGING, PALETTE, SEQUENTIAL, color, image_overlay  # noqa: E402

__all__ = [
    "DIVERGING",
    "PALETTE",
    "SEQUENTIAL",
    "STYLE",
    "color",
    "heatmap",
    "image_overlay",
    "new_figure",
    "save_figure",
]

STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
    "svg.fonttype": "path", "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}  # fmt: skip


def new_figure(nrows: int = 1, ncols: int = 1, *, w: float = 4.2, h: float = 3.0, **kw):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, layout="constrained", **kw
        )
    return fig, axes


def save_figure(fig, writer, stem: str, caption: str) -> dict[str, str]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg`` atomically via the step writer; close the figure."""
    with plt.rc_context(STYLE):
        figures.save_figure(fig, writer.path(stem), bbox_inches=None)  # the constrained layout's own size
    plt.close(fig)
    return {"caption": caption, **{fmt: writer.rel(f"{stem}.{fmt}") for fmt in figures.FORMATS}}


def heatmap(ax, mat, xlabels, ylabels, *, cbar_label: str, fmt: str | None = "{:.0f}", **kw):
    """:func:`mechvit.viz.figures.heatmap` with the values written in the cells, x labels at 60 degrees and a
    slim colour bar; ``marks`` (bool array) outlines cells (e.g. seen corruptions)."""
    im = figures.heatmap(
        ax,
        mat,
        xlabels,
        ylabels,
        cbar_label=cbar_label,
        fmt=fmt,
        xrotation=60,
        cbar_kw={"fraction": 0.046, "pad": 0.03},
        **kw,
    )
    ax.tick_params(labelsize=STYLE["xtick.labelsize"])
    return im
