"""How good is an SAE: reconstruction metrics on held-out activations, and spliced into the model.

``reconstruction_metrics``: explained variance, MSE, L0, dead and dense features, feature density.
``spliced_metrics``: the hook's activation is replaced by the SAE's reconstruction at the selected tokens
(the others untouched) during the forward; reports accuracy, KL(clean || spliced) and the loss recovered
relative to zero-ablating the same positions: ``(L_zero - L_sae) / (L_zero - L_clean)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .activations import TOKEN_SELECTIONS, _model_device, check_hook, token_slice

__all__ = [
    "ReconstructionMetrics",
    "SplicedMetrics",
    "Splicer",
    "feature_density_figure",
    "reconstruction_metrics",
    "AblationGap",
    "PCABaseline",
    "ablation_gap",
    "ablation_gap_sweep",
    "check_sae_hook",
    "choose_hook",
    "encode",
    "mean_activation",
    "pca_baseline",
    "pca_components",
    "splice_hook",
    "spliced_kl_per_image",
    "spliced_metrics",
    "spliced_metrics_many",
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
    # with ``per_row=True``: "active" (latents active per row, int32) and "sq_err" (||x - x_hat||^2 per row,
    # float64), for CIs over the images the rows come from (mechvit.analysis.reconstruction_cis); not in to_dict()
    per_row: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("feature_density", "per_row")
        }


def _sae_width(sae: Any) -> int:
    return int(sae.cfg.d_in)


def _plain_relu_sae(sae: Any) -> str | None:
    """``"jumprelu"`` / ``"standard"`` for an sae-lens JumpReLU or standard (ReLU) SAE with a ReLU base
    activation and nothing hooked on its hook points; None for anything else."""
    from sae_lens import JumpReLUSAE, StandardSAE

    kind = {JumpReLUSAE: "jumprelu", StandardSAE: "standard"}.get(type(sae))
    if kind is None or not isinstance(getattr(sae, "activation_fn", None), torch.nn.ReLU):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in sae.modules()):
        return None
    return kind


def encode(sae: Any, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_sae"]:
    """``sae.encode(x)``: the same values (bit for bit; ``torch.equal``), faster for an sae-lens JumpReLU SAE
    (what a BatchTopK SAE is at inference) or standard SAE on ``[n, d_in]`` rows. sae-lens computes
    ``relu(pre) * (pre > threshold).to(dtype)``: four passes over the ``[n, d_sae]`` pre-activations and three
    new tensors of that size; here the bias is added in place and the entries at or under
    ``max(threshold, 0)`` are zeroed in place (the same kept entries: ``pre > threshold`` and ``pre > 0``;
    the same +0.0 elsewhere, NaN where sae-lens gives NaN). Measured on one thread, 4,096 rows, d_in 96,
    d_sae 1,152: 22 ms -> 12 ms. Anything else (other architectures, 3-d inputs, hooks on the SAE's hook
    points, another base activation, a JumpReLU threshold with a NaN entry: ``pre <= NaN`` is False, so the
    in-place zeroing would keep what sae-lens zeroes) runs ``sae.encode``."""
    kind = _plain_relu_sae(sae) if x.ndim == 2 else None
    if kind == "jumprelu" and bool(torch.isnan(sae.threshold).any()):
        kind = None
    if kind is None:
        return sae.encode(x)
    pre = torch.matmul(sae.process_sae_in(x), sae.W_enc).add_(sae.b_enc)  # = sae_in @ W_enc + b_enc
    if kind == "standard":
        return pre.relu_()
    return pre.masked_fill_(pre <= sae.threshold.clamp(min=0), 0.0)


def check_sae_hook(sae: Any, hook: str) -> None:
    """Raise ValueError when ``sae`` records the hook it was trained on (``cfg.metadata.hook_name``, as
    mechvit and sae-lens save it) and that is not ``hook``: the same width does not make it the same space
    (an SAE trained on ``blocks.2.hook_resid_post`` spliced into ``blocks.4.hook_resid_post`` would run)."""
    recorded = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    if recorded and recorded != hook:
        raise ValueError(
            f"this SAE was trained on hook {recorded!r} (its cfg.metadata.hook_name), not {hook!r}; "
            f"use it at {recorded!r}, or set sae.cfg.metadata.hook_name = {hook!r} to apply it "
            "elsewhere on purpose"
        )


@torch.no_grad()
def reconstruction_metrics(
    sae: Any,
    activations: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    per_row: bool = False,
) -> ReconstructionMetrics:
    """Metrics of ``sae`` (sae-lens inference SAE) on held-out rows: a [N, d_in] tensor or an iterable of
    [n, d_in] chunks (e.g. ``CachedActivations.chunks`` / ``batches(epochs=1)``), streamed in one pass.
    ``per_row``: also keep each row's active count and squared error (``.per_row``, on the CPU)."""
    d_in = _sae_width(sae)
    chunks = activations.split(batch_size) if isinstance(activations, Tensor) else activations
    device = sae.W_dec.device
    n = 0
    sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros((), dtype=torch.float64, device=device)
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    active = torch.zeros(int(sae.cfg.d_sae), dtype=torch.long, device=device)  # exact counts
    rows_active: list[Tensor] = []
    rows_err: list[Tensor] = []
    sae.eval()
    for x in chunks:
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"activations must be [n, {d_in}] (the SAE's d_in), got {tuple(x.shape)}")
        x = x.to(device, torch.float32)
        codes = encode(sae, x)
        recon = sae.decode(codes)
        n += len(x)
        x64 = x.double()
        sum_x += x64.sum(0)
        sum_x2 += (x64**2).sum()
        err = ((recon.double() - x64) ** 2).sum(1)
        sum_err += err.sum()
        # counts from the non-zero entries (~k per row): count_nonzero(dim=...) over the dense [n, d_sae] codes
        # took 15 + 11 ms per 4,096 x 1,152 chunk, the index list 5 ms; the same integers
        rows, cols = torch.nonzero(codes, as_tuple=True)
        active += torch.bincount(cols, minlength=active.numel())
        if per_row:
            rows_active.append(torch.bincount(rows, minlength=len(x)).to(torch.int32).cpu())
            rows_err.append(err.cpu())
    if n == 0:
        raise ValueError("no activations given")
    total_var = sum_x2 - (sum_x**2).sum() / n
    active = active.double()
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
        per_row={"active": torch.cat(rows_active), "sq_err": torch.cat(rows_err)} if per_row else None,
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
    # per image (for CIs over images): correct_clean, correct_sae (bool) and kl_sae (nats); not in to_dict()
    per_image: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_image"}


