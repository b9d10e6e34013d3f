"""How good is an SAE: reconstruction metrics on held-out activations, and spliced into the model.

``reconstruction_metrics``: explained variance, MSE, L0, dead and dense features, feature density.
``spliced_metrics``: the hook's activation is replaced by the SAE's reconstruction at the selected tokens
(the others untouched) during the forward; reports accuracy, KL(clean || spliced) and the loss recovered
relative to zero-ablating the same positions: ``(L_zero - L_sae) / (L_zero - L_clean)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .activations import TOKEN_SELECTIONS, _model_device, _token_slice, check_hook

__all__ = [
    "ReconstructionMetrics",
    "SplicedMetrics",
    "feature_density_figure",
    "reconstruction_metrics",
    "splice_hook",
    "spliced_metrics",
]


@dataclass
class ReconstructionMetrics:
    explained_variance: float  # 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    mse: float  # mean over rows and dimensions
    l0: float  # mean active features per row
    dead_features: int  # never active on these rows
    dense_features: int  # active on more than ``dense_threshold`` of the rows
    n_rows: int
    d_sae: int
    feature_density: Tensor  # [d_sae] fraction of rows on which each feature is active

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("feature_density")
        return d


def _sae_width(sae: Any) -> int:
    return int(sae.cfg.d_in)


@torch.no_grad()
def reconstruction_metrics(
    sae: Any,
    activations: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
) -> ReconstructionMetrics:
    """Metrics of ``sae`` (sae-lens inference SAE) on held-out rows: a [N, d_in] tensor or an iterable of
    [n, d_in] chunks (e.g. ``CachedActivations.chunks`` / ``batches(epochs=1)``), streamed in one pass."""
    d_in = _sae_width(sae)
    chunks = activations.split(batch_size) if isinstance(activations, Tensor) else activations
    device = sae.W_dec.device
    n = 0
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    active = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64, device=device)
    sae.eval()
    for x in chunks:
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"activations must be [n, {d_in}] (the SAE's d_in), got {tuple(x.shape)}")
        x = x.to(device, torch.float32)
        codes = sae.encode(x)
        recon = sae.decode(codes)
        n += len(x)
        x64 = x.double()
        sum_x += x64.sum(0)
        sum_x2 += (x64**2).sum()
        sum_err += ((recon.double() - x64) ** 2).sum()
        active += (codes != 0).double().sum(0)
    if n == 0:
        raise ValueError("no activations given")
    total_var = sum_x2 - (sum_x**2).sum() / n
    density = (active / n).float().cpu()
    return ReconstructionMetrics(
        explained_variance=float(1 - sum_err / total_var.clamp_min(1e-12)),
        mse=float(sum_err / (n * d_in)),
        l0=float(active.sum() / n),
        dead_features=int((density == 0).sum()),
        dense_features=int((density > dense_threshold).sum()),
        n_rows=n,
        d_sae=int(sae.cfg.d_sae),
        feature_density=density,
    )


def feature_density_figure(density: Tensor, *, title: str = "SAE feature density", ax: Any = None) -> Any:
    """Histogram of log10 feature density (dead features counted apart). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
    else:
        fig = ax.figure
    density = torch.as_tensor(density).float()
    alive = density[density > 0]
    if len(alive):
        ax.hist(torch.log10(alive).numpy(), bins=40, color="#4477aa")
    ax.set_xlabel("log10 fraction of tokens on which the feature fires")
    ax.set_ylabel("features")
    ax.set_title(f"{title} ({int((density == 0).sum())} dead of {len(density)})")
    fig.tight_layout()
    return fig


