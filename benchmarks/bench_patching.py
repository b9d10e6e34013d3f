"""Activation patching: attribution estimate vs exact batched sweep vs the naive loop, measured in one run.

    python benchmarks/bench_patching.py [--images 1 8 32] [--rounds 3] [--device auto|cpu|cuda]
        [--dtype float32|bfloat16] [--max-rows N]

A full layer x position ``resid_pre`` sweep (clean -> corrupted, gaussian noise severity 4 on Fashion-MNIST
test images) on the shipped model ``checkpoints/fmnist_vit_base`` when it exists, else on a randomly
initialised model of the same shape (configs/train_base.yaml: patch 4, width 96, depth 6, 4 heads; 50
tokens, so 300 patched variants). Variants:

- naive: ``activation_patching(..., batched=False)``: one full forward of the image batch per variant;
- batched-full: variants stacked along the batch dimension, every chunk runs the whole model;
- batched: the same, and each layer's chunk starts at that layer from the cached residual stream, and the
  last block computes only the class-token row the readout pools (``readout_only``);
- attribution: ``attribution_patching``, the first-order estimate of the same sweep from one forward and one
  backward pass per batch.

The three exact variants must give the same scores (max abs difference printed, asserted < 1e-4 in float32,
< 0.05 in bfloat16). For attribution the Pearson correlation with the exact scores is printed, over the whole
sweep and per layer. Rounds are interleaved; ratios are median(naive) / median(variant), and
median(batched) / median(attribution). CUDA timings synchronise before and after each call.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from _common import add_device_args, kept_output, load_shipped_base, machine, resolve, timed

import mechvit.analysis.patching as patching
from mechvit.analysis import activation_patching, attribution_patching


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


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def bench(model, n_images: int, rounds: int, max_rows: int | None, device, dtype) -> dict:
    x, xc, y, data_src = load_data(n_images)
    x, xc, y = x.to(device, dtype), xc.to(device, dtype), y.to(device)
    kw = dict(component="resid_pre", by="position", batch_size=n_images, progress=False)
    supports_start = patching._supports_start

    def batched_full():
        patching._supports_start = lambda m: False
        try:
            return activation_patching(model, x, xc, y, max_rows=max_rows, **kw)
        finally:
            patching._supports_start = supports_start

    variants = {
        "naive": lambda: activation_patching(model, x, xc, y, batched=False, max_rows=max_rows, **kw),
        "batched-full": batched_full,
        "batched": lambda: activation_patching(model, x, xc, y, max_rows=max_rows, **kw),
        "attribution": lambda: attribution_patching(model, x, xc, y, **kw),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one image: no denominator interval
        results = {k: fn() for k, fn in variants.items()}  # warm-up, and the results compared below
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for k, fn in variants.items():
                times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    exact = ("naive", "batched-full", "batched")
    diffs = {k: float((results[k].values - results["naive"].values).abs().max()) for k in exact}
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert max(diffs.values()) < tol, f"batched and naive results differ: {diffs}"
    a, e = results["attribution"].values, results["batched"].values
    r_layers = [pearson(a[i], e[i]) for i in range(a.shape[0])]
    return {
        "med": med,
        "diffs": diffs,
        "result": results["batched"],
        "data": data_src,
        "r": pearson(a, e),
        "r_layers": r_layers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=None, help="default: 256 on CPU, 4096 on GPU")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_device_args(ap)
    args = ap.parse_args()
    device, dtype = resolve(args)
    torch.set_num_threads(args.threads)
    model, model_src = load_shipped_base(device, dtype)
    cfg = model.cfg
    print(f"model: {model_src}; {machine(device, dtype)}", flush=True)
    print(
        f"sweep: resid_pre, {cfg.n_layers} layers x {cfg.n_tokens} positions = {cfg.n_layers * cfg.n_tokens} "
        f"variants; max_rows {args.max_rows or 'default'}; {args.rounds} interleaved rounds (median)"
    )
    print(
        "| images | naive (s) | batched-full (s) | batched (s) | attribution (s) | batched vs naive "
        "| attribution vs batched | attribution vs naive | exact max abs diff | attribution r (per layer) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.images:
        b = bench(model, n, args.rounds, args.max_rows, device, dtype)
        med = b["med"]
        per = " ".join(f"{v:.2f}" for v in b["r_layers"])
        print(
            f"| {n} | {med['naive']:.3f} | {med['batched-full']:.3f} | {med['batched']:.3f} "
            f"| {med['attribution']:.3f} | {med['naive'] / med['batched']:.1f}x "
            f"| {med['batched'] / med['attribution']:.1f}x | {med['naive'] / med['attribution']:.1f}x "
            f"| {max(b['diffs'].values()):.1e} | {b['r']:.3f} ({per}) |",
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
        f"{r.corrupted_logit_diff:.3f}; top patches: {', '.join(where)}; after the run: "
        f"{machine(device, dtype)}"
    )


if __name__ == "__main__":
    with kept_output("bench_patching"):
        main()
