"""The feature explorer: one self-contained, offline HTML page (``features.html``) to browse every live latent
of one or more SAEs.

Each latent's panel shows its top clean images and, in a second row, its top corrupted images (captioned with
the condition each came from), with their per-patch heatmaps, and the ablate/double effect on the top images of
the set its effects are measured on (clean, or corrupted for a latent that never fires on a clean image).

The page embeds its data (JSON; images as PNG sprite sheets, per-patch maps quantised to 4 bits and
probabilities to uint16, base64-encoded and decoded lazily per SAE; zlib-compressing them saved a third of
the size but inflating every SAE's arrays at load doubled the opening time) and its script and style (``explorer_assets/``), and forbids every network request
with a Content-Security-Policy, so it opens from disk, e-mail or a USB stick. The index is virtualised (only
visible rows exist in the DOM), so tens of thousands of latents stay fast.

Python: :func:`write_explorer` (SAEs, HookedViTs, images) -> ``features.html``; :func:`explorer_data` gives
the embedded data and the :class:`~mechvit.analysis.features.FeatureStats` it came from. Command line:
``mechvit explore --sae DIR [--sae DIR ...] --model CKPT_OR_DIR --out OUT`` (:func:`add_cli_arguments`,
:func:`run_cli`). See ``docs/explorer.md``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).with_name("explorer_assets")
PAGE_NAME = "features.html"
CARDS_DIR = "feature_cards"

__all__ = [
    "ExplorerSAE",
    "add_cli_arguments",
    "explorer_array",
    "explorer_data",
    "explorer_html",
    "read_explorer_data",
    "run_cli",
    "write_explorer",
]


@dataclass
class ExplorerSAE:
    """One SAE shown in the explorer.

    ``model`` names the HookedViT it reads (a key of the ``models`` mapping). SAEs of the same ``model`` and
    ``condition`` (the data they were trained on) with different ``seed`` are seed replicates: each latent's
    *seed stability* is its mean decoder cosine to the nearest latent of every other replicate. An SAE of
    another model with the same ``condition`` (and the same ``seed`` when there is one) is its counterpart:
    the nearest latent there, with its cosine, is the *change under fine-tuning*, shown side by side.
    ``sae`` is a sae-lens ``SAE`` or a folder written by ``mechvit.sae.train_sae`` / ``SAE.save_model``."""

    name: str
    sae: Any
    model: str
    condition: str = ""
    seed: int | str = 0
    hook: str | None = None


def _load_sae(spec: ExplorerSAE, device: str | None = None):
    if isinstance(spec.sae, (str, os.PathLike)):
        from mechvit.sae import load_sae

        return load_sae(spec.sae, device=device or "cpu")[0]
    return spec.sae


PROB_MAX = 65535  # probabilities are stored as uint16 (little-endian) of [0, 1]: steps of 1.5e-5


ARRAY_KEYS = {
    "maps": "u1", "maps_c": "u1", "p_abl": "<u2", "p_dbl": "<u2", "probs": "<u2", "probs_c": "<u2", "logit": "<i2",
}  # fmt: skip
LOGIT_MAX = 32767  # direct logit effects: int16 steps of the SAE's largest |effect| / LOGIT_MAX
LOGIT_NAN = -32768  # the one int16 the scaled effects never take: an effect that was not measured (NaN)
# what the direct logit effect of a listed latent is computed at (FeatureStats.effect_basis): data["effect_bases"]
# names them, each SAE entry's "effect_basis" holds one index per listed latent (absent in older pages); the same
# names index "ablation_set" (the images its ablate/double effect is measured on) and "label_set" (the images its
# label comes from)
EFFECT_BASES = ("clean", "corrupted", "none")


def _b64(a: np.ndarray) -> str:
    """uint8 bytes -> base64 (decoded lazily by the page, per SAE, when first shown)."""
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.uint8).tobytes()).decode("ascii")


def _b64_logits(effect: np.ndarray) -> tuple[str, float]:
    """Direct logit effects [F, C] as little-endian int16 times a scale (the SAE's largest |effect| / 32767):
    a resolution of 1/65534 of that largest effect, ~6x smaller than JSON numbers at 3 decimals and finer for
    effects under ~16 logits (the page shows 2 decimals). A NaN effect (not measured) is stored as -32768."""
    e = np.asarray(effect, np.float64)
    finite = np.isfinite(e)
    scale = float(np.abs(e[finite]).max()) / LOGIT_MAX if finite.any() else 0.0
    scale = scale if scale > 0 and np.isfinite(scale) else 1.0
    q = np.rint(np.clip(np.where(finite, e, 0.0) / scale, -LOGIT_MAX, LOGIT_MAX)).astype("<i2")
    q[~finite] = LOGIT_NAN
    return _b64(np.ascontiguousarray(q).view(np.uint8)), scale


def _b64_probs(p: np.ndarray) -> str:
    """Probabilities [0, 1] as little-endian uint16 (small ablation effects stay visible)."""
    q = np.rint(np.clip(np.asarray(p, np.float64), 0, 1) * PROB_MAX).astype("<u2")
    return _b64(np.ascontiguousarray(q).view(np.uint8))


MAP_LEVELS = 15  # per-patch maps: 4 bits per patch (0 = not firing, 15 = the latent's max), two per byte


def explorer_array(data: dict, obj: dict, key: str) -> np.ndarray:
    """A binary array of the page's data, flat: ``obj`` is an SAE entry (``maps``, ``maps_c``: per-patch levels
    0-255 of the latent's max, as the page draws them; ``p_abl``, ``p_dbl``: probabilities [listed latents, k,
    classes] on the top images of the set ``ablation_set`` names; ``logit``: direct logit effects, row-major
    [listed latents, classes]) or a ``data["models"]`` entry (``probs``: on the clean images, ``probs_c``: on the
    corrupted ones); probabilities and logit effects come back as floats (an effect that was not measured as
    NaN)."""
    if key == "logit" and isinstance(obj[key], list):  # pages before the int16 encoding: rounded numbers
        return np.asarray(obj[key], np.float64).reshape(-1)
    a = np.frombuffer(base64.b64decode(obj[key]), ARRAY_KEYS[key])
    if key == "logit":
        return np.where(a == LOGIT_NAN, np.nan, a * obj["logit_scale"])
    if key in ("p_abl", "p_dbl", "probs", "probs_c"):
        return a / data["prob_max"]
    if data.get("map_bits") == 4:  # high nibble first; the page scales 0-15 to 0-255
        a = np.stack([a >> 4, a & 15], axis=1).reshape(-1)[: obj["n_map_values"]] * 17
    return a.astype(np.uint8)


def _q(a: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Quantise [0, scale] to uint8 (0 stays 0; rounding to the nearest of 255 steps)."""
    return np.rint(np.clip(np.asarray(a, np.float64) / np.maximum(scale, 1e-12), 0, 1) * 255).astype(np.uint8)


