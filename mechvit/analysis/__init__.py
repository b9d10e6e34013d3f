"""Analyses of HookedViTs: feature overlap, activation patching, logit lens, attention, CKA.

Each function takes HookedViT(s), SAEs and tensors and returns tensors or small dataclasses with
``to_dict()``, ``rows()`` (a tidy table) and ``save_csv(path)``. See ``docs/analysis.md``.
"""

from mechvit.analysis.attention import (
    AttentionStats,
    PairedAttention,
    attention_entropy,
    attention_rollout,
    attention_stats,
    cls_attention_map,
    compare_attention,
    mean_attention_distance,
    model_attention_rollout,
    model_cls_attention,
    patch_centers,
)
from mechvit.analysis.logit_lens import (
    LogitLensResult,
    LogitLensSweep,
    first_correct_layer,
    logit_lens,
    logit_lens_sweep,
)
from mechvit.analysis.overlap import (
    CodeSimilarity,
    FeatureOverlap,
    OverlapConfig,
    code_similarity,
    collect_activations,
    decoder_cosine,
    feature_overlap,
    match_features,
    mean_max_cosine,
    model_code_similarity,
    sae_fit,
)
from mechvit.analysis.patching import PatchingResult, activation_patching, best_other, logit_diff
from mechvit.analysis.similarity import CKAResult, layer_cka, linear_cka, write_rows_csv

__all__ = [
    "AttentionStats",
    "CKAResult",
    "CodeSimilarity",
    "FeatureOverlap",
    "LogitLensResult",
    "LogitLensSweep",
    "OverlapConfig",
    "PairedAttention",
    "PatchingResult",
    "activation_patching",
    "attention_entropy",
    "attention_rollout",
    "attention_stats",
    "best_other",
    "cls_attention_map",
    "code_similarity",
    "collect_activations",
    "compare_attention",
    "decoder_cosine",
    "feature_overlap",
    "first_correct_layer",
    "layer_cka",
    "linear_cka",
    "logit_diff",
    "logit_lens",
    "logit_lens_sweep",
    "match_features",
    "mean_attention_distance",
    "mean_max_cosine",
    "model_attention_rollout",
    "model_cls_attention",
    "model_code_similarity",
    "patch_centers",
    "sae_fit",
    "write_rows_csv",
]
