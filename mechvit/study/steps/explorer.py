"""The feature explorer: one offline page, ``explorer/features.html``, over the SAEs of the ``sae`` step (every
one, or the first ``explorer.replicates`` seed replicates of each model; :func:`mechvit.viz.write_explorer`;
what it shows: docs/explorer.md).

Images: the first ``explorer.n_images`` clean test images, and the same images under each of the study's
conditions pooled into the page's one corrupted set (every condition's copy, in config order; each image's
caption names its condition), because every SAE was trained on the one clean + corrupted mix of all of them.
Groups: every SAE of an architecture shares one training mix, so they all get the same ``condition``
(``mix``, plus the architecture when the study has several); the replicates of one model are its seed
replicates (seed stability), and the same replicate index of another model is its counterpart (change under
fine-tuning), so an SAE's ``seed`` on the page is its replicate index, not its training seed.

``explorer.max_latents`` (None: every live latent) lists only that many live latents per SAE, those firing on
the most patch tokens, and measures only their effects: the ablate/double effect costs a forward from the hook
per latent and top image (its top clean images; its top corrupted images for a latent that fires only on those),
which dominates at ViT-B width (24,576 latents x 8 top images per SAE in the paper config)."""

from __future__ import annotations

import time
from fractions import Fraction

import torch

from mechvit._numbers import fmt_fixed
from mechvit.study.context import StudyContext, parallel_workers
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.study.steps.sae import sae_runs

TITLE = "Feature explorer"
SECTION = "explorer"
DEPS = ("sae",)
PAGE = "features.html"


def class_names(ctx: StudyContext) -> list[str]:
    """The class names: the base model's own (``cfg.class_names``), else the dataset's (Fashion-MNIST's, or
    an ImageFolder's sorted class folders), else ``class <i>``."""
    model = ctx.model(ctx.base_name)
    n = int(model.cfg.num_classes)
    names = list(model.cfg.class_names or [])
    if not names and ctx.cfg.data.dataset == "fashion_mnist":
        from mechvit.data import FASHION_MNIST_CLASSES

        names = list(FASHION_MNIST_CLASSES)
    if not names and ctx.cfg.data.dataset == "imagefolder" and ctx.cfg.data.root:
        from pathlib import Path

        folder = Path(ctx.cfg.data.root) / ctx.cfg.data.test_split
        names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return names if len(names) == n else [f"class {i}" for i in range(n)]


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.viz.explorer import ExplorerSAE, write_explorer

    e, s = ctx.cfg.explorer, ctx.cfg.sae
    t0 = time.time()
    every = sae_runs(ctx)
    runs = [r for r in every if e.replicates is None or r.replicate < e.replicates]
    several = len(s.architectures) > 1
    specs = []
    for r in runs:
        folder = ctx.out / "sae" / r.dirname
        if not (folder / "cfg.json").is_file():
            raise FileNotFoundError(f"explorer: SAE folder {folder} is missing; rerun the sae step (--force)")
        specs.append(
            ExplorerSAE(
                name=f"{r.architecture} · {r.model} · r{r.replicate}"
                if several
                else f"{r.model} · r{r.replicate}",
                sae=str(folder),
                model=r.model,
                condition=f"mix ({r.architecture})" if several else "mix",
                seed=r.replicate,
                hook=s.hook,
            )
        )
    models = {n: ctx.model(n) for n in dict.fromkeys(r.model for r in runs)}
    n = e.n_images  # counted in the context's test images (needed_test_images): never capped by other steps
    x, y = ctx.test_images(n)
    conds = ctx.cfg.conditions
    corrupted = torch.cat([ctx.corrupted(c, n) for c in conds])
    path = write_explorer(
        w.path(PAGE),
        specs,
        models,
        x,
        y,
        class_names(ctx),
        corrupted=corrupted,
        corrupted_labels=y.repeat(len(conds)),
        corrupted_name=" + ".join(c.label for c in conds),
        corrupted_groups=[(c.label, len(x)) for c in conds],
        transform=ctx.prep,
        title=f"{ctx.cfg.title}: SAE features",
        k=e.top_images,
        n_assoc=e.n_assoc,
        n_bins=e.histogram_bins,
        max_latents=e.max_latents,
        cards=e.cards,
        progress=ctx.progress,
        workers=parallel_workers(ctx, len(models), e),
    )
    seconds = round(time.time() - t0, 2)
    size = path.stat().st_size
    data_rows = _index_rows(path)
    shown = (
        "every live latent"
        if e.max_latents is None
        else f"the {e.max_latents} most often firing live latents"
    )
    res = StepResult()
    if n < e.n_images:
        res.notes.append(
            f"explorer.n_images is {e.n_images} but the study loads only {n} test images (the largest "
            "n_images of the other steps); the explorer uses those"
        )
    res.metrics = {
        "page": w.rel(PAGE),
        "bytes": size,
        "seconds": seconds,
        "n_images": len(x),
        "n_corrupted": len(corrupted),
        "saes": {
            row["name"]: {"dir": f"sae/{r.dirname}", **row} for row, r in zip(data_rows, runs, strict=True)
        },
    }
    res.links.append(
        {
            "file": w.rel(PAGE),
            "title": f"Feature explorer: {shown} of {_which(len(specs), len(every))} SAEs "
            f"({fmt_fixed(Fraction(size, 10**6), 1)} MB, offline; opens in a browser)",
        }
    )
    if e.max_latents is not None and any(row["listed"] < row["live"] for row in data_rows):
        res.notes.append(
            f"explorer.max_latents is {e.max_latents}: the page lists (and measures the effects of) only the "
            f"{e.max_latents} live latents of each SAE that fire on the most clean + corrupted patch tokens"
        )
    if len(runs) < len(every):
        res.notes.append(
            f"explorer.replicates is {e.replicates}: the page holds the first {e.replicates} seed replicates of "
            f"each model of sae.models ({len(runs)} of the sae step's {len(every)} SAEs; the others are in the SAE "
            "table and its folders); seed stability matches a latent against the replicates on the page"
        )
    res.notes.append(
        f"features.html browses {shown} of every SAE on the page on {len(x)} clean test images and the same "
        f"images under {', '.join(c.label for c in conds)} (pooled into its one corrupted set): top clean and top "
        "corrupted images (captioned with their condition) with per-patch heatmaps, activation histogram, class "
        "association and automatic label, direct logit effect, the measured effect of ablating and doubling the "
        "latent on its top images (the clean ones; the corrupted ones for a latent that never fires on a clean "
        "image), and the nearest latent of "
        "the other seed replicates (seed stability) and of the same replicate of every other model (change "
        "under fine-tuning). See docs/explorer.md."
    )
    bounded = e.max_latents is not None
    res.metrics["live_counted_on"] = image_sets(ctx, len(x))
    for row in res.metrics["saes"].values():
        row["dead_on_explorer_images"] = row["d_sae"] - row["live"]
    res.notes.append(f"live and dead counts: {res.metrics['live_counted_on']}")
    res.tables.append(
        sae_table(data_rows, [f"sae/{r.dirname}" for r in runs], len(x), len(corrupted), bounded)
    )
    return res


