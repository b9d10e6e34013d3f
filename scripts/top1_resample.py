"""How many images the spliced top-1 bar needs (docs/sae.md, "Spliced top-1 on more images").

Splices every SAE of a finished study (``runs/<name>/sae/saes/*``) into its model on the first ``--images``
clean test images (``mechvit.sae.spliced_metrics_many``, as the study's SAE step does) and prints each SAE's
top-1 drop there with its 95% CI (paired bootstrap over images), then the chance that a study measuring on
``n`` of those images (the study takes the first n; here: n drawn at random, ``--draws`` times, the same n for
every SAE as in the study) finds every SAE within the 1 pp bar, and how many it finds over it.

    python scripts/top1_resample.py --run runs/default --images 10000 --n 1000 2000 3000 5000

Takes ~4 minutes at two threads for the default's 20 SAEs (5 seeds x 4 models; measured before its 4 single SAEs)
on 10,000 images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mechvit.analysis import paired_difference_ci
from mechvit.sae import load_sae, spliced_metrics_many
from mechvit.study.config import load_study_config
from mechvit.study.context import StudyContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/fashion_mnist.yaml", help="the run's study config")
    p.add_argument("--run", default="runs/default", help="the study's output folder")
    p.add_argument("--images", type=int, default=10000, help="first test images to splice on")
    p.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 3000, 5000], help="sample sizes to try")
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--bar", type=float, default=1.0, help="the bar, pp")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", nargs="+", default=None, help="only these models' SAEs (default: all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_study_config(a.config, {"progress": False, "sae.n_fidelity_images": a.images})
    s = cfg.sae
    ctx = StudyContext(cfg, Path(a.run))
    x, y = ctx.test_images(a.images)
    drops: dict[str, np.ndarray] = {}
    print(f"| SAE | top-1 drop on {a.images:,} images (pp) | 95% CI |\n|---|---|---|")
    by_model: dict[str, list[Path]] = {}  # one clean forward per model for all its SAEs
    for folder in sorted((Path(a.run) / "sae" / "saes").iterdir()):
        model = folder.name.split("__")[1]
        if a.models is None or model in a.models:
            by_model.setdefault(model, []).append(folder)
    for model, folders in by_model.items():
        saes = [load_sae(f)[0] for f in folders]
        sps = spliced_metrics_many(ctx.model(model), saes, ctx.prep(x), y, s.hook, tokens=s.tokens)
        for folder, sp in zip(folders, sps, strict=True):
            cc, cs = (sp.per_image[k].double().numpy() for k in ("correct_clean", "correct_sae"))
            ci = paired_difference_ci(cc, cs, seed=cfg.seed)
            drops[folder.name] = cc - cs
            name = " ".join(folder.name.split("__"))
            print(
                f"| {name} | {100 * ci.estimate:.2f} | [{100 * ci.low:.2f}, {100 * ci.high:.2f}] |",
                flush=True,
            )
    rng = np.random.default_rng(cfg.seed)
    print(f"\n| images | every SAE within {a.bar} pp | SAEs over it (mean) |\n|---|---|---|")
    for n in a.n:
        over = np.array(
            [
                sum(100 * d[idx].mean() > a.bar + 1e-9 for d in drops.values())
                for idx in (rng.choice(a.images, n, replace=False) for _ in range(a.draws))
            ]
        )
        print(f"| {n:,} | {(over == 0).mean():.2f} | {over.mean():.2f} of {len(drops)} |")


if __name__ == "__main__":
    main()