def splice_hook(sae: Any | None, model_cfg: Any, tokens: str, hook_name: str):
    """A forward hook replacing the selected tokens by the SAE reconstruction (zeros when ``sae`` is None);
    use it with ``model.run_with_hooks(images, fwd_hooks=[(hook_name, splice_hook(...))])``."""
    d_in = None if sae is None else _sae_width(sae)
    if sae is not None:
        check_sae_hook(sae, hook_name)

    def fn(act: Tensor, hook: Any) -> Tensor:
        shape = act.shape
        flat = act[:, None, :] if act.ndim == 2 else (act.flatten(2) if act.ndim == 4 else act)
        if flat.ndim != 3:
            raise ValueError(f"cannot splice hook {hook_name!r} with shape {tuple(shape)}")
        if d_in is not None and flat.shape[-1] != d_in:
            raise ValueError(f"the SAE has d_in={d_in} but hook {hook_name!r} has width {flat.shape[-1]}")
        sl = slice(None) if act.ndim == 2 else token_slice(model_cfg, tokens, flat.shape[1])
        out = flat.clone()
        sel = out[:, sl]
        if sae is None:
            out[:, sl] = 0
        else:
            rows = sel.reshape(-1, sel.shape[-1]).to(sae.W_dec.device, torch.float32)
            out[:, sl] = sae.decode(encode(sae, rows)).reshape(sel.shape).to(out.device, out.dtype)
        return out.reshape(shape)

    return fn


