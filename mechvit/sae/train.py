"""Train sae-lens SAEs through sae-lens's own ``SAETrainer`` on activations from the store.

We never write an SAE training loop: this module builds the sae-lens training SAE and
``SAETrainerConfig`` from one small dataclass, guards the trainer against its known traps, logs metrics
to a JSONL file and saves the result in sae-lens's inference format (``SAE.load_from_disk`` loads it),
next to a ``mechvit_sae.json`` manifest saying what the SAE was trained on.

sae-lens traps handled here:

- every batch must have exactly ``train_batch_size_samples`` rows (the trainer's sparsity statistics
  count the configured size, not the real one): ``_ExactBatches`` checks each batch;
- ``SAETrainerConfig.lr_end`` has no default (the trainer asserts it): we always pass it;
- ``total_training_samples`` not a multiple of the batch size makes the trainer run one step more than the
  lr schedule knows, and cosine annealing then climbs back up: we round it down to whole batches;
- the norm-scaling estimate eats ``n_batches_for_norm_estimate`` batches (default 1000): we default to 20;
- the dead-feature window (default 1000 steps) is longer than a CPU-sized run, which would switch the
  TopK auxiliary loss off for the whole run: we scale it to the run length;
- a BatchTopK training SAE saved with ``save_model`` cannot be read by ``SAE.load_from_disk`` (its
  architecture is not registered for inference): we save with ``save_inference_model``, which writes the
  JumpReLU SAE that BatchTopK becomes at inference (threshold = the learned batch top-k threshold);
- that threshold is a running mean of every training batch's smallest kept activation, so it also averages
  earlier encoders and lands the inference L0 off k (0.05-0.2 under it, or over it, on the default study's
  SAEs): with ``threshold_batches`` it is re-estimated from the final weights (:func:`reestimate_thresholds`),
  and the rows should be a sample of the whole training set (``threshold_rows``): a few dozen consecutive
  batches of a shuffle buffer hold a few thousand images and move it by ~1%.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sae_lens import SAE
from sae_lens import __version__ as sae_lens_version
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from mechvit._io import atomic_save_safetensors, atomic_write_json, atomic_write_text, staged_dir, strict_json

from .activations import (
    ActivationStoreConfig,
    ImageTransform,
    _dataset_id,
    cache_activations,
    check_hook,
    hook_width,
    model_fingerprint,
    stream_batches,
)
from .metrics import reconstruction_metrics

__all__ = [
    "ARCHITECTURES",
    "MANIFEST_NAME",
    "METRICS_LOG_NAME",
    "SAETrainingConfig",
    "TrainedSAE",
    "build_training_sae",
    "convergence",
    "derive_seed",
    "load_sae",
    "reestimate_thresholds",
    "save_trained",
    "train_sae",
    "train_sae_for_hook",
    "train_saes",
]

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "batchtopk", "jumprelu")
MANIFEST_NAME = "mechvit_sae.json"
METRICS_LOG_NAME = "metrics.jsonl"
SPARSITY_NAME = "sparsity.safetensors"  # sae-lens's own name for the log10 feature density


def derive_seed(study_seed: int, *parts: Any) -> int:
    """A seed for one SAE from the study seed and what identifies it, e.g.
    ``derive_seed(0, "batchtopk", "base", "clean+blur", 2)``: the first 8 bytes of
    sha256(json([study_seed, *parts])) modulo 2**31 - 1. Stable across runs, machines and Python versions
    (unlike ``hash()``); distinct identities give distinct seeds (collision odds ~1e-9 per pair)."""
    key = json.dumps([int(study_seed), *[str(p) for p in parts]], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % (2**31 - 1)


def convergence(
    log: list[dict[str, float]], key: str = "metrics/explained_variance", fraction: float = 0.1
) -> dict[str, Any]:
    """How much ``key`` still moved over the last ``fraction`` of training: the least-squares slope of the
    logged values against the step over that window, times the window's length in steps (robust to the
    batch-to-batch noise of the training EV). ``converged`` when its magnitude is below 0.005."""
    pts = [(e["step"], e[key]) for e in log if key in e and e.get(key) == e.get(key)]
    if len(pts) < 3:
        return {"key": key, "change": None, "converged": None, "n_points": len(pts)}
    last = pts[-1][0]
    start = last - fraction * last
    win = [(x, y) for x, y in pts if x >= start]
    if len(win) < 3:
        win = pts[-3:]
    xs = torch.tensor([x for x, _ in win], dtype=torch.float64)
    ys = torch.tensor([y for _, y in win], dtype=torch.float64)
    xc = xs - xs.mean()
    slope = float((xc * (ys - ys.mean())).sum() / (xc**2).sum().clamp_min(1e-12))
    change = slope * float(xs[-1] - xs[0])
    return {
        "key": key,
        "window_steps": [int(xs[0]), int(xs[-1])],
        "mean_in_window": float(ys.mean()),
        "change": change,
        "converged": abs(change) < 0.005,
        "n_points": len(win),
    }


# the run length of a config that leaves total_samples unset (the study sets its own from sae.epochs)
DEFAULT_TOTAL_SAMPLES = 300_000
# what sae-lens's SAE configs accept for normalize_activations
_NORMALIZE = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SAETrainingConfig:
    """How to train one SAE. Defaults are CPU-sized; the paper's are BatchTopK, k=32, aux 1/32, x32, lr 1e-3.

    Every value is checked here (ValueError naming the field, what it expects and what it got). The checks
    that need the run length (``total_samples`` at least one batch, ``lr_warmup_steps`` under the number of
    steps) run here when ``total_samples`` is given, and otherwise when the run length is first read
    (:attr:`total_steps`, before training starts): a caller that sets ``total_samples`` itself (the study, from
    ``sae.epochs``, with ``dataclasses.replace``, which runs them again) is not checked against the default.
    :meth:`check_run_length` and :meth:`check_d_in` check a config against a run length and an activation
    width that are known before training (e.g. a study's ``--validate``)."""

    architecture: Architecture = "batchtopk"
    expansion_factor: int = 16  # d_sae = expansion_factor * d_in (paper: 32)
    # topk: active features per sample (an integer); batchtopk: their batch mean (a float works too)
    k: int = 32
    aux_coefficient: float = 1 / 32  # topk / batchtopk: dead-feature auxiliary loss
    l1_coefficient: float = 5.0  # standard (ReLU + L1, the paper's "vanilla")
    l1_warmup_steps: int = 0
    l0_coefficient: float = 1.0  # jumprelu
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    topk_threshold_lr: float | None = None  # batchtopk: EMA rate of the inference threshold; None = auto
    # batchtopk only (another architecture with a value > 0 is refused): after training, the inference
    # threshold is re-estimated with the final weights as the (k x rows)-th largest activation over this many
    # training batches pooled (reestimate_thresholds); 0 keeps sae-lens's running mean
    threshold_batches: int = 0
    lr: float = 1e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps: int = 0
    lr_end: float | None = None  # cosine floor, in [0, lr]; None = lr / 10 (sae-lens's runner default)
    batch_size: int = 1024  # activations per step; every batch is exactly this size
    # rounded down to whole batches; None: set by the caller, else DEFAULT_TOTAL_SAMPLES (300,000)
    total_samples: int | None = None
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    n_batches_for_norm_estimate: int = 20
    dead_feature_window: int | None = None  # steps; None = total_steps // 10 clipped to [10, 1000]
    decoder_init_norm: float | None = 0.1
    log_every: int = 10  # steps between metrics-log lines
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.normalize_activations not in _NORMALIZE:
            raise ValueError(
                f"normalize_activations must be one of {_NORMALIZE}, got {self.normalize_activations!r}"
            )
        # integers (a float expansion factor or batch size breaks sae-lens or the batching)
        minimum = {
            "expansion_factor": 1, "batch_size": 1, "log_every": 1, "n_batches_for_norm_estimate": 1,
            "threshold_batches": 0, "lr_warmup_steps": 0, "l1_warmup_steps": 0,
        }  # fmt: skip
        for name, low in minimum.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be >= {low} and an integer, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.threshold_batches and self.architecture != "batchtopk":
            raise ValueError(
                "threshold_batches re-estimates a BatchTopK SAE's inference threshold; architecture "
                f"{self.architecture!r} has none to re-estimate: expected 0, got {self.threshold_batches}"
            )
        if self.dead_feature_window is not None and (
            not _is_int(self.dead_feature_window) or self.dead_feature_window < 1
        ):
            raise ValueError(
                "dead_feature_window must be an integer >= 1 (training steps) or None (auto), "
                f"got {self.dead_feature_window!r}"
            )
        # k: torch.topk needs an integer (TopK); BatchTopK keeps k x rows per batch, so a mean k may be a float
        if self.architecture == "topk" and not _is_int(self.k):
            raise ValueError(f"k must be an integer for architecture 'topk', got {self.k!r}")
        if not _is_real(self.k) or self.k < 1:
            raise ValueError(f"k must be a number >= 1, got {self.k!r}")
        if not _is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.lr_end is not None and (not _is_real(self.lr_end) or not 0 <= self.lr_end <= self.lr):
            raise ValueError(
                f"lr_end must be a number in [0, lr] = [0, {self.lr}] (the cosine floor) or None (lr / 10), "
                f"got {self.lr_end!r}"
            )
        for name in ("aux_coefficient", "l1_coefficient", "l0_coefficient", "jumprelu_init_threshold"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_real(self.jumprelu_bandwidth) or self.jumprelu_bandwidth <= 0:
            raise ValueError(
                f"jumprelu_bandwidth must be a finite number > 0, got {self.jumprelu_bandwidth!r}"
            )
        if self.topk_threshold_lr is not None and (
            not _is_real(self.topk_threshold_lr) or not 0 < self.topk_threshold_lr <= 1
        ):
            raise ValueError(
                "topk_threshold_lr must be a number in (0, 1] (an EMA rate) or None (auto), "
                f"got {self.topk_threshold_lr!r}"
            )
        if self.decoder_init_norm is not None and (
            not _is_real(self.decoder_init_norm) or self.decoder_init_norm <= 0
        ):
            raise ValueError(
                f"decoder_init_norm must be a finite number > 0 or None, got {self.decoder_init_norm!r}"
            )
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"device must name a torch device (cpu, cuda, cuda:<n>, mps), got {self.device!r}"
            ) from None
        if self.total_samples is not None:
            self.check_run_length()

    def for_architecture(self, architecture: str, **changes: Any) -> SAETrainingConfig:
        """This config for ``architecture`` (plus ``changes``, e.g. ``seed``), as one pass over several
        architectures needs it: ``threshold_batches`` (BatchTopK's inference threshold) is kept for BatchTopK and
        is 0 for the others, which have no threshold and refuse it."""
        thr = self.threshold_batches if architecture == "batchtopk" else 0
        return dataclasses.replace(self, architecture=architecture, threshold_batches=thr, **changes)

    def check_run_length(self, total_samples: int | None = None) -> None:
        """Raise ValueError unless a run of ``total_samples`` activations (None: this config's
        :attr:`resolved_total_samples`) holds at least one batch and more steps than ``lr_warmup_steps``."""
        n = total_samples if total_samples is not None else self.total_samples
        n = DEFAULT_TOTAL_SAMPLES if n is None else n
        if not _is_int(n):
            raise ValueError(f"total_samples must be an integer, got {n!r}")
        if n < self.batch_size:
            raise ValueError(f"total_samples ({n}) must be at least one batch (batch_size {self.batch_size})")
        steps = n // self.batch_size
        if self.lr_warmup_steps >= steps:
            raise ValueError(
                f"lr_warmup_steps must be in [0, {steps}) (the run's steps: total_samples {n} // batch_size "
                f"{self.batch_size}), got {self.lr_warmup_steps}"
            )

    def check_d_in(self, d_in: int) -> None:
        """Raise ValueError unless an SAE of this config fits activations of width ``d_in``: a TopK / BatchTopK
        ``k`` must not exceed ``d_sae = expansion_factor * d_in`` (what :func:`build_training_sae` refuses)."""
        if not _is_int(d_in) or d_in < 1:
            raise ValueError(f"d_in must be an integer >= 1, got {d_in!r}")
        d_sae = int(d_in) * self.expansion_factor
        if self.architecture in ("topk", "batchtopk") and self.k > d_sae:
            raise ValueError(
                f"k ({self.k}) must not exceed d_sae ({d_sae} = expansion_factor {self.expansion_factor} x "
                f"d_in {d_in})"
            )

    @property
    def resolved_total_samples(self) -> int:
        return DEFAULT_TOTAL_SAMPLES if self.total_samples is None else int(self.total_samples)

    @property
    def total_steps(self) -> int:
        """Training steps (checks the run length first: see the class docstring)."""
        self.check_run_length()
        return self.resolved_total_samples // self.batch_size

    @property
    def resolved_lr_end(self) -> float:
        return self.lr / 10 if self.lr_end is None else float(self.lr_end)

    @property
    def resolved_topk_threshold_lr(self) -> float:
        """sae-lens's 0.01 needs ~300 steps to converge; a short run would save a threshold that is far
        too low (inference L0 >> k), so the EMA spans about a fifth of the run, never slower than 0.01."""
        if self.topk_threshold_lr is not None:
            return float(self.topk_threshold_lr)
        return float(min(0.5, max(0.01, 5.0 / self.total_steps)))

    @property
    def resolved_dead_feature_window(self) -> int:
        if self.dead_feature_window is not None:
            return int(self.dead_feature_window)
        return int(min(1000, max(10, self.total_steps // 10)))


@dataclass
class TrainedSAE:
    """What ``train_sae`` returns: the inference SAE (as ``SAE.load_from_disk`` would give it) and its records."""

    sae: SAE
    manifest: dict[str, Any]
    log: list[dict[str, float]] = field(default_factory=list)
    log_feature_sparsity: Tensor | None = None  # [d_sae] log10 firing rate over the last training window
    path: Path | None = None


class _FastBatchTopK(BatchTopK):
    """sae-lens's ``BatchTopK``, exact, with a cheaper selection on CPU (written here because it measurably
    beats ``torch.topk``: the top-k over the ``batch x d_sae`` activations was a third of a BatchTopK training
    step on CPU, ~16 ms at 1024 x 768 under load).

    - ``torch.topk(..., sorted=False)``: torch does not sort the ``k * batch`` kept values (the kept set is the
      same);
    - on CPU, a pre-filter: the ``k * batch``-th largest value moves little from one training step to the
      next, so only the activations ``>= 0.8 x`` the previous step's go through ``torch.topk`` (found with
      :func:`_at_least`). When at least ``k * batch`` activations pass, the global top set lies among them
      (every kept value is ``>=`` the ``k * batch``-th largest, which is ``>=`` the filter), so the selection
      is exact; otherwise (the first step, a shifted distribution) the whole batch goes through
      ``torch.topk``. Only ties at the boundary value could pick other indices of equal values, as two
      ``torch.topk`` calls may;
    - the kept indices come out ascending (the candidates >= the ``k * batch``-th value, in order) for the
      sparse training step, which needs them sorted, without a sort (one only on a tie at the boundary).

    The output is ``zeros.scatter(kept indices, kept values)`` as in sae-lens, so output and gradient equal
    sae-lens's (tested, also over a run of steps that takes both paths)."""

    FILTER = 0.8

    def __init__(self, k: float):
        super().__init__(k)
        self._floor = 0.0  # the next step's pre-filter (0: none)
        self.filtered_steps = 0  # steps that took the pre-filtered path (for tests and benchmarks)

    @torch.no_grad()
    def select(self, acts: Tensor, *, relu: bool = False) -> Tensor:
        """The flat indices of the kept entries of ``acts`` (already ReLU'd; or pre-activations with
        ``relu=True``, the same indices as for ``acts.relu()`` without making it on the filtered path, whose
        floor is positive), ascending: the batch's top ``k x rows``."""
        flat = acts.detach().flatten()
        keep = int(self.k * acts.shape[:-1].numel())
        if keep == 0:
            return torch.zeros(0, dtype=torch.long, device=flat.device)
        if self._floor > 0 and flat.device.type == "cpu":
            candidates = _at_least(flat, self._floor)  # ascending; all > 0, where ReLU changes nothing
            if len(candidates) >= keep:
                self.filtered_steps += 1
                values = flat.index_select(0, candidates)
                top = torch.topk(values, keep, sorted=False)
                kth = float(top.values.min())
                self._floor = self.FILTER * kth
                # the candidates >= the keep-th largest value are the kept set, still ascending, unless a tie
                # at that value makes them more than keep: then torch.topk's pick, sorted
                idx = candidates[_at_least(values, kth)]
                return idx if len(idx) == keep else candidates.index_select(0, top.indices).sort().values
        if relu:
            flat = flat.relu()
        idx = torch.topk(flat, keep, sorted=False).indices.sort().values
        if flat.device.type == "cpu":
            self._floor = self.FILTER * float(flat.index_select(0, idx).min())
        return idx

    def forward(self, x: Tensor) -> Tensor:
        acts = x.relu()
        flat = acts.flatten()
        idx = self.select(acts)
        return torch.zeros_like(flat).scatter(-1, idx, flat.gather(-1, idx)).reshape(acts.shape)


def _at_least(flat: Tensor, floor: float) -> Tensor:
    """The indices of the entries of the 1-d CPU tensor ``flat`` that are ``>= floor``, ascending. numpy's
    ``flatnonzero`` of the comparison, where it applies, because it measurably beats torch's: 0.7 ms against
    2.5 ms (``(flat >= floor).nonzero()``) on 1024 x 1152 float32 activations on one thread, a sixth of a
    BatchTopK training step of the default study; same indices (tested)."""
    if flat.dtype in (torch.float32, torch.float64) and flat.is_contiguous() and not flat.requires_grad:
        return torch.from_numpy(np.flatnonzero(flat.numpy() >= floor))
    return (flat >= floor).nonzero().squeeze(1)


def min_positive(acts: Tensor) -> Tensor:
    """The smallest positive entry of ``acts`` (0-d; ``inf`` when none is positive; NaN is not positive): what
    sae-lens's BatchTopK threshold EMA takes, as ``acts[acts > 0].min()``, without that boolean indexing (a
    nonzero + gather over the batch)."""
    if acts.numel() == 0:
        return acts.new_tensor(math.inf)
    return acts.masked_fill(~(acts > 0), math.inf).min()


class _SparseCodec(torch.autograd.Function):
    """The decoder's output ``A @ W_dec`` for the kept activations ``A`` (``[n, d_sae]``, ``values`` at
    ``(rows, cols)``, rows sorted, 0 elsewhere), whose values are the pre-activations
    ``(sae_in @ W_enc + b_enc)[rows, cols]`` (given: computed once, densely, for the selection). Forward and
    backward are sparse-dense products over the kept entries (CSR ``A @ W_dec``, the sampled product
    ``g_out W_dec^T`` at the kept entries, ``A^T g_out``, ``G^T sae_in``, ``G W_enc^T``) instead of the dense
    ``[n, d_sae]`` products autograd runs for a dense ``A``."""

    @staticmethod
    def forward(ctx, values, sae_in, W_enc, b_enc, W_dec, rows, cols):  # noqa: ARG004 (b_enc: its gradient)
        n, d_sae = sae_in.shape[0], W_dec.shape[0]
        crow = torch.searchsorted(rows, torch.arange(n + 1, device=rows.device))
        ctx.save_for_backward(sae_in, W_enc, W_dec, values, crow, rows, cols)
        return _csr(crow, cols, values, (n, d_sae)) @ W_dec

    @staticmethod
    def backward(ctx, g_out):
        sae_in, W_enc, W_dec, values, crow, rows, cols = ctx.saved_tensors
        n, d_sae = sae_in.shape[0], W_dec.shape[0]
        pattern = _csr(crow, cols, torch.zeros_like(values), (n, d_sae))
        g = torch.sparse.sampled_addmm(pattern, g_out.contiguous(), W_dec.t(), beta=0.0).values()
        g = g * (values != 0)  # ReLU: a kept entry that is 0 (fewer positive than kept) passes no gradient
        by_col = torch.stack([cols, rows])  # the transposed pattern, [d_sae, n]
        grad_w_dec = torch.sparse.mm(_coo(by_col, values, (d_sae, n)), g_out)
        grad_w_enc = torch.sparse.mm(_coo(by_col, g, (d_sae, n)), sae_in).t()
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        # the input's gradient only when it needs one (the SAE's input is data: never in training)
        grad_in = _csr(crow, cols, g, (n, d_sae)) @ W_enc.t() if ctx.needs_input_grad[1] else None
        return g, grad_in, grad_w_enc, grad_b_enc, grad_w_dec, None, None


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # torch notes once per process that sparse CSR support is in beta: not a warning for our users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _coo(indices: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False)


class _BatchTopKTrainingSAE(BatchTopKTrainingSAE):
    """sae-lens's BatchTopK training SAE with :class:`_FastBatchTopK`, the same inference-threshold EMA
    computed without boolean indexing, and a sparse training step (written here because it measurably beats
    the dense one on CPU: see :meth:`training_forward_pass`; everything else is sae-lens's)."""

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return _FastBatchTopK(self.cfg.k)

    def _sparse_step_applies(self, x: Tensor) -> bool:
        c = self.cfg
        return (
            x.ndim == 2
            and x.device.type == "cpu"
            and c.normalize_activations in ("none", "expected_average_only_in")
            and getattr(self, "d_head", None) is None
            and not torch.is_autocast_enabled("cpu")
            and not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in self.modules())
            and isinstance(self.activation_fn, _FastBatchTopK)
        )

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """sae-lens's training step (``TrainingSAE.training_forward_pass`` + ``TopKTrainingSAE``'s auxiliary
        loss + ``BatchTopKTrainingSAE``'s threshold EMA) computed sparsely on CPU: the encoder's
        ``[batch, d_sae]`` pre-activations are computed once (as sae-lens does) to select the kept entries,
        then the decoder sums only the kept rows of ``W_dec`` and the backward touches only the kept entries
        (the dense path spends two thirds of a step in ``[batch, d_sae] x [d_sae, d_in]`` products of
        mostly zeros). Same losses, outputs and metrics as sae-lens's to float rounding (the order of a few
        sums); gradients equal to float tolerance (tests/test_sae_train.py). Elsewhere (CUDA, autocast, hooks,
        a layer-norm or rescaling normalisation) sae-lens's own step runs."""
        if not self._sparse_step_applies(step_input.sae_in):
            return super().training_forward_pass(step_input)
        sae_in = self.process_sae_in(step_input.sae_in)
        d_sae, rescale = self.cfg.d_sae, self.cfg.rescale_acts_by_decoder_norm
        norms = self.W_dec.norm(dim=-1).detach() if rescale else None  # sae-lens: x decoder row norms
        with torch.no_grad():
            raw = sae_in @ self.W_enc + self.b_enc
            hidden_pre = raw * norms if rescale else raw
            # selected on the pre-activations: the ReLU of the whole [batch, d_sae] (0.6 ms a step) only
            # where select needs it, then of the kept entries alone
            kept = self.activation_fn.select(hidden_pre, relu=True)  # ascending: a coalesced sparse tensor
            rows, cols = kept // d_sae, kept % d_sae
            kept_acts = hidden_pre.view(-1).index_select(0, kept).relu()
            # sparse COO, which sae-lens's trainer takes (its firing counts and L0 cost a third as much)
            feature_acts = torch.sparse_coo_tensor(
                torch.stack([rows, cols]),
                kept_acts,
                hidden_pre.shape,
                is_coalesced=True,
                check_invariants=False,
            )
        # ReLU's gradient: 0 where a kept entry is 0. With decoder-norm rescaling (sae-lens's default) the
        # encoder multiplies a pre-activation by its decoder row's norm and the decoder divides by it again:
        # the coefficient of a decoder row is the raw pre-activation, and the norm's two gradients cancel
        values = raw.view(-1).index_select(0, kept) * (kept_acts > 0)
        decoded = (
            _SparseCodec.apply(values, sae_in, self.W_enc, self.b_enc, self.W_dec, rows, cols) + self.b_dec
        )
        sae_out = self.run_time_activation_norm_fn_out(decoded)
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        aux_loss = self._aux_loss(step_input, sae_in, sae_out, norms)
        out = TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=mse_loss + aux_loss,
            losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss},
        )
        self.update_topk_threshold(kept_acts)
        out.metrics["topk_threshold"] = self.topk_threshold
        return out

    def _aux_loss(self, step_input: TrainStepInput, sae_in: Tensor, sae_out: Tensor, norms: Tensor | None):
        """``TopKTrainingSAE.calculate_topk_aux_loss`` on the dead latents' columns only: per row the top
        ``min(d_in // 2, n_dead)`` dead latents by pre-activation (no ReLU) reconstruct the residual, scaled
        by ``min(n_dead / (d_in // 2), 1)``; 0 when no latent is dead. sae-lens ranks every column with the
        live ones at ``-inf``, which picks the same entries."""
        dead = step_input.dead_neuron_mask
        if dead is None or (n_dead := int(dead.sum())) == 0:
            return sae_out.new_tensor(0.0)
        k_aux = self.cfg.d_in // 2
        scale = min(n_dead / k_aux, 1.0)
        k_aux = min(k_aux, n_dead)
        cols = dead.nonzero().squeeze(1)
        pre = sae_in @ self.W_enc.index_select(1, cols) + self.b_enc.index_select(0, cols)
        if k_aux < n_dead:
            rank = pre.detach() * norms.index_select(0, cols) if norms is not None else pre.detach()
            # ranked x norm (as sae-lens ranks), then / norm: the raw pre-activation decodes
            top = rank.topk(k_aux, sorted=False).indices
            aux_acts = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))
        else:  # every dead latent is in its row's top k_aux (most steps of the default: <= 48 dead)
            aux_acts = pre
        residual = (step_input.sae_in - sae_out).detach()
        recons = aux_acts @ self.W_dec.index_select(0, cols)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: Tensor) -> None:
        low = min_positive(acts_topk)
        with torch.autocast(self.topk_threshold.device.type, enabled=False):
            if torch.isfinite(low):
                lr = self.cfg.topk_threshold_lr
                self.topk_threshold = (1 - lr) * self.topk_threshold + lr * low.to(self.topk_threshold.dtype)


