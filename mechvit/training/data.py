"""Data for training: Fashion-MNIST (in memory) or an ImageFolder, seeded batches, augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from mechvit.training.config import AugmentConfig, DataConfig

TensorData = tuple[Tensor, Tensor]


def load_split(cfg: DataConfig, split: str, model: nn.Module | None = None) -> TensorData | Dataset:
    """``(images, labels)`` tensors for Fashion-MNIST, a ``Dataset`` of ``(image [C,H,W] in [0,1], label)``
    for an ImageFolder (``mechvit.data.datasets.image_folder``: resized and centre-cropped to ``img_size``,
    or with ``model``'s timm evaluation transform when ``img_size`` is unset). ``split``: "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    limit = cfg.limit_train if split == "train" else cfg.limit_test
    if cfg.dataset == "fashion_mnist":
        from mechvit.data import load_fashion_mnist

        x, y = load_fashion_mnist(split, root=cfg.root)
        if cfg.img_size is not None and cfg.img_size != x.shape[-1]:
            x = nn.functional.interpolate(x, size=cfg.img_size, mode="bilinear", align_corners=False)
        return (x[:limit], y[:limit]) if limit is not None else (x, y)
    if cfg.dataset == "imagefolder":
        from mechvit.data.datasets import image_folder

        if cfg.root is None:
            raise ValueError("data.root must name the ImageFolder root for dataset 'imagefolder'")
        folder = Path(cfg.root) / (cfg.train_split if split == "train" else cfg.test_split)
        if not folder.is_dir():
            raise ValueError(f"ImageFolder split folder {folder} does not exist")
        if cfg.img_size is None and model is None:
            raise ValueError("dataset 'imagefolder' needs data.img_size (or a model for its timm transform)")
        tf = None
        if cfg.img_size is not None:
            from torchvision import transforms

            tf = transforms.Compose([
                transforms.Resize(cfg.img_size), transforms.CenterCrop(cfg.img_size), transforms.ToTensor(),
            ])  # fmt: skip
        ds = image_folder(folder, model, transform=tf)
        if limit is not None:
            ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        return ds
    raise ValueError(f"data.dataset must be 'fashion_mnist' or 'imagefolder', got {cfg.dataset!r}")


def n_items(data: TensorData | Dataset) -> int:
    return len(data[1]) if isinstance(data, tuple) else len(data)


def batches(
    data: TensorData | Dataset,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> Iterator[TensorData]:
    """Batches of ``(images, labels)``; the order is a function of ``generator`` only (reproducible)."""
    if isinstance(data, tuple):
        x, y = data
        idx = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
        for i in range(0, len(y), batch_size):
            j = idx[i : i + batch_size]
            yield x[j], y[j]
        return
    sampler = RandomSampler(data, generator=generator) if shuffle else SequentialSampler(data)
    yield from DataLoader(data, batch_size=batch_size, sampler=sampler)


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


class Normalized(nn.Module):
    """``model((x - mean) / std)``: lets corruptions and attacks act on [0, 1] images while a pretrained
    model sees the normalised input it expects. Without mean/std it is the identity wrapper."""

    def __init__(self, model: nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.model = model
        if (mean is None) != (std is None):
            raise ValueError(f"give both data.mean and data.std or neither, got mean={mean}, std={std}")
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.model(x)
