"""Corruption speed: mechvit (one batched call) vs imagecorruptions (its per-image loop), measured in one run.

For every corruption at severity 3: images per second of ``mechvit.corruptions.corrupt`` on a batch and of
``imagecorruptions.corrupt`` called image by image (uint8 HxWx3, as that package expects), on 16 images of
224x224 (scikit-image photographs) and 256 images of 32x32 (Fashion-MNIST upscaled, as RGB). Prints a
markdown table with each ratio and the geometric mean over the corruptions at each size separately (224 px
is the size ImageNet-C work uses), with ours at torch's default thread count (what a user gets: ``--threads``
overrides it), then the same geometric means with ours pinned to one torch thread, measured in the same
interleaved rounds against the same reference timings (best of ``--repeats`` rounds per side). The reference
is a per-image numpy/scipy/PIL loop (single-threaded; the OpenCV calls of a few corruptions use OpenCV's
default threads, left as they are). The machine's load average is printed before and after: on a shared
machine it says how much the numbers can be trusted. For that case each side is also timed in this
process's CPU time (``time.process_time``: all its threads, none of the time it waits for a core), and the
1-thread ratio in CPU time is printed too: it is what the two sides cost in core-seconds, which other jobs
on the machine change far less than the wall clock (both sides still share caches and memory bandwidth).

    .venv/bin/python benchmarks/bench_corruptions.py [--sizes 224 32] [--names gaussian_noise,glass_blur]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16] [--out bench.json]

``--device cuda`` times ours on the GPU (synchronised before and after each call; the 1-thread column is then
skipped) against the same CPU reference. ``--dtype bfloat16`` feeds ours bfloat16 images (computed in float32
inside ``corrupt`` and cast back, so this measures the conversions).

The reference is patched for NumPy 2 / scikit-image >= 0.19 here (``np.float_``, ``gaussian(multichannel=)``),
never in mechvit.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
from _common import add_device_args, kept_output, load, machine, resolve, sync
from tqdm import tqdm

from mechvit._io import atomic_write_json
from mechvit.corruptions import CORRUPTIONS, corrupt


def patch_reference():
    warnings.simplefilter("ignore")
    import imagecorruptions
    import imagecorruptions.corruptions as R
    import skimage.filters

    if not hasattr(np, "float_"):
        np.float_ = np.float64  # plasma_fractal (fog) uses the alias NumPy 2 removed

    def gaussian(image, sigma=1, multichannel=None, **kw):
        if multichannel:
            kw["channel_axis"] = -1
        return skimage.filters.gaussian(image, sigma=sigma, **kw)

    R.gaussian = gaussian
    return imagecorruptions


def image_sets(sizes: list[int], n224: int, n32: int) -> dict[str, np.ndarray]:
    from skimage import data as skdata
    from skimage import transform as sktransform

    from mechvit.data import load_fashion_mnist

    out = {}
    for size in sizes:
        if size == 32:
            x, _ = load_fashion_mnist("test")
            x = torch.nn.functional.interpolate(x[:n32], size=(32, 32), mode="bilinear", align_corners=False)
            small = (
                (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
            )
            out[f"{n32} x 32px"] = small
        elif size == 224:
            photos = []
            for p in (skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.cat()):
                s = min(p.shape[:2])
                photos.append((sktransform.resize(p[:s, :s], (224, 224), anti_aliasing=True) * 255).round())
            out[f"{n224} x 224px"] = np.stack([photos[i % len(photos)] for i in range(n224)]).astype(np.uint8)
        else:
            raise SystemExit(f"--sizes: 224 and/or 32, got {size}")
    return out


def time_ours(x: torch.Tensor, name: str, severity: int, threads: int) -> tuple[float, float]:
    """Images per second of wall-clock time and of this process's CPU time."""
    torch.set_num_threads(threads)
    sync(x.device)
    t, c = time.perf_counter(), time.process_time()
    corrupt(x, name, severity, seed=0)
    sync(x.device)
    return len(x) / (time.perf_counter() - t), len(x) / max(time.process_time() - c, 1e-9)


def time_reference(ic, imgs: np.ndarray, name: str, severity: int) -> tuple[float, float]:
    np.random.seed(0)
    t, c = time.perf_counter(), time.process_time()
    for im in imgs:
        ic.corrupt(im, corruption_name=name, severity=severity)
    return len(imgs) / (time.perf_counter() - t), len(imgs) / max(time.process_time() - c, 1e-9)