class Splicer:
    """Logits of ONE model on fixed images, clean and with the selected tokens at ``hook`` replaced (by an
    SAE's reconstruction, or zeros): what :func:`spliced_metrics`, :func:`spliced_kl_per_image` and the
    cross-model splices of :func:`mechvit.analysis.overlap_controls` share.

    The clean logits are computed once; for a residual-stream hook (``blocks.L.hook_resid_pre`` /
    ``hook_resid_post`` of a model whose ``forward`` takes ``start_at_layer``/``stop_at_layer``, as
    HookedViT's) so is the stream there, and each splice reruns only the blocks after the hook. Where the
    forward also takes ``readout_only`` (HookedViT), those resumed forwards (clean, spliced, zero-ablated) pass
    it: the last block computes only the rows the pooling reads (the class token), so hooks attached to the
    last block see only those rows. The logits then equal those of a full ``run_with_hooks`` forward with
    :func:`splice_hook` to float rounding, not bitwise (tested to 1e-5 with the same top-1); clean and spliced
    are computed alike, so an identity splice still gives the clean logits exactly. Measured on
    ``checkpoints/fmnist_vit_base`` (1,000 Fashion-MNIST test images, its five trained base SAEs and the
    zero-ablation at ``blocks.0.hook_resid_post``, logits up to 4.3): max abs difference 3.0e-6, no top-1
    changed. In the default study (5 SAEs per model, 1,000 images, hook at block 0 of 6): 2.5x fewer block
    passes than three full forwards per SAE (36 against 90), and ``readout_only`` makes
    :func:`spliced_metrics_many` there 1.11-1.17x faster than the same resumed forwards on every token
    (benchmarks/bench_splicer.py, 5 random x12 SAEs, 1 CPU thread). Any other hook runs the full hooked
    forward, every token (the clean logits too), as before."""

    def __init__(
        self,
        model: Any,
        images: Float[Tensor, "n c h w"],
        hook: str,
        *,
        tokens: str = "patches",
        batch_size: int = 128,
        transform: Any = None,
    ):
        from .activations import resume_layer

        check_hook(model, hook)
        if tokens not in TOKEN_SELECTIONS:
            raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
        if len(images) == 0:
            raise ValueError("no images given")
        self.model, self.images, self.hook, self.tokens = model, images, hook, tokens
        self.batch_size, self.transform = int(batch_size), transform
        layer = resume_layer(hook)
        n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
        params = _forward_parameters(model)
        resumable = "start_at_layer" in params
        self.layer = layer if resumable and layer is not None and n_layers and layer < n_layers else None
        # the resumed forwards need only the logits: where the forward takes it, the last block computes only
        # the rows the pooling reads (HookedViT's readout_only)
        self._resume_kwargs = {"readout_only": True} if "readout_only" in params else {}
        self._clean: list[Tensor] | None = None
        self._resid: list[Tensor] | None = None
        self._width: int | None = None  # of the hook's selected rows: one blank forward, once

    def check(self, sae: Any) -> None:
        """Raise ValueError when ``sae`` was trained on another hook or its ``d_in`` does not fit the hook."""
        if self._width is None:
            from .activations import hook_width

            self._width = hook_width(self.model, self.hook, self.tokens)
        _check_fit(self.model, sae, self.hook, self.tokens, width=self._width)

    def _batches(self):
        device = _model_device(self.model)
        for i in range(0, len(self.images), self.batch_size):
            x = self.images[i : i + self.batch_size].to(device, torch.float32)
            yield self.transform(x) if self.transform is not None else x

    def _eval(self, fn):
        was_training = self.model.training
        self.model.eval()
        try:
            return fn()
        finally:
            self.model.train(was_training)

    def _resume(self, resid: Tensor) -> Tensor:
        """Float32 logits from the residual stream at the hook: only the blocks after it."""
        return self.model(resid, start_at_layer=self.layer, **self._resume_kwargs).float()

    @torch.no_grad()
    def clean(self) -> list[Tensor]:
        """Clean float32 logits, one tensor per batch of ``batch_size`` images."""
        if self._clean is None:

            def run() -> tuple[list[Tensor], list[Tensor] | None]:
                if self.layer is None:
                    return [self.model(x).float() for x in self._batches()], None
                resid = [self.model(x, stop_at_layer=self.layer) for x in self._batches()]
                return [self._resume(r) for r in resid], resid

            self._clean, self._resid = self._eval(run)
        return self._clean

    @torch.no_grad()
    def spliced(self, sae: Any | None) -> list[Tensor]:
        """Float32 logits per batch with ``sae``'s reconstruction (None: zeros) at the selected tokens."""
        if sae is not None:
            self.check(sae)
        self.clean()
        fn = splice_hook(sae, self.model.cfg, self.tokens, self.hook)

        def run() -> list[Tensor]:
            if self._resid is not None:
                return [self._resume(fn(r, None)) for r in self._resid]
            return [
                self.model.run_with_hooks(x, fwd_hooks=[(self.hook, fn)]).float() for x in self._batches()
            ]

        return self._eval(run)

    def kl_per_image(self, sae: Any | None) -> Float[Tensor, " n"]:
        """KL(p_clean || p_spliced) per image, nats (on the CPU)."""
        if sae is not None:
            self.check(sae)  # before the clean forward
        out = []
        for c, s in zip(self.clean(), self.spliced(sae), strict=True):
            lp_c, lp_s = c.log_softmax(-1), s.log_softmax(-1)
            out.append((lp_c.exp() * (lp_c - lp_s)).sum(-1).clamp_min(0).cpu())
        return torch.cat(out)


