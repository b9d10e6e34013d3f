"""Configs for training, fine-tuning, PGD and evaluation: dataclasses loaded from YAML with validation.

Every key of a YAML file must name a field (an unknown key or a value of the wrong type raises a
``ValueError`` naming the key path, see :mod:`mechvit._dataclass_yaml`), so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechvit._dataclass_yaml import ConfigError, apply_overrides, from_dict, read_yaml
from mechvit.data.loading import DataConfig

__all__ = [
    "AugmentConfig", "ConfigError", "CorruptionFinetune", "DataConfig", "EvalConfig", "ModelSpec", "PGDConfig",
    "TrainConfig", "check_pgd", "check_positive", "from_dict", "load_config", "to_dict",
]  # fmt: skip


@dataclass
class ModelSpec:
    """A timm model: ``timm.create_model(name, pretrained=pretrained, **kwargs)``."""

    name: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False


@dataclass
class AugmentConfig:
    crop_padding: int = 2  # random crop after zero padding by this many pixels (0 = off; >= 0)
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
    n_test: int | None = None  # None = every test image; else >= 1
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
    grad_clip: float | None = 1.0  # the largest gradient norm (> 0); None = no clipping
    seed: int = 0
    device: str | None = None
    num_threads: int | None = None
    keep_state: bool = False  # keep train_state.pt (the resumable state) after the run ends
    eval: EvalConfig | None = field(default_factory=EvalConfig)  # written into the card; None = clean only

    def __post_init__(self):
        check_positive(self, ("epochs", "batch_size", "lr"))
        if not math.isfinite(self.lr):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(
                f"min_lr must be in [0, lr={self.lr}] (the cosine schedule decays from lr to min_lr), "
                f"got {self.min_lr!r}"
            )
        if not (0 <= self.weight_decay and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(
                f"grad_clip must be a finite number > 0 (the largest gradient norm) or null (no clipping), "
                f"got {self.grad_clip!r}"
            )
        if self.augment.crop_padding < 0:
            raise ValueError(
                f"augment.crop_padding must be >= 0 pixels (0: no random crop), got {self.augment.crop_padding!r}"
            )
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.model is None and self.init_from is None:
            raise ValueError(
                "config needs `model` (train from scratch) or `init_from` (fine-tune a checkpoint)"
            )
        if self.corruption is not None:
            if not self.corruption.seen:
                raise ValueError("corruption.seen must list at least one corruption name, got []")
            if not 0 <= self.corruption.p <= 1:
                raise ValueError(f"corruption.p must be in [0, 1], got {self.corruption.p}")
            if not self.corruption.severities:
                raise ValueError("corruption.severities must list at least one severity, got []")
            check_corruptions(self.corruption.seen, "corruption.seen")
            check_severities(self.corruption.severities, "corruption.severities")
        if self.adversarial is not None:
            check_pgd(self.adversarial)
        if self.eval is not None:
            e = self.eval
            if e.corruptions is not None:
                check_corruptions(e.corruptions, "eval.corruptions")
            check_severities(e.severities, "eval.severities")
            if e.n_test is not None and not e.n_test >= 1:
                raise ValueError(
                    f"eval.n_test must be null (every test image) or an integer >= 1, got {e.n_test!r}"
                )
            if not e.batch_size >= 1:
                raise ValueError(f"eval.batch_size must be >= 1, got {e.batch_size!r}")


def check_corruptions(names, key: str) -> None:
    """Every name one of ``mechvit.corruptions.CORRUPTIONS``; the error names the key and the entry and says
    what is wrong in the words of ``mechvit.corruptions.corruption_problem`` (as the study config does). A
    ``ValueError``, not a ``ConfigError``: the loader prefixes it with ``TrainConfig:``."""
    from mechvit.corruptions import corruption_problem

    _first_problem(names, key, corruption_problem)


def check_severities(severities, key: str) -> None:
    """Every severity an integer in 1..5, in the words of ``mechvit.corruptions.severity_problem``."""
    from mechvit.corruptions import severity_problem

    _first_problem(severities, key, severity_problem)


def _first_problem(values, key: str, problem_of) -> None:
    for i, v in enumerate(values):
        if (problem := problem_of(v)) is not None:
            raise ValueError(f"{key}[{i}]: {problem}")


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


def load_config(path: str | Path, cls=TrainConfig, overrides: dict | None = None):
    """Load a YAML config into ``cls``; ``overrides`` (dotted keys, e.g. ``{"epochs": 1}``) win over the file."""
    data = apply_overrides(read_yaml(path), overrides or {})
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise type(e)(f"{path}: {e}") from e


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