@torch.no_grad()
def reestimate_thresholds(
    saes: dict[str, TrainingSAE],
    n_batches: dict[str, int],
    batches: Iterator[dict[str, Tensor]],
    margin: int = 2,
) -> dict[str, dict[str, Any]]:
    """BatchTopK's inference threshold from the final weights: for each BatchTopK SAE ``name`` with
    ``n_batches[name] > 0``, the ``k x rows``-th largest activation over that many of its batches pooled
    (``batches`` yields ``{name: [rows, d_in]}``, raw activations, after the trainer folded its normalisation
    into the weights): the threshold at which the SAE fires k latents per row on average over those rows, which
    is what BatchTopK's k means for one batch that large. sae-lens keeps instead a running mean of each
    training batch's smallest kept activation, which also averages earlier encoders; the mean of per-batch
    minima with the final weights (Bussmann et al. 2024) is biased low in threshold: measured on the default
    study's base and blur-4 SAEs (65,536 training rows), running mean: L0 11.82-11.94 on training rows;
    mean of minima: 12.04-12.09; this pooled quantile: 12.000 on its rows, 11.98-12.01 on other training rows.

    Exact: each batch contributes its ``margin x k x batch_rows`` largest activations, which hold every value
    above the pooled threshold unless one batch fires more than ``margin`` times k per row on average above it;
    that is checked, and an SAE where it fails gets the quantile of the candidates (a lower bound) with
    ``"exact": False`` in its record and a warning. Sets each SAE's ``topk_threshold`` and returns
    ``{name: {"ema", "estimated", "batches", "rows", "exact"}}``; fewer batches than asked when the iterator
    ends; none: the running mean is kept. Under torchrun each rank holds a slice of every global batch: the
    candidates of all ranks are pooled."""
    todo = {
        n: sae for n, sae in saes.items() if isinstance(sae, BatchTopKTrainingSAE) and n_batches.get(n, 0) > 0
    }
    if not todo:
        return {}
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    par = _data_parallel()
    cands: dict[str, list[Tensor]] = {n: [] for n in todo}
    floor = dict.fromkeys(todo, 0.0)  # the largest value below which a batch dropped positive activations
    rows = dict.fromkeys(todo, 0)
    # each batch's candidates: its margin x k x rows largest values, with the training step's pre-filter on CPU
    pick = {n: _FastBatchTopK(min(margin * sae.cfg.k, sae.cfg.d_sae)) for n, sae in todo.items()}
    for i in range(max(n_batches[n] for n in todo)):
        try:
            multi = next(batches)
        except (StopIteration, _RanOut):
            break
        for name, sae in todo.items():
            if i >= n_batches[name]:
                continue
            x = multi[name]
            sae_in = sae.process_sae_in(x)
            pre = sae_in @ sae.W_enc + sae.b_enc
            if sae.cfg.rescale_acts_by_decoder_norm:
                pre = pre * sae.W_dec.norm(dim=-1)
            acts = pre.relu()
            flat = acts.flatten()
            top = flat.index_select(0, pick[name].select(acts))
            if 0 < len(top) < len(flat):
                floor[name] = max(floor[name], float(top.min()))
            if par is not None:
                import torch.distributed as dist

                parts = [torch.empty_like(top) for _ in range(par.world_size)]
                dist.all_gather(parts, top.contiguous())
                top = torch.cat(parts)
                low = torch.tensor(floor[name], dtype=torch.float64, device=top.device)
                dist.all_reduce(low, op=dist.ReduceOp.MAX)
                floor[name] = float(low)
            cands[name].append(top[top > 0].to(torch.float64))
            rows[name] += len(x) * (par.world_size if par is not None else 1)
    out = {}
    for name, sae in todo.items():
        ema = float(sae.topk_threshold)
        values = torch.cat(cands[name]) if cands[name] else torch.zeros(0, dtype=torch.float64)
        want = int(sae.cfg.k * rows[name])
        exact = True
        if len(values) and want:
            theta = float(torch.topk(values, min(want, len(values))).values[-1])
            exact = theta >= floor[name]
            if not exact:
                warnings.warn(
                    f"{name}: the BatchTopK threshold estimate {theta:.4g} is under a batch's candidate floor "
                    f"{floor[name]:.4g} (a batch fires more than {margin} x k per row above it); it is a lower "
                    "bound of the pooled quantile (recorded as exact: false)",
                    stacklevel=2,
                )
            sae.topk_threshold = torch.full_like(sae.topk_threshold, theta)
        out[name] = {
            "ema": ema,
            "estimated": float(sae.topk_threshold),
            "batches": len(cands[name]),
            "rows": rows[name],
            "exact": exact,
        }
    return out


