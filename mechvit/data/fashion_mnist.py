"""Fashion-MNIST from its gzipped IDX files (Debian package ``dataset-fashion-mnist``).

The folder is taken from the ``root`` argument, else the ``MECHVIT_DATA`` environment variable, else
``/usr/share/datasets/fashion-mnist/``. Each file's size and SHA-256 are checked against the values recorded
below (of the decompressed IDX bytes, so the Debian files, the upstream Zalando files and unzipped copies all
verify), and a missing or damaged file raises an error that says how to install the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int64
from torch import Tensor
from torch.utils.data import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist/"
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (or `make data`), "
    "or point MECHVIT_DATA (or root=) at a folder holding the four Fashion-MNIST IDX files"
)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without ".gz"
    n_bytes: int  # size of the decompressed IDX file
    sha256: str  # SHA-256 of the decompressed IDX bytes
    gz_sha256: str  # SHA-256 of the Debian .gz file (informational; the raw checksum is what is verified)


FILES: dict[str, tuple[IdxFile, IdxFile]] = {
    "train": (
        IdxFile("train-images-idx3-ubyte", 47_040_016,
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
        IdxFile("train-labels-idx1-ubyte", 60_008,
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    ),
    "test": (
        IdxFile("t10k-images-idx3-ubyte", 7_840_016,
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
        IdxFile("t10k-labels-idx1-ubyte", 10_008,
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
    ),
}  # fmt: skip

_IDX_DTYPES = {0x08: np.uint8}


class FashionMNISTError(FileNotFoundError):
    """A Fashion-MNIST file is missing or damaged."""


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$MECHVIT_DATA``, else the Debian location."""
    return Path(root if root is not None else os.environ.get("MECHVIT_DATA") or DEFAULT_ROOT)


def _read_raw(folder: Path, spec: IdxFile) -> bytes:
    for path, opener in ((folder / f"{spec.name}.gz", gzip.open), (folder / spec.name, open)):
        if path.is_file():
            try:
                with opener(path, "rb") as f:
                    raw = f.read()
            except (OSError, EOFError) as e:
                raise FashionMNISTError(f"Fashion-MNIST file {path} is damaged ({e}); {INSTALL_HINT}") from e
            if len(raw) != spec.n_bytes:
                raise FashionMNISTError(
                    f"Fashion-MNIST file {path} is damaged: {len(raw)} bytes after decompression, "
                    f"expected {spec.n_bytes}; {INSTALL_HINT}"
                )
            digest = hashlib.sha256(raw).hexdigest()
            if digest != spec.sha256:
                raise FashionMNISTError(
                    f"Fashion-MNIST file {path} is damaged: SHA-256 {digest}, expected {spec.sha256}; "
                    f"{INSTALL_HINT}"
                )
            return raw
    raise FashionMNISTError(f"Fashion-MNIST file {spec.name}.gz not found in {folder}; {INSTALL_HINT}")


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX byte string (unsigned-byte data) into a numpy array of its declared shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError("not an IDX file: expected magic bytes 00 00 <type> <ndim>")
    dtype, ndim = raw[2], raw[3]
    if dtype not in _IDX_DTYPES:
        raise ValueError(f"IDX data type 0x{dtype:02x} not supported; expected 0x08 (unsigned byte)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    n = int(np.prod(shape)) if shape else 0
    if len(raw) - offset != n:
        raise ValueError(
            f"IDX header declares shape {shape} ({n} values) but {len(raw) - offset} bytes follow"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[Float[Tensor, "n 1 28 28"], Int64[Tensor, " n"]]:
    """Load a Fashion-MNIST split: ``(images float32 [N,1,28,28] in [0,1], labels int64 [N])``."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = resolve_root(root)
    if not folder.is_dir():
        raise FashionMNISTError(f"Fashion-MNIST folder {folder} does not exist; {INSTALL_HINT}")
    image_spec, label_spec = FILES[split]
    images = parse_idx(_read_raw(folder, image_spec))
    labels = parse_idx(_read_raw(folder, label_spec))
    x = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


class FashionMNIST(Dataset):
    """A map-style ``Dataset`` over a Fashion-MNIST split (the whole split is held in memory, 47 MB for train).

    ``transform`` (if given) is applied to each ``[1,28,28]`` float image tensor; ``limit`` keeps the first
    ``limit`` images.
    """

    def __init__(self, split: str = "train", root=None, transform=None, limit: int | None = None):
        self.images, self.labels = load_fashion_mnist(split, root)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.transform = transform
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])
