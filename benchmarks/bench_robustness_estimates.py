"""robustness_estimates (the robustness step's accuracy CIs and paired differences) in one process vs in
forked one-thread processes (``workers``), measured in the same run on an input the size of the default study.

    .venv/bin/python benchmarks/bench_robustness_estimates.py [--images 2000] [--workers 2] [--rounds 2]

The input is synthetic per-image correctness shaped like configs/fashion_mnist.yaml's: 8 models (base, blur1,
blur2, blur4, noise1, noise2, noise4, clean), the 19 corruptions at severity 4 and the clean images, and
each blur / noise fine-tune's seen corruption at its trained severity 1 or 2, scored for that fine-tune, the
base and the clean control (as the step's ``trained_cell_models``); ``saturate`` excluded (colour-only,
unchanged on grayscale), the study's ``seed`` 0. Each model's top-1 rate per cell is drawn in [0.3, 0.95];
the bootstrap's cost does not depend on it. Rounds alternate the two sides; the table gives each side's
median wall time and the ratio of the medians, and checks that both sides give the same estimates (their
JSON, to the bit). CPU only (``workers`` > 1 forks one-thread processes); the load average before and after
says how busy the machine was (another job on a 2-core machine slows the 2-process side most).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from _common import kept_output, load

from mechvit.analysis.robustness import robustness_estimates
from mechvit.corruptions import CORRUPTIONS

MODELS = ("base", "blur1", "blur2", "blur4", "noise1", "noise2", "noise4", "clean")


def study_like(n: int, seed: int = 0) -> tuple[dict, dict, dict]:
    """``correct``, ``seen`` and ``trained`` shaped like the default study's robustness step."""
    g = torch.Generator().manual_seed(seed)
    seen, trained = {}, {}
    for m in MODELS:
        if m.startswith(("blur", "noise")):
            seen[m] = ["gaussian_blur" if m.startswith("blur") else "gaussian_noise"]
            trained[m] = [int(m[-1])]
    cells = [("clean", 0)] + [(c, 4) for c in CORRUPTIONS]
    correct = {}
    for m in MODELS:
        for c, s in cells:
            p = 0.3 + 0.65 * float(torch.rand((), generator=g))
            correct[(m, c, s)] = torch.rand(n, generator=g) < p
    for m, sevs in trained.items():  # the trained severities off the study's [4]: base, clean and that model
        for s in sevs:
            if s == 4:
                continue
            for who in ("base", "clean", m):
                key = (who, seen[m][0], s)
                if key not in correct:
                    correct[key] = torch.rand(n, generator=g) < 0.7
    return correct, seen, trained


def plain(est: dict) -> str:
    return json.dumps(
        {
            m: {
                **d,
                "accuracy": {k: v.to_dict() for k, v in d["accuracy"].items()},
                "vs": {o: {k: v.to_dict() for k, v in x.items()} for o, x in d["vs"].items()},
            }
            for m, d in est.items()
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    correct, seen, trained = study_like(args.images)
    kw = dict(exclude=["saturate"], severities=[4], trained=trained, seed=0)
    print(f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {load()} (before)")
    print(f"{len(MODELS)} models, {len(correct)} cells, {args.images} images\n")
    times: dict[int, list[float]] = {1: [], args.workers: []}
    outs: dict[int, str] = {}
    for _ in range(args.rounds):
        for w in times:
            t = time.perf_counter()
            est = robustness_estimates(correct, seen, "base", workers=w, **kw)
            times[w].append(time.perf_counter() - t)
            outs[w] = plain(est)
    n_ci = sum(len(d["accuracy"]) + sum(len(x) for x in d["vs"].values()) for d in est.values())
    same = outs[1] == outs[args.workers]
    one = statistics.median(times[1])
    print("| workers | median s | rounds s | speed-up |")
    print("|---|---|---|---|")
    for w, ts in times.items():
        med = statistics.median(ts)
        print(f"| {w} | {med:.2f} | {', '.join(f'{t:.2f}' for t in ts)} | {one / med:.2f}x |")
    print(f"\n{n_ci} bootstrap CIs; the same estimates at 1 and {args.workers} workers: {same}")
    print(f"{load()} (after)")
    if not same:
        raise SystemExit("the estimates differ between the two sides")


if __name__ == "__main__":
    with kept_output("bench_robustness_estimates"):
        main()
