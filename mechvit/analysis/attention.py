"""Attention analysis: entropy, mean attention distance, CLS-to-patch maps, rollout, paired comparisons.

Conventions (patterns are ``[B, H, T_q, T_k]``, rows sum to 1, token order ``[prefix..., patches]``):

- entropy: ``-sum_k p log p`` in nats per query row (``0 log 0 = 0``), averaged over images and *all*
  query tokens; uniform attention over ``n`` keys has entropy ``log(n)``.
- mean attention distance (Dosovitskiy et al. 2021): for every *patch* query, the attention-weighted mean
  Euclidean distance in pixels between its patch centre and the key patch centres. Prefix tokens (CLS,
  distillation, registers) have no position on the image, so they are excluded on both sides: prefix
  queries are skipped and the attention a patch query pays to prefix keys is dropped and the remaining
  weights are renormalised to sum to 1 (a row with no mass on patches contributes distance 0).
- attention rollout (Abnar & Zuidema 2020): heads averaged, the residual added as ``0.5 A + 0.5 I`` and
  rows renormalised, then multiplied from the first layer up: ``R = A_L ... A_1``.
- paired maps (clean vs corrupted, or base vs fine-tuned): per layer and head, entropy difference
  (b minus a), mean squared difference of the two patterns (mean over query, key and images) and cosine
  similarity of the flattened ``T x T`` maps (mean over images).
- per image: ``AttentionStats.per_image`` and ``PairedAttention.per_image`` keep each image's value per layer
  (head mean) of every per-layer metric, ``[N, L]``; their mean over the images is ``per_layer()``, and they are
  what a CI over images resamples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechvit.analysis._utils import batches, check_images, model_device
from mechvit.analysis.similarity import write_rows_csv


def _check_pattern(pattern, name: str = "pattern") -> None:
    if not isinstance(pattern, Tensor) or pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        got = tuple(pattern.shape) if isinstance(pattern, Tensor) else type(pattern).__name__
        raise ValueError(f"{name} must be an attention pattern [B, H, T, T], got {got}")


def attention_entropy(pattern: Float[Tensor, "... t_q t_k"]) -> Float[Tensor, "... t_q"]:
    """Entropy in nats of each attention row (``0 log 0`` taken as 0)."""
    if not isinstance(pattern, Tensor) or pattern.ndim < 1:
        raise ValueError(f"pattern must be a tensor [..., T_k], got {type(pattern).__name__}")
    p = pattern.to(torch.float32)
    return -torch.special.xlogy(p, p).sum(-1)


def patch_centers(grid_size: Sequence[int], patch_size: Sequence[int]) -> Float[Tensor, "n 2"]:
    """Pixel coordinates (row, column) of each patch centre, row-major like the token order."""
    (gh, gw), (ph, pw) = grid_size, patch_size
    rows = (torch.arange(gh, dtype=torch.float32) + 0.5) * ph
    cols = (torch.arange(gw, dtype=torch.float32) + 0.5) * pw
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(gh * gw, 2)


def mean_attention_distance(
    pattern: Float[Tensor, "b h t t"], grid_size: Sequence[int], patch_size: Sequence[int], n_prefix: int
) -> Float[Tensor, "b h"]:
    """Mean attention distance in pixels per image and head (see the module docstring)."""
    _check_pattern(pattern)
    n_patch = grid_size[0] * grid_size[1]
    if pattern.shape[-1] != n_prefix + n_patch:
        raise ValueError(
            f"pattern has {pattern.shape[-1]} tokens, expected {n_prefix} prefix + {n_patch} patches"
        )
    centers = patch_centers(grid_size, patch_size).to(pattern.device)
    dist = torch.cdist(centers, centers)  # [P, P]
    p = pattern[..., n_prefix:, n_prefix:].to(torch.float32)
    mass = p.sum(-1, keepdim=True)
    p = torch.where(mass > 0, p / mass.clamp_min(1e-12), torch.zeros_like(p))
    return (p * dist).sum(-1).mean(-1)


def cls_attention_map(
    pattern: Float[Tensor, "b h t t"], grid_size: Sequence[int], n_prefix: int, query: int = 0
) -> Float[Tensor, "b h gh gw"]:
    """Attention from token ``query`` (default the CLS token, 0) to every patch, on the patch grid."""
    _check_pattern(pattern)
    gh, gw = grid_size
    if pattern.shape[-1] != n_prefix + gh * gw:
        raise ValueError(
            f"pattern has {pattern.shape[-1]} tokens, expected {n_prefix} prefix + {gh * gw} patches"
        )
    if not 0 <= query < pattern.shape[-1]:
        raise ValueError(f"query must index a token in [0, {pattern.shape[-1]}), got {query}")
    return pattern[:, :, query, n_prefix:].reshape(*pattern.shape[:2], gh, gw)


def attention_rollout(
    patterns: Sequence[Float[Tensor, "b h t t"]], *, residual: bool = True, head_fusion: str = "mean"
) -> Float[Tensor, "b t t"]:
    """Attention rollout over layers (Abnar & Zuidema 2020), first layer first in ``patterns``."""
    if len(patterns) == 0:
        raise ValueError("attention_rollout needs at least one layer's pattern, got none")
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    rollout = None
    for i, pattern in enumerate(patterns):
        _check_pattern(pattern, f"patterns[{i}]")
        a = getattr(pattern.to(torch.float64), head_fusion)(1)
        a = a.values if not isinstance(a, Tensor) else a
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        rollout = a if rollout is None else a @ rollout
    return rollout.to(torch.float32)


def _pattern_names(model) -> list[str]:
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def _patterns(model, x: Tensor) -> list[Tensor]:
    names = _pattern_names(model)
    wanted = set(names)
    _, cache = model.run_with_cache(x.to(model_device(model)), names_filter=lambda n: n in wanted)
    return [cache[n] for n in names]


@torch.no_grad()
def model_attention_rollout(model, images: Tensor, *, residual: bool = True, batch_size: int = 64) -> Tensor:
    """Rollout ``[B, T, T]`` of ``model`` on ``images`` (on CPU)."""
    check_images(images)
    return torch.cat(
        [
            attention_rollout(_patterns(model, images[s : s + batch_size]), residual=residual).cpu()
            for s in batches(images.shape[0], batch_size)
        ]
    )


@torch.no_grad()
def model_cls_attention(model, images: Tensor, *, batch_size: int = 64, query: int = 0) -> Tensor:
    """CLS-to-patch attention maps ``[L, B, H, gh, gw]`` of ``model`` on ``images`` (on CPU)."""
    check_images(images)
    cfg = model.cfg
    if cfg.n_prefix_tokens < 1 and query == 0:
        raise ValueError("this model has no prefix (CLS) token; pass query=<a patch token index>")
    per_batch = []
    for s in batches(images.shape[0], batch_size):
        pats = _patterns(model, images[s : s + batch_size])
        per_batch.append(
            torch.stack([cls_attention_map(p, cfg.grid_size, cfg.n_prefix_tokens, query).cpu() for p in pats])
        )
    return torch.cat(per_batch, dim=1)


@dataclass
class AttentionStats:
    """Per layer and head attention statistics of one run, averaged over images."""

    entropy: Tensor  # [L, H] nats
    distance: Tensor  # [L, H] pixels
    n_images: int
    # {"entropy": [N, L], "distance_px": [N, L]}: each image's value per layer, head mean (mean over images:
    # per_layer())
    per_image: dict[str, Tensor] | None = None

    def per_layer(self) -> dict[str, Tensor]:
        """Head-averaged statistics per layer."""
        return {"entropy": self.entropy.mean(1), "distance_px": self.distance.mean(1)}

    def rows(self) -> list[dict]:
        n_layers, n_heads = self.entropy.shape
        return [
            {
                "layer": lay,
                "head": h,
                "entropy": float(self.entropy[lay, h]),
                "distance_px": float(self.distance[lay, h]),
                "n_images": self.n_images,
            }
            for lay in range(n_layers)
            for h in range(n_heads)
        ]

    def to_dict(self) -> dict:
        return {
            "entropy": self.entropy.tolist(),
            "distance_px": self.distance.tolist(),
            "n_images": self.n_images,
        }

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


@torch.no_grad()
def attention_stats(model, images: Tensor, *, batch_size: int = 64, progress: bool = True) -> AttentionStats:
    """Entropy and mean attention distance per layer and head of ``model`` on ``images``."""
    check_images(images)
    cfg = model.cfg
    ent = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    dist = torch.zeros_like(ent)
    per_image: dict[str, list[Tensor]] = {"entropy": [], "distance_px": []}  # per batch: [b, L]
    for s in batches(images.shape[0], batch_size, progress, "attention stats"):
        ent_img, dist_img = [], []
        for layer, p in enumerate(_patterns(model, images[s : s + batch_size])):
            e = attention_entropy(p).mean(-1)  # [b, H]
            d = mean_attention_distance(p, cfg.grid_size, cfg.patch_size, cfg.n_prefix_tokens)
            ent[layer] += e.sum(0).double().cpu()
            dist[layer] += d.sum(0).double().cpu()
            ent_img.append(e.double().mean(1).cpu())
            dist_img.append(d.double().mean(1).cpu())
        per_image["entropy"].append(torch.stack(ent_img, 1))
        per_image["distance_px"].append(torch.stack(dist_img, 1))
    n = images.shape[0]
    return AttentionStats(
        entropy=(ent / n).float(), distance=(dist / n).float(), n_images=n,
        per_image={k: torch.cat(v).float() for k, v in per_image.items()},
    )  # fmt: skip


@dataclass
class PairedAttention:
    """Per layer and head comparison of two runs' attention (a: clean or base, b: corrupted or fine-tuned)."""

    entropy_a: Tensor  # [L, H]
    entropy_b: Tensor  # [L, H]
    distance_a: Tensor  # [L, H]
    distance_b: Tensor  # [L, H]
    mse: Tensor  # [L, H]
    cosine: Tensor  # [L, H]
    n_images: int
    labels: tuple[str, str] = ("a", "b")
    cosine_per_image: Tensor | None = None  # [N]: cosine of the two maps, mean over layers, heads and queries
    # {key of per_layer(): [N, L]}: each image's value per layer, head mean (mean over images: per_layer())
    per_image: dict[str, Tensor] | None = None

    @property
    def entropy_diff(self) -> Tensor:
        """Entropy of run b minus run a, [L, H]."""
        return self.entropy_b - self.entropy_a

    def per_layer(self) -> dict[str, Tensor]:
        """Head-averaged metrics per layer."""
        return {
            "entropy_a": self.entropy_a.mean(1),
            "entropy_b": self.entropy_b.mean(1),
            "entropy_diff": self.entropy_diff.mean(1),
            "distance_diff": (self.distance_b - self.distance_a).mean(1),
            "mse": self.mse.mean(1),
            "cosine": self.cosine.mean(1),
        }

    def rows(self) -> list[dict]:
        n_layers, n_heads = self.mse.shape
        a, b = self.labels
        return [
            {
                "layer": lay,
                "head": h,
                "run_a": a,
                "run_b": b,
                "entropy_a": float(self.entropy_a[lay, h]),
                "entropy_b": float(self.entropy_b[lay, h]),
                "entropy_diff": float(self.entropy_diff[lay, h]),
                "distance_a_px": float(self.distance_a[lay, h]),
                "distance_b_px": float(self.distance_b[lay, h]),
                "mse": float(self.mse[lay, h]),
                "cosine": float(self.cosine[lay, h]),
                "n_images": self.n_images,
            }
            for lay in range(n_layers)
            for h in range(n_heads)
        ]

    def to_dict(self) -> dict:
        out = {k: v.tolist() for k, v in self.per_layer().items()}
        out.update(labels=list(self.labels), n_images=self.n_images, per_head=self.rows())
        return out

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


