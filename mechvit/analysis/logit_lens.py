"""Logit lens for ViTs: every layer's residual stream through the model's own readout.

``model.unembed(resid)`` applies the final norm, the pooling (CLS token, average, ...), ``fc_norm`` and the
head to the *whole* residual stream ``[B, T, D]`` after block ``l`` (``blocks.{l}.hook_resid_post``), so the
lens reads each layer exactly as the model reads its last one; at the last layer it equals the model's
logits. ``include_embed=True`` adds the embeddings (``blocks.0.hook_resid_pre``) as a layer named ``embed``.

Per image and layer: correct-class probability, whether the correct class is top-1, the KL divergence
``KL(p_final || p_layer)`` from the final distribution to the layer's (nats), and the entropy (nats).

"First correct layer" (``mode``): ``"first"`` (default, the seed paper's "first layer at which the correct
class is top-1") is the first layer where the correct class is top-1, even if it is lost again later;
``"stable"`` is the first layer from which it stays top-1 through the last layer. Images for which no such
layer exists get -1 and are left out of the average. Layer indices count the rows of ``layers``
(block index ``l`` when ``include_embed`` is off); ``first_correct_block`` / ``mean_first_correct_block``
leave the embed row out (0 = after block 0), as the study does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechvit.analysis._utils import batches, check_images, check_labels, model_device
from mechvit.analysis.similarity import write_rows_csv

MODES = ("first", "stable")


def first_correct_layer(top1: Tensor, mode: str = "first") -> Tensor:
    """Index of the first layer where ``top1 [N, L]`` holds (``first``) or holds to the end (``stable``); -1 if none."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    top1 = top1.bool()
    n_layers = top1.shape[1]
    if mode == "stable":
        # suffix[i, l] = top1 at every layer >= l
        top1 = top1.flip(1).cumprod(1).flip(1).bool()
    idx = torch.where(
        top1, torch.arange(n_layers).expand_as(top1), torch.full_like(top1, n_layers, dtype=torch.long)
    )
    first = idx.min(1).values
    return torch.where(first == n_layers, torch.full_like(first, -1), first)


def _mean_found(first: Tensor) -> float:
    f = first[first >= 0]
    return float(f.double().mean()) if f.numel() else float("nan")


@dataclass
class LogitLensResult:
    """Per-image, per-layer logit-lens measures (tensors ``[N, n_layers]`` on CPU)."""

    layers: list[str]
    correct_prob: Tensor
    top1: Tensor  # bool
    kl_to_final: Tensor
    entropy: Tensor
    mode: str = "first"
    meta: dict = field(default_factory=dict)  # e.g. {"model": "base", "condition": "clean"}

    @property
    def first_correct(self) -> Tensor:
        return first_correct_layer(self.top1, self.mode)

    @property
    def mean_first_correct(self) -> float:
        """Mean first-correct layer (an index into ``layers``, the embed row included when there is one) over
        images correct at some layer (``nan`` if none is)."""
        return _mean_found(self.first_correct)

    @property
    def first_correct_block(self) -> Tensor:
        """First block after which the correct class is top-1 (``mode``; 0 = after block 0; -1: none): the
        embed row left out, since before block 0 the class token does not depend on the image (its readout
        is one class for every image, "correct" for that class's images by chance)."""
        has_embed = bool(self.layers) and self.layers[0] == "embed"
        return first_correct_layer(self.top1[:, 1:] if has_embed else self.top1, self.mode)

    @property
    def mean_first_correct_block(self) -> float:
        """Mean of :attr:`first_correct_block` over images correct after some block (``nan`` if none is)."""
        return _mean_found(self.first_correct_block)

    def summary(self) -> dict[str, Tensor]:
        return {
            "top1_acc": self.top1.double().mean(0).float(),
            "correct_prob": self.correct_prob.mean(0),
            "kl_to_final": self.kl_to_final.mean(0),
            "entropy": self.entropy.mean(0),
        }

    def rows(self) -> list[dict]:
        s = self.summary()
        return [
            {**self.meta, "layer": lay, **{k: float(v[i]) for k, v in s.items()}}
            for i, lay in enumerate(self.layers)
        ]

    def to_dict(self) -> dict:
        f = self.first_correct
        return {
            **self.meta,
            "layers": list(self.layers),
            **{k: v.tolist() for k, v in self.summary().items()},
            "first_correct_mode": self.mode,
            "mean_first_correct_layer": self.mean_first_correct,
            "mean_first_correct_block": self.mean_first_correct_block,
            "n_correct_somewhere": int((f >= 0).sum()),
            "n_images": int(self.top1.shape[0]),
        }

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


