import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mechvit.data import FASHION_MNIST_CLASSES, FashionMNIST, FashionMNISTError, load_fashion_mnist
from mechvit.data.fashion_mnist import DEFAULT_ROOT, parse_idx, resolve_root

HAVE_FMNIST = Path(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")


@needs_fmnist
def test_load_test_split_known_values():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # first test labels of Fashion-MNIST (ankle boot, pullover, trouser, ...) and a balanced split
    assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert y.bincount().tolist() == [1000] * 10
    # pixel values are k/255 exactly
    assert torch.equal(torch.round(x * 255) / 255, x)
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


@needs_fmnist
def test_dataset_wrapper_and_transform():
    ds = FashionMNIST("test", limit=5, transform=lambda t: t * 2)
    assert len(ds) == 5
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and y == 9 and float(x.max()) == 2.0


def _copy_test_split(dst: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.symlink(Path(DEFAULT_ROOT, name), dst / name)


@needs_fmnist
def test_root_from_env_and_uncompressed_files(tmp_path, monkeypatch):
    _copy_test_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with gzip.open(Path(DEFAULT_ROOT, "t10k-labels-idx1-ubyte.gz")) as f:
        (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(f.read())  # an unzipped copy verifies too
    monkeypatch.setenv("MECHVIT_DATA", str(tmp_path))
    assert resolve_root() == tmp_path
    _, y = load_fashion_mnist("test")
    assert y[:3].tolist() == [9, 2, 1]


@needs_fmnist
def test_damaged_file_is_reported(tmp_path):
    _copy_test_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with gzip.open(Path(DEFAULT_ROOT, "t10k-labels-idx1-ubyte.gz")) as f:
        raw = bytearray(f.read())
    raw[100] ^= 1  # one flipped bit, same size
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(FashionMNISTError, match="SHA-256.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw[:-5]))
    with pytest.raises(FashionMNISTError, match="10003 bytes after decompression, expected 10008"):
        load_fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(FashionMNISTError, match="damaged.*apt-get install"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_name_the_install_command(tmp_path):
    with pytest.raises(FashionMNISTError, match="not found.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(FashionMNISTError, match="does not exist.*MECHVIT_DATA"):
        load_fashion_mnist("train", root=tmp_path / "nope")


def test_bad_split():
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\], got 'val'"):
        load_fashion_mnist("val")


def test_parse_idx_round_trip_and_errors():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    np.testing.assert_array_equal(parse_idx(raw), arr)
    with pytest.raises(ValueError, match="declares shape"):
        parse_idx(raw[:-1])
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x01\x00\x08\x01")
    with pytest.raises(ValueError, match="0x0d not supported"):
        parse_idx(bytes([0, 0, 0x0D, 1, 0, 0, 0, 0]))
