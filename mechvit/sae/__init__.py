"""Sparse autoencoders on HookedViT activations: activation store, sae-lens training, evaluation."""

from .activations import (
    TOKEN_SELECTIONS,
    ActivationStoreConfig,
    CachedActivations,
    CorruptionMix,
    cache_activations,
    hook_width,
    iter_activations,
    model_fingerprint,
    run_to_hook,
    select_tokens,
    shuffle_batches,
    stream_batches,
)
from .metrics import (
    ReconstructionMetrics,
    SplicedMetrics,
    feature_density_figure,
    reconstruction_metrics,
    splice_hook,
    spliced_metrics,
)
from .train import SAETrainingConfig, TrainedSAE, load_sae, save_trained, train_sae, train_sae_for_hook

__all__ = [
    "TOKEN_SELECTIONS",
    "ActivationStoreConfig",
    "CachedActivations",
    "CorruptionMix",
    "ReconstructionMetrics",
    "SAETrainingConfig",
    "SplicedMetrics",
    "TrainedSAE",
    "cache_activations",
    "feature_density_figure",
    "hook_width",
    "iter_activations",
    "load_sae",
    "model_fingerprint",
    "reconstruction_metrics",
    "run_to_hook",
    "save_trained",
    "select_tokens",
    "shuffle_batches",
    "splice_hook",
    "spliced_metrics",
    "stream_batches",
    "train_sae",
    "train_sae_for_hook",
]