@torch.no_grad()
def logit_lens(
    model,
    images: Tensor,
    labels: Tensor,
    *,
    include_embed: bool = False,
    mode: str = "first",
    batch_size: int = 64,
    meta: Mapping | None = None,
    progress: bool = True,
) -> LogitLensResult:
    """Logit lens of ``model`` on ``images`` (see the module docstring for definitions)."""
    check_images(images)
    labels = check_labels(labels, images.shape[0], model.cfg.num_classes)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n_layers = model.cfg.n_layers
    names = (["blocks.0.hook_resid_pre"] if include_embed else []) + [
        f"blocks.{lay}.hook_resid_post" for lay in range(n_layers)
    ]
    layer_names = (["embed"] if include_embed else []) + [str(lay) for lay in range(n_layers)]
    wanted = set(names)
    device = model_device(model)
    out: dict[str, list[Tensor]] = {k: [] for k in ("correct_prob", "top1", "kl_to_final", "entropy")}
    for s in batches(images.shape[0], batch_size, progress, "logit lens"):
        x, y = images[s : s + batch_size].to(device), labels[s : s + batch_size].to(device)
        _, cache = model.run_with_cache(x, names_filter=lambda n: n in wanted)
        logp = torch.stack([model.unembed(cache[n]).float().log_softmax(-1) for n in names], 1)  # [B, L, C]
        logp_final = logp[:, -1:]
        p = logp.exp()
        out["correct_prob"].append(p.gather(2, y[:, None, None].expand(-1, len(names), 1)).squeeze(2).cpu())
        out["top1"].append((logp.argmax(-1) == y[:, None]).cpu())
        out["kl_to_final"].append((logp_final.exp() * (logp_final - logp)).sum(-1).clamp_min(0).cpu())
        out["entropy"].append(-(p * logp).nan_to_num().sum(-1).cpu())
    return LogitLensResult(
        layers=layer_names, **{k: torch.cat(v) for k, v in out.items()}, mode=mode, meta=dict(meta or {})
    )


@dataclass
class LogitLensSweep:
    """Logit lens for several models x input conditions (e.g. base / fine-tuned x clean / each corruption)."""

    results: dict[tuple[str, str], LogitLensResult]

    def rows(self) -> list[dict]:
        return [row for res in self.results.values() for row in res.rows()]

    def to_dict(self) -> dict:
        return {f"{m}/{c}": res.to_dict() for (m, c), res in self.results.items()}

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


def logit_lens_sweep(
    models: Mapping[str, object], inputs: Mapping[str, Tensor], labels: Tensor, **kwargs
) -> LogitLensSweep:
    """:func:`logit_lens` for every model in ``models`` (name -> HookedViT) on every condition in ``inputs``
    (name -> images, e.g. ``{"clean": x, "gaussian_blur/4": corrupt(x, "gaussian_blur", 4, seed=0)}``)."""
    if not models or not inputs:
        raise ValueError(
            f"need at least one model and one input condition, got {len(models)} and {len(inputs)}"
        )
    return LogitLensSweep(
        {
            (m, c): logit_lens(model, x, labels, meta={"model": m, "condition": c}, **kwargs)
            for m, model in models.items()
            for c, x in inputs.items()
        }
    )
