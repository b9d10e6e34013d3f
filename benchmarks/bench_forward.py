"""HookedViT vs timm on the same weights: forward time ratios, measured in one run.

    python benchmarks/bench_forward.py [--models vit_tiny_patch16_224 vit_base_patch16_224] [--batches 8 32]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16]

Variants per (model, batch): timm forward; HookedViT forward (no hooks); HookedViT ``run_with_cache``
(every hook cached). Rounds are interleaved (timm, hooked, cached, timm, ...) so that drift in machine
load hits all variants alike; each ratio is median(variant) / median(timm). no_grad; ``--device`` and
``--dtype`` (default: CUDA when present, else CPU; float32) move both models and the input; CUDA timings synchronise before and after
each call. Targets: <= 1.02x without hooks, <= 1.10x with a full cache.

The run is repeated in a child process with glibc told to keep freed memory (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``): a full cache holds ~1 GB for ViT-B at batch 32, and with glibc's defaults every
call gets that memory back from the kernel, page faults included, which costs more than the hooks themselves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import timm
import torch
from _common import add_device_args, kept_output, machine, resolve, timed

from mechvit import HookedViT


def bench(name: str, batch: int, rounds: int, device, dtype) -> dict[str, float]:
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    hooked = HookedViT.from_timm(ref).eval().to(device, dtype)
    ref = ref.to(device, dtype)
    x = torch.rand(batch, 3, *ref.patch_embed.img_size).to(device, dtype)
    with torch.no_grad():
        diff = float((hooked(x).float() - ref(x).float()).abs().max())
        assert diff < (1e-4 if dtype == torch.float32 else 0.1), f"HookedViT and timm differ by {diff}"
        variants = {
            "timm": lambda: ref(x),
            "hooked": lambda: hooked(x),
            "cached": lambda: hooked.run_with_cache(x),
        }
        for fn in variants.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "timm_s": med["timm"],
        "hooked_x": med["hooked"] / med["timm"],
        "cached_x": med["cached"] / med["timm"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--no-tuned-malloc", action="store_true", help="skip the run with glibc keeping freed memory"
    )
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = resolve(args)
    torch.set_num_threads(args.threads)
    tuned = "MALLOC_MMAP_THRESHOLD_" in os.environ
    print(
        f"{machine(device, dtype)}; timm {timm.__version__}, {args.rounds} interleaved rounds, "
        f"glibc malloc {'keeping freed memory' if tuned else 'defaults'}"
    )
    print("| model | batch | timm (s) | HookedViT / timm | run_with_cache / timm |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batches:
            rounds = args.rounds if "base" not in name or batch <= 8 else max(3, args.rounds // 2)
            r = bench(name, batch, rounds, device, dtype)
            print(
                f"| {name} | {batch} | {r['timm_s']:.3f} | {r['hooked_x']:.3f}x | {r['cached_x']:.3f}x |",
                flush=True,
            )
    if not tuned and not args.no_tuned_malloc:
        print(flush=True)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 30), MALLOC_TRIM_THRESHOLD_=str(8 << 30))
        subprocess.run([sys.executable, *sys.argv], env=env, check=True)


if __name__ == "__main__":
    with kept_output("bench_forward"):
        main()