@torch.no_grad()
def compare_attention(
    model_a,
    images_a: Tensor,
    model_b=None,
    images_b: Tensor | None = None,
    *,
    labels: tuple[str, str] = ("a", "b"),
    batch_size: int = 64,
    progress: bool = True,
) -> PairedAttention:
    """Paired attention metrics between ``model_a`` on ``images_a`` and ``model_b`` on ``images_b``.

    Clean vs corrupted: ``compare_attention(model, clean, images_b=corrupted, labels=("clean", "blur"))``.
    Base vs fine-tuned: ``compare_attention(base, x, finetuned, labels=("base", "finetuned"))``.
    """
    model_b = model_a if model_b is None else model_b
    images_b = images_a if images_b is None else images_b
    check_images(images_a, "images_a")
    check_images(images_b, "images_b")
    if images_a.shape[0] != images_b.shape[0]:
        raise ValueError(
            f"images_a and images_b must be paired, got {images_a.shape[0]} and {images_b.shape[0]} images"
        )
    ca, cb = model_a.cfg, model_b.cfg
    if (ca.n_layers, ca.n_heads, ca.n_tokens) != (cb.n_layers, cb.n_heads, cb.n_tokens):
        raise ValueError(
            "models must share n_layers, n_heads and n_tokens, got "
            f"{(ca.n_layers, ca.n_heads, ca.n_tokens)} and {(cb.n_layers, cb.n_heads, cb.n_tokens)}"
        )
    sums = {
        k: torch.zeros(ca.n_layers, ca.n_heads, dtype=torch.float64)
        for k in ("entropy_a", "entropy_b", "distance_a", "distance_b", "mse", "cosine")
    }
    per_image = []
    layer_img: dict[str, list[Tensor]] = {k: [] for k in sums}  # per batch: [b, L], head mean
    for s in batches(images_a.shape[0], batch_size, progress, "attention compare"):
        pats_a = _patterns(model_a, images_a[s : s + batch_size])
        pats_b = _patterns(model_b, images_b[s : s + batch_size])
        cos_img = torch.zeros(pats_a[0].shape[0], dtype=torch.float64)
        batch_img: dict[str, list[Tensor]] = {k: [] for k in sums}
        for layer, (pa, pb) in enumerate(zip(pats_a, pats_b, strict=True)):
            pa, pb = pa.float(), pb.to(pa.device).float()
            per_head = {  # [b, H] each
                "entropy_a": attention_entropy(pa).mean(-1),
                "entropy_b": attention_entropy(pb).mean(-1),
                "distance_a": mean_attention_distance(pa, ca.grid_size, ca.patch_size, ca.n_prefix_tokens),
                "distance_b": mean_attention_distance(pb, cb.grid_size, cb.patch_size, cb.n_prefix_tokens),
                "mse": (pa - pb).pow(2).mean((-1, -2)),
                "cosine": torch.nn.functional.cosine_similarity(pa.flatten(2), pb.flatten(2), dim=-1),
            }
            for k, v in per_head.items():
                sums[k][layer] += v.sum(0).double().cpu()  # summed as before: the same per-layer numbers
                batch_img[k].append(v.double().mean(1).cpu())
            # per image: cosine of each query row's attention distribution, mean over queries and heads
            cos_img += torch.nn.functional.cosine_similarity(pa, pb, dim=-1).mean((-1, -2)).double().cpu()
        per_image.append(cos_img / len(pats_a))
        for k, v in batch_img.items():
            layer_img[k].append(torch.stack(v, 1))
    n = images_a.shape[0]
    img = {k: torch.cat(v) for k, v in layer_img.items()}  # [N, L] float64
    by_layer = {
        "entropy_a": img["entropy_a"],
        "entropy_b": img["entropy_b"],
        "entropy_diff": img["entropy_b"] - img["entropy_a"],
        "distance_diff": img["distance_b"] - img["distance_a"],
        "mse": img["mse"],
        "cosine": img["cosine"],
    }
    return PairedAttention(
        **{k: (v / n).float() for k, v in sums.items()}, n_images=n, labels=tuple(labels),
        cosine_per_image=torch.cat(per_image).float(), per_image={k: v.float() for k, v in by_layer.items()},
    )  # fmt: skip
