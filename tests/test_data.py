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


# ---- users' data formats -------------------------------------------------------------------------------------

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

from mechvit.data.datasets import (  # noqa: E402
    CIFAR10C,
    data_config,
    image_folder,
    imagenet_c,
    load_cifar10_c,
    normalize,
    timm_transform,
)


def _tiny_vit(in_chans=3, img_size=32):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8,
                             in_chans=in_chans, num_classes=2, embed_dim=16, depth=1, num_heads=2)  # fmt: skip


def _write_image(path: Path, rgb, size=(60, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(rgb)).save(path)


def test_data_config_uses_the_models_real_size_and_channels():
    cfg = data_config(_tiny_vit(in_chans=1, img_size=28))
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    cfg = data_config("vit_base_patch16_224")
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9


def test_image_folder_with_timm_transform(tmp_path):
    _write_image(tmp_path / "cat" / "a.png", (255, 0, 128))
    _write_image(tmp_path / "dog" / "b.jpg", (0, 255, 0), size=(33, 90))
    ds = image_folder(tmp_path, _tiny_vit())
    assert ds.classes == ["cat", "dog"] and len(ds) == 2
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    torch.testing.assert_close(x[:, 5, 7], torch.tensor([1.0, 0.0, 128 / 255]))  # [0, 1], not normalised
    x1, y1 = ds[1]
    assert x1.shape == (3, 32, 32) and y1 == 1 and float(x1[1].mean()) > 0.95  # jpeg of pure green
    xn, _ = image_folder(tmp_path, _tiny_vit(), normalize=True)[0]
    torch.testing.assert_close(xn, (x - 0.5) / 0.5)
    torch.testing.assert_close(normalize(x[None], (0.5,) * 3, (0.5,) * 3)[0], xn)
    grey, _ = image_folder(tmp_path, _tiny_vit(in_chans=1, img_size=24))[0]
    assert grey.shape == (1, 24, 24)
    expected = round((255 * 299 + 128 * 114) / 1000) / 255  # PIL's "L" conversion
    assert abs(float(grey[0, 3, 3]) - expected) <= 1 / 255
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nope", _tiny_vit())
    with pytest.raises(ValueError, match="pass a timm model"):
        image_folder(tmp_path)
    assert len(timm_transform(_tiny_vit()).transforms) >= 3


def _write_cifar_c(root: Path, names=("gaussian_noise", "fog"), block=3):
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(block, dtype=np.uint8), 5) % 10
    np.save(root / "labels.npy", labels)
    for k, name in enumerate(names):
        imgs = np.zeros((5 * block, 32, 32, 3), dtype=np.uint8)
        for s in range(5):
            for i in range(block):
                imgs[s * block + i] = 10 * (s + 1) + i + k
        np.save(root / f"{name}.npy", imgs)
    return labels


def test_cifar10_c_blocks(tmp_path):
    _write_cifar_c(tmp_path)
    x, y = load_cifar10_c(tmp_path, "gaussian_noise", 2)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert [round(float(v) * 255) for v in x[:, 0, 0, 0]] == [20, 21, 22]
    assert y.tolist() == [0, 1, 2]
    x5, _ = load_cifar10_c(tmp_path, "fog", 5)
    assert round(float(x5[0, 2, 31, 31]) * 255) == 51
    ds = CIFAR10C(tmp_path, "gaussian_noise", 1)
    assert len(ds) == 3 and ds[2][1] == 2 and ds.classes[0] == "airplane"
    with pytest.raises(ValueError, match="no snow.npy.*available: fog, gaussian_noise"):
        load_cifar10_c(tmp_path, "snow", 1)
    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5, got 6"):
        load_cifar10_c(tmp_path, "fog", 6)
    # mechvit.corruptions.severity_problem's check and words: 2.0 is refused, a string shows its type
    with pytest.raises(ValueError, match=r"severity must be an integer in 1\.\.5, got float 2\.0"):
        load_cifar10_c(tmp_path, "fog", 2.0)
    with pytest.raises(ValueError, match=r"got str '3'"):
        load_cifar10_c(tmp_path, "fog", "3")
    assert len(load_cifar10_c(tmp_path, "fog", np.int64(2))[0]) == 3
    from mechvit.corruptions import severity_problem

    for bad in (0, 6, 2.0, 2.5, True, "3", None):  # the twin of the shared check says the same
        with pytest.raises(ValueError) as err:
            load_cifar10_c(tmp_path, "fog", bad)
        assert str(err.value) == severity_problem(bad)
    np.save(tmp_path / "labels.npy", np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="5 equal severity blocks and as many labels, got 15 images and 7"):
        load_cifar10_c(tmp_path, "fog", 1)
    with pytest.raises(FileNotFoundError, match="no labels.npy"):
        load_cifar10_c(tmp_path / "empty", "fog", 1)


