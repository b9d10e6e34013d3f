"""SAE activation store and SAE training throughput, each against a plain in-memory baseline in the same run.

    python benchmarks/bench_sae.py [--images 1000] [--layer 3] [--steps 30] [--rounds 3]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16]

Store (activations/s, patch tokens of ``blocks.{layer}.hook_resid_post``):
  baseline  ``run_with_cache(names_filter=hook)`` per batch (full forward), all rows kept in one tensor,
            then batches drawn by ``randperm`` indexing: the plain in-memory approach;
  stream    ``stream_batches``: forward stopped at the hook, shuffle buffer, bounded memory;
  cache     ``cache_activations`` (float16 shards + manifest) then one pass of ``CachedActivations.batches``;
  read      ``CachedActivations.batches`` alone (memory-mapped read-back) vs the in-memory tensor iterator.
  write     ``cache_activations`` alone (forward to the hook + float16 shards on disk) vs the same forward
            with the rows kept in memory (``iter_activations`` into one tensor);
  seq read  ``CachedActivations.chunks(shuffle=False)`` as float32 (sequential memory-mapped read) vs
            slicing the in-memory float32 tensor.
SAE training (samples/s), the same sae-lens ``SAETrainer`` (BatchTopK, k=32, x16) fed by: an in-memory
tensor iterator (baseline), the disk cache, the live stream; and on in-memory rows our sparse BatchTopK step
(``mechvit.sae.train._BatchTopKTrainingSAE.training_forward_pass``, CPU) against sae-lens's dense one. Rounds are interleaved; ratios are of medians.

``--device`` (default ``auto``: CUDA when present) runs the ViT and the SAE training there, both sides alike;
timings synchronise the device before and after each call. ``--dtype bfloat16`` runs the ViT in bfloat16
(the store casts the images to it) and the SAE training under ``torch.autocast`` to bfloat16 (float32 weights
and optimiser); the cache stores float16 and every batch is float32, whatever the dtype. The memory-mapped
read rows compare host-side reads (CPU tensors) on every device.

Processes (torch.distributed, gloo, forked CPU ranks with one thread each, the ``--dtype`` as above;
``--no-processes`` skips it): ``cache_activations_distributed`` and data-parallel ``train_sae`` (DDP, same
global batch) on 2 processes vs 1 (activations/s and samples/s, wall time between two barriers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mechvit import HookedViT
from mechvit.sae import (
    ActivationStoreConfig,
    CachedActivations,
    SAETrainingConfig,
    cache_activations,
    stream_batches,
)
from mechvit.sae.activations import iter_activations, select_tokens
from mechvit.sae.distributed import cache_activations_distributed
from mechvit.sae.train import _BatchTopKTrainingSAE, train_sae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_device_args, kept_output, load, machine, resolve, sync  # noqa: E402


def images_for(n: int) -> torch.Tensor:
    try:
        from mechvit.data import load_fashion_mnist

        return load_fashion_mnist("test")[0][:n]
    except Exception:  # no dataset here: random images measure the same code paths
        return torch.rand(n, 1, 28, 28)


def memory_batches(rows: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """The baseline iterator: random batches of an in-memory tensor, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(rows), generator=g).to(rows.device)
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[perm[i : i + batch_size]]


def timed(fn: Callable[[], int], device: torch.device) -> tuple[float, int]:
    """Seconds and items of ``fn()``, the device's queue drained before and after (CUDA runs asynchronously)."""
    sync(device)
    t = time.perf_counter()
    n = fn()
    sync(device)
    return time.perf_counter() - t, n


def precision(device: torch.device, dtype: torch.dtype):
    """``(transform, autocast)``: the cast of the store's float32 images to the ViT's dtype (None for
    float32), and the context SAE training runs in (autocast to ``dtype``, or nothing for float32)."""
    if dtype == torch.float32:
        return None, contextlib.nullcontext

    def transform(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype)

    return transform, functools.partial(torch.autocast, device.type, dtype=dtype)


