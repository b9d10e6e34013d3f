"""Models to study: base training, corruption fine-tuning, PGD adversarial training, robustness evaluation.

``train(load_config("configs/train_base.yaml"))`` writes a checkpoint folder (``model.safetensors`` +
``card.json``); ``load_checkpoint(dir)`` rebuilds the timm model (``HookedViT.from_timm(load_checkpoint(dir))``
hooks it); ``evaluate_checkpoints([...])`` measures the robustness matrix.
"""

from mechvit.training.attacks import fgsm, pgd
from mechvit.training.checkpoint import load_checkpoint, read_card, save_checkpoint
from mechvit.training.config import (
    AugmentConfig,
    CorruptionFinetune,
    DataConfig,
    EvalConfig,
    ModelSpec,
    PGDConfig,
    TrainConfig,
    load_config,
)
from mechvit.training.evaluate import (
    classification_metrics,
    corruption_errors,
    evaluate_checkpoints,
    expected_calibration_error,
    robustness_matrix,
    seen_unseen_summary,
)
from mechvit.training.train import finetune, train

__all__ = [
    "AugmentConfig", "CorruptionFinetune", "DataConfig", "EvalConfig", "ModelSpec", "PGDConfig", "TrainConfig",
    "classification_metrics", "corruption_errors", "evaluate_checkpoints", "expected_calibration_error",
    "fgsm", "finetune", "load_checkpoint", "load_config", "pgd", "read_card", "robustness_matrix",
    "save_checkpoint", "seen_unseen_summary", "train",
]  # fmt: skip