def test_imagenet_c_layout(tmp_path):
    for wnid, rgb in (("n01440764", (10, 20, 30)), ("n01443537", (200, 100, 0))):
        for k in range(2):
            _write_image(tmp_path / "gaussian_blur" / "3" / wnid / f"ILSVRC2012_val_{k}.JPEG", rgb, (80, 64))
    (tmp_path / "gaussian_blur" / "5").mkdir()
    ds = imagenet_c(tmp_path, "gaussian_blur", 3, _tiny_vit())
    assert ds.classes == ["n01440764", "n01443537"] and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and y == 1 and abs(float(x[0].mean()) - 200 / 255) < 0.03
    with pytest.raises(ValueError, match="no corruption 'fog'.*available: gaussian_blur"):
        imagenet_c(tmp_path, "fog", 3, _tiny_vit())
    with pytest.raises(ValueError, match="no severity 2 for gaussian_blur.*available: 3, 5"):
        imagenet_c(tmp_path, "gaussian_blur", 2, _tiny_vit())


def test_normalisation_settings_are_checked_with_clear_errors():
    import timm

    from mechvit import HookedViT
    from mechvit.data.loading import DataConfig, Normalized

    with pytest.raises(ValueError, match=r"data.std must be > 0 for every channel, got \[0.5, 0.0, 0.5\]"):
        DataConfig(mean=[0.5, 0.5, 0.5], std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="one value per channel each, got 3 and 2"):
        DataConfig(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5])
    with pytest.raises(ValueError, match="give both data.mean and data.std or neither"):
        DataConfig(mean=[0.5])
    model = HookedViT.from_timm(
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=28,
            patch_size=7,
            in_chans=1,
            embed_dim=32,
            depth=1,
            num_heads=2,
            num_classes=10,
        )  # fmt: skip
    )
    with pytest.raises(ValueError, match=r"have 3 values but the model takes 1 channel\(s\)"):
        Normalized(model, [0.5] * 3, [0.2] * 3)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(Normalized(model, [0.5], [0.25])(x), model((x - 0.5) / 0.25))


def test_study_config_reports_bad_normalisation_at_its_key():
    from mechvit.study.config import load_study_config

    with pytest.raises(ValueError, match=r"^data: data.std must be > 0"):
        load_study_config(None, {"data.mean": [0.5], "data.std": [-1.0]})


# ---------------------------------------------------------------------------------- limits and class indices


def _write_split(root: Path, classes_and_counts: dict[str, int]) -> None:
    """``root/<class>/<i>.png``: small grey images, one grey level per image of a class."""
    for c, n in classes_and_counts.items():
        for i in range(n):
            _write_image(root / c / f"{i:02d}.png", (40 * (ord(c[0]) % 5) + i,) * 3, size=(12, 12))


def test_data_limits_must_be_null_or_positive():
    from mechvit.data.loading import DataConfig
    from mechvit.training.config import load_config

    for key in ("limit_train", "limit_test"):
        for bad in (-100, 0, True):
            with pytest.raises(
                ValueError,
                match=rf"data\.{key} must be null \(every image\) or an integer >= 1, got {bad!r}$",
            ):
                DataConfig(**{key: bad})
    assert DataConfig(limit_train=1, limit_test=np.int64(5)).limit_train == 1
    cfg = Path(__file__).resolve().parents[1] / "configs" / "train_base.yaml"
    # through a training config: the file and the key (was: -100 silently dropped the last 100 images)
    with pytest.raises(
        ValueError, match=r"train_base\.yaml: data: data\.limit_train must be null .* got -100$"
    ):
        load_config(cfg, overrides={"data.limit_train": -100})