def _q4(a: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, int]:
    """Maps to 4-bit levels of [0, scale] packed two per byte (high nibble first), and the number of values.
    A patch where the latent fires at all keeps level >= 1, so where it fires stays visible."""
    x = np.clip(np.asarray(a, np.float64) / np.maximum(scale, 1e-12), 0, 1).reshape(-1)
    q = np.rint(x * MAP_LEVELS).astype(np.uint8)
    q[(x > 0) & (q == 0)] = 1
    n = len(q)
    if n % 2:
        q = np.append(q, np.uint8(0))
    return (q[0::2] << 4) | q[1::2], n


def _num(a: np.ndarray, digits: int = 4) -> list:
    """Floats to 4 significant digits for JSON (NaN -> None)."""
    return [
        None if not np.isfinite(x) else float(f"{x:.{digits}g}") for x in np.asarray(a, np.float64).ravel()
    ]


def _sprite(images: np.ndarray, cols: int = 64) -> tuple[str, int]:
    """[N, C, H, W] in [0, 1] -> a PNG data URI of a grid ``cols`` wide (grayscale or RGB), and ``cols``."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    px = np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)
    sheet = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        sheet[r * h : (r + 1) * h, q * w : (q + 1) * w] = px[i].transpose(1, 2, 0)
    img = Image.fromarray(sheet[..., 0] if c == 1 else sheet[..., :3], mode="L" if c == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), cols


def _cols(a: np.ndarray, k: int, fill) -> np.ndarray:
    """``a`` [F, j, ...] with exactly ``k`` columns: cut, or padded with ``fill``."""
    a = np.asarray(a)
    if a.shape[1] >= k:
        return a[:, :k]
    pad = np.full((a.shape[0], k - a.shape[1], *a.shape[2:]), fill, dtype=a.dtype)
    return np.concatenate([a, pad], axis=1)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "sae"


def explorer_data(
    saes: Sequence[ExplorerSAE],
    models: Mapping[str, Any],
    images,
    labels,
    class_names: Sequence[str],
    *,
    corrupted=None,
    corrupted_labels=None,
    corrupted_name: str = "corrupted",
    corrupted_groups: Sequence[tuple[str, int]] | None = None,
    transform: Callable | None = None,
    title: str = "mechvit feature explorer",
    k: int = 8,
    n_assoc: int = 32,
    n_bins: int = 24,
    max_latents: int | None = None,
    progress: bool = True,
    stats: Mapping[str, Any] | None = None,
    workers: int = 1,
) -> tuple[dict, dict]:
    """The page's data and ``{sae name: FeatureStats}``. ``images`` [N, C, H, W] in [0, 1] (what is shown;
    ``transform`` maps them to model inputs), ``labels`` [N]; ``corrupted`` any [M, C, H, W] in [0, 1] with
    ``corrupted_labels`` (default: ``labels`` when M == N); ``corrupted_groups`` ``[(name, count), ...]``
    says which consecutive corrupted images came from which corruption (shown under each image); ``k`` top
    images per latent in each set (the page shows the clean and the corrupted ones in two rows; the ablate/double
    effect is measured on the clean ones, or on the corrupted ones for a latent that never fires on a clean
    image: ``FeatureStats.ablation_set``), ``n_assoc`` for the label (from the top clean images, or the top
    corrupted ones with ``corrupted_labels`` for a latent that never fires on a clean image:
    ``FeatureStats.label_set``; the page marks such a label "(corrupted images)"), ``n_bins`` histogram bins
    (:func:`mechvit.analysis.features.feature_stats`). ``max_latents``: list only this many live latents per SAE,
    those firing on the most clean + corrupted patch tokens, whose effects alone are computed
    (``feature_stats(max_effect_latents=...)``); None: every live latent. ``stats`` reuses
    already computed FeatureStats (the page lists the latents whose effects they hold). ``workers`` > 1 (CPU,
    Linux): the models' statistics in that many forked one-thread processes, a model's SAEs together
    (:func:`mechvit.runtime.forked_map`); the same numbers to the float rounding of one thread's forwards."""
    import torch

    from mechvit.analysis.features import decoder_directions, feature_stats, nearest_cosine

    if max_latents is not None and max_latents < 1:
        raise ValueError(f"max_latents must be >= 1 or None, got {max_latents}")
    if not saes:
        raise ValueError("give at least one SAE")
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        raise ValueError(f"SAE names must be unique, got {names}")
    for s in saes:
        if s.model not in models:
            raise ValueError(
                f"SAE {s.name!r} reads model {s.model!r}, which is not among the models {sorted(models)}"
            )
    images = torch.as_tensor(images).float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    if corrupted is not None:
        corrupted = torch.as_tensor(corrupted).float().cpu()
        if corrupted_labels is None:
            if len(corrupted) != len(labels):
                raise ValueError(
                    f"give corrupted_labels: {len(corrupted)} corrupted images but {len(labels)} labels"
                )
            corrupted_labels = labels
        corrupted_labels = torch.as_tensor(corrupted_labels).long().cpu()
        if len(corrupted_labels) != len(corrupted):
            raise ValueError(
                f"{len(corrupted)} corrupted images but {len(corrupted_labels)} corrupted labels"
            )
    if corrupted_groups is not None:
        corrupted_groups = [(str(g), int(c)) for g, c in corrupted_groups]
        n_grouped = sum(c for _, c in corrupted_groups)
        if corrupted is None or n_grouped != len(corrupted) or any(c < 0 for _, c in corrupted_groups):
            raise ValueError(
                f"corrupted_groups must count the {0 if corrupted is None else len(corrupted)} corrupted "
                f"images (non-negative counts), got {n_grouped}"
            )
    if isinstance(workers, bool) or int(workers) < 1:
        raise ValueError(f"workers must be a number of processes >= 1, got {workers!r}")
    loaded = {s.name: _load_sae(s) for s in saes}
    stats = dict(stats or {})
    todo = [s for s in saes if s.name not in stats]
    groups = list(dict.fromkeys(s.model for s in todo))
    forked = workers > 1 and len(groups) > 1

    def model_stats(model: str) -> dict:
        cache: dict = {}  # the model's own activations and probabilities, computed once for all its SAEs
        return {
            s.name: feature_stats(
                models[model],
                loaded[s.name],
                images,
                labels,
                class_names,
                corrupted=corrupted,
                corrupted_labels=corrupted_labels,
                hook=s.hook,
                transform=transform,
                k=k,
                n_assoc=n_assoc,
                n_bins=n_bins,
                max_effect_latents=max_latents,
                progress=progress and not forked,
                cache=cache,
            )
            for s in todo
            if s.model == model
        }

    if forked:
        from mechvit.runtime import forked_map

        for _, part in forked_map(model_stats, groups, workers):
            stats.update(part)
    else:
        for model in groups:
            stats.update(model_stats(model))
    dirs = {n: decoder_directions(sae) for n, sae in loaded.items()}

    def counterparts(x: ExplorerSAE) -> list[ExplorerSAE]:
        out = []
        for model in dict.fromkeys(s.model for s in saes if s.model != x.model):
            cands = [s for s in saes if s.model == model and s.condition == x.condition]
            same_seed = [s for s in cands if s.seed == x.seed]
            if same_seed or cands:
                out.append((same_seed or cands)[0])
        return out

    entries = []
    for x in saes:
        st = stats[x.name]
        live = st.with_effects  # every live latent unless max_latents
        if max_latents is not None and len(live) > max_latents:  # stats given, computed without the limit
            live = np.intersect1d(live, st.most_active(max_latents))
        k_ = st.top_idx.shape[1]
        matches = []
        for y in counterparts(x):
            idx, cos = nearest_cosine(dirs[x.name][live], dirs[y.name])
            matches.append({"sae": y.name, "model": y.model, "idx": idx.tolist(), "cos": _num(cos)})
        reps = [
            y
            for y in saes
            if y is not x and y.model == x.model and y.condition == x.condition and y.seed != x.seed
        ]
        replicates, stability = [], None
        if reps:
            coss = []
            for y in reps:
                idx, cos = nearest_cosine(dirs[x.name][live], dirs[y.name])
                replicates.append({"sae": y.name, "model": y.model, "idx": idx.tolist(), "cos": _num(cos)})
                coss.append(cos)
            stability = _num(np.mean(coss, axis=0))
        scale = st.max_act[live][:, None, None, None]
        logit_b64, logit_scale = _b64_logits(st.logit_effect[live])
        mean_c = getattr(st, "mean_act_corrupted", None)
        basis = np.asarray(st.basis)[live]
        entry = {
            "name": x.name,
            "model": x.model,
            "condition": x.condition,
            "seed": x.seed,
            "hook": st.hook,
            "d_sae": st.d_sae,
            "grid": list(st.grid),
            "k": k_,
            "n_assoc": st.n_assoc,
            "live": live.tolist(),
            "n_live": len(st.live),  # more than len(live) when max_latents left some out
            "density": _num(st.density[live]),
            "density_c": None if st.density_corrupted is None else _num(st.density_corrupted[live]),
            "mean_act": _num(st.mean_act[live]),  # None: never fires on a clean token
            "mean_act_c": None if mean_c is None else _num(mean_c[live]),
            "effect_basis": [EFFECT_BASES.index(str(b)) for b in basis],
            "max_act": _num(st.max_act[live]),
            "label": [st.label[f] for f in live],
            # the images each label comes from: "clean", "corrupted" (it fires only on corrupted images: the page marks
            # the label so) or "none" (label "-"), one index into effect_bases per listed latent (absent before /6)
            "label_set": [EFFECT_BASES.index(str(a)) for a in st.labelled_on[live]],
            "stability": stability,
            "matches": matches,
            "replicates": replicates,
            "hist": st.hist[live].tolist(),
            "top": st.top_idx[live].tolist(),
            "top_val": [_num(v) for v in st.top_val[live]],
            "maps": _b64(_q4(st.top_maps[live], scale)[0]),
            "n_map_values": int(st.top_maps[live].size),
            # the corrupted top images, k_ per latent like the clean ones (the page reads both, and their maps, with
            # one k; padded with -1 / 0 when there are fewer corrupted images than k_)
            "top_c": None
            if st.top_idx_corrupted is None
            else _cols(st.top_idx_corrupted[live], k_, -1).tolist(),
            "top_val_c": None
            if st.top_val_corrupted is None
            else [_num(v) for v in _cols(st.top_val_corrupted[live], k_, 0)],
            "maps_c": None
            if st.top_maps_corrupted is None
            else _b64(_q4(_cols(st.top_maps_corrupted[live], k_, 0), scale)[0]),
            "class_counts": st.class_counts[live].tolist(),
            "logit": logit_b64,
            "logit_scale": logit_scale,
            # the ablate/double probabilities: on top image j of the set ablation_set names (clean: "top", corrupted:
            # "top_c"; "none": not measured), one index into effect_bases per listed latent
            "ablation_set": [EFFECT_BASES.index(str(a)) for a in st.ablated_on[live]],
            "p_abl": _b64_probs(st.probs_ablate[live]),
            "p_dbl": _b64_probs(st.probs_double[live]),
            "cards": {},
        }
        entries.append(entry)
    model_probs = {}
    for x in saes:
        model_probs.setdefault(x.model, {"probs": _b64_probs(stats[x.name].probs), "probs_c": None})
        p_c = getattr(stats[x.name], "probs_corrupted", None)  # "before" of the ablations on corrupted images
        if p_c is not None and corrupted is not None and len(p_c) == len(corrupted):
            model_probs[x.model]["probs_c"] = model_probs[x.model]["probs_c"] or _b64_probs(p_c)
    sprite, cols = _sprite(images.numpy())
    img = {
        "n": len(images),
        "h": int(images.shape[-2]),
        "w": int(images.shape[-1]),
        "labels": labels.tolist(),
        "clean": {"sprite": sprite, "cols": cols},
        "corrupted": None,
        "corrupted_name": corrupted_name,
        "n_corrupted": 0,
        "labels_corrupted": None,
        "corrupted_groups": None,
    }
    if corrupted is not None:
        sprite_c, cols_c = _sprite(corrupted.numpy())
        img.update(
            corrupted={"sprite": sprite_c, "cols": cols_c},
            n_corrupted=len(corrupted),
            labels_corrupted=corrupted_labels.tolist(),
            corrupted_groups=None if corrupted_groups is None else [list(g) for g in corrupted_groups],
        )
    data = {
        # 4: mean_act None where it never fires on clean, mean_act_c, effect_basis; 5: p_abl / p_dbl of a latent
        # that fires only on corrupted images are measured on its top corrupted images (ablation_set per listed
        # latent; models[m].probs_c: the model's probabilities on the corrupted images, "before" there); 6: a latent
        # that fires only on corrupted images is labelled from its top corrupted images (label_set per listed latent;
        # its class_counts are those images' classes)
        "format": "mechvit-explorer/6",
        "prob_max": PROB_MAX,
        "map_bits": 4,
        "effect_bases": list(EFFECT_BASES),
        "title": title,
        "class_names": list(class_names),
        "images": img,
        "models": model_probs,
        "saes": entries,
    }
    return data, stats


