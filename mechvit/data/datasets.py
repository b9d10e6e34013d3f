"""Users' own data: an ImageFolder with a timm model's preprocessing, CIFAR-10-C and ImageNet-C.

All datasets yield ``(image float [C, H, W] in [0, 1], label int)``: mechvit corrupts images in [0, 1], so the
model's mean/std normalisation is *not* applied by default; apply it after corrupting with
:func:`normalize` (or pass ``normalize=True`` to :func:`timm_transform` for clean-only use).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import Dataset

from mechvit._checks import severity_problem  # the rule mechvit.corruptions checks too

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR_C_BLOCK = 10_000  # images per severity block in the released CIFAR-10-C files


def data_config(model: Any) -> dict[str, Any]:
    """timm preprocessing settings (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``) for a timm model, a timm model name, or a HookedViT built from one.

    The model's actual image size and channel count win over its ``pretrained_cfg`` (a model created with
    ``img_size=28, in_chans=1`` keeps the 224 px, 3-channel ``pretrained_cfg`` of its architecture); with one
    channel, mean and std become the average of the configured ones."""
    import timm
    import timm.data

    if isinstance(model, str):
        cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(model).to_dict())
        return cfg
    if isinstance(model, dict):
        return timm.data.resolve_data_config(pretrained_cfg=model)
    pretrained = getattr(model, "pretrained_cfg", None) or {}
    cfg = timm.data.resolve_data_config(pretrained_cfg=dict(pretrained))
    size, chans = None, None
    if hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None) is not None:
        size, chans = tuple(model.patch_embed.img_size), model.patch_embed.proj.in_channels
    elif hasattr(model, "cfg") and hasattr(model.cfg, "img_size"):  # HookedViT
        size, chans = tuple(model.cfg.img_size), model.cfg.in_chans
    if size is not None:
        cfg["input_size"] = (chans, *size)
        if len(cfg["mean"]) != chans:
            cfg["mean"] = (float(np.mean(cfg["mean"])),) * chans
            cfg["std"] = (float(np.mean(cfg["std"])),) * chans
    return cfg


def timm_transform(model: Any, *, normalize: bool = False):
    """timm's evaluation transform for ``model`` (resize, centre crop, to tensor; grey conversion for
    1-channel models). Without ``normalize`` the output stays in [0, 1], ready for ``corrupt``."""
    import timm.data
    from torchvision import transforms

    cfg = data_config(model)
    tf = timm.data.create_transform(**cfg, is_training=False, normalize=normalize)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    steps = [transforms.Lambda(lambda im: im.convert(mode)), *tf.transforms]
    if not normalize:  # timm then returns uint8 tensors
        steps.append(transforms.ConvertImageDtype(torch.float32))
    return transforms.Compose(steps)


def normalize(images: Float[Tensor, "n c h w"], mean, std) -> Float[Tensor, "n c h w"]:
    """``(images - mean) / std`` per channel (``mean``/``std`` as in :func:`data_config`)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def image_folder(
    root: str | os.PathLike, model: Any = None, *, transform=None, normalize: bool = False,
    classes: Sequence[str] | None = None,
):  # fmt: skip
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``) with ``model``'s timm transform (or
    ``transform``). Classes are the sorted sub-folder names (``dataset.classes``), or ``classes`` when given
    (e.g. a training split's, so that a test split's labels index the same classes): then label ``i`` is
    ``classes[i]``, a class folder not in ``classes`` is a ``ValueError`` and a class of ``classes`` without a
    folder here is fine (it has no images)."""
    from torchvision import datasets

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"ImageFolder root {root} does not exist (expected {root}/<class>/<image files>)"
        )
    if transform is None:
        if model is None:
            raise ValueError("pass a timm model (or model name) for its transform, or an explicit transform")
        transform = timm_transform(model, normalize=normalize)
    ds = datasets.ImageFolder(str(root), transform=transform)
    if classes is None:
        return ds
    classes = list(classes)
    extra = [c for c in ds.classes if c not in classes]
    if extra:
        raise ValueError(
            f"{root} has class folder(s) {', '.join(extra)} that the training classes lack; labels index the "
            f"training classes ({len(classes)}: {', '.join(classes[:20])}{', ...' if len(classes) > 20 else ''}), "
            "so every class folder here must be one of them"
        )
    to_idx = {c: i for i, c in enumerate(classes)}
    remap = [to_idx[c] for c in ds.classes]  # this folder's own index -> the given classes' index
    ds.samples = [(path, remap[t]) for path, t in ds.samples]
    ds.imgs = ds.samples
    ds.targets = [t for _, t in ds.samples]
    ds.classes, ds.class_to_idx = classes, to_idx
    return ds


def _cifar_c_names(root: Path) -> list[str]:
    return sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")


def load_cifar10_c(
    root: str | os.PathLike, corruption: str, severity: int
) -> tuple[Float[Tensor, "n 3 32 32"], Tensor]:
    """One corruption and severity of CIFAR-10-C: ``(images float [N,3,32,32] in [0,1], labels int64 [N])``.

    ``root`` holds ``<corruption>.npy`` (uint8 ``[5 * B, 32, 32, 3]``, severities 1..5 in consecutive blocks
    of ``B`` images; ``B`` = 10,000 in the released files) and ``labels.npy`` (``[5 * B]``)."""
    root = Path(root)
    if not (root / "labels.npy").is_file():
        raise FileNotFoundError(
            f"CIFAR-10-C folder {root} has no labels.npy (expected <corruption>.npy files)"
        )
    path = root / f"{corruption}.npy"
    if not path.is_file():
        raise ValueError(
            f"no {corruption}.npy in {root}; available: {', '.join(_cifar_c_names(root)) or 'none'}"
        )
    if (problem := severity_problem(severity)) is not None:
        raise ValueError(problem)
    severity = int(severity)
    images = np.load(path, mmap_mode="r")
    labels = np.load(root / "labels.npy", mmap_mode="r")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 [5*B, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) % 5 or len(labels) != len(images):
        raise ValueError(
            f"{path}: expected 5 equal severity blocks and as many labels, got {len(images)} images and "
            f"{len(labels)} labels"
        )
    block = len(images) // 5
    sl = slice((severity - 1) * block, severity * block)
    x = torch.from_numpy(np.array(images[sl])).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(np.asarray(labels[sl]).astype(np.int64))
    return x.contiguous(), y


class CIFAR10C(Dataset):
    """``Dataset`` over one corruption and severity of CIFAR-10-C (held in memory, 123 MB per block)."""

    classes = CIFAR10_CLASSES

    def __init__(self, root, corruption: str, severity: int, transform=None):
        self.images, self.labels = load_cifar10_c(root, corruption, severity)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), int(self.labels[i])


def imagenet_c(
    root: str | os.PathLike, corruption: str, severity: int, model: Any = None, *, transform=None,
    normalize: bool = False,
):  # fmt: skip
    """ImageNet-C (``root/<corruption>/<severity>/<wnid>/*.JPEG``) as an ``ImageFolder`` with ``model``'s timm
    transform. Class indices follow the sorted wnids, as for the ImageNet validation set."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"ImageNet-C root {root} does not exist (expected <corruption>/<severity>/<class>/)"
        )
    if not (root / corruption).is_dir():
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ValueError(f"no corruption {corruption!r} in {root}; available: {', '.join(names) or 'none'}")
    folder = root / corruption / str(severity)
    if not folder.is_dir():
        sev = sorted(p.name for p in (root / corruption).iterdir() if p.is_dir())
        raise ValueError(f"no severity {severity!r} for {corruption} in {root}; available: {', '.join(sev)}")
    return image_folder(folder, model, transform=transform, normalize=normalize)