def _forward_parameters(model: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


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
    return spliced_metrics_many(
        model, [sae], images, labels, hook, tokens=tokens, batch_size=batch_size, transform=transform
    )[0]


@torch.no_grad()
def spliced_metrics_many(
    model: Any,
    saes: Sequence[Any],
    images: Float[Tensor, "n c h w"],
    labels: Tensor,
    hook: str,
    *,
    tokens: str = "patches",
    batch_size: int = 128,
    transform: Any = None,
) -> list[SplicedMetrics]:
    """:func:`spliced_metrics` of each of ``saes`` (all trained on ``model`` at ``hook``): the same numbers as
    one call per SAE, but the clean and zero-ablated forwards run once (:class:`Splicer`)."""
    splicer = Splicer(model, images, hook, tokens=tokens, batch_size=batch_size, transform=transform)
    if len(images) != len(labels):
        raise ValueError(f"need as many labels as images, got {len(images)} images and {len(labels)} labels")
    if len(saes) == 0:
        raise ValueError("no SAEs given")
    for sae in saes:  # every SAE before the first forward
        splicer.check(sae)
    device = _model_device(model)
    ys = [labels[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    clean, zero = splicer.clean(), splicer.spliced(None)
    return [_spliced_summary(clean, splicer.spliced(sae), zero, ys) for sae in saes]


def _spliced_summary(clean: list[Tensor], spliced: list[Tensor], zero: list[Tensor], ys: list[Tensor]):
    """SplicedMetrics from per-batch logits (clean, SAE-spliced, zero-ablated) and labels."""
    sums = dict.fromkeys(("acc_c", "acc_s", "acc_z", "kl_s", "kl_z", "l_c", "l_s", "l_z"), 0.0)
    per: dict[str, list[Tensor]] = {"correct_clean": [], "correct_sae": [], "kl_sae": []}
    for c, s, z, y in zip(clean, spliced, zero, ys, strict=True):
        logp_c = c.log_softmax(-1)
        for key, logits in (("s", s), ("z", z)):
            logp = logits.log_softmax(-1)
            kl = F.kl_div(logp, logp_c, log_target=True, reduction="none").sum(-1)
            correct = logits.argmax(-1) == y
            sums[f"kl_{key}"] += float(kl.sum())
            sums[f"acc_{key}"] += float(correct.sum())
            sums[f"l_{key}"] += float(F.cross_entropy(logits, y, reduction="sum"))
            if key == "s":
                per["kl_sae"].append(kl.cpu())
                per["correct_sae"].append(correct.cpu())
        correct = c.argmax(-1) == y
        per["correct_clean"].append(correct.cpu())
        sums["acc_c"] += float(correct.sum())
        sums["l_c"] += float(F.cross_entropy(c, y, reduction="sum"))
    n = sum(len(y) for y in ys)
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
        per_image={k: torch.cat(v) for k, v in per.items()},
    )


def _check_fit(model: Any, sae: Any, hook: str, tokens: str, width: int | None = None) -> None:
    """``check_sae_hook``, and the SAE's ``d_in`` against ``width`` (the hook's row width; measured with a blank
    forward when None)."""
    from .activations import hook_width

    check_sae_hook(sae, hook)
    if width is None:
        width = hook_width(model, hook, tokens)
    if width != _sae_width(sae):
        raise ValueError(f"the SAE has d_in={_sae_width(sae)} but hook {hook!r} gives rows of width {width}")


# ---- is the hook worth an SAE: the ablation gap ---------------------------------------------------


@dataclass
class AblationGap:
    """What the model loses when the selected tokens at ``hook`` are replaced by their mean (or zeros).

    ``kl`` (mean over images of KL(p_clean || p_ablated), nats) is the gap: non-negative and label-free.
    ``loss_delta`` = CE(ablated) - CE(clean) can be negative (an ablation can *lower* the loss), so "loss
    recovered", which divides by it, is only meaningful when it is clearly positive.
    """

    hook: str
    tokens: str
    mode: str  # "mean" or "zero"
    kl: float
    kl_per_image: Tensor  # [n_images]
    loss_clean: float
    loss_ablated: float
    accuracy_clean: float
    accuracy_ablated: float
    n_images: int

    @property
    def loss_delta(self) -> float:
        return self.loss_ablated - self.loss_clean

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kl_per_image")
        d["loss_delta"] = self.loss_delta
        return d


def mean_activation(
    model: Any,
    images: Float[Tensor, "n c h w"],
    hook: str,
    *,
    tokens: str = "patches",
    batch_size: int = 256,
    transform: Any = None,
) -> Float[Tensor, " d"]:
    """Mean activation vector over the selected tokens of ``images`` at ``hook`` (float64 sum, float32 out)."""
    from .activations import run_to_hook, select_tokens

    total, n = None, 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(_model_device(model), torch.float32)
        if transform is not None:
            x = transform(x)
        rows = select_tokens(run_to_hook(model, x, hook), model.cfg, tokens, hook).double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        n += len(rows)
    if total is None:
        raise ValueError("no images given")
    return (total / n).float()


def _replace_hook(value: Tensor | None, model_cfg: Any, tokens: str, hook_name: str):
    """Forward hook setting the selected tokens to ``value`` ([d] broadcast) or zeros when None."""

    def fn(act: Tensor, hook: Any) -> Tensor:
        if act.ndim != 3:
            raise ValueError(
                f"ablation needs a [batch, tokens, d] hook, {hook_name!r} gives {tuple(act.shape)}"
            )
        out = act.clone()
        sl = token_slice(model_cfg, tokens, act.shape[1])
        out[:, sl] = 0 if value is None else value.to(out.device, out.dtype)
        return out

    return fn


@torch.no_grad()
def ablation_gap(
    model: Any,
    images: Float[Tensor, "n c h w"],
    labels: Tensor,
    hook: str,
    *,
    tokens: str = "patches",
    mode: str = "mean",
    mean: Tensor | None = None,
    batch_size: int = 256,
    transform: Any = None,
) -> AblationGap:
    """KL and loss change when the ``tokens`` at ``hook`` are mean-ablated (``mode="mean"``: one mean vector
    over all selected tokens of ``images``, or ``mean`` if given, e.g. from training images) or zeroed."""
    check_hook(model, hook)
    if mode not in ("mean", "zero"):
        raise ValueError(f"mode must be 'mean' or 'zero', got {mode!r}")
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {TOKEN_SELECTIONS}, got {tokens!r}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}"
        )
    value = None
    if mode == "mean":
        value = (
            mean
            if mean is not None
            else mean_activation(
                model, images, hook, tokens=tokens, batch_size=batch_size, transform=transform
            )
        )
    device = _model_device(model)
    was_training = model.training
    model.eval()
    kls, l_c, l_a, a_c, a_a = [], 0.0, 0.0, 0.0, 0.0
    try:
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device, torch.float32)
            y = labels[i : i + batch_size].to(device)
            if transform is not None:
                x = transform(x)
            clean = model(x).float()
            abl = model.run_with_hooks(
                x, fwd_hooks=[(hook, _replace_hook(value, model.cfg, tokens, hook))]
            ).float()
            lp_c, lp_a = clean.log_softmax(-1), abl.log_softmax(-1)
            kls.append((lp_c.exp() * (lp_c - lp_a)).sum(-1).clamp_min(0).cpu())
            l_c += float(F.cross_entropy(clean, y, reduction="sum"))
            l_a += float(F.cross_entropy(abl, y, reduction="sum"))
            a_c += float((clean.argmax(-1) == y).sum())
            a_a += float((abl.argmax(-1) == y).sum())
    finally:
        model.train(was_training)
    kl = torch.cat(kls)
    n = len(images)
    return AblationGap(
        hook=hook,
        tokens=tokens,
        mode=mode,
        kl=float(kl.double().mean()),
        kl_per_image=kl,
        loss_clean=l_c / n,
        loss_ablated=l_a / n,
        accuracy_clean=a_c / n,
        accuracy_ablated=a_a / n,
        n_images=n,
    )