def best_rates(
    ic, imgs: np.ndarray, name: str, severity: int, repeats: int, threads: int, device, dtype
) -> dict[str, float]:
    """Best of ``repeats`` interleaved rounds (ours at ``threads``, ours at 1 thread, reference, ...) after one
    warm-up of each, so that drifting load on a shared machine hits all alike."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255).contiguous().to(device, dtype)
    corrupt(x[:2], name, severity, seed=0)  # warm-up (kernel caches, lazy imports, CUDA context)
    ic.corrupt(imgs[0], corruption_name=name, severity=severity)
    one_thread = device.type == "cpu" and threads != 1
    best = {k: 0.0 for k in ("ours", "ours_1thread", "reference", "ours_1thread_cpu", "reference_cpu")}

    def keep(key, rates):
        best[key] = max(best[key], rates[0])
        if key + "_cpu" in best:
            best[key + "_cpu"] = max(best[key + "_cpu"], rates[1])

    for _ in range(repeats):
        ours = time_ours(x, name, severity, threads)
        keep("ours", ours)
        keep("ours_1thread", time_ours(x, name, severity, 1) if one_thread else ours)
        keep("reference", time_reference(ic, imgs, name, severity))
    if device.type != "cpu":
        best["ours_1thread"] = best["ours_1thread_cpu"] = float("nan")
    torch.set_num_threads(threads)
    return best


def geomean(v) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", default=",".join(CORRUPTIONS), help="comma-separated corruption names")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 32], help="image sizes: 224 and/or 32")
    ap.add_argument("--images-224", type=int, default=16, help="images at 224 px")
    ap.add_argument("--images-32", type=int, default=256, help="images at 32 px")
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; the best rate of each side counts"
    )
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for ours in the main table (default: torch's default, "
                         f"{torch.get_num_threads()} here); a 1-thread geometric mean is printed too")  # fmt: skip
    add_device_args(ap)
    args = ap.parse_args(argv)
    device, dtype = resolve(args)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    names = [n for n in args.names.split(",") if n]
    ic = patch_reference()
    sets = image_sets(args.sizes, args.images_224, args.images_32)
    load_before = load()
    print(f"before: {machine(device, dtype)}", flush=True)
    rows = {}
    for name in tqdm(names, desc="corruptions"):
        rows[name] = {}
        for label, imgs in sets.items():
            r = best_rates(ic, imgs, name, args.severity, args.repeats, threads, device, dtype)
            r["ratio"] = r["ours"] / r["reference"]
            r["ratio_1thread"] = r["ours_1thread"] / r["reference"]
            r["ratio_1thread_cpu"] = r["ours_1thread_cpu"] / r["reference_cpu"]
            rows[name][label] = r
    labels = list(sets)
    load_after = load()
    print(f"\n{machine(device, dtype)} (before the run: {load_before}); severity {args.severity}; "
          f"images/s, ours (torch threads {threads}) vs imagecorruptions (its per-image loop, CPU), "
          f"best of {args.repeats} interleaved rounds\n")  # fmt: skip
    print(
        "| corruption | "
        + " | ".join(f"{lb}: ours | ref | ratio | 1-thread ratio | 1-thread CPU-time ratio" for lb in labels)
        + " |"
    )
    print("|---|" + "---|---|---|---|---|" * len(labels))
    for name, r in rows.items():
        cells = [
            f"{r[lb]['ours']:.0f} | {r[lb]['reference']:.1f} | {r[lb]['ratio']:.2f}x | "
            f"{r[lb]['ratio_1thread']:.2f}x | {r[lb]['ratio_1thread_cpu']:.2f}x"
            for lb in labels
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    summary = {}
    for key in ("ratio", "ratio_1thread", "ratio_1thread_cpu"):
        summary[key] = {lb: geomean([r[lb][key] for r in rows.values()]) for lb in labels}
    print(
        "| **geometric mean** | "
        + " | ".join(
            f" | | **{summary['ratio'][lb]:.2f}x** | **{summary['ratio_1thread'][lb]:.2f}x** "
            f"| **{summary['ratio_1thread_cpu'][lb]:.2f}x**"
            for lb in labels
        )
        + " |"
    )
    print()
    for lb in labels:
        print(
            f"{lb}: geometric mean over {len(rows)} corruptions: {summary['ratio'][lb]:.2f}x at torch threads "
            f"{threads}, {summary['ratio_1thread'][lb]:.2f}x at 1 torch thread (core against core), "
            f"{summary['ratio_1thread_cpu'][lb]:.2f}x in CPU time at 1 torch thread"
        )
    if args.out:
        atomic_write_json(args.out, {
            "rows": rows, "threads": threads, "severity": args.severity, "device": str(device),
            "dtype": args.dtype, "machine": machine(device, dtype), "load_before": load_before,
            "load_after": load_after, "geomean": summary["ratio"], "geomean_1thread": summary["ratio_1thread"],
            "geomean_1thread_cpu": summary["ratio_1thread_cpu"],
        })  # fmt: skip


if __name__ == "__main__":
    with kept_output("bench_corruptions"):
        main()