def _threshold_batches(
    rows: Tensor | None, cfg: SAETrainingConfig, d_in: int, names: list[str], par: Any
) -> Iterator[dict[str, Tensor]] | None:
    """``rows`` as whole ``[batch_size, d_in]`` float32 batches on the SAE's device for every SAE in ``names``
    (this rank's slice of each under torchrun), ending with the rows; None without rows."""
    if rows is None:
        return None
    if rows.ndim != 2 or rows.shape[1] != d_in:
        raise ValueError(f"threshold_rows must be [n, {d_in}] (n, d_in), got shape {tuple(rows.shape)}")
    rows = rows.to(device=cfg.device, dtype=torch.float32)
    whole = [b for b in rows.split(cfg.batch_size) if len(b) == cfg.batch_size]
    batches = ({n: b for n in names} for b in whole)
    return par.slices(batches) if par is not None else batches


def build_training_sae(d_in: int, cfg: SAETrainingConfig) -> TrainingSAE:
    """The sae-lens training SAE for ``cfg`` (weights initialised from the current torch RNG)."""
    if int(d_in) < 1:
        raise ValueError(f"d_in must be >= 1, got {d_in}")
    common = dict(
        d_in=int(d_in),
        d_sae=int(d_in) * cfg.expansion_factor,
        device=cfg.device,
        normalize_activations=cfg.normalize_activations,
        decoder_init_norm=cfg.decoder_init_norm,
    )
    if cfg.architecture == "standard":
        return StandardTrainingSAE(
            StandardTrainingSAEConfig(
                **common, l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warmup_steps
            )
        )
    if cfg.architecture in ("topk", "batchtopk") and cfg.k > common["d_sae"]:
        raise ValueError(f"k ({cfg.k}) must not exceed d_sae ({common['d_sae']})")
    if cfg.architecture == "topk":
        return TopKTrainingSAE(
            TopKTrainingSAEConfig(**common, k=cfg.k, aux_loss_coefficient=cfg.aux_coefficient)
        )
    if cfg.architecture == "batchtopk":
        return _BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                **common,
                k=cfg.k,
                aux_loss_coefficient=cfg.aux_coefficient,
                topk_threshold_lr=cfg.resolved_topk_threshold_lr,
            )
        )
    return JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(
            **common,
            l0_coefficient=cfg.l0_coefficient,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        )
    )