@dataclass
class SplicedMetrics:
    accuracy_clean: float
    accuracy_sae: float
    accuracy_zero: float
    kl_sae: float  # mean KL(p_clean || p_sae) over images, nats
    kl_zero: float
    loss_clean: float  # mean cross-entropy against the labels
    loss_sae: float
    loss_zero: float
    loss_recovered: float  # (loss_zero - loss_sae) / (loss_zero - loss_clean)
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def splice_hook(sae: Any | None, model_cfg: Any, tokens: str, hook_name: str):
    """A forward hook replacing the selected tokens by the SAE reconstruction (zeros when ``sae`` is None);
    use it with ``model.run_with_hooks(images, fwd_hooks=[(hook_name, splice_hook(...))])``."""
    d_in = None if sae is None else _sae_width(sae)

    def fn(act: Tensor, hook: Any) -> Tensor:
        shape = act.shape
        flat = act[:, None, :] if act.ndim == 2 else (act.flatten(2) if act.ndim == 4 else act)
        if flat.ndim != 3:
            raise ValueError(f"cannot splice hook {hook_name!r} with shape {tuple(shape)}")
        if d_in is not None and flat.shape[-1] != d_in:
            raise ValueError(f"the SAE has d_in={d_in} but hook {hook_name!r} has width {flat.shape[-1]}")
        sl = slice(None) if act.ndim == 2 else _token_slice(model_cfg, tokens, flat.shape[1])
        out = flat.clone()
        sel = out[:, sl]
        if sae is None:
            out[:, sl] = 0
        else:
            rows = sel.reshape(-1, sel.shape[-1]).to(sae.W_dec.device, torch.float32)
            out[:, sl] = sae.decode(sae.encode(rows)).reshape(sel.shape).to(out.device, out.dtype)
        return out.reshape(shape)

    return fn


@torch.no_grad()
def spliced_metrics(
    model: Any,
    sae: Any,
    images: Float[Tensor, "n c h w"],
    labels: Tensor,
    hook: str,
    *,
    tokens: str = "patches",
    batch_size: int = 128,
    transform: Any = None,
) -> SplicedMetrics:
    """Run ``images`` clean, with the SAE spliced in at ``hook`` (selected tokens only) and with those
    tokens zero-ablated; compare logits. ``transform`` is applied to the images first (e.g. normalisation)."""
    check_hook(model, hook)
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}"
        )
    _check_fit(model, sae, hook, tokens)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(("acc_c", "acc_s", "acc_z", "kl_s", "kl_z", "l_c", "l_s", "l_z"), 0.0)
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device, torch.float32)
            y = labels[i : i + batch_size].to(device)
            if transform is not None:
                x = transform(x)
            clean = model(x).float()
            spliced = model.run_with_hooks(
                x, fwd_hooks=[(hook, splice_hook(sae, model.cfg, tokens, hook))]
            ).float()
            zero = model.run_with_hooks(
                x, fwd_hooks=[(hook, splice_hook(None, model.cfg, tokens, hook))]
            ).float()
            logp_c = clean.log_softmax(-1)
            for key, logits in (("s", spliced), ("z", zero)):
                logp = logits.log_softmax(-1)
                sums[f"kl_{key}"] += float(F.kl_div(logp, logp_c, log_target=True, reduction="sum"))
                sums[f"acc_{key}"] += float((logits.argmax(-1) == y).sum())
                sums[f"l_{key}"] += float(F.cross_entropy(logits, y, reduction="sum"))
            sums["acc_c"] += float((clean.argmax(-1) == y).sum())
            sums["l_c"] += float(F.cross_entropy(clean, y, reduction="sum"))
    finally:
        model.train(was_training)
    n = len(images)
    m = {k: v / n for k, v in sums.items()}
    gap = m["l_z"] - m["l_c"]
    return SplicedMetrics(
        accuracy_clean=m["acc_c"],
        accuracy_sae=m["acc_s"],
        accuracy_zero=m["acc_z"],
        kl_sae=m["kl_s"],
        kl_zero=m["kl_z"],
        loss_clean=m["l_c"],
        loss_sae=m["l_s"],
        loss_zero=m["l_z"],
        loss_recovered=float((m["l_z"] - m["l_s"]) / gap) if abs(gap) > 1e-12 else float("nan"),
        n_images=n,
    )


def _check_fit(model: Any, sae: Any, hook: str, tokens: str) -> None:
    from .activations import hook_width

    width = hook_width(model, hook, tokens)
    if width != _sae_width(sae):
        raise ValueError(f"the SAE has d_in={_sae_width(sae)} but hook {hook!r} gives rows of width {width}")
