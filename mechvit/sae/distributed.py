"""The SAE pipeline on several processes (``torchrun``): sharded activation caching and data-parallel
SAE training, both giving what one process gives.

Caching (:func:`cache_activations_distributed`): shard ``i`` of the cache (image batches
``[i * batches_per_shard, (i + 1) * batches_per_shard)``, clean/corrupted mix seeded by the batch index, token
selection as in :func:`mechvit.sae.cache_activations`) is computed by rank ``i % world_size``, which writes
``shard_<i>.npy`` itself and records it in its own progress file ``manifest.rank<r>.json`` (atomic). When
every rank is done (barrier), rank 0 merges the records, in shard order, into ``manifest.json`` (atomic)
and deletes the progress files. The merged cache is the single-process cache: same files, same rows in the
same order, same manifest. A killed run keeps every finished shard; a rerun (any number of processes, or
one) computes only the missing shards.

Training (``train_sae`` / ``train_saes`` under torchrun, through :func:`data_parallel`): every rank reads
the same global batches (``batch_size`` rows, whatever the number of processes) and trains on its
``batch_size / world_size`` slice; gradients are averaged by torch's ``DistributedDataParallel``. What
sae-lens computes over a batch is made global so the result equals one process on the same global batches:
the activation-norm estimate, the dead-feature and firing-frequency statistics, and BatchTopK's batch-wide
top-k and its threshold (:class:`GlobalBatchTopK`). Rank 0 saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from sae_lens.config import SAETrainerConfig
from sae_lens.saes import BatchTopKTrainingSAE
from sae_lens.saes.sae import TrainingSAE, TrainStepInput, TrainStepOutput
from sae_lens.training.activation_scaler import ActivationScaler
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..runtime import rank0_runs, rank_and_world
from .activations import (
    ActivationStoreConfig,
    CachedActivations,
    ImageTransform,
    _as_image_tensor,
    _partial_manifests,
    cache_identity,
    check_hook,
    finished_shards,
    iter_activations,
    write_manifest,
    write_shard,
)
from .train import _LoggingTrainer, min_positive

__all__ = [
    "DataParallel",
    "GlobalBatchTopK",
    "cache_activations_distributed",
    "data_parallel",
    "init_from_env",
    "leave_process_group",
    "rank0_runs",
    "rank_and_world",
]


# ---- process group ---------------------------------------------------------------------------------------


_JOINED = False  # init_from_env made this process's group (and leave_process_group may destroy it)


def init_from_env(device: str = "auto", timeout_minutes: float = 120.0) -> str:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...)
    and return this rank's device. ``device``: ``auto`` (cuda when available), ``cpu``, ``cuda``; under
    torchrun ``cuda`` becomes ``cuda:<LOCAL_RANK>``. Backend: gloo for CPU tensors and nccl for CUDA ones
    (``cpu:gloo,cuda:nccl`` when CUDA is available, else ``gloo``). Outside torchrun nothing is initialised.
    The timeout is long because ranks wait at the end of caching for the slowest rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available")
        if world > 1 and torch.device(device).index is None:
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        global _JOINED
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        _JOINED = True
    return device


def leave_process_group() -> None:
    """Destroy the process group :func:`init_from_env` made, once the command is done (a no-op otherwise, and
    a group the caller made is left alone). Without it gloo's worker threads can outlive the interpreter's
    teardown and abort the process at exit, "terminate called without an active exception" (SIGABRT) after
    a successful run (pytorch/pytorch#190489; seen once in CI under torchrun). Call it on success only: on
    an error other ranks may still be inside a collective."""
    global _JOINED
    if _JOINED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _JOINED = False


def _rank0_decides(message: str | None) -> str | None:
    """Rank 0's ``message`` on every rank (a collective: it also synchronises the ranks)."""
    _, world = rank_and_world()
    if world == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


# ---- caching ---------------------------------------------------------------------------------------------


def _n_images(data: Any) -> int | None:
    images = _as_image_tensor(data)
    if images is not None:
        return len(images)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    return None


def _images_between(data: Any, start: int, stop: int, batch_size: int, num_workers: int) -> Any:
    """Images ``[start, stop)`` of ``data`` (a tensor, ``(images, labels)`` or a map-style Dataset)."""
    images = _as_image_tensor(data)
    if images is not None:
        return images[start:stop]
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(data, range(start, stop)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )


def cache_activations_distributed(
    model: Any,
    data: Any,
    out_dir: str | os.PathLike,
    cfg: ActivationStoreConfig,
    *,
    dataset: str | None = None,
    batches_per_shard: int = 16,
    dtype: Literal["float16", "float32"] = "float16",
    transform: ImageTransform | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> CachedActivations:
    """:func:`mechvit.sae.cache_activations` split over the ranks of the process group (one process
    without one). Call it on every rank with the same model, data and config (checked: a rank with another
    model hash or dataset raises ``ValueError`` on every rank).

    ``data``: a tensor, ``(images, labels)`` or a map-style ``Dataset`` of ``(image, label)`` (each rank
    reads only its shards' images, through a ``DataLoader`` with ``num_workers``); any other iterable of
    image batches is read whole by every rank, which keeps only its shards. ``out_dir`` must be one folder
    every rank can write (a shared filesystem across nodes).
    """
    rank, world = rank_and_world()
    identity = cache_identity(
        model, data, cfg, dataset=dataset, batches_per_shard=batches_per_shard, dtype=dtype
    )
    check_hook(model, cfg.hook)
    cfg.mix.validate()
    out = Path(out_dir)
    if world > 1:
        identities: list[Any] = [None] * world
        dist.all_gather_object(identities, identity)
        bad = {
            r: sorted(k for k in identity if other.get(k) != identities[0].get(k))
            for r, other in enumerate(identities)
        }
        bad = {r: keys for r, keys in bad.items() if keys}
        if bad:
            raise ValueError(
                f"the ranks would cache different activations (rank: keys differing from rank 0's): {bad}; "
                "every rank needs the same model, data and store config"
            )
    problem = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        try:
            finished_shards(out, identity, overwrite=overwrite)  # refuses (or clears) a different cache
        except ValueError as e:
            problem = str(e)
    problem = _rank0_decides(problem)
    if problem:
        raise ValueError(problem)
    done = finished_shards(out, identity)
    own_file = f"manifest.rank{rank:05d}.json"
    # this rank rewrites its progress file of an earlier run: keep the records it held
    mine = {i: s for i, s in done.items() if s["file"] in _files_listed(out / own_file)}

    def record(index: int, parts: list[np.ndarray], first_batch: int) -> None:
        mine[index] = write_shard(out, index, parts, first_batch, dtype, cfg.hook)
        write_manifest(out, identity, mine, mine[index]["width"], False, name=own_file)

    bps, per_shard = batches_per_shard, batches_per_shard * cfg.model_batch_size
    n_images = _n_images(data)
    desc = f"caching {cfg.hook}" + (f" (rank {rank}/{world})" if world > 1 else "")
    if n_images is not None:
        todo = [i for i in range(math.ceil(n_images / per_shard)) if i % world == rank and i not in done]
        for i in tqdm(todo, desc=desc, unit="shard", leave=False, disable=not progress):
            part = _images_between(
                data, i * per_shard, min(n_images, (i + 1) * per_shard), cfg.model_batch_size, num_workers
            )
            rows = iter_activations(model, part, cfg, transform=transform, batch_offset=i * bps)
            record(i, [r.cpu().numpy().astype(dtype) for _, r in rows], i * bps)
    else:  # an iterable of batches: every rank reads it all and runs the model on its own shards only
        pending: list[np.ndarray] = []
        current = -1
        skip = lambda b: b // bps % world != rank or b // bps in done  # noqa: E731
        for b, rows in tqdm(
            iter_activations(model, data, cfg, transform=transform, skip_batch=skip),
            desc=desc,
            disable=not progress,
        ):
            if b // bps != current:
                if pending:
                    record(current, pending, current * bps)
                pending, current = [], b // bps
            pending.append(rows.cpu().numpy().astype(dtype))
        if pending:
            record(current, pending, current * bps)

    _barrier()  # every rank has written its shards
    problem = None
    if rank == 0:
        shards = finished_shards(out, identity)
        expected = range(math.ceil(n_images / per_shard)) if n_images is not None else range(len(shards))
        missing = sorted(set(expected) - set(shards))
        if not shards:
            problem = "no images in data: nothing to cache"
        elif missing:
            problem = f"the activation cache in {out} misses shards {missing[:10]} after every rank finished"
        else:
            write_manifest(out, identity, shards, next(iter(shards.values()))["width"], True)
            for path in _partial_manifests(out):
                path.unlink(missing_ok=True)
    problem = _rank0_decides(problem)
    if problem:
        raise ValueError(problem)
    return CachedActivations(out)


def _files_listed(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {s["file"] for s in json.loads(path.read_text()).get("shards", [])}


# ---- training --------------------------------------------------------------------------------------------


class GlobalBatchTopK(nn.Module):
    """sae-lens's ``BatchTopK`` over the global batch when each rank holds a slice of it: the
    ``k * global_rows`` largest activations of all ranks together are kept. Each rank sends its own top
    ``k * global_rows`` values (the global top set is within their union); the smallest kept value is the
    threshold. The output (and its gradient) is that of ``BatchTopK`` on the concatenated batch."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        acts = x.relu()
        _, world = rank_and_world()
        keep = int(self.k * acts.shape[:-1].numel() * world)
        if keep == 0:
            return torch.zeros_like(acts)
        local = torch.topk(acts.detach().flatten(), min(keep, acts.numel())).values
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous())
        threshold = torch.topk(torch.cat(gathered), keep).values[-1]
        return acts * (acts >= threshold)


class _GlobalBatchTopKTrainingSAE(BatchTopKTrainingSAE):
    """sae-lens's BatchTopK training SAE with the batch-wide operations over the global batch: the top-k
    (:class:`GlobalBatchTopK`) and the inference-threshold EMA (the minimum positive kept activation)."""

    def get_activation_fn(self):
        return GlobalBatchTopK(self.cfg.k)

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: Tensor) -> None:
        low = min_positive(acts_topk).to(torch.float64).to(self.topk_threshold.device)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if math.isfinite(low.item()):
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * low.to(self.topk_threshold.dtype)


class _GlobalActivationScaler(ActivationScaler):
    """sae-lens's activation scaler with the mean-norm estimate over the global batches."""

    @torch.no_grad()
    def estimate_scaling_factor(self, d_in: int, data_provider: Any, n_batches_for_norm_estimate: int = 1000):
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(n_batches_for_norm_estimate):
            norms = next(data_provider).norm(dim=-1)
            total += torch.tensor([norms.float().sum().item(), norms.numel()], dtype=torch.float64)
        dist.all_reduce(total)
        self.scaling_factor = (d_in**0.5) / float(total[0] / total[1])

    def estimate_whitening(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("covariance whitening is not supported in data-parallel training")


class _TrainingForward(nn.Module):
    """The module DistributedDataParallel wraps: its forward is the SAE's ``training_forward_pass``."""

    def __init__(self, sae: TrainingSAE):
        super().__init__()
        self.sae = sae

    def forward(self, step_input: TrainStepInput) -> TrainStepOutput:
        return type(self.sae).training_forward_pass(self.sae, step_input)


class DataParallelTrainer(_LoggingTrainer):
    """sae-lens's ``SAETrainer`` (through our logging subclass: its loop, Adam, gradient clipping, lr and
    coefficient schedules run unchanged) on this rank's slice of every global batch.

    Why DistributedDataParallel reached through ``training_forward_pass``: the trainer's only call into the
    SAE for a step is ``self.sae.training_forward_pass(step_input=...)``, never ``sae(...)``, and DDP arms its
    gradient all-reduce in its own ``forward``. So the SAE gets an instance attribute
    ``training_forward_pass`` that calls ``DDP(_TrainingForward(sae))``: DDP broadcasts rank 0's weights at
    the start, averages the gradients during ``loss.backward()`` (bucketed, overlapped with the backward),
    and the trainer's ``clip_grad_norm_`` and ``optimizer.step()`` then see the global-batch gradient, as
    in one process. Plain all-reduce hooks on the four parameters would do the same arithmetic, but DDP is
    the engine the torch ecosystem runs and checks (parameter shapes agree across ranks, no reduction is
    left pending). Reimplementing the step instead would fork sae-lens's trainer.

    The trainer's batch statistics are made global after each step (:meth:`after_step`): firing counts
    summed, steps-since-fired taken as the minimum over ranks (a feature is alive if it fired on any
    rank), so dead-feature masks (TopK auxiliary loss) and the saved sparsity equal one process's.
    """

    def __init__(
        self, *args: Any, world_size: int, global_batch: int, device_ids: list[int] | None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self._world, self._global_batch = world_size, global_batch
        self.activation_scaler = _GlobalActivationScaler()
        self._ddp = DistributedDataParallel(_TrainingForward(self.sae), device_ids=device_ids)

        def through_ddp(step_input: TrainStepInput) -> TrainStepOutput:
            return self._ddp(step_input)

        self.sae.training_forward_pass = through_ddp  # a plain function attribute, not a submodule

    def step(self, batch: Tensor) -> TrainStepOutput:
        self._freq_before = self.act_freq_scores.clone()
        self._frac_before = self.n_frac_active_samples
        return super().step(batch)

    @torch.no_grad()
    def after_step(self) -> None:
        delta = self.act_freq_scores - self._freq_before
        dist.all_reduce(delta)
        self.act_freq_scores = self._freq_before + delta
        self.n_frac_active_samples = self._frac_before + self._global_batch
        dist.all_reduce(self.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)

    @property
    def samples_seen(self) -> int:
        return self.n_training_samples * self._world


class _RankSlice:
    """This rank's rows of each global batch (or of each SAE's batch in a ``{name: batch}`` dict)."""

    def __init__(self, batches: Any, rank: int, world: int):
        self._it, self._rank, self._world = iter(batches), rank, world

    def __iter__(self) -> _RankSlice:
        return self

    def _slice(self, batch: Tensor) -> Tensor:
        n = len(batch) // self._world
        return batch[self._rank * n : (self._rank + 1) * n]

    def __next__(self) -> Any:
        batch = next(self._it)
        if isinstance(batch, dict):
            return {k: self._slice(v) for k, v in batch.items()}
        return self._slice(batch)


@dataclasses.dataclass
class DataParallel:
    """What ``train_sae``/``train_saes`` need to train on this rank's slice (see :func:`data_parallel`)."""

    rank: int
    world_size: int

    def check(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the number of processes ({self.world_size}): "
                "the global batch is split evenly"
            )

    def trainer_config(self, tc: SAETrainerConfig) -> SAETrainerConfig:
        """Per-rank sizes: a ``1 / world_size`` slice of each batch, same number of steps."""
        return dataclasses.replace(
            tc,
            train_batch_size_samples=tc.train_batch_size_samples // self.world_size,
            total_training_samples=tc.total_training_samples // self.world_size,
        )

    def sae(self, sae: TrainingSAE) -> TrainingSAE:
        """BatchTopK gets the global-batch variant (same weights); the others are per-row already."""
        if isinstance(sae, BatchTopKTrainingSAE) and not isinstance(sae, _GlobalBatchTopKTrainingSAE):
            glob = _GlobalBatchTopKTrainingSAE(sae.cfg)
            glob.load_state_dict(sae.state_dict())
            return glob
        return sae

    def slices(self, batches: Any) -> _RankSlice:
        return _RankSlice(batches, self.rank, self.world_size)

    def trainer(self, *, cfg: SAETrainerConfig, global_batch: int, **kwargs: Any) -> DataParallelTrainer:
        device = torch.device(cfg.device)
        ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        return DataParallelTrainer(
            cfg=self.trainer_config(cfg),
            world_size=self.world_size,
            global_batch=global_batch,
            device_ids=ids,
            **kwargs,
        )


def data_parallel() -> DataParallel | None:
    """The data-parallel set-up when this process is one of several (torch.distributed initialised with more
    than one rank, e.g. under torchrun after :func:`init_from_env`), else None."""
    rank, world = rank_and_world()
    return DataParallel(rank, world) if world > 1 else None
