"""Feature pages: an SAE feature's most activating images with its per-patch activation as a heatmap overlay,
two models' matched features side by side (e.g. the base model's SAE on the left, the fine-tuned model's on
the right).

Activations are ``[N, n_patches, d_in]`` patch-token activations (``mechvit.analysis.collect_activations``
with ``tokens="patches"``); the patch order is timm's row-major grid, so feature maps reshape to
``[N, gh, gw]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechvit._numbers import fmt_fixed
from mechvit.sae.metrics import encode as sae_encode
from mechvit.viz.figures import _scalar
from mechvit.viz.figures import styled as _styled


def _check(acts: Tensor, sae) -> None:
    if not isinstance(acts, Tensor) or acts.ndim != 3 or acts.shape[-1] != sae.cfg.d_in:
        got = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
        raise ValueError(f"expected activations [n_images, n_patches, {sae.cfg.d_in}], got {got}")


@torch.no_grad()
def _codes(sae, acts: Tensor, batch: int = 64):
    dev = sae.W_dec.device
    for s in range(0, acts.shape[0], batch):
        chunk = acts[s : s + batch]
        z = sae_encode(sae, chunk.reshape(-1, chunk.shape[-1]).to(dev, sae.W_dec.dtype))
        yield s, z.reshape(*chunk.shape[:2], -1).float().cpu()


def top_features(sae, acts: Float[Tensor, "n p d"], k: int) -> list[int]:
    """The ``k`` features with the largest mean activation over all images and patches (dead ones never)."""
    _check(acts, sae)
    total = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    for _, z in _codes(sae, acts):
        total += z.double().sum((0, 1))
    order = torch.argsort(total, descending=True)
    return [int(f) for f in order[:k] if total[f] > 0]


def feature_maps(
    sae, acts: Float[Tensor, "n p d"], features: Sequence[int], grid: tuple[int, int]
) -> Float[Tensor, "n f gh gw"]:
    """Activation of each of ``features`` at every patch, laid out on the patch grid."""
    _check(acts, sae)
    gh, gw = grid
    if acts.shape[1] != gh * gw:
        raise ValueError(f"expected {gh}x{gw}={gh * gw} patch tokens, got {acts.shape[1]}")
    feats = torch.as_tensor(list(features), dtype=torch.long)
    if feats.numel() and (feats.min() < 0 or feats.max() >= sae.cfg.d_sae):
        raise ValueError(f"features must index [0, {sae.cfg.d_sae}), got {feats.tolist()}")
    out = torch.empty(acts.shape[0], len(feats), gh, gw)
    for s, z in _codes(sae, acts):
        out[s : s + z.shape[0]] = z[..., feats].permute(0, 2, 1).reshape(z.shape[0], len(feats), gh, gw)
    return out


def top_image_indices(maps: Float[Tensor, "n gh gw"], k: int) -> list[int]:
    """Indices of the ``k`` images where the feature's strongest patch is strongest (only those > 0)."""
    score = maps.flatten(1).amax(1)
    order = torch.argsort(score, descending=True)[:k]
    return [int(i) for i in order if score[i] > 0]


@_styled
def feature_comparison_figure(
    images: Float[Tensor, "n c h w"],
    maps_left: Float[Tensor, "n f gh gw"],
    maps_right: Float[Tensor, "n f gh gw"],
    features_left: Sequence[int],
    features_right: Sequence[int],
    names: tuple[str, str],
    image_labels: Sequence[str] | None = None,
    *,
    top_images: int = 6,
    pair_cosine: Sequence[float] | None = None,
):
    """One row per feature pair: the left feature's top images | the right feature's top images, each with
    its per-patch activation overlaid (one colour scale per feature, colour bars on the right).

    ``images`` are the [0, 1] images the maps were computed on; ``pair_cosine`` (decoder cosine of each
    pair) goes into the row titles. Returns the matplotlib figure."""
    from mechvit.viz import figures as plots

    n, f = maps_left.shape[:2]
    if maps_right.shape[:2] != (n, f) or len(images) != n:
        raise ValueError(
            f"images {tuple(images.shape)}, maps_left {tuple(maps_left.shape)} and maps_right "
            f"{tuple(maps_right.shape)} must hold the same images and features"
        )
    if len(features_left) != f or len(features_right) != f:
        raise ValueError(f"give {f} feature ids per side, got {len(features_left)} and {len(features_right)}")
    labels = list(image_labels) if image_labels is not None else [f"#{i}" for i in range(n)]
    k = max(1, min(top_images, n))
    fig, ax = plots.new_figure(
        f, 2 * k + 1, w=1.05, h=1.25, gridspec_kw={"width_ratios": [1] * k + [0.25] + [1] * k}
    )
    for r in range(f):
        for side, maps, feat in ((0, maps_left, features_left), (1, maps_right, features_right)):
            m = maps[:, r]
            idx = top_image_indices(m, k)
            vmax = float(m.max()) or 1.0
            for c in range(k):
                a = ax[r, c + side * (k + 1)]
                if c < len(idx):
                    i = idx[c]
                    im = plots.image_overlay(
                        a,
                        images[i].numpy(),
                        m[i].numpy(),
                        vmax=vmax,
                        title=f"{labels[i]}\nmax {fmt_fixed(_scalar(m[i].max()), 2)}",
                    )
                    a.title.set_fontsize(6)
                elif c > 0:
                    a.axis("off")
            first = ax[r, side * (k + 1)]
            if not idx:
                first.set(xticks=[], yticks=[])
                for spine in first.spines.values():
                    spine.set_visible(False)
                first.text(
                    0.5,
                    0.5,
                    "never active\non these images",
                    ha="center",
                    va="center",
                    fontsize=7,
                    transform=first.transAxes,
                )
            head = f"{names[side]}\nfeature {feat[r]}"
            if pair_cosine is not None and side == 1:
                head += f"\n(cos {fmt_fixed(_scalar(pair_cosine[r]), 2)})"
            first.set_ylabel(head, fontsize=7, fontweight="bold")
            if idx:
                fig.colorbar(
                    im,
                    ax=ax[r, side * (k + 1) : side * (k + 1) + k].tolist(),
                    fraction=0.02,
                    pad=0.01,
                    label="activation" if r == f - 1 else None,
                )
        ax[r, k].axis("off")
    return fig
