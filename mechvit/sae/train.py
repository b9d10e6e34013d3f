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
  JumpReLU SAE that BatchTopK becomes at inference (threshold = the learned batch top-k threshold).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from safetensors.torch import save_file
from torch import Tensor

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
    "load_sae",
    "save_trained",
    "train_sae",
    "train_sae_for_hook",
]

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "batchtopk", "jumprelu")
MANIFEST_NAME = "mechvit_sae.json"
METRICS_LOG_NAME = "metrics.jsonl"
SPARSITY_NAME = "sparsity.safetensors"  # sae-lens's own name for the log10 feature density


@dataclass
class SAETrainingConfig:
    """How to train one SAE. Defaults are CPU-sized; the paper's are BatchTopK, k=32, aux 1/32, x32, lr 1e-3."""

    architecture: Architecture = "batchtopk"
    expansion_factor: int = 16  # d_sae = expansion_factor * d_in (paper: 32)
    k: int = 32  # topk / batchtopk: active features per sample (batch mean for batchtopk)
    aux_coefficient: float = 1 / 32  # topk / batchtopk: dead-feature auxiliary loss
    l1_coefficient: float = 5.0  # standard (ReLU + L1, the paper's "vanilla")
    l1_warmup_steps: int = 0
    l0_coefficient: float = 1.0  # jumprelu
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    topk_threshold_lr: float | None = None  # batchtopk: EMA rate of the inference threshold; None = auto
    lr: float = 1e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps: int = 0
    lr_end: float | None = None  # cosine floor; None = lr / 10 (sae-lens's runner default)
    batch_size: int = 1024  # activations per step; every batch is exactly this size
    total_samples: int = 300_000  # rounded down to whole batches
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
        for name in ("expansion_factor", "k", "batch_size", "log_every", "n_batches_for_norm_estimate"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.total_samples < self.batch_size:
            raise ValueError(
                f"total_samples ({self.total_samples}) must be at least one batch ({self.batch_size})"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_warmup_steps < self.total_steps:
            raise ValueError(
                f"lr_warmup_steps must be in [0, {self.total_steps}), got {self.lr_warmup_steps}"
            )

    @property
    def total_steps(self) -> int:
        return self.total_samples // self.batch_size

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
        return BatchTopKTrainingSAE(
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
            raise ValueError(
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
    """sae-lens's trainer, unchanged, plus a metrics line every ``log_every`` steps (no wandb)."""

    def __init__(self, *args: Any, log_every: int, log: list[dict[str, float]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._log_every, self._log = log_every, log

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        out = super().step(batch)
        step = self.n_training_steps  # fit() increments after step(): this is the 0-based index
        if step % self._log_every == 0 or self.n_training_samples >= self.cfg.total_training_samples:
            entry = self.build_train_step_log_dict(output=out, n_training_samples=self.n_training_samples)
            self._log.append(
                {"step": step + 1, **{k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}}
            )
        return out


def train_sae(
    batches: Iterable[torch.Tensor],
    d_in: int,
    cfg: SAETrainingConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    manifest: dict[str, Any] | None = None,
) -> TrainedSAE:
    """Train an SAE with sae-lens's ``SAETrainer`` on ``batches`` (endless iterator of [batch_size, d_in]).

    ``manifest`` (hook, model hash, token selection, data mix, ...) is stored with the SAE. With
    ``out_dir`` the SAE is written atomically in sae-lens's format plus ``mechvit_sae.json`` and
    ``metrics.jsonl``. The returned ``sae`` is the inference SAE, read back the way sae-lens reads it.
    """
    cfg = cfg or SAETrainingConfig()
    log: list[dict[str, float]] = []
    device = torch.device(cfg.device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        sae = build_training_sae(d_in, cfg)
        if manifest and manifest.get("hook"):
            sae.cfg.metadata.hook_name = manifest["hook"]
        if manifest and manifest.get("model_name"):
            sae.cfg.metadata.model_name = manifest["model_name"]
        trainer = _LoggingTrainer(
            cfg=_trainer_config(cfg),
            sae=sae,
            data_provider=_ExactBatches(batches, cfg.batch_size, int(d_in), cfg.device),
            log_every=cfg.log_every,
            log=log,
        )
        sae = trainer.fit()
    final = log[-1] if log else {}
    record = {
        "format": "mechvit-sae/1",
        "sae_lens_version": sae_lens_version,
        "architecture": cfg.architecture,
        "inference_architecture": sae.cfg.get_inference_config_class().architecture(),
        "d_in": int(d_in),
        "d_sae": int(sae.cfg.d_sae),
        "training": asdict(cfg),
        "trained_samples": int(trainer.n_training_samples),
        "final_train_metrics": {
            k: final[k]
            for k in ("metrics/explained_variance", "metrics/l0", "losses/mse_loss", "sparsity/dead_features")
            if k in final
        },
        **(manifest or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        # the trainer's SAE is a training SAE; sae-lens writes and reads the inference one
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device=cfg.device)
    trained = TrainedSAE(
        sae=inference, manifest=record, log=log, log_feature_sparsity=trainer.log_feature_sparsity.cpu()
    )
    if out_dir is not None:
        trained.path = save_trained(trained, out_dir)
    return trained


def save_trained(trained: TrainedSAE, out_dir: str | os.PathLike) -> Path:
    """Write ``trained`` atomically: sae-lens's ``cfg.json`` + ``sae_weights.safetensors`` (+ its
    ``sparsity.safetensors``), our ``mechvit_sae.json`` manifest and the ``metrics.jsonl`` log."""
    with tempfile.TemporaryDirectory() as tmp:
        trained.sae.save_model(tmp)
        if trained.log_feature_sparsity is not None:
            save_file({"sparsity": trained.log_feature_sparsity.contiguous()}, Path(tmp) / SPARSITY_NAME)
        _write_json(Path(tmp) / MANIFEST_NAME, trained.manifest)
        with open(Path(tmp) / METRICS_LOG_NAME, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in trained.log)
        return _replace_dir(Path(tmp), Path(out_dir))


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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> Path:
    """Copy ``src`` next to ``dst`` then swap it in, so ``dst`` is never half written."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    shutil.copytree(src, staging, dirs_exist_ok=True)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(staging, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


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
        batches = cached.batches(
            cfg.batch_size, buffer_size=store.buffer_size, seed=store.seed, device=cfg.device
        )
    else:
        d_in = hook_width(model, store.hook, store.tokens)
        manifest["dataset"] = dataset or _dataset_id(data, None)
        batches = stream_batches(model, data, store, cfg.batch_size, transform=transform)
    trained = train_sae(batches, d_in, cfg, out_dir=None, manifest=manifest)
    if heldout is not None:
        trained.manifest["heldout_metrics"] = reconstruction_metrics(trained.sae, heldout).to_dict()
    if out_dir is not None:
        trained.path = save_trained(trained, out_dir)
    return trained