def _trainer_config(cfg: SAETrainingConfig) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=cfg.total_steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.resolved_lr_end,
        lr_scheduler_name="cosineannealing" if cfg.lr_schedule == "cosine" else "constant",
        lr_warm_up_steps=cfg.lr_warmup_steps,
        device=cfg.device,
        dead_feature_window=cfg.resolved_dead_feature_window,
        feature_sampling_window=max(1, cfg.resolved_dead_feature_window),
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
        logger=LoggingConfig(log_to_wandb=False),
    )


class _RanOut(ValueError):
    """The activation iterator ended."""


class _ExactBatches:
    """Wraps the activation iterator: float32 [batch_size, d_in] on the SAE's device, or a clear error."""

    def __init__(self, batches: Iterable[torch.Tensor], batch_size: int, d_in: int, device: str):
        self._it: Iterator[torch.Tensor] = iter(batches)
        self.batch_size, self.d_in, self.device = batch_size, d_in, device

    def __iter__(self) -> _ExactBatches:
        return self

    def __next__(self) -> torch.Tensor:
        try:
            batch = next(self._it)
        except StopIteration:
            raise _RanOut(
                "the activation iterator ran out before training finished; give an endless one "
                "(e.g. CachedActivations.batches(epochs=None)) or lower total_samples"
            ) from None
        if batch.shape != (self.batch_size, self.d_in):
            raise ValueError(
                f"every training batch must have shape ({self.batch_size}, {self.d_in}) "
                f"(batch_size, d_in), got {tuple(batch.shape)}"
            )
        return batch.to(device=self.device, dtype=torch.float32)


