"""The SAE sweep behind the default study's SAE settings (docs/sae.md, "Choosing the SAE").

One model, one hook: caches the model's activations on the study's training mix exactly as the study does
(``configs/fashion_mnist.yaml``: its images, its corruption mix, its store), trains every configuration of the
grid from ONE pass over them (``mechvit.sae.train_saes``, sae-lens's trainer per SAE) and measures each on
the study's held-out set (the first ``sae.n_fidelity_images`` test images, clean and under each condition):
held-out EV beside the EV of a PCA with k components, L0, dead (never active on the held-out tokens) and
dense (active on > 10% of them) latents, and the spliced top-1 drop and KL on the clean images. Prints one
markdown table row per configuration.

    python scripts/sae_sweep.py --model base --layer 0 --grid x8:12 x8:14 x12:14 x16:16
    python scripts/sae_sweep.py --model blur4 --layer 0 --grid x12:12:3e-3:0.03125 x12:12:3e-3:0.25
    python scripts/sae_sweep.py --model noise4 --layer 0 --mix 0.5 --grid x12:12 x12:12 x12:12   # 3 seeds

A grid entry is expansion:k[:lr[:aux coefficient]]; what it leaves out comes from the config's sae.train.
Repeating an entry trains it again with the next seed. ``--mix`` overrides the config's training mix fraction
(``sae.store.mix.fraction``). Besides the held-out L0, the L0 on each part of the held-out set (clean, then
each condition) is printed: BatchTopK's inference threshold is learnt on the training mix, so the held-out
L0 depends on how the two compare.

Each row takes ~40 s of one thread per x8 SAE (1M tokens); run two sweeps side by side at one thread each.

A finished sweep keeps what it printed in ``scripts/results/sae_sweep-<UTC date>-<commit>.md`` (the command
line, the commit, ``+dirty`` when the tree had changes, the CPU; benchmarks/_common.py: kept_output, as the
benchmarks keep theirs) and the same numbers, unrounded, in the ``.json`` of that name; ``--results`` moves
the folder. An interrupted sweep keeps nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mechvit.sae import cache_activations, pca_baseline, reconstruction_metrics, spliced_metrics, train_saes
from mechvit.study.config import load_study_config
from mechvit.study.context import StudyContext
from mechvit.study.steps.sae import heldout, mix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import kept_output, machine  # noqa: E402  (the benchmarks' kept results)

RESULTS = Path(__file__).resolve().parent / "results"


def _grid_entry(text: str) -> tuple[str, dict]:
    parts = text.split(":")
    try:
        if not 2 <= len(parts) <= 4 or not parts[0].startswith("x"):
            raise ValueError
        kw = {"expansion_factor": int(parts[0][1:]), "k": int(parts[1])}
        kw.update({key: float(v) for key, v in zip(("lr", "aux_coefficient"), parts[2:], strict=False)})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected expansion:k[:lr[:aux]] like x8:14 or x12:12:3e-3:0.25, got {text!r}"
        ) from None
    return text, kw


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/fashion_mnist.yaml")
    p.add_argument("--model", default="base", help="a model name of the config")
    p.add_argument("--layer", type=int, required=True, help="block whose hook_resid_post the SAEs read")
    p.add_argument("--grid", type=_grid_entry, nargs="+", required=True, help="expansion:k[:lr] ...")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mix", type=float, default=None, help="training mix fraction (default: the config's)")
    p.add_argument(
        "--results",
        default=None,
        help="folder of the kept .md and .json (default: $MECHVIT_BENCH_RESULTS, else scripts/results)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None):
    """Run the sweep (``argv``: its arguments, default the command line's); returns the ``Kept`` record of
    kept_output: ``.data`` the numbers of the table, ``.path`` and ``.data_path`` the files written."""
    a = parse_args(argv)
    command = ["python", *(sys.argv if argv is None else ["scripts/sae_sweep.py", *argv])]
    folder = a.results or os.environ.get("MECHVIT_BENCH_RESULTS") or RESULTS
    with kept_output("sae_sweep", folder, command=command) as kept:
        kept.data = sweep(a)
    return kept


def sweep(a: argparse.Namespace) -> dict:
    """Train the grid and print its table; returns what the table shows, unrounded (the kept .json)."""
    torch.set_num_threads(a.threads)
    cfg = load_study_config(a.config, {"progress": False})
    cfg.sae.store = dataclasses.replace(cfg.sae.store, hook=f"blocks.{a.layer}.hook_resid_post")
    if a.mix is not None:
        cfg.sae.store = dataclasses.replace(
            cfg.sae.store, mix=dataclasses.replace(cfg.sae.store.mix, fraction=a.mix)
        )
    s = cfg.sae
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StudyContext(cfg, Path(tmp))
        model = ctx.model(a.model)
        store = dataclasses.replace(s.store, seed=cfg.seed, mix=mix(ctx))
        cached = cache_activations(
            model, ctx.train_images(s.n_train_images), Path(tmp) / "acts", store, transform=ctx.prep
        )
        total = len(cached) // s.train.batch_size * s.train.batch_size
        cfgs = {  # keyed by position: a repeated entry is another seed
            f"{i}:{name}": dataclasses.replace(s.train, total_samples=total, seed=i + 1, device="cpu", **kw)
            for i, (name, kw) in enumerate(a.grid)
        }
        batches = cached.batches(s.train.batch_size, buffer_size=store.buffer_size, seed=0, device="cpu")
        trained = train_saes(batches, cached.d_in, cfgs)
        held = heldout(ctx, model)
        train_rows = cached.rows(0, min(len(cached), 200_000))
        xe, ye = ctx.test_images(s.fidelity_images)
        parts = ["clean", *(f"{c.corruption}-{c.severity}" for c in cfg.conditions)]
        n_part = len(held) // len(parts)  # heldout(): the clean images, then each condition, equal sizes
        result = {
            "config": str(a.config),
            "model": a.model,
            "layer": a.layer,
            "hook": s.hook,
            "training_tokens": total,
            "mix_fraction": float(s.store.mix.fraction),
            "heldout_tokens": len(held),
            "splice_images": len(xe),
            "parts": parts,
            "rows": [],
        }
        print(f"{machine(torch.device('cpu'), torch.float32)}\n")
        print(
            f"{a.model}, {s.hook}, {total:,} training tokens (mix fraction {s.store.mix.fraction:g}), "
            f"{len(held):,} held-out tokens"
        )
        print(
            "| model | layer | expansion | k | lr | aux | seed | EV | EV PCA-k | L0 | L0 by part "
            f"({', '.join(parts)}) | dead | dense | top-1 drop (pp) | KL |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, t in trained.items():
            c = cfgs[name]
            m = reconstruction_metrics(t.sae, held)
            sp = spliced_metrics(model, t.sae, ctx.prep(xe), ye, s.hook, tokens=s.tokens)
            row = {
                "grid": name.split(":", 1)[1],
                "expansion_factor": c.expansion_factor,
                "k": c.k,
                "lr": float(c.lr),
                "aux_coefficient": float(c.aux_coefficient),
                "seed": c.seed,
                "explained_variance": float(m.explained_variance),
                "pca_explained_variance": float(pca_baseline(train_rows, held, c.k).explained_variance),
                "l0": float(m.l0),
                "l0_by_part": [
                    float(reconstruction_metrics(t.sae, held[i * n_part : (i + 1) * n_part]).l0)
                    for i in range(len(parts))
                ],
                "dead_features": int(m.dead_features),
                "dense_features": int(m.dense_features),
                "d_sae": int(m.d_sae),
                "top1_drop_pp": 100 * float(sp.accuracy_clean - sp.accuracy_sae),
                "kl": float(sp.kl_sae),
            }
            result["rows"].append(row)
            print(table_row(a.model, a.layer, row), flush=True)
    return result


def table_row(model: str, layer: int, r: dict) -> str:
    """One markdown row of the printed table (the kept .md), from one row of the kept .json."""
    return (
        f"| {model} | {layer} | x{r['expansion_factor']} | {r['k']} | {r['lr']:g} | {r['aux_coefficient']:g} | "
        f"{r['seed']} | {r['explained_variance']:.3f} | {r['pca_explained_variance']:.3f} | {r['l0']:.2f} | "
        f"{', '.join(f'{v:.2f}' for v in r['l0_by_part'])} | {r['dead_features']} / {r['d_sae']} | "
        f"{r['dense_features']} / {r['d_sae']} | {r['top1_drop_pp']:.1f} | {r['kl']:.4f} |"
    )


if __name__ == "__main__":
    main()
