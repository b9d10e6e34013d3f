"""Small helpers shared by the analysis modules: input checks, hook names, batched cached runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechvit.sae.activations import run_to_hooks

BLOCK_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def check_images(images, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        got = (
            f"{type(images).__name__} {tuple(images.shape)}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise ValueError(f"{name} must be a float tensor [B, C, H, W], got {got}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got 0 images (shape {tuple(images.shape)})")


def check_labels(labels, n: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor [{n}], got {got}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor [{n}] of class indices, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def layer_hook_names(model, hook: str) -> list[str]:
    if hook not in BLOCK_HOOKS:
        raise ValueError(f"hook must be one of {BLOCK_HOOKS}, got {hook!r}")
    return [f"blocks.{layer}.hook_{hook}" for layer in range(model.cfg.n_layers)]


def batches(n: int, batch_size: int, progress: bool = False, desc: str = ""):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False)


@torch.no_grad()
def run_hook_batches(
    model,
    images: Tensor,
    names: Sequence[str],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
    desc: str = "",
    with_logits: bool = False,
) -> dict[str, Tensor]:
    """Run ``model`` over ``images`` in batches, keep the activations at ``names`` (on CPU).

    ``transform`` is applied to each batch's activation (e.g. a token reduction) before it is stored.
    With ``with_logits`` the logits are returned under the key ``"logits"``.
    """
    device = torch.device(device) if device is not None else model_device(model)
    wanted = set(names)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    if with_logits:
        out["logits"] = []
    for start in batches(images.shape[0], batch_size, progress, desc):
        x = images[start : start + batch_size].to(device)
        if with_logits:
            logits, cache = model.run_with_cache(x, names_filter=lambda n: n in wanted)
            out["logits"].append(logits.detach().cpu())
        else:
            cache = run_to_hooks(model, x, wanted)  # the forward stops at the last wanted hook
        for n in names:
            act = cache[n]
            out[n].append((transform(act) if transform is not None else act).detach().cpu())
        del cache
    return {n: torch.cat(v) for n, v in out.items()}


def bootstrap_counts(
    n: int, n_resamples: int, generator: torch.Generator, among: Tensor | None = None
) -> Tensor:
    """``[n_resamples, n]`` float64 draw counts of a bootstrap over ``n`` items on a torch generator (the torch
    twin of :func:`mechvit.analysis.statistics.bootstrap_weights`): each row draws ``len(among)`` of the item
    indices ``among`` (default: all ``n``) with replacement; items outside ``among`` count 0."""
    idx = torch.arange(n) if among is None else among
    draws = idx[torch.randint(len(idx), (n_resamples, len(idx)), generator=generator)]
    counts = torch.zeros(n_resamples, n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