class _LoggingTrainer(SAETrainer):
    """sae-lens's trainer plus a metrics line every ``log_every`` steps (no wandb); its training step counts
    a sparse step's firings faster (:meth:`_train_step`), with the same result."""

    def __init__(self, *args: Any, log_every: int, log: list[dict[str, float]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._log_every, self._log = log_every, log

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        out = super().step(batch)
        self.after_step()
        step = self.n_training_steps  # fit() increments after step(): this is the 0-based index
        if step % self._log_every == 0 or self.n_training_samples >= self.cfg.total_training_samples:
            entry = self.build_train_step_log_dict(output=out, n_training_samples=self.samples_seen)
            self._log.append(
                {"step": step + 1, **{k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}}
            )
        return out

    def _train_step(self, sae: TrainingSAE, sae_in: torch.Tensor) -> TrainStepOutput:
        """sae-lens's ``SAETrainer._train_step`` line for line (written here because it measurably beats it on
        the sparse step), but for the firing statistics of a sparse COO ``feature_acts``: the fired latents
        counted with one ``bincount`` over the kept entries' columns instead of sae-lens's ``.bool().float()``
        and two sums over the sparse tensor, 1.4 ms of a 12.8 ms training step of the default study's SAEs
        (one thread). The same integers, so the same state bit for bit (tests/test_sae_train.py runs both
        trainers side by side); a dense ``feature_acts`` goes through sae-lens's own lines."""
        sae.train()
        with self.autocast_if_enabled:
            out = self.sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=sae_in,
                    dead_neuron_mask=self.dead_neurons,
                    coefficients=self.get_coefficients(),
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                ),
            )
            with torch.no_grad():
                acts = out.feature_acts
                if acts.is_sparse and acts.ndim == 2:
                    acts = acts if acts.is_coalesced() else acts.coalesce()
                    cols = acts._indices()[1][acts._values() != 0]  # .bool(): a stored 0 has not fired
                    counts = torch.bincount(cols, minlength=acts.shape[1])
                    did_fire, fired = counts > 0, counts.to(self.act_freq_scores.dtype)
                else:  # sae-lens's lines
                    firing_feats = acts.bool().float()
                    did_fire = firing_feats.sum(-2).bool()
                    if did_fire.is_sparse:
                        did_fire = did_fire.to_dense()
                    fired = firing_feats.sum(0)
                self.n_forward_passes_since_fired += 1
                self.n_forward_passes_since_fired[did_fire] = 0
                self.act_freq_scores += fired
                self.n_frac_active_samples += self.cfg.train_batch_size_samples
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        return out

    def after_step(self) -> None:
        """Called after each step, before logging (the data-parallel trainer makes its statistics global)."""

    @property
    def samples_seen(self) -> int:
        """Training samples so far (over all processes in data-parallel training)."""
        return self.n_training_samples


