"""Attribution patching: a first-order estimate of a whole activation-patching sweep from one forward and one
backward pass per image batch (Nanda 2023, "Attribution Patching"; Syed et al. 2023).

For a patched variant that replaces the receiving run's activation ``a`` by the source run's ``a'`` on a
set ``S`` of elements (a token, a head, an SAE feature, ...), the patched logit difference is, to first order,

    LD(patched) ~= LD(receiving) + sum over S of (a' - a) * dLD/da        (gradient taken on the receiving run)

so one backward pass of the receiving run's ``LD`` gives every variant of every layer and component at once.
Scores use the exact sweep's metric and result type (``mechvit.analysis.patching``: normalised by
``mean LD_clean - mean LD_corrupted``, the same ``other`` class per image, the same ``PatchingResult`` dims
and labels), so ``attribution_patching(...)`` and ``activation_patching(...)`` take the same arguments and
``activation_patching(..., method="attribution")`` switches between them.

SAE features (``component="sae"``): the code change ``z' - z`` of the masked features times the gradient
with respect to the codes, ``J_decode^T dLD/da`` (exact for sae-lens's linear decoder), the error term kept as
in the exact sweep.

The estimate is exact when LD is linear in the patched activation (e.g. the last ``resid_post`` of a model
whose readout has no norm) and degrades where LayerNorm, softmax attention and GELU curve between the two
runs; docs/analysis.md measures where on the shipped model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mechvit.analysis._utils import batches, model_device
from mechvit.analysis.patching import (
    COMPONENTS,
    PatchingResult,
    _check_inputs,
    _names,
    _plan,
    _result,
    best_other,
    hook_name,
    logit_diff,
)

# Each component's default ``by`` when ``components`` lists bare names.
DEFAULT_BY = {
    "resid_pre": "position",
    "resid_mid": "position",
    "resid_post": "position",
    "attn_out": "position",
    "mlp_out": "position",
    "z": "head",
    "pattern": "head",
    "sae": "feature",
}


def _contribution(component: str, delta_times_grad: Tensor) -> Tensor:
    """``(a' - a) * dLD/da`` summed over the elements no variant indexes, to the plan's per-example mask
    shape (summed over images too): resid [B, T, D] -> [T]; z [B, T, H, dh] -> [T, H];
    pattern [B, H, Tq, Tk] -> [H, Tq]; sae codes [B, T, F] -> [T, F]."""
    x = delta_times_grad.double()
    if component == "sae":
        return x.sum(0)
    return x.sum(-1).sum(0)


def attribution_patching(
    model,
    clean_images: Tensor,
    corrupted_images: Tensor,
    labels: Tensor,
    *,
    component: str = "resid_pre",
    by: str = "position",
    components: Sequence[str | tuple[str, str]] | None = None,
    direction: str = "clean_to_corrupted",
    corrupted_model=None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    features: Sequence[int] | None = None,
    sae=None,
    sae_hook: str | None = None,
    batch_size: int = 64,
    max_rows: int | None = None,
    batched: bool = True,
    progress: bool = True,
) -> PatchingResult | dict:
    """First-order estimate of ``activation_patching`` with the same arguments and result layout.

    One ``component``/``by`` gives one ``PatchingResult``. ``components=[...]`` (names, each with its
    ``DEFAULT_BY``, or ``(component, by)`` pairs) estimates them all from the same forward/backward passes and
    returns ``{item: PatchingResult}`` keyed by the items as given. ``max_rows`` and ``batched`` are accepted
    so that a call to the exact sweep can switch to this one unchanged; they do not apply here.
    ``result.meta["method"]`` is ``"attribution"``.
    """
    corrupted_model = model if corrupted_model is None else corrupted_model
    labels = _check_inputs(
        model, corrupted_model, clean_images, corrupted_images, labels, direction, sae_hook
    )
    del max_rows, batched
    items = [(component, by)] if components is None else list(components)
    if not items:
        raise ValueError("components must list at least one component, got an empty list")
    pairs = []
    for it in items:
        if isinstance(it, str):
            if it not in DEFAULT_BY:
                raise ValueError(f"component must be one of {COMPONENTS}, got {it!r}")
            pairs.append((it, DEFAULT_BY[it]))
        elif isinstance(it, tuple) and len(it) == 2:
            pairs.append(it)
        else:
            raise ValueError(f"components items must be a name or a (component, by) pair, got {it!r}")
    plans = [_plan(model, c, b, layers, positions, heads, features, sae, sae_hook) for c, b in pairs]
    names_of = [_names(p, c, sae_hook) for p, (c, _) in zip(plans, pairs, strict=True)]
    names = sorted({n for ns in names_of for n in ns})

    if direction == "clean_to_corrupted":
        recv_model, recv_x, src_model, src_x = corrupted_model, corrupted_images, model, clean_images
    else:
        recv_model, recv_x, src_model, src_x = model, clean_images, corrupted_model, corrupted_images
    device = model_device(recv_model)
    # summed over images: per hook name, the contribution tensor of each component that reads it
    contrib: dict[tuple[str, str], Tensor] = {}
    lds_clean, lds_corr = [], []
    acts: dict[str, Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act

    for s in batches(clean_images.shape[0], batch_size, progress, "attribution patching (image batches)"):
        y = labels[s : s + batch_size].to(device)
        with torch.no_grad():
            src_logits, src_cache = src_model.run_with_cache(
                src_x[s : s + batch_size].to(device), names_filter=lambda n: n in names
            )
        # the input requires grad so that every activation does, even in a model with frozen weights
        x = recv_x[s : s + batch_size].to(device).detach().requires_grad_(True)
        with torch.enable_grad(), recv_model.hooks(fwd_hooks=[(n, keep) for n in names]):
            recv_logits = recv_model(x)
            corr_logits = recv_logits if direction == "clean_to_corrupted" else src_logits
            other = best_other(corr_logits.detach(), y)
            ld_recv = logit_diff(recv_logits, y, other)
            grads = torch.autograd.grad(ld_recv.sum(), [acts[n] for n in names])
        ld_src, ld_recv = logit_diff(src_logits, y, other).detach(), ld_recv.detach()
        lds_clean.append((ld_src if direction == "clean_to_corrupted" else ld_recv).double().cpu())
        lds_corr.append((ld_recv if direction == "clean_to_corrupted" else ld_src).double().cpu())
        grad = dict(zip(names, grads, strict=True))
        keys = {(c, n) for (c, _), ns in zip(pairs, names_of, strict=True) for n in ns}
        for c, n in sorted(keys):
            if c == "sae":
                with torch.no_grad():
                    z = sae.encode(acts[n].detach()).requires_grad_(True)
                with torch.enable_grad():
                    (gz,) = torch.autograd.grad(sae.decode(z), z, grad_outputs=grad[n])
                with torch.no_grad():
                    val = _contribution(c, (sae.encode(src_cache[n]) - z.detach()) * gz)
            else:
                val = _contribution(c, (src_cache[n] - acts[n].detach()) * grad[n])
            contrib[(c, n)] = contrib[(c, n)] + val if (c, n) in contrib else val
        acts.clear()
        del grads, grad, src_cache
    ld_clean, ld_corr = torch.cat(lds_clean), torch.cat(lds_corr)
    ld_recv_sum = float((ld_corr if direction == "clean_to_corrupted" else ld_clean).sum())
    out = {}
    for it, plan, (c, b) in zip(items, plans, pairs, strict=True):
        sum_ld = torch.empty(len(plan.variants), dtype=torch.float64)
        for i, (lay, index) in enumerate(plan.variants):
            n = sae_hook if c == "sae" else hook_name(c, lay)
            sum_ld[i] = ld_recv_sum + float(contrib[(c, n)][index].sum())
        meta = {"by": b, **({"sae_hook": sae_hook} if sae_hook else {}), "method": "attribution"}
        out[it] = _result(plan, c, direction, sum_ld, ld_clean, ld_corr, model, meta)
    return out[items[0]] if components is None else out