def read_explorer_data(path: str | os.PathLike) -> dict:
    """The data embedded in a written explorer page (what :func:`explorer_data` returned)."""
    text = Path(path).read_text(encoding="utf-8")
    m = re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', text, re.S)
    if m is None:
        raise ValueError(f"{path}: not a mechvit feature explorer page (no embedded explorer-data)")
    return json.loads(m.group(1))  # JSON reads the escaped "<\/" of the page back as "</"


def explorer_html(data: dict) -> str:
    """The page for ``data`` (from :func:`explorer_data`): data, script and style inlined."""
    css = (ASSETS / "explorer.css").read_text(encoding="utf-8")
    js = (ASSETS / "explorer.js").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    csp = (
        "default-src 'none'; img-src data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'"
    )
    t = html.escape(data.get("title", "feature explorer"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{t}</title>
<style>{css}</style></head>
<body>
<header><h1 id="title">{t}</h1><span class="meta" id="meta"></span><span id="saes"></span>
<input id="search" type="search" placeholder="search: #id or label (e.g. sneaker, top-left)" aria-label="search"></header>
<main><section id="left"><div id="count"></div><div class="thead" id="thead"></div>
<div id="list" tabindex="0" role="listbox" aria-label="latents (arrow keys, Home, End, Enter)"><div id="spacer" role="presentation"></div></div></section>
<section id="detail"></section></main>
<script id="explorer-data" type="application/json">{payload}</script>
<script>{js}</script>
</body></html>
"""


def write_explorer(
    out: str | os.PathLike,
    saes: Sequence[ExplorerSAE],
    models: Mapping[str, Any],
    images,
    labels,
    class_names: Sequence[str],
    *,
    corrupted=None,
    corrupted_labels=None,
    corrupted_name: str = "corrupted",
    corrupted_groups: Sequence[tuple[str, int]] | None = None,
    transform: Callable | None = None,
    title: str = "mechvit feature explorer",
    k: int = 8,
    n_assoc: int = 32,
    n_bins: int = 24,
    max_latents: int | None = None,
    cards: int = 0,
    progress: bool = True,
    stats: Mapping[str, Any] | None = None,
    workers: int = 1,
) -> Path:
    """Write the explorer page: ``out`` is the ``.html`` path or a folder (then ``out/features.html``).

    ``saes``: :class:`ExplorerSAE` entries; ``models``: ``{name: HookedViT}``; ``images`` [N, C, H, W] in
    [0, 1] with ``labels`` [N] and ``class_names``; ``corrupted``: optional images in [0, 1] (e.g. the same
    images corrupted): each latent's top corrupted images are shown in a row below its top clean ones, and a latent
    that never fires on a clean image has its ablate/double effect measured on them (``corrupted_groups``: which
    corruption each consecutive run of them came from, written under each image, see :func:`explorer_data`);
    ``transform``: [0, 1] images -> model inputs.
    ``max_latents``: list (and measure the effects of) at most this many live latents per SAE, the most
    often firing (None: every live latent; see :func:`explorer_data`).
    ``cards > 0`` also writes publication feature cards (PNG + SVG, :func:`mechvit.viz.feature_card`) of
    each SAE's ``cards`` densest latents under ``feature_cards/`` beside the page, linked from it (a latent that
    never fires on a clean image gets the row of its top corrupted images).
    ``workers`` > 1 (CPU, Linux): the models' statistics and the cards in that many forked one-thread
    processes (see :func:`explorer_data`). Returns the page's path."""
    from mechvit._io import atomic_write_text

    out = Path(out)
    path = out if out.suffix.lower() in (".html", ".htm") else out / PAGE_NAME
    data, stats = explorer_data(
        saes,
        models,
        images,
        labels,
        class_names,
        corrupted=corrupted,
        corrupted_labels=corrupted_labels,
        corrupted_name=corrupted_name,
        corrupted_groups=corrupted_groups,
        transform=transform,
        title=title,
        k=k,
        n_assoc=n_assoc,
        n_bins=n_bins,
        max_latents=max_latents,
        progress=progress,
        stats=stats,
        workers=workers,
    )
    if cards > 0:
        from mechvit.viz.feature_card import feature_card

        imgs = np.asarray(images, dtype=np.float32)
        jobs = []  # (SAE index, latent)
        for i, entry in enumerate(data["saes"]):
            st = stats[entry["name"]]
            live = np.asarray(entry["live"], dtype=np.int64)
            jobs += [(i, int(f)) for f in live[np.argsort(-st.density[live], kind="stable")[:cards]]]

        def card(job: tuple[int, int]) -> str:
            entry, f = data["saes"][job[0]], job[1]
            stem = path.parent / CARDS_DIR / _slug(entry["name"]) / f"latent_{f}"
            title = f"{entry['name']} · latent #{f}"
            st = stats[entry["name"]]
            # a latent that never fires on a clean token: its card shows its top corrupted images instead
            extra = {}
            if corrupted is not None and str(st.basis[f]) == "corrupted":
                extra = {"corrupted": np.asarray(corrupted, np.float32), "corrupted_groups": corrupted_groups}
            feature_card(
                st, f, imgs, class_names, path=stem.with_suffix(".png"), formats=("png", "svg"), title=title,
                **extra,
            )  # fmt: skip
            return stem.relative_to(path.parent).as_posix()

        if workers > 1 and len(jobs) > 1:  # matplotlib is single-threaded: the cards in forked processes too
            from mechvit.runtime import forked_map

            done = dict(forked_map(card, jobs, workers))
        else:
            done = {job: card(job) for job in jobs}
        for i, f in jobs:  # in the order of the sequential loop
            data["saes"][i]["cards"][f] = {"png": done[(i, f)] + ".png", "svg": done[(i, f)] + ".svg"}
    atomic_write_text(path, explorer_html(data))
    return path


# ---------------------------------------------------------------------------------------------------------
# command line: mechvit explore


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sae",
        action="append",
        required=True,
        metavar="[[NAME@]MODEL=]DIR",
        help="an SAE folder (mechvit.sae / sae-lens format); repeat for several. It reads the --model whose "
        "sha256 its manifest (mechvit_sae.json) records; with one --model and no recorded hash, that model; a "
        "recorded hash that no --model has is an error. Prefix MODEL= to name its model yourself (a model "
        "other than the recorded one is then used on purpose, with a warning). The SAE is shown as the "
        "shortest end of its path that tells it from the other --sae folders (a/sae, b/sae), or as NAME "
        "given as NAME@MODEL=DIR or NAME@=DIR",
    )
    p.add_argument(
        "--hook",
        default=None,
        metavar="HOOK",
        help="the hook (e.g. blocks.3.hook_resid_post) of the SAEs that record none in their cfg.json "
        "(cfg.metadata.hook_name) or manifest; an SAE that records another hook is an error",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a mechvit checkpoint folder (card.json) or a HookedViT folder (save_pretrained); repeat for several",
    )
    p.add_argument(
        "--out", required=True, help="output folder (features.html is written there) or .html path"
    )
    p.add_argument("--n-images", type=int, default=1000, help="test images to scan (default 1000)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument(
        "--corruption", default=None, help="also scan the images under this corruption (e.g. gaussian_noise)"
    )
    p.add_argument("--severity", type=int, default=3, help="severity of --corruption (default 3)")
    p.add_argument("--k", type=int, default=8, help="top images per latent (default 8)")
    p.add_argument("--cards", type=int, default=0, help="write feature cards of each SAE's N densest latents")
    p.add_argument(
        "--max-latents",
        type=int,
        default=None,
        help="list (and measure the effects of) only the N most often firing live latents per SAE (default: all)",
    )
    p.add_argument("--title", default="mechvit feature explorer")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption draws")