def _which(shown: int, every: int) -> str:
    """``the 20`` or ``20 of the 24``: how many of the sae step's SAEs the page holds."""
    return f"the {shown}" if shown == every else f"{shown} of the {every}"


def sae_table(rows: list[dict], folders: list[str], n_clean: int, n_corrupted: int, bounded: bool) -> Table:
    """The explorer's SAE table: live and dead latents on the explorer's images; the ``listed`` column only when
    ``explorer.max_latents`` bounds the page (otherwise it equals ``live``)."""
    return Table(
        f"SAEs in the explorer (live: fires on at least one patch token of the explorer's {n_clean} clean + "
        f"{n_corrupted} corrupted images; dead = d_sae - live on these images)",
        ["SAE", "folder", "live latents", "dead (explorer images)"]
        + (["listed (max_latents)"] if bounded else [])
        + ["d_sae", "mean seed stability"],
        [
            [row["name"], folder, row["live"], row["d_sae"] - row["live"]]
            + ([row["listed"]] if bounded else [])
            + [row["d_sae"], row["stability"]]
            for row, folder in zip(rows, folders, strict=True)
        ],
    )


def image_sets(ctx: StudyContext, n: int) -> str:
    """Which images the explorer's live counts are over, next to the ones the SAE step's dead counts are over:
    its held-out images, ``sae.heldout_images`` (``n_heldout_images``, else ``n_fidelity_images``, else
    ``n_eval_images``; :func:`mechvit.study.steps.sae.heldout`). Both are the first test images of the split,
    clean and under every condition, so the smaller set is a subset of the larger."""
    n_held, n_cond = ctx.cfg.sae.heldout_images, len(ctx.cfg.conditions)
    if n_held < n:
        rel = (
            "a subset of the explorer's: a latent dead there can fire on the explorer's other images, so the "
            "SAE step's dead count is at least d_sae minus the explorer's live count"
        )
    elif n_held > n:
        rel = (
            "a superset of the explorer's: a latent live on the explorer's images is live there too, so the "
            "SAE step's dead count is at most d_sae minus the explorer's live count"
        )
    else:
        rel = "the same images, so the two counts agree"
    return (
        f"the explorer counts a latent live on its {n} clean test images and the same images under "
        f"{n_cond} condition(s) ({n * (1 + n_cond)} images); the SAE step's dead counts are over its held-out "
        f"{n_held} clean test images (sae.heldout_images) and the same under each condition "
        f"({n_held * (1 + n_cond)} images: {rel})"
    )


def _index_rows(path) -> list[dict]:
    """Per SAE of the written page: name, live and listed latents, d_sae and mean seed stability of the listed
    ones (read back from it)."""
    from mechvit.viz.explorer import read_explorer_data

    rows = []
    for sae in read_explorer_data(path)["saes"]:
        stab = [v for v in sae["stability"] or [] if v is not None]
        rows.append(
            {
                "name": sae["name"],
                "live": sae.get("n_live", len(sae["live"])),
                "listed": len(sae["live"]),
                "d_sae": sae["d_sae"],
                "stability": sum(stab) / len(stab) if stab else None,
            }
        )
    return rows