def ablation_gap_sweep(
    model: Any, images: Tensor, labels: Tensor, hooks: Iterable[str] | None = None, **kwargs: Any
) -> list[AblationGap]:
    """:func:`ablation_gap` at every hook (default: every block's ``hook_resid_post``)."""
    if hooks is None:
        hooks = [f"blocks.{i}.hook_resid_post" for i in range(int(model.cfg.n_layers))]
    return [ablation_gap(model, images, labels, h, **kwargs) for h in hooks]


def choose_hook(gaps: Iterable[AblationGap], min_gap: float = 0.2) -> str:
    """The deepest hook (last in the given order) whose ablation gap (KL, nats) is at least ``min_gap``.

    The seed paper reads a late block; this takes the latest one whose patch tokens still matter."""
    gaps = list(gaps)
    ok = [g for g in gaps if g.kl >= min_gap]
    if not ok:
        best = max(gaps, key=lambda g: g.kl, default=None)
        raise ValueError(
            f"no hook has an ablation gap >= {min_gap} nats; the largest is "
            + (f"{best.kl:.3f} at {best.hook!r}" if best else "(no hooks given)")
        )
    return ok[-1].hook


# ---- the PCA baseline -----------------------------------------------------------------------------


@dataclass
class PCABaseline:
    """Explained variance of the top-``k`` principal components (fit on training rows) on held-out rows."""

    k: int
    explained_variance: float
    train_explained_variance: float
    n_train: int
    n_heldout: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Rows per float64 chunk of the PCA passes. One float64 copy of 200,000 x 96 rows (and its centred twin) cost
