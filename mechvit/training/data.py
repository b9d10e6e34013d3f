"""Training-time data: augmentation. Loading, splits and normalisation live in :mod:`mechvit.data.loading`
(re-exported here for existing callers)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechvit.data.loading import (  # noqa: F401  (re-exported)
    DataConfig,
    Normalized,
    TensorData,
    batches,
    load_split,
    n_items,
)
from mechvit.training.config import AugmentConfig


def augment(
    x: Float[Tensor, "b c h w"], cfg: AugmentConfig, generator: torch.Generator | None = None
) -> Float[Tensor, "b c h w"]:
    """Random crop after zero padding (``crop_padding`` pixels) and random horizontal flip, per image."""
    b, _, h, w = x.shape
    p = cfg.crop_padding
    if p > 0:
        xp = nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B,1,H,1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B,1,1,W]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows, cols]
    if cfg.hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