def _rank(rank: int, world: int, tmp: str, job: Callable[[int], int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        dist.barrier()
        t = time.perf_counter()
        n = job(rank)
        dist.barrier()
        if rank == 0:
            Path(tmp, "result.json").write_text(json.dumps([n, time.perf_counter() - t]))
    finally:
        dist.destroy_process_group()


def in_processes(job: Callable[[int], int], world: int) -> float:
    """Items per second of ``job`` run on ``world`` forked ranks (one thread each), between two barriers."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, tmp, job), nprocs=world, start_method="fork")
        n, seconds = json.loads(Path(tmp, "result.json").read_text())
    return n / seconds


def process_scaling(model, images, store, d_model: int, args, dtype) -> list[tuple[str, float, float]]:
    """1 vs 2 processes: caching and data-parallel SAE training, on CPU ranks (``model`` on the CPU in
    ``dtype``). Forked before this process runs any multi-threaded op (OpenMP is not fork-safe) or starts
    CUDA."""
    folder = tempfile.TemporaryDirectory()
    transform, autocast = precision(torch.device("cpu"), dtype)

    def cache_job(rank: int, out: Path) -> int:
        cached = cache_activations_distributed(model, images, out, store, transform=transform, progress=False)
        return len(cached)

    rows = torch.randn(8 * args.batch, d_model, generator=torch.Generator().manual_seed(0))
    cfg = SAETrainingConfig(
        architecture="batchtopk",
        k=32,
        expansion_factor=16,
        batch_size=args.batch,
        total_samples=args.batch * args.steps,
        n_batches_for_norm_estimate=5,
        log_every=10**9,
    )

    def train_job(rank: int) -> int:
        with autocast():
            train_sae(memory_batches(rows, args.batch), d_model, cfg)
        return args.batch * args.steps

    rates: dict[str, list[float]] = {k: [] for k in ("cache1", "cache2", "train1", "train2")}
    for r in range(args.rounds):
        for world in (1, 2):
            out = Path(folder.name) / f"cache{r}_{world}"  # a fresh folder: a finished cache would be reused
            rates[f"cache{world}"].append(in_processes(functools.partial(cache_job, out=out), world))
            rates[f"train{world}"].append(in_processes(train_job, world))
    folder.cleanup()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return [
        ("caching (activations/s): 2 CPU processes vs 1", med["cache2"], med["cache1"]),
        (
            f"SAE training (samples/s, global batch {args.batch}): 2 CPU processes vs 1",
            med["train2"],
            med["train1"],
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--batch", type=int, default=1024, help="SAE batch (activations)")
    ap.add_argument("--steps", type=int, default=30, help="SAE training steps per variant")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-processes", action="store_true", help="skip the 1 vs 2 processes comparison")
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = resolve(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=args.width,
        depth=args.depth,
        num_heads=3,
    )
    cpu_model = HookedViT.from_timm(vit).eval().to(dtype=dtype)
    images = images_for(args.images)
    hook = f"blocks.{args.layer}.hook_resid_post"
    store = ActivationStoreConfig(
        hook=hook, tokens="patches", model_batch_size=128, buffer_size=16 * args.batch
    )
    n_rows = len(images) * cpu_model.cfg.n_patches
    print(f"{machine(device, dtype)} (before)")
    print(
        f"ViT d={args.width} depth={args.depth}, {len(images)} images -> {n_rows} activations at {hook}; "
        f"{args.rounds} interleaved rounds; {os.cpu_count()} CPUs, {args.threads} threads"
    )
    d_model = cpu_model.cfg.d_model
    scaling = [] if args.no_processes else process_scaling(cpu_model, images, store, d_model, args, dtype)
    model = cpu_model if device.type == "cpu" else copy.deepcopy(cpu_model).to(device)
    transform, autocast = precision(device, dtype)

    def baseline_store() -> int:
        with torch.no_grad():
            parts = [
                select_tokens(
                    model.run_with_cache(x.to(device, dtype), names_filter=hook)[1][hook],
                    model.cfg,
                    "patches",
                ).float()
                for x in images.split(store.model_batch_size)
            ]
        rows = torch.cat(parts)
        it = memory_batches(rows, args.batch)
        return sum(len(next(it)) for _ in range(len(rows) // args.batch))

    def stream_store() -> int:
        return sum(
            len(b) for b in stream_batches(model, images, store, args.batch, epochs=1, transform=transform)
        )

    tmp = tempfile.TemporaryDirectory()

    def cache_store() -> int:
        cached = cache_activations(model, images, tmp.name, store, transform=transform)
        # cache_activations resumes a finished cache: clear it so every round really writes
        for s in cached.manifest["shards"]:
            (cached.path / s["file"]).unlink()
        (cached.path / "manifest.json").unlink()
        return sum(len(b) for b in cached.batches(args.batch, buffer_size=store.buffer_size, epochs=1))

    cache_activations(model, images, tmp.name + "/read", store, transform=transform)
    reader = CachedActivations(tmp.name + "/read")
    in_memory = reader.rows()

    def read_cache() -> int:
        return sum(len(b) for b in reader.batches(args.batch, buffer_size=store.buffer_size, epochs=1))

    def read_memory() -> int:
        it = memory_batches(in_memory, args.batch)
        return sum(len(next(it)) for _ in range(len(in_memory) // args.batch))

    def write_memory() -> int:  # the same forward, rows kept in one float32 tensor
        return len(
            torch.cat([rows for _, rows in iter_activations(model, images, store, transform=transform)])
        )

    def write_cache() -> int:
        cached = cache_activations(model, images, tmp.name + "/write", store, transform=transform)
        for s in cached.manifest["shards"]:
            (cached.path / s["file"]).unlink()
        (cached.path / "manifest.json").unlink()
        return len(cached)

    chunk = 16 * args.batch

    def seq_read_memory() -> int:
        return sum(len(c.to(torch.float32, copy=True)) for c in in_memory.split(chunk))  # a copy per slice

    def seq_read_cache() -> int:
        return sum(len(c.float()) for c in reader.chunks(chunk, shuffle=False))

    store_variants = {
        "baseline": baseline_store,
        "stream": stream_store,
        "cache": cache_store,
        "read_memory": read_memory,
        "read_cache": read_cache,
        "write_memory": write_memory,
        "write_cache": write_cache,
        "seq_read_memory": seq_read_memory,
        "seq_read_cache": seq_read_cache,
    }
    train_cfg = SAETrainingConfig(
        architecture="batchtopk",
        k=32,
        expansion_factor=16,
        batch_size=args.batch,
        total_samples=args.batch * args.steps,
        n_batches_for_norm_estimate=5,
        log_every=10**9,
        device=str(device),
    )

    def train_on(batches: Iterator[torch.Tensor]) -> int:
        with autocast():
            train_sae(batches, d_model, train_cfg)
        return args.batch * args.steps  # trained samples (the norm estimate is inside the time)

    def train_dense(batches: Iterator[torch.Tensor]) -> int:
        """sae-lens's own dense BatchTopK step (our sparse CPU step switched off)."""
        sparse = _BatchTopKTrainingSAE._sparse_step_applies
        _BatchTopKTrainingSAE._sparse_step_applies = lambda self, x: False
        try:
            return train_on(batches)
        finally:
            _BatchTopKTrainingSAE._sparse_step_applies = sparse

    on_device = in_memory.to(device)  # the baseline's rows where the SAE trains
    train_variants = {
        "memory": lambda: train_on(memory_batches(on_device, args.batch)),
        "dense": lambda: train_dense(memory_batches(on_device, args.batch)),
        "cache": lambda: train_on(reader.batches(args.batch, buffer_size=store.buffer_size, device=device)),
        "stream": lambda: train_on(stream_batches(model, images, store, args.batch, transform=transform)),
    }
    results: dict[str, list[float]] = {f"store/{k}": [] for k in store_variants}
    results.update({f"train/{k}": [] for k in train_variants})
    for fn in [*store_variants.values(), *train_variants.values()]:
        fn()  # warm-up
    for _ in range(args.rounds):
        for group, variants in (("store", store_variants), ("train", train_variants)):
            for k, fn in variants.items():
                seconds, n = timed(fn, device)
                results[f"{group}/{k}"].append(n / seconds)
    med = {k: statistics.median(v) for k, v in results.items()}
    print("\n| measurement | ours (/s) | baseline (/s) | ratio |\n|---|---|---|---|")
    rows = [
        (
            "store: stream (early stop + shuffle buffer) vs run_with_cache + in-memory",
            "store/stream",
            "store/baseline",
        ),
        ("store: disk cache write + read vs run_with_cache + in-memory", "store/cache", "store/baseline"),
        (
            "store: memory-mapped read-back vs in-memory tensor iterator (host)",
            "store/read_cache",
            "store/read_memory",
        ),
        (
            "store: cache write (forward + float16 shards) vs forward into memory",
            "store/write_cache",
            "store/write_memory",
        ),
        (
            "store: sequential memory-mapped read (float16 -> float32) vs in-memory slices (host)",
            "store/seq_read_cache",
            "store/seq_read_memory",
        ),
        (
            "SAE training: our sparse BatchTopK step (CPU) vs sae-lens's dense step, in-memory rows",
            "train/memory",
            "train/dense",
        ),
        ("SAE training fed by the disk cache vs in-memory iterator", "train/cache", "train/memory"),
        ("SAE training fed by the live stream vs in-memory iterator", "train/stream", "train/memory"),
    ]
    for label, ours, base in rows:
        print(f"| {label} | {med[ours]:,.0f} | {med[base]:,.0f} | {med[ours] / med[base]:.2f}x |")
    for label, two, one in scaling:
        print(f"| {label} | {two:,.0f} | {one:,.0f} | {two / one:.2f}x |")
    print(f"{load()} (after)")
    tmp.cleanup()


if __name__ == "__main__":
    with kept_output("bench_sae"):
        main()
