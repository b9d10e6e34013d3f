"""circuitsvis attention views for ViTs, saved as HTML that opens offline.

circuitsvis's ``attention_heads(...)`` returns a ``RenderedHTML`` with two sources: ``str()`` (and the
notebook display when online) loads the React bundle from unpkg.com, while ``.local_src`` inlines the
bundle shipped in the package (``circuitsvis/dist/cdn/iife.js``, ~1.3 MB, no network access of its own).
A page of several views here inlines that bundle once (a classic ``<script>`` that defines the global
``CircuitsVis``) and renders each view with ``CircuitsVis.render(id, CircuitsVis.AttentionHeads, props)``,
exactly what ``local_src`` does for one view. Token labels are the model's (``CLS``, ``r{row}c{col}``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def circuitsvis_bundle() -> str:
    """The circuitsvis JavaScript bundle shipped with the installed package (safe to inline)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(f"circuitsvis bundle {path} not found; reinstall circuitsvis")
    return path.read_text(encoding="utf-8").replace("</script>", "<\\/script>")


BUNDLE_NAME = "circuitsvis.js"


def write_circuitsvis_bundle(folder: str | Path) -> Path:
    """Write the circuitsvis bundle once as ``folder/circuitsvis.js`` (unchanged if already there), for pages
    made with ``attention_views_page(..., bundle_src=...)`` to share instead of inlining ~1.3 MB each."""
    import circuitsvis

    from mechvit._io import atomic_write_bytes

    src = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not src.is_file():
        raise FileNotFoundError(f"circuitsvis bundle {src} not found; reinstall circuitsvis")
    data = src.read_bytes()
    path = Path(folder) / BUNDLE_NAME
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    return path


def head_names(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]


def attention_heads(pattern: Tensor, tokens: Sequence[str], names: Sequence[str] | None = None):
    """circuitsvis ``AttentionHeads`` of ``pattern`` ``[heads, T, T]`` or ``[layers, heads, T, T]`` (flattened to
    heads named ``L{l}H{h}``); display it in a notebook, or write ``.local_src`` for an offline file."""
    import circuitsvis as cv

    pattern, names = _flatten(pattern, tokens, names)
    return cv.attention.attention_heads(
        pattern, list(tokens), attention_head_names=names, max_value=1.0, min_value=0.0, mask_upper_tri=False
    )


def _flatten(pattern: Tensor, tokens: Sequence[str], names: Sequence[str] | None) -> tuple[Tensor, list[str]]:
    pattern = torch.as_tensor(pattern).detach().float().cpu()
    if pattern.ndim == 4:
        names = list(names) if names is not None else head_names(pattern.shape[0], pattern.shape[1])
        pattern = pattern.reshape(-1, *pattern.shape[2:])
    if pattern.ndim != 3 or pattern.shape[1] != pattern.shape[2] or pattern.shape[1] != len(tokens):
        raise ValueError(
            f"expected a pattern [heads, T, T] or [layers, heads, T, T] with T = {len(tokens)} "
            f"tokens, got {tuple(pattern.shape)}"
        )
    names = list(names) if names is not None else [f"H{h}" for h in range(pattern.shape[0])]
    if len(names) != pattern.shape[0]:
        raise ValueError(f"got {len(names)} head names for {pattern.shape[0]} heads")
    return pattern, names


def _image_data_uri(image: Tensor, scale: int = 6) -> str:
    from matplotlib.image import imsave

    img = torch.as_tensor(image).detach().float().cpu().clamp(0, 1).numpy()
    img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
    img = np.kron(img, np.ones((scale, scale) + ((1,) if img.ndim == 3 else ()))) if scale > 1 else img
    buf = io.BytesIO()
    imsave(buf, img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def attention_views_page(
    views: Sequence[dict],
    tokens: Sequence[str],
    *,
    title: str = "Attention heads",
    decimals: int = 3,
    bundle_src: str | None = None,
) -> str:
    """A self-contained HTML page with one circuitsvis ``AttentionHeads`` view per entry of ``views``.

    Each view: ``{"title": str, "pattern": [layers, heads, T, T] or [heads, T, T], "image": optional
    [C, H, W] in [0, 1]}``. Values are rounded to ``decimals`` to keep the page small. ``bundle_src``: a
    relative URL of a shared copy of the bundle (:func:`write_circuitsvis_bundle`) loaded with
    ``<script src>`` instead of inlining it (pages and bundle then travel together; still offline)."""
    if bundle_src is not None:
        script = f'<script src="{html.escape(bundle_src, quote=True)}"></script>'
        where = f"The circuitsvis bundle is loaded from {html.escape(bundle_src)} beside this page: it works offline."
    else:
        script = f"<script>{circuitsvis_bundle()}</script>"
        where = "The circuitsvis bundle is inlined: this page works offline."
    parts = []
    for i, v in enumerate(views):
        pattern, names = _flatten(v["pattern"], tokens, v.get("head_names"))
        props = {
            # rounded in float64: a rounded float32 (0.009f) widens to 0.008999999612569809 in .tolist()
            "attention": np.round(pattern.numpy().astype(np.float64), decimals).tolist(),
            "tokens": list(tokens),
            "attentionHeadNames": names,
            "maxValue": 1.0,
            "minValue": 0.0,
            "maskUpperTri": False,
        }
        img = (
            f'<img class="thumb" src="{_image_data_uri(v["image"])}" alt="input image">'
            if "image" in v
            else ""
        )
        parts.append(
            f"<section><h2>{html.escape(str(v.get('title', f'view {i}')))}</h2>{img}"
            f'<div id="cv-{i}"></div>'
            f'<script>CircuitsVis.render("cv-{i}", CircuitsVis.AttentionHeads, '
            f"{json.dumps(props, separators=(',', ':'))});</script></section>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px}}
img.thumb{{image-rendering:pixelated;border:1px solid #ccc;margin-bottom:.5em}}
section{{border-top:1px solid #ddd;padding-top:.5em}}</style>
{script}</head>
<body><h1>{html.escape(title)}</h1>
<p>Tokens: {html.escape(", ".join(tokens[:3]))}, … (CLS and prefix tokens first, then patches r&lt;row&gt;c&lt;col&gt;,
row-major). Heads are named L&lt;layer&gt;H&lt;head&gt;; click a head to enlarge it. Rows are queries
(destination), columns keys (source). {where}</p>
{"".join(parts)}
</body></html>
"""


def save_attention_views(
    path: str | Path,
    views: Sequence[dict],
    tokens: Sequence[str],
    *,
    shared_bundle: str | Path | None = None,
    **kwargs,
) -> Path:
    """Write :func:`attention_views_page` to ``path`` atomically. ``shared_bundle``: a folder (e.g. the report's
    ``assets/``) holding one copy of the circuitsvis bundle for every page, referenced relatively."""
    import os

    from mechvit._io import atomic_write_text

    path = Path(path)
    if shared_bundle is not None:
        bundle = write_circuitsvis_bundle(shared_bundle)
        kwargs["bundle_src"] = Path(os.path.relpath(bundle.resolve(), path.resolve().parent)).as_posix()
    return atomic_write_text(path, attention_views_page(views, tokens, **kwargs))
