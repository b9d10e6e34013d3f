"""Image splits as the models and the study see them: which dataset, which split, how many images,
normalisation. ``load_split(DataConfig(...), "test")`` gives Fashion-MNIST as tensors or an ImageFolder as a
``Dataset``; :class:`Normalized` wraps a model that expects normalised input so corruptions and attacks act on
[0, 1] images. Training (:mod:`mechvit.training`), the evaluate command and the study all load through here.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

TensorData = tuple[Tensor, Tensor]


@dataclass
class DataConfig:
    """Where the images come from. ``dataset`` is ``fashion_mnist`` or ``imagefolder``.

    ``imagefolder`` reads ``root/train/<class>/*`` and ``root/val/<class>/*`` (``train_split``/``test_split``
    name the subfolders), resized to ``img_size``. Class indices come from the train split's class folders
    (sorted), for the test split too: a test class folder the train split lacks is an error, a train class
    without test images is fine. Images reach the model as ``(x - mean) / std`` when ``mean``/``std`` are
    given (pretrained timm models), else as they are in [0, 1]; corruptions and attacks always act on the
    [0, 1] images.

    ``limit_train``/``limit_test`` (None: every image; else an integer >= 1) keep that many images of the
    split. Fashion-MNIST: the first n (its files are already in mixed class order). ImageFolder (whose images
    are in class order, so the first n would be one or two whole classes): a seeded, stratified subset
    (:func:`stratified_order`): every class in proportion to its size, in a fixed mixed order whose first n
    images are the subset for ``limit = n`` (a smaller limit keeps a prefix of a larger one's subset).
    """

    dataset: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    img_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    limit_train: int | None = None  # n images of the split (None: all); see the class docstring
    limit_test: int | None = None

    def __post_init__(self) -> None:
        check_mean_std(self.mean, self.std)
        for key in ("limit_train", "limit_test"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"data.{key} must be null (every image) or an integer >= 1, got {v!r}")


SUBSET_SEED = 0  # seeds the ImageFolder subsets of limit_train / limit_test (stratified_order)


def stratified_order(targets, seed: int = SUBSET_SEED) -> list[int]:
    """A seeded order of the indices ``0..len(targets)-1`` that mixes the classes in proportion: each class's
    indices are shuffled (one ``torch.randperm`` per class, in sorted class order, from a generator seeded
    with ``seed``), and its ``r``-th index (of ``n_c``) is placed at the fraction ``(r + 1/2) / n_c`` of the
    order (ties by class). So the first ``n`` indices hold every class in proportion to its size (within
    one image), and the first ``n`` of the order are always the first ``n`` of any longer prefix."""
    targets = np.asarray(targets)
    g = torch.Generator().manual_seed(seed)
    idx, frac, cls = [], [], []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        perm = torch.randperm(len(members), generator=g).numpy()
        idx.append(members[perm])
        frac.append((np.arange(len(members)) + 0.5) / len(members))
        cls.append(np.full(len(members), c))
    if not idx:
        return []
    idx, frac, cls = np.concatenate(idx), np.concatenate(frac), np.concatenate(cls)
    return idx[np.lexsort((cls, frac))].tolist()


def split_classes(cfg: DataConfig) -> list[str]:
    """The classes of an ImageFolder config: the train split's class folders, sorted (their indices are the
    labels of both splits)."""
    from torchvision.datasets.folder import find_classes

    folder = Path(cfg.root) / cfg.train_split
    if not folder.is_dir():
        raise ValueError(
            f"ImageFolder train split folder {folder} does not exist: the class indices of every split are "
            f"the train split's sorted class folders (data.train_split names it)"
        )
    return find_classes(str(folder))[0]


def check_mean_std(mean, std, channels: int | None = None) -> None:
    """Per-channel normalisation must come as both ``mean`` and ``std`` (or neither), of one length (1 or
    ``channels``), with every std > 0; a ValueError says which rule is broken and what was given."""
    if (mean is None) != (std is None):
        raise ValueError(f"give both data.mean and data.std or neither, got mean={mean}, std={std}")
    if mean is None:
        return
    if len(mean) != len(std) or len(mean) == 0:
        raise ValueError(
            f"data.mean and data.std need one value per channel each, got {len(mean)} and {len(std)}"
        )
    if any(not s > 0 for s in std):
        raise ValueError(f"data.std must be > 0 for every channel, got {list(std)}")
    if channels is not None and len(mean) not in (1, channels):
        raise ValueError(
            f"data.mean/std have {len(mean)} values but the model takes {channels} channel(s): expected 1 or {channels}"
        )


def load_split(cfg: DataConfig, split: str, model: nn.Module | None = None) -> TensorData | Dataset:
    """``(images, labels)`` tensors for Fashion-MNIST, a ``Dataset`` of ``(image [C,H,W] in [0,1], label)``
    for an ImageFolder (``mechvit.data.datasets.image_folder``: resized and centre-cropped to ``img_size``,
    or with ``model``'s timm evaluation transform when ``img_size`` is unset; labels index the train split's
    classes, :func:`split_classes`). ``split``: "train" or "test". Limits: see :class:`DataConfig`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    limit = cfg.limit_train if split == "train" else cfg.limit_test
    if cfg.dataset == "fashion_mnist":
        from mechvit.data.fashion_mnist import load_fashion_mnist

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
        ds = image_folder(folder, model, transform=tf, classes=split_classes(cfg))
        if limit is not None:
            ds = torch.utils.data.Subset(ds, stratified_order(ds.targets)[:limit])
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


class Normalized(nn.Module):
    """``model((x - mean) / std)``: lets corruptions and attacks act on [0, 1] images while a pretrained
    model sees the normalised input it expects. Without mean/std it is the identity wrapper."""

    def __init__(self, model: nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.model = model
        cfg = getattr(model, "cfg", None)
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        channels = getattr(cfg, "in_chans", None) or getattr(proj, "in_channels", None)
        check_mean_std(mean, std, channels)
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.model(x)


def as_tensors(data: TensorData | Dataset) -> TensorData:
    """``(images float [N,C,H,W], labels long [N])`` of a split (a Dataset is read into memory)."""
    if isinstance(data, tuple):
        return data[0].float().contiguous(), data[1].long()
    if len(data) == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    xs, ys = zip(*[(x, y) for x, y in data], strict=True)
    return torch.stack(xs).float(), torch.tensor(ys).long()


__all__ = [
    "DataConfig",
    "Normalized",
    "SUBSET_SEED",
    "check_mean_std",
    "split_classes",
    "stratified_order",
    "TensorData",
    "as_tensors",
    "batches",
    "load_split",
    "n_items",
]
