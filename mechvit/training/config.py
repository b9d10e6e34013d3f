"""Configs for training, fine-tuning, PGD and evaluation: dataclasses loaded from YAML with validation.

Every key of a YAML file must name a field (an unknown key or a value of the wrong type raises a
``ValueError`` naming the key), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


@dataclass
class ModelSpec:
    """A timm model: ``timm.create_model(name, pretrained=pretrained, **kwargs)``."""

    name: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False


@dataclass
class DataConfig:
    """Where the images come from. ``dataset`` is ``fashion_mnist`` or ``imagefolder``.

    ``imagefolder`` reads ``root/train/<class>/*`` and ``root/val/<class>/*`` (``train_split``/``test_split``
    name the subfolders), resized to ``img_size``. Images reach the model as ``(x - mean) / std`` when
    ``mean``/``std`` are given (pretrained timm models), else as they are in [0, 1]; corruptions and
    attacks always act on the [0, 1] images.
    """

    dataset: str = "fashion_mnist"
    root: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    img_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    limit_train: int | None = None
    limit_test: int | None = None


@dataclass
class AugmentConfig:
    crop_padding: int = 2  # random crop after zero padding by this many pixels (0 = off)
    hflip: bool = True


@dataclass
class CorruptionFinetune:
    """Each batch is corrupted with probability ``p`` by a corruption drawn uniformly from ``seen`` at a
    severity drawn uniformly from ``severities``."""

    seen: list[str] = field(default_factory=list)
    severities: list[int] = field(default_factory=lambda: [3])
    p: float = 0.5


@dataclass
class PGDConfig:
    """L-inf PGD on [0, 1] images; ``steps=1, step_size=eps, random_start=False`` is FGSM.

    In adversarial training each batch is replaced by its adversarial copy with probability ``p``."""

    eps: float = 8 / 255
    steps: int = 10
    step_size: float = 2 / 255
    random_start: bool = True
    p: float = 1.0


@dataclass
class EvalConfig:
    """The robustness matrix: every corruption x severity on the test set (``n_test`` first images, or all)."""

    corruptions: list[str] | None = None  # None = every corruption in mechvit.corruptions.CORRUPTIONS
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    n_test: int | None = None
    batch_size: int = 500
    seed: int = 1234  # seeds the corruptions: every model sees identical corrupted images


@dataclass
class TrainConfig:
    """Base training (``init_from`` unset) or fine-tuning from a checkpoint folder (``init_from`` set).

    Fine-tuning keeps the checkpoint's architecture (``model`` must then be left out or match); it is
    corruption fine-tuning when ``corruption`` is set, PGD adversarial training when ``adversarial`` is set.
    """

    out: str
    model: ModelSpec | None = None
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    corruption: CorruptionFinetune | None = None
    adversarial: PGDConfig | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str | None = None
    num_threads: int | None = None
    keep_state: bool = False  # keep train_state.pt (the resumable state) after the run ends
    eval: EvalConfig | None = field(default_factory=EvalConfig)  # written into the card; None = clean only

    def __post_init__(self):
        check_positive(self, ("epochs", "batch_size", "lr"))
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.model is None and self.init_from is None:
            raise ValueError("config needs `model` (train from scratch) or `init_from` (fine-tune a checkpoint)")
        if self.corruption is not None:
            if not self.corruption.seen:
                raise ValueError("corruption.seen must list at least one corruption name, got []")
            if not 0 <= self.corruption.p <= 1:
                raise ValueError(f"corruption.p must be in [0, 1], got {self.corruption.p}")
            if not self.corruption.severities:
                raise ValueError("corruption.severities must list at least one severity, got []")
        if self.adversarial is not None:
            check_pgd(self.adversarial)


def check_positive(obj, names) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ValueError(f"{n} must be > 0, got {v!r}")


def check_pgd(cfg: PGDConfig) -> None:
    if cfg.eps < 0 or cfg.step_size < 0:
        raise ValueError(f"eps and step_size must be >= 0, got eps={cfg.eps}, step_size={cfg.step_size}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if not 0 <= cfg.p <= 1:
        raise ValueError(f"adversarial.p must be in [0, 1], got {cfg.p}")


# ---------------------------------------------------------------------------------------------------------
# dict/YAML -> dataclass with validation


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"config key {key!r}: expected {tp}, got None")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"config key {key!r}: expected {tp}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp} for {key!r}")
    raise ValueError(f"config key {key!r}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a dict; unknown keys and wrong types raise ``ValueError`` naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; known keys: {sorted(names)}")
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise ValueError(f"missing config key(s) {[prefix + k for k in missing]}")
    kwargs = {k: _convert(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def load_config(path: str | Path, cls=TrainConfig, overrides: dict | None = None):
    """Load a YAML config into ``cls``; ``overrides`` (dotted keys, e.g. ``{"epochs": 1}``) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    for dotted, v in (overrides or {}).items():
        d = data
        *parents, last = dotted.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
