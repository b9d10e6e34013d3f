"""Activation patching: batched sweep vs the naive one-forward-per-patch loop, measured in one run.

    python benchmarks/bench_patching.py [--images 1 8 32] [--rounds 3] [--device cpu] [--max-rows N]

A full layer x position ``resid_pre`` sweep (clean -> corrupted, gaussian noise severity 4 on Fashion-MNIST
test images) on the shipped model ``checkpoints/fmnist_vit_base`` when it exists, else on a randomly
initialised model of the same shape (configs/train_base.yaml: patch 4, width 96, depth 6, 4 heads; 50
tokens, so 300 patched variants). Variants:

- naive: ``activation_patching(..., batched=False)``: one full forward of the image batch per variant;
- batched-full: variants stacked along the batch dimension, every chunk runs the whole model;
- batched: the same, and each layer's chunk starts at that layer from the cached residual stream, and the
  last block computes only the class-token row the readout pools (``readout_only``).

All three must give the same scores (max abs difference printed, asserted < 1e-4). Rounds are interleaved;
ratios are median(naive) / median(variant).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

import mechvit.analysis.patching as patching
from mechvit import HookedViT
from mechvit.analysis import activation_patching

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0
)


def load_model(device: str) -> tuple[HookedViT, str]:
    ckpt = ROOT / "checkpoints" / "fmnist_vit_base"
    if (ckpt / "card.json").is_file():
        from mechvit.training.checkpoint import load_checkpoint

        return HookedViT.from_timm(load_checkpoint(ckpt)).to(device).eval(), str(ckpt.relative_to(ROOT))
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SHAPE)
    return HookedViT.from_timm(m).to(device).eval(), "random init, shipped shape (no checkpoint yet)"


def load_data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    try:
        from mechvit.data import load_fashion_mnist

        x, y = load_fashion_mnist("test")
        x, y, src = x[:n], y[:n], "Fashion-MNIST test"
    except Exception as e:  # noqa: BLE001 - the benchmark still runs without the dataset
        g = torch.Generator().manual_seed(0)
        x, y, src = (
            torch.rand(n, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            f"random ({e})",
        )
    try:
        from mechvit.corruptions import corrupt

        xc = corrupt(x, "gaussian_noise", 4, seed=0)
        src += ", gaussian_noise/4"
    except Exception as e:  # noqa: BLE001
        xc = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
        src += f", additive noise ({e})"
    return x, xc, y, src


def bench(model, n_images: int, rounds: int, max_rows: int | None, device: str) -> dict:
    x, xc, y, data_src = load_data(n_images)
    x, xc, y = x.to(device), xc.to(device), y.to(device)
    kw = dict(component="resid_pre", by="position", batch_size=n_images, max_rows=max_rows, progress=False)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    supports_start = patching._supports_start

    def batched_full():
        patching._supports_start = lambda m: False
        try:
            return activation_patching(model, x, xc, y, **kw)
        finally:
            patching._supports_start = supports_start

    variants = {
        "naive": lambda: activation_patching(model, x, xc, y, batched=False, **kw),
        "batched-full": batched_full,
        "batched": lambda: activation_patching(model, x, xc, y, **kw),
    }
    results = {k: fn() for k, fn in variants.items()}  # warm-up, and the results compared below
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    diffs = {k: float((results[k].values - results["naive"].values).abs().max()) for k in variants}
    assert max(diffs.values()) < 1e-4, f"batched and naive results differ: {diffs}"
    return {"med": med, "diffs": diffs, "result": results["batched"], "data": data_src}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=None, help="default: 256 on CPU, 4096 on GPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, model_src = load_model(args.device)
    cfg = model.cfg
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    )
    print(f"model: {model_src}; device: {device}; torch {torch.__version__}")
    print(
        f"sweep: resid_pre, {cfg.n_layers} layers x {cfg.n_tokens} positions = {cfg.n_layers * cfg.n_tokens} "
        f"variants; max_rows {args.max_rows or 'default'}; {args.rounds} interleaved rounds (median)"
    )
    print(
        "| images | naive (s) | batched-full (s) | batched (s) | batched-full speed-up | batched speed-up "
        "| max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.images:
        b = bench(model, n, args.rounds, args.max_rows, args.device)
        med = b["med"]
        print(
            f"| {n} | {med['naive']:.3f} | {med['batched-full']:.3f} | {med['batched']:.3f} "
            f"| {med['naive'] / med['batched-full']:.1f}x | {med['naive'] / med['batched']:.1f}x "
            f"| {max(b['diffs'].values()):.1e} |",
            flush=True,
        )
    r = b["result"]
    best = torch.topk(r.values.flatten(), 3)
    where = [
        f"layer {i // cfg.n_tokens} {r.labels['position'][i % cfg.n_tokens]} ({v:.2f})"
        for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
    ]
    print(
        f"data: {b['data']}; last sweep: clean LD {r.clean_logit_diff:.3f}, corrupted LD "
        f"{r.corrupted_logit_diff:.3f}; top patches: {', '.join(where)}"
    )


if __name__ == "__main__":
    main()