def _split_named(value: str) -> tuple[str | None, str]:
    name, sep, rest = value.partition("=")
    if sep and name and not Path(value).exists():
        return name, rest
    return None, value


def _load_model(path: Path, device):
    from mechvit.model import HookedViT

    if (path / "card.json").is_file():
        from mechvit.training.checkpoint import load_checkpoint

        return HookedViT.from_timm(load_checkpoint(path), device=device).eval()
    if path.is_dir():
        return HookedViT.from_pretrained(path, device=device).eval()
    raise ValueError(
        f"--model {path}: expected a mechvit checkpoint folder (card.json + model.safetensors) or a "
        "HookedViT folder written by save_pretrained"
    )


def _split_sae(value: str) -> tuple[str | None, str | None, str]:
    """``--sae [[NAME@]MODEL=]DIR`` -> (name, model, dir); ``NAME@=DIR`` names the SAE only."""
    prefix, path = _split_named(value)
    if prefix is None:
        return None, None, value
    name, at, model = prefix.rpartition("@")
    if not at:
        return None, prefix, path
    if not name:
        raise ValueError(f"--sae {value}: expected NAME@MODEL=DIR or NAME@=DIR, got an empty NAME before '@'")
    return name, model or None, path


def distinct_names(paths: Sequence[str | os.PathLike]) -> list[str | None]:
    """Each path's shortest end (its folder name, then with as many parent folders as it takes) that no other
    path ends with: ``runs/a/sae``, ``runs/b/sae`` -> ``a/sae``, ``b/sae``; ``x/sae``, ``y/other`` -> ``sae``,
    ``other``. Paths are made absolute (not resolved: symlinks keep their names); None for a path given twice."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    out: list[str | None] = []
    for i, own in enumerate(parts):
        name = None
        for k in range(1, len(own) + 1):
            if all(other[-k:] != own[-k:] for j, other in enumerate(parts) if j != i):
                name = str(Path(*own[-k:]))
                break
        out.append(name)
    return out


def _recorded_hook(sae: Any, manifest: dict) -> str | None:
    return getattr(getattr(sae.cfg, "metadata", None), "hook_name", None) or manifest.get("hook") or None


def _sae_model(
    spec: str, path: Path, given: str | None, manifest: dict, models: dict, hashes: dict, paths: dict
):
    """The name of the --model an SAE reads: ``given`` (MODEL=), else the one with the sha256 its manifest
    records, else the only --model when the manifest records no hash."""
    recorded = manifest.get("model_sha256")
    listing = "; ".join(f"{n}={paths[n]} (sha256 {hashes[n]})" for n in models)
    if given is not None:
        if given not in models:
            raise ValueError(f"--sae {spec}: unknown model {given!r}; models: {sorted(models)}")
        if recorded and recorded != hashes[given]:
            print(
                f"warning: --sae {path}: its manifest records model sha256 {recorded}, but it is applied to "
                f"--model {given}={paths[given]} (sha256 {hashes[given]}) as its {given}= prefix says",
                file=sys.stderr,
            )
        return given
    if recorded:
        matches = [n for n in models if hashes[n] == recorded]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(
                f"--sae {path}: its manifest's model sha256 {recorded} is that of several --model entries "
                f"({', '.join(matches)}); say which with MODEL={path}"
            )
        raise ValueError(
            f"--sae {path}: its manifest (mechvit_sae.json) says it was trained on the model with sha256 "
            f"{recorded}, which is none of the --model entries: {listing}. Give that model with --model, or "
            f"write MODEL={path} to apply the SAE to another model on purpose"
        )
    if len(models) == 1:
        return next(iter(models))
    raise ValueError(
        f"--sae {path}: its manifest records no model hash (model_sha256), so it cannot be matched to one of "
        f"the {len(models)} --model entries ({', '.join(models)}); write MODEL={path}"
    )


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from mechvit.sae import load_sae, model_fingerprint
    from mechvit.sae.activations import check_hook

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models, hashes, model_paths = {}, {}, {}
    for spec in args.model:
        name, path = _split_named(spec)
        path = Path(path)
        name = name or path.name
        if name in models:
            raise ValueError(f"two --model entries are named {name!r}; name them NAME=PATH")
        models[name] = _load_model(path, device)
        hashes[name], model_paths[name] = model_fingerprint(models[name]), path
    specs = [_split_sae(spec) for spec in args.sae]
    unnamed = [i for i, (name, _, _) in enumerate(specs) if name is None]
    derived = dict(zip(unnamed, distinct_names([specs[i][2] for i in unnamed]), strict=True))
    entries = []
    for i, (spec, (sname, mname, path)) in enumerate(zip(args.sae, specs, strict=True)):
        path = Path(path)
        if sname is None:
            sname = derived[i]
            if sname is None:
                raise ValueError(f"--sae {path} is given twice; name each NAME@=DIR (or NAME@MODEL=DIR)")
        sae, manifest = load_sae(path, device=str(device))
        mname = _sae_model(spec, path, mname, manifest, models, hashes, model_paths)
        recorded = _recorded_hook(sae, manifest)
        if recorded and args.hook and recorded != args.hook:
            raise ValueError(
                f"--sae {path} was trained on hook {recorded!r} (recorded in its cfg.json or manifest), not "
                f"--hook {args.hook!r}; --hook applies only to SAEs that record no hook"
            )
        hook = recorded or args.hook
        if not hook:
            raise ValueError(
                f"--sae {path}: the SAE records no hook name (cfg.metadata.hook_name in its cfg.json, or "
                "'hook' in its manifest); pass --hook blocks.L.hook_... (the hook it was trained on)"
            )
        check_hook(models[mname], hook)
        cond = (
            json.dumps(manifest.get("corruption_mix"), sort_keys=True)
            if manifest.get("corruption_mix")
            else ""
        )
        seed = manifest.get("training", {}).get("seed", 0)
        entries.append(ExplorerSAE(name=sname, sae=sae, model=mname, condition=cond, seed=seed, hook=hook))
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"SAE names must be unique, got {names}: {repeated} repeat; name the SAEs NAME@MODEL=DIR or NAME@=DIR"
        )
    first = next(iter(models.values()))
    from mechvit.training.checkpoint import card_normalisation

    mean = std = None
    for spec in args.model:  # the first checkpoint that records one
        mean, std = card_normalisation(_split_named(spec)[1])
        if mean is not None:
            break
    from mechvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist

    x, y = load_fashion_mnist("test", root=args.data_root)
    if args.n_images < 1:
        raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
    x, y = x[: args.n_images], y[: args.n_images]
    class_names = list(first.cfg.class_names or FASHION_MNIST_CLASSES)
    corrupted = None
    if args.corruption:
        from mechvit.corruptions import corrupt

        corrupted = corrupt(x, args.corruption, args.severity, seed=args.seed)
    transform = None
    if mean is not None:
        from mechvit.data import normalize

        transform = functools.partial(normalize, mean=mean, std=std)

    path = write_explorer(
        args.out,
        entries,
        models,
        x,
        y,
        class_names,
        corrupted=corrupted,
        corrupted_name=f"{args.corruption} {args.severity}" if args.corruption else "corrupted",
        transform=transform,
        title=args.title,
        k=args.k,
        max_latents=args.max_latents,
        cards=args.cards,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
