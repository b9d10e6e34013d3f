"""L-inf PGD and FGSM on images in [0, 1]."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn


def pgd(
    model: nn.Module | Callable[[Tensor], Tensor],
    images: Float[Tensor, "b c h w"],
    labels: Int[Tensor, " b"],
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Float[Tensor, "b c h w"]:
    """Untargeted L-inf PGD (Madry et al.): ``steps`` signed-gradient ascent steps of size ``step_size``
    on ``loss_fn`` (cross-entropy by default), each projected back onto the eps-ball around ``images``
    and onto [0, 1]. ``random_start`` starts from a uniform point of the ball (drawn from ``generator``,
    a CPU generator, when given). Returns detached adversarial images; ``model``'s mode and its
    parameters' gradients are left as they were.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1], got values in [{images.min():.3f}, {images.max():.3f}]")
    step_size = eps / max(steps, 1) * 2.5 if step_size is None else step_size
    loss_fn = loss_fn or F.cross_entropy
    x0 = images.detach()
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = (x0 + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x = x0.clone()
    params = [p for p in model.parameters()] if isinstance(model, nn.Module) else []
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():  # works inside torch.no_grad() too
            x = _ascend(model, loss_fn, x, x0, labels, eps, steps, step_size)
    finally:
        for p, r in zip(params, saved, strict=True):
            p.requires_grad_(r)
    return x.detach()


def _ascend(model, loss_fn, x, x0, labels, eps, steps, step_size):
    for _ in range(steps):
        x.requires_grad_(True)
        loss = loss_fn(model(x), labels)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x + step_size * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
    return x


def fgsm(model, images: Tensor, labels: Tensor, *, eps: float, loss_fn=None) -> Tensor:
    """FGSM (Goodfellow et al.): one signed-gradient step of size ``eps``; PGD with one step, no random start."""
    return pgd(model, images, labels, eps=eps, steps=1, step_size=eps, random_start=False, loss_fn=loss_fn)