# 3.6-5.6 s in fresh processes here (page faults on 150 MB temporaries), chunks of 16,384 rows 0.6-0.8 s, with
# the same EVs to 1e-16.
_PCA_CHUNK = 16384


def pca_components(train: Float[Tensor, "n d"], k: int) -> tuple[Tensor, Tensor]:
    """(mean [d], components [k, d]) of ``train``: exact eigendecomposition of the centred rows' float64
    covariance, accumulated in chunks."""
    if train.ndim != 2 or len(train) < 2:
        raise ValueError(f"train rows must be [n >= 2, d], got {tuple(train.shape)}")
    if not 1 <= k <= train.shape[1]:
        raise ValueError(f"k must be in [1, {train.shape[1]}] (the row width), got {k}")
    mean = _mean64(train)
    # d x d covariance then eigh: exact, and cheap for d ~ 100 whatever n
    cov = torch.zeros(train.shape[1], train.shape[1], dtype=torch.float64, device=train.device)
    for c in train.split(_PCA_CHUNK):
        xc = c.double() - mean
        cov.addmm_(xc.T, xc)
    _, vecs = torch.linalg.eigh(cov)
    return mean, vecs[:, -k:].flip(1).T.contiguous()


def _mean64(x: Tensor) -> Tensor:
    return sum(c.double().sum(0) for c in x.split(_PCA_CHUNK)) / len(x)


def _ev(x: Tensor, recon: Any, mean: Tensor | None = None) -> float:
    """1 - sum ||x - recon(x)||^2 / sum ||x - mean(x)||^2 over the rows of ``x``, in float64 chunks (``mean``:
    the rows' float64 mean when the caller has it)."""
    mean = _mean64(x) if mean is None else mean
    sst = sse = 0.0
    for c in x.split(_PCA_CHUNK):
        c = c.double()
        sst += float(((c - mean) ** 2).sum())
        sse += float(((c - recon(c)) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def pca_baseline(train: Float[Tensor, "n d"], heldout: Float[Tensor, "m d"], k: int) -> PCABaseline:
    """EV of the rank-``k`` PCA reconstruction ``mean + (x - mean) V V^T`` on ``heldout`` (the SAE's
    comparison: an SAE with L0 <= k should beat it, since PCA is a dense code of the same size)."""
    if heldout.ndim != 2 or heldout.shape[1] != train.shape[1] or len(heldout) < 2:
        raise ValueError(
            f"heldout rows must be [m >= 2, {train.shape[1]}] like train, got {tuple(heldout.shape)}"
        )
    mean, v = pca_components(train, k)

    def recon(x: Tensor) -> Tensor:
        return mean + (x - mean) @ v.T @ v

    return PCABaseline(
        k=int(k),
        explained_variance=_ev(heldout, recon),
        train_explained_variance=_ev(train, recon, mean),  # the PCA's mean is the training rows' own
        n_train=len(train),
        n_heldout=len(heldout),
    )


@torch.no_grad()
def spliced_kl_per_image(
    model: Any,
    sae: Any,
    images: Float[Tensor, "n c h w"],
    hook: str,
    *,
    tokens: str = "patches",
    batch_size: int = 256,
    transform: Any = None,
) -> Float[Tensor, " n"]:
    """KL(p_clean || p_spliced) per image (nats) with ``sae``'s reconstruction spliced in at ``hook``
    (selected tokens only). ``sae`` may come from another model: Kissane et al. (2024)'s cross-model splice."""
    return Splicer(
        model, images, hook, tokens=tokens, batch_size=batch_size, transform=transform
    ).kl_per_image(sae)