def train_sae(
    batches: Iterable[torch.Tensor],
    d_in: int,
    cfg: SAETrainingConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    manifest: dict[str, Any] | None = None,
    threshold_rows: Tensor | None = None,
) -> TrainedSAE:
    """Train an SAE with sae-lens's ``SAETrainer`` on ``batches`` (endless iterator of [batch_size, d_in]).

    ``manifest`` (hook, model hash, token selection, data mix, ...) is stored with the SAE. With
    ``out_dir`` the SAE is written atomically in sae-lens's format plus ``mechvit_sae.json`` and
    ``metrics.jsonl``. The returned ``sae`` is the inference SAE, read back the way sae-lens reads it.
    ``threshold_rows``: where a BatchTopK SAE with ``cfg.threshold_batches`` re-estimates its inference
    threshold (:func:`reestimate_thresholds`; ``[n, d_in]``, e.g. ``CachedActivations.sample``); None: the
    next batches of ``batches``.
    """
    cfg = cfg or SAETrainingConfig()
    log: list[dict[str, float]] = []
    device = torch.device(cfg.device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    par = _data_parallel()
    if par is not None:
        par.check(cfg.batch_size)
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        sae = build_training_sae(d_in, cfg)
        if manifest and manifest.get("hook"):
            sae.cfg.metadata.hook_name = manifest["hook"]
        if manifest and manifest.get("model_name"):
            sae.cfg.metadata.model_name = manifest["model_name"]
        provider = _ExactBatches(batches, cfg.batch_size, int(d_in), cfg.device)
        if par is None:
            trainer = _LoggingTrainer(
                cfg=_trainer_config(cfg), sae=sae, data_provider=provider, log_every=cfg.log_every, log=log
            )
        else:  # torchrun: this rank's slice of every global batch (mechvit.sae.distributed)
            trainer = par.trainer(
                cfg=_trainer_config(cfg),
                global_batch=cfg.batch_size,
                sae=par.sae(sae),
                data_provider=par.slices(provider),
                log_every=cfg.log_every,
                log=log,
            )
        sae = trainer.fit()
        source = _threshold_batches(threshold_rows, cfg, int(d_in), ["sae"], par)
        thresholds = reestimate_thresholds(
            {"sae": sae},
            {"sae": cfg.threshold_batches},
            source or ({"sae": b} for b in trainer.data_provider),
        )
    if thresholds:
        manifest = {**(manifest or {}), "inference_threshold": thresholds["sae"]}
    trained = _finish(sae, trainer, cfg, int(d_in), log, manifest)
    if out_dir is not None and (par is None or par.rank == 0):
        trained.path = save_trained(trained, out_dir)
    return trained


def _data_parallel() -> Any:
    """``mechvit.sae.distributed.DataParallel`` when this process is one of several, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from .distributed import data_parallel

    return data_parallel()


def _finish(
    sae: TrainingSAE,
    trainer: SAETrainer,
    cfg: SAETrainingConfig,
    d_in: int,
    log: list[dict[str, float]],
    manifest: dict[str, Any] | None,
) -> TrainedSAE:
    """The inference SAE (as sae-lens reads it back) and its manifest, after the trainer is done."""
    final = log[-1] if log else {}
    record = {
        "format": "mechvit-sae/1",
        "sae_lens_version": sae_lens_version,
        "architecture": cfg.architecture,
        "inference_architecture": sae.cfg.get_inference_config_class().architecture(),
        "d_in": int(d_in),
        "d_sae": int(sae.cfg.d_sae),
        "training": {**asdict(cfg), "total_samples": cfg.resolved_total_samples},
        "trained_samples": int(trainer.samples_seen),
        "final_train_metrics": {
            k: final[k]
            for k in ("metrics/explained_variance", "metrics/l0", "losses/mse_loss", "sparsity/dead_features")
            if k in final
        },
        "convergence": convergence(log),
        **(manifest or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # the trainer's SAE is a training SAE; sae-lens writes and reads the inference one
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device=cfg.device)
    return TrainedSAE(
        sae=inference, manifest=record, log=log, log_feature_sparsity=trainer.log_feature_sparsity.cpu()
    )


class _SharedPass:
    """One pass over a stream of shuffled [batch_size, d] batches feeds several SAEs, each in its own order.

    A pool holds the last ``pool_batches`` batches of the stream; every step one new batch enters (the
    oldest leaves) and each SAE draws ``batch_size`` distinct pool rows with its own generator (seeded by
    its ``SAETrainingConfig.seed``). A row stays ``pool_batches`` steps in the pool and is drawn with
    probability ``1 / pool_batches`` per step, so each SAE sees it once on average (0, 1, 2... times,
    Poisson-like) and no two SAEs see the same sequence. With ``pool_batches=1`` every SAE gets exactly the
    stream's batch (in its own row order). Yields ``{name: batch}`` as sae-lens's ``MultiSAETrainer`` reads.
    """

    def __init__(
        self,
        batches: Iterable[torch.Tensor],
        seeds: dict[str, int],
        batch_size: int,
        d_in: int,
        device: str,
        pool_batches: int,
    ):
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1, got {pool_batches}")
        self._src = _ExactBatches(batches, batch_size, d_in, device)
        self._gens = {n: torch.Generator().manual_seed(int(s)) for n, s in seeds.items()}
        self._pool: list[torch.Tensor] = []
        self._pool_batches, self._batch_size = pool_batches, batch_size
        self._next_slot = 0

    def __iter__(self) -> _SharedPass:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._src)
        if len(self._pool) < self._pool_batches:
            self._pool.append(batch)
        else:
            self._pool[self._next_slot] = batch
            self._next_slot = (self._next_slot + 1) % self._pool_batches
        pool = torch.cat(self._pool) if len(self._pool) > 1 else batch
        out = {}
        for name, g in self._gens.items():
            idx = torch.randperm(len(pool), generator=g)[: self._batch_size]
            out[name] = pool[idx.to(pool.device)]
        return out


class _LockstepTrainer(MultiSAETrainer):
    """sae-lens's ``MultiSAETrainer`` (one coordinator, one ``SAETrainer`` per SAE, stepped in lockstep),
    with our logging trainers and a trainer config per SAE (same batch size and sample count, anything
    else, e.g. the learning rate, may differ)."""

    def __init__(
        self,
        cfgs: dict[str, SAETrainerConfig],
        saes: dict[str, TrainingSAE],
        data_provider: Iterator[dict[str, torch.Tensor]],
        log_every: int,
        logs: dict[str, list[dict[str, float]]],
        par: Any = None,
        global_batch: int = 0,
    ):
        first = next(iter(cfgs.values()))
        if par is not None:  # torchrun: per-rank sizes, data-parallel trainers (mechvit.sae.distributed)
            first = par.trainer_config(first)
            saes = {name: par.sae(sae) for name, sae in saes.items()}
            data_provider = par.slices(data_provider)
        super().__init__(cfg=first, saes=saes, hook_names={n: n for n in saes}, data_provider=data_provider)
        if par is None:
            self.trainers = {
                name: _LoggingTrainer(
                    cfg=cfgs[name], sae=sae, data_provider=iter(()), log_every=log_every, log=logs[name]
                )
                for name, sae in self.saes.items()
            }
        else:
            self.trainers = {
                name: par.trainer(
                    cfg=cfgs[name],
                    global_batch=global_batch,
                    sae=sae,
                    data_provider=iter(()),
                    log_every=log_every,
                    log=logs[name],
                )
                for name, sae in self.saes.items()
            }


_LOCKSTEP_SAME = ("batch_size", "resolved_total_samples", "n_batches_for_norm_estimate", "device")


def train_saes(
    batches: Iterable[torch.Tensor],
    d_in: int,
    cfgs: dict[str, SAETrainingConfig],
    *,
    pool_batches: int = 8,
    manifests: dict[str, dict[str, Any]] | None = None,
    out_dirs: dict[str, str | os.PathLike] | None = None,
    threshold_rows: Tensor | None = None,
) -> dict[str, TrainedSAE]:
    """Train several SAEs (replicates, architectures) from ONE pass over ``batches`` with sae-lens's
    ``MultiSAETrainer``: each SAE keeps its own sae-lens ``SAETrainer`` (optimizer, lr schedule, aux loss,
    sparsity window, normalisation estimate), initialised from its own ``cfg.seed`` and fed its own
    draw of the shared stream (see :class:`_SharedPass`; its order also comes from ``cfg.seed``).

    ``batches``: endless iterator of shuffled [batch_size, d_in] rows (e.g. ``CachedActivations.batches``).
    Configs must agree on ``batch_size``, ``total_samples``, ``n_batches_for_norm_estimate`` and ``device``;
    seeds must differ (two SAEs with one seed would be one SAE twice). ``threshold_rows``: as in
    :func:`train_sae` (the same rows for every SAE; None: each SAE's next draws of the stream).
    """
    if not cfgs:
        raise ValueError("train_saes needs at least one config")
    first = next(iter(cfgs.values()))
    for name, cfg in cfgs.items():
        diff = [k for k in _LOCKSTEP_SAME if getattr(cfg, k) != getattr(first, k)]
        if diff:
            raise ValueError(
                f"SAEs trained in one pass must share {[k.removeprefix('resolved_') for k in _LOCKSTEP_SAME]}; "
                f"{name!r} differs in {[k.removeprefix('resolved_') for k in diff]}"
            )
    par = _data_parallel()
    if par is not None:
        par.check(first.batch_size)
    seeds = {n: c.seed for n, c in cfgs.items()}
    if len(set(seeds.values())) != len(seeds):
        raise ValueError(f"every SAE needs its own seed (see derive_seed), got {seeds}")
    logs: dict[str, list[dict[str, float]]] = {n: [] for n in cfgs}
    device = torch.device(first.device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        saes = {}
        for name, cfg in cfgs.items():
            torch.manual_seed(cfg.seed)
            saes[name] = build_training_sae(d_in, cfg)
            meta = (manifests or {}).get(name) or {}
            if meta.get("hook"):
                saes[name].cfg.metadata.hook_name = meta["hook"]
            if meta.get("model_name"):
                saes[name].cfg.metadata.model_name = meta["model_name"]
        provider = _SharedPass(batches, seeds, first.batch_size, int(d_in), first.device, pool_batches)
        coordinator = _LockstepTrainer(
            {n: _trainer_config(c) for n, c in cfgs.items()},
            saes,
            provider,
            log_every=first.log_every,
            logs=logs,
            par=par,
            global_batch=first.batch_size,
        )
        fitted = coordinator.fit()
        source = _threshold_batches(threshold_rows, first, int(d_in), list(cfgs), par)
        thresholds = reestimate_thresholds(
            fitted, {n: c.threshold_batches for n, c in cfgs.items()}, source or coordinator.data_provider
        )
    out: dict[str, TrainedSAE] = {}
    for name, cfg in cfgs.items():
        meta = {
            **((manifests or {}).get(name) or {}),
            "lockstep": {"group": sorted(cfgs), "pool_batches": pool_batches},
            **({"inference_threshold": thresholds[name]} if name in thresholds else {}),
        }
        out[name] = _finish(fitted[name], coordinator.trainers[name], cfg, int(d_in), logs[name], meta)
        if out_dirs and name in out_dirs and (par is None or par.rank == 0):
            out[name].path = save_trained(out[name], out_dirs[name])
    return out


def save_trained(trained: TrainedSAE, out_dir: str | os.PathLike) -> Path:
    """Write ``trained`` atomically: sae-lens's ``cfg.json`` + ``sae_weights.safetensors`` (+ its
    ``sparsity.safetensors``), our ``mechvit_sae.json`` manifest and the ``metrics.jsonl`` log."""
    with staged_dir(out_dir) as tmp:
        trained.sae.save_model(tmp)
        if trained.log_feature_sparsity is not None:
            atomic_save_safetensors(
                Path(tmp) / SPARSITY_NAME, {"sparsity": trained.log_feature_sparsity.contiguous()}
            )
        atomic_write_json(Path(tmp) / MANIFEST_NAME, trained.manifest)
        atomic_write_text(
            Path(tmp) / METRICS_LOG_NAME, "".join(json.dumps(strict_json(e)) + "\n" for e in trained.log)
        )
    return Path(out_dir)


def load_sae(path: str | os.PathLike, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Load an SAE written by ``train_sae`` (plain ``sae_lens.SAE.load_from_disk``) and its manifest."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise ValueError(
            f"{path} is not an SAE directory: expected cfg.json and sae_weights.safetensors in it"
        )
    manifest_path = path / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return SAE.load_from_disk(path, device=device), manifest


class _EveryPassHasImages:
    """``data`` for a streaming store, which reads it once per epoch until the SAE has its samples: a
    pass that yields no image raises ValueError instead of leaving the store waiting forever for its first
    batch."""

    def __init__(self, data: Any):
        self.data, self.passes = data, 0

    def __iter__(self) -> Iterator[Any]:
        n = 0
        for item in self.data:
            x = item[0] if isinstance(item, (tuple, list)) and item else item
            n += len(x) if isinstance(x, Tensor) else 1
            yield item
        if n == 0:
            raise ValueError(
                "data has no images: nothing to train the SAE on"
                if self.passes == 0
                else f"data yielded no images on pass {self.passes + 1}: streaming SAE training reads "
                "the data once per epoch, so it must be re-iterable (a tensor, a list of batches or a "
                "DataLoader, not a one-shot iterator or generator), or cache it first with cache_dir"
            )
        self.passes += 1


def _images_every_pass(data: Any) -> Any:
    """``data`` itself when it is an image tensor (or ``(images, labels)``) with images, else a guard."""
    images = data if isinstance(data, Tensor) else None
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor) and data[0].ndim == 4:
        images = data[0]
    if images is not None:
        if len(images) == 0:
            raise ValueError(f"data has no images (shape {tuple(images.shape)}): nothing to train the SAE on")
        return data
    return _EveryPassHasImages(data)


def train_sae_for_hook(
    model: Any,
    data: Any,
    store: ActivationStoreConfig,
    cfg: SAETrainingConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    transform: ImageTransform | None = None,
    heldout: Tensor | None = None,
) -> TrainedSAE:
    """Train an SAE on ``model``'s activations at ``store.hook`` over ``data``.

    With ``cache_dir`` the activations are cached to disk first (resumable) and read back memory-mapped;
    without, they stream from the model through the shuffle buffer, epoch after epoch. ``heldout`` rows
    ([n, d_in], e.g. ``CachedActivations.rows()`` of a test split) add reconstruction metrics to the manifest.
    """
    cfg = cfg or SAETrainingConfig()
    cfg.check_run_length()  # before the activations are cached
    check_hook(model, store.hook)
    manifest: dict[str, Any] = {
        "hook": store.hook,
        "tokens": store.tokens,
        "model_sha256": model_fingerprint(model),
        "model_name": getattr(model.cfg, "timm_name", None),
        "corruption_mix": store.mix.to_dict(),
        "store": store.identity(),
    }
    if cache_dir is not None:
        cached = cache_activations(model, data, cache_dir, store, dataset=dataset, transform=transform)
        d_in = cached.d_in
        manifest["dataset"], manifest["activations"] = cached.manifest["dataset"], str(Path(cache_dir))
        manifest["n_activations"] = len(cached)
        # the data order is the SAE's own (cfg.seed); store.seed decided the cached rows themselves
        batches = cached.batches(
            cfg.batch_size, buffer_size=store.buffer_size, seed=cfg.seed, device=cfg.device
        )
    else:
        d_in = hook_width(model, store.hook, store.tokens)
        manifest["dataset"] = dataset or _dataset_id(data, None)
        batches = stream_batches(model, _images_every_pass(data), store, cfg.batch_size, transform=transform)
    trained = train_sae(batches, d_in, cfg, out_dir=None, manifest=manifest)
    if heldout is not None:
        trained.manifest["heldout_metrics"] = reconstruction_metrics(trained.sae, heldout).to_dict()
    if out_dir is not None:
        trained.path = save_trained(trained, out_dir)
    return trained