def test_imagefolder_test_labels_index_the_train_classes(tmp_path):
    """The test split's labels are the train split's class indices: a test split without 'dog' used to label
    its 'fox' images 1, which is 'dog' for the model. A test class the train split lacks is an error."""
    from mechvit.data.loading import DataConfig, load_split

    _write_split(tmp_path / "train", {"cat": 2, "dog": 2, "fox": 2})
    _write_split(tmp_path / "val", {"cat": 1, "fox": 3})
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), test_split="val", img_size=8)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.classes == test.classes == ["cat", "dog", "fox"]
    assert [t for _, t in train.samples] == [0, 0, 1, 1, 2, 2]
    assert [(Path(p).parent.name, t) for p, t in test.samples] == [("cat", 0)] + [("fox", 2)] * 3
    assert [int(test[i][1]) for i in range(len(test))] == [0, 2, 2, 2]
    _write_split(tmp_path / "val", {"wolf": 1})
    with pytest.raises(ValueError, match=r"val has class folder\(s\) wolf that the training classes lack"):
        load_split(cfg, "test")
    with pytest.raises(ValueError, match=r"train split folder .*nope does not exist"):
        load_split(DataConfig(dataset="imagefolder", root=str(tmp_path), train_split="nope", test_split="val",
                              img_size=8), "test")  # fmt: skip


def test_imagefolder_limits_take_a_seeded_stratified_subset(tmp_path):
    """ImageFolder files are in class order: limit_train=12 of 3 x 10 images used to be classes 0 and 1 only
    (10 + 2). Now every class in proportion, the same subset on every call, a smaller limit a prefix of a
    larger one; Fashion-MNIST keeps its first n images."""
    from mechvit.data.loading import DataConfig, load_split

    _write_split(tmp_path / "train", {"a": 10, "b": 10, "c": 10})
    _write_split(tmp_path / "test", {"a": 6, "b": 3, "c": 3})
    cfg = DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=8, limit_train=12, limit_test=4)
    train = load_split(cfg, "train")
    labels = [int(train[i][1]) for i in range(len(train))]
    assert len(train) == 12 and np.bincount(labels).tolist() == [4, 4, 4]
    assert list(load_split(cfg, "train").indices) == list(train.indices)  # seeded: the same every time
    assert sorted(train.indices) != list(range(12))
    small = load_split(
        DataConfig(dataset="imagefolder", root=str(tmp_path), img_size=8, limit_train=5), "train"
    )
    assert list(small.indices) == list(train.indices)[:5]
    test_labels = [int(y) for _, y in load_split(cfg, "test")]
    assert np.bincount(test_labels).tolist() == [2, 1, 1]  # in proportion to the split's 6 / 3 / 3
    # the order itself: a known answer for unequal classes, and every index exactly once
    from mechvit.data.loading import stratified_order

    targets = np.array([0] * 6 + [1] * 3 + [2] * 3)
    order = stratified_order(targets)
    assert sorted(order) == list(range(12))
    # class 0's r-th image sits at (r + 1/2) / 6 of the order, classes 1 and 2's at (r + 1/2) / 3 (ties by class)
    assert targets[order].tolist() == [0, 1, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0]
    assert np.bincount(targets[order[:8]]).tolist() == [4, 2, 2]
    assert stratified_order([]) == []


@needs_fmnist
def test_fashion_mnist_limits_keep_the_first_images():
    from mechvit.data.loading import DataConfig, load_split

    x, y = load_split(DataConfig(limit_train=7, limit_test=10), "test")
    full_x, _ = load_fashion_mnist("test")
    assert y.tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7] and torch.equal(x, full_x[:10])
