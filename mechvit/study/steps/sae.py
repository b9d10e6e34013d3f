"""SAEs: ``sae.replicates`` per architecture and model (one for a model of ``sae.single_models``), each with its
own seed, all trained with sae-lens on the same clean/corrupted mix; the SAEs of one model train in one pass
over its cached activations. Measured on held-out clean + corrupted test images: EV, L0, dead and dense
latents, spliced KL and accuracy, the EV of PCA with k components (the baseline an SAE must beat),
convergence, and the hook's mean-ablation gap (is the hook worth an SAE: do its tokens matter for the
prediction?).

Under torchrun every rank runs this step (``DISTRIBUTED``): each caches its shards of the activations
(:func:`mechvit.sae.distributed.cache_activations_distributed`) and trains its slice of every global batch
(``train_saes`` under DistributedDataParallel); rank 0 decides what is left to train, evaluates, saves and
builds the result. The SAEs equal one process's within float tolerance (tests/test_distributed.py)."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from mechvit._numbers import fmt_fixed
from mechvit.analysis import collect_activations, mean_ci, paired_difference_ci, reconstruction_cis_many
from mechvit.runtime import forked_map, rank0_runs, rank_and_world
from mechvit.sae import (
    CorruptionMix,
    ablation_gap,
    cache_activations,
    derive_seed,
    load_sae,
    pca_baseline,
    reconstruction_metrics,
    save_trained,
    spliced_metrics_many,
    train_saes,
)
from mechvit.sae.distributed import cache_activations_distributed
from mechvit.study.config import token_words
from mechvit.study.context import StudyContext, parallel_workers
from mechvit.study.result import StepResult, StepWriter, Table

TITLE = "Sparse autoencoders"
SECTION = "sae"
DISTRIBUTED = True


@dataclass(frozen=True)
class SAERun:
    """One SAE of the study: ``architecture`` x ``model`` x ``replicate`` with its own ``seed``."""

    architecture: str
    model: str
    replicate: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.architecture}|{self.model}|{self.replicate}"

    @property
    def dirname(self) -> str:
        return f"saes/{self.architecture}__{self.model}__r{self.replicate}"


def sae_runs(ctx: StudyContext) -> list[SAERun]:
    """Every SAE the config asks for, each with its seed ``derive_seed(seed, architecture, model, replicate)``:
    ``sae.replicates`` per model of ``sae.models``, then replicate 0 of each of ``sae.single_models``."""
    s = ctx.cfg.sae
    reps = [(n, r) for n in ctx.sae_model_names for r in range(s.replicates)]
    reps += [(n, 0) for n in ctx.sae_single_names]
    return [
        SAERun(arch, n, r, derive_seed(ctx.cfg.seed, arch, n, r)) for arch in s.architectures for n, r in reps
    ]


def mix(ctx: StudyContext) -> CorruptionMix:
    """The one training mix of every SAE: ``store.mix.fraction`` of the images carry one of the conditions."""
    conds = tuple((c.corruption, c.severity) for c in ctx.cfg.conditions)
    return CorruptionMix(ctx.cfg.sae.store.mix.fraction if conds else 0.0, conds)


def run_configs(ctx: StudyContext, runs: list[SAERun], rows_per_epoch: int):
    """The store config (shared by every model: same images, same corruptions) and one training config per
    run: the config's ``sae.train`` with what the study sets (architecture, samples, seed, device)."""
    s = ctx.cfg.sae
    b = s.train.batch_size
    total = s.total_samples(rows_per_epoch)
    store = dataclasses.replace(s.store, seed=ctx.cfg.seed, mix=mix(ctx))
    trains = {
        r.key: s.train.for_architecture(
            r.architecture,
            total_samples=total,
            seed=r.seed,
            device=str(ctx.device),
            log_every=max(1, total // b // 50),
        )
        for r in runs
    }
    return store, trains


def heldout(ctx: StudyContext, model) -> torch.Tensor:
    """The model's hook activations on the held-out clean test images and every condition, ``[n, d]``: the
    first ``sae.heldout_images`` test images (``n_heldout_images``, else ``n_fidelity_images``, else
    ``n_eval_images``), the first of those the spliced numbers use. Their size matters for "dead": at an
    average firing rate of 1e-4 a latent fires ~3 times in 29,400 tokens (200 images x 3 inputs x 49 patches)
    and looks dead there by chance; 1,000 images give 147,000 tokens."""
    s = ctx.cfg.sae
    n = s.heldout_images
    parts = [ctx.test_images(n)[0]] + [ctx.corrupted(c, n) for c in ctx.cfg.conditions]
    acts = [collect_activations(model, ctx.prep(x), s.hook, tokens=s.tokens, progress=False) for x in parts]
    return torch.cat(acts).reshape(-1, acts[0].shape[-1])


def heldout_images(ctx: StudyContext, model) -> np.ndarray:
    """The test image each row of :func:`heldout` comes from (its clean and corrupted copies alike): the
    groups its CIs resample, since the tokens of one image are not independent draws."""
    n, parts = ctx.cfg.sae.heldout_images, 1 + len(ctx.cfg.conditions)
    return np.tile(np.repeat(np.arange(n), ctx.cfg.sae.rows_per_image(model.cfg)), parts)


def heldout_metrics(saes: list, held: torch.Tensor, images: np.ndarray, seed: int) -> list[dict]:
    """``reconstruction_metrics`` of each SAE on the held-out rows, with 95% CIs of EV and L0 over their
    images (the rows' per-image sums taken once for all the SAEs)."""
    recs = [reconstruction_metrics(sae, held, per_row=True) for sae in saes]
    per = [(r.per_row["sq_err"].numpy(), r.per_row["active"].numpy()) for r in recs]
    cis = reconstruction_cis_many(held.numpy(), per, images, seed=seed)
    return [
        {
            **r.to_dict(),
            "explained_variance_ci": c["explained_variance"].to_dict(),
            "l0_ci": c["l0"].to_dict(),
        }
        for r, c in zip(recs, cis, strict=True)
    ]


def _train_model(ctx: StudyContext, w: StepWriter, name: str, runs: list[SAERun], train_x) -> None:
    """Cache ``name``'s activations once, then train its SAEs in one pass; each SAE saved when done."""
    s = ctx.cfg.sae
    model = ctx.model(name)
    store, trains = run_configs(ctx, runs, len(train_x) * s.rows_per_image(model.cfg))
    world = rank_and_world()[1]
    t0 = time.time()
    cache = cache_activations_distributed if world > 1 else cache_activations  # the same cache (tested)
    cached = cache(model, train_x, w.path(f"_acts/{name}"), store, transform=ctx.prep)
    batches = cached.batches(
        s.train.batch_size,
        buffer_size=store.buffer_size,
        seed=derive_seed(ctx.cfg.seed, "order", name),
        device=str(ctx.device),
    )
    manifests = {
        r.key: {
            "hook": s.hook, "tokens": s.tokens, "model_name": name, "corruption_mix": store.mix.to_dict(),
            # mechvit.sae.model_fingerprint(model), as train_sae records it (the cache checked it is this model's)
            "model_sha256": cached.manifest["model_sha256"],
            "store": store.identity(), "n_activations": len(cached),
            "study": {"architecture": r.architecture, "model": name, "replicate": r.replicate, "seed": r.seed},
            "processes": world,
        }
        for r in runs
    }  # fmt: skip
    # BatchTopK's inference threshold is re-estimated on rows drawn from the whole cache: the stream's next
    # batches hold a few thousand images, and the threshold (k per row on average) moved by 0.05 latents with them
    n_thr = min(len(cached), max(t.threshold_batches for t in trains.values()) * s.train.batch_size)
    rows = cached.sample(n_thr, seed=derive_seed(ctx.cfg.seed, "threshold", name)) if n_thr else None
    trained = train_saes(batches, cached.d_in, trains, manifests=manifests, threshold_rows=rows)
    seconds = round(time.time() - t0, 2)

    def evaluate_and_save() -> None:
        xe, ye = ctx.test_images(s.fidelity_images)
        held, images = heldout(ctx, model), heldout_images(ctx, model)
        train_rows = cached.rows(0, min(len(cached), 200_000))
        pca = pca_baseline(train_rows, held, s.train.k).explained_variance
        # the clean and zero-ablated forwards once for all the model's SAEs (the same numbers as one call each)
        spliced = spliced_metrics_many(
            model, [trained[r.key].sae for r in runs], ctx.prep(xe), ye, s.hook, tokens=s.tokens
        )
        recs = heldout_metrics([trained[r.key].sae for r in runs], held, images, ctx.cfg.seed)
        for r, sp, rec in zip(runs, spliced, recs, strict=True):
            t = trained[r.key]
            t.manifest.update(
                heldout_metrics=rec,
                pca_k_explained_variance=pca,
                spliced_clean=fidelity(sp, ctx.cfg.seed),
                train_seconds_group=seconds,
            )
            save_trained(t, w.path(r.dirname))

    rank0_runs(evaluate_and_save, f"evaluating and saving the SAEs of {name!r}")


# Why processes: an SAE step on a 96-wide residual is small matrix products and sae-lens's Python around them,
# which a second intra-op thread speeds up only in part. Measured on the 2-core machine, five x12 k12 SAEs in one
# pass over in-memory rows: one process at 1 thread 23,500 SAE-tokens/s, at 2 threads 33,900 (1.44x); two
# 1-thread processes side by side 21,500 + 22,100 = 43,600 (1.28x the 2-thread process). Each worker runs one
# thread, so the SAEs are those of a one-thread sequential run, bit for bit (tests/test_study_sae_parallel.py).
# Fork, not spawn: the workers inherit the study context (models, images) instead of pickling it.
def _train_in_processes(ctx: StudyContext, w: StepWriter, todo: dict, train_x, workers: int, bar) -> None:
    """Each model's SAE group in its own forked one-thread process, ``workers`` at a time; each SAE is saved
    by its worker when done (an interrupted step keeps them), a worker's error is raised here."""
    ctx.preload()  # models and images once here: every worker inherits them
    for _ in forked_map(lambda name: _train_model(ctx, w, name, todo[name], train_x), list(todo), workers):
        bar.update(1)


def _low_high(est: dict | None, scale: float = 1.0) -> list:
    """``[estimate, low, high]`` of an ``Estimate.to_dict()`` times ``scale``; Nones where there is none."""
    if not est:
        return [None, None, None]
    return [None if est.get(k) is None else scale * est[k] for k in ("estimate", "low", "high")]


def fidelity(sp, seed: int) -> dict:
    """``spliced_metrics``' numbers plus 95% CIs over images: the top-1 drop (clean minus spliced, paired
    bootstrap over images, in fractions) and the mean spliced KL."""
    per = sp.per_image
    drop = paired_difference_ci(
        per["correct_clean"].double().numpy(), per["correct_sae"].double().numpy(), seed=seed
    )
    return {
        **sp.to_dict(),
        "accuracy_drop": drop.to_dict(),
        "kl_sae_ci": mean_ci(per["kl_sae"].double().numpy(), seed=seed).to_dict(),
    }


def _left_to_train(w: StepWriter, runs: list[SAERun]) -> list[SAERun]:
    return [r for r in runs if not (w.path(r.dirname) / "cfg.json").is_file()]


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.sae
    runs = sae_runs(ctx)
    res = StepResult()
    train_x = ctx.train_images(s.n_train_images)
    # the replicated models first, then the single-SAE ones: the parallel workers take the long groups first
    names = [*ctx.sae_model_names, *ctx.sae_single_names]
    todo = {  # finished SAEs survive an interrupted step; rank 0 looks (its files)
        name: rank0_runs(
            functools.partial(_left_to_train, w, [r for r in runs if r.model == name]),
            f"listing the SAEs left to train for {name!r}",
        )
        for name in names
    }
    todo = {name: left for name, left in todo.items() if left}
    with ctx.bar(len(names), "SAEs (per model)") as bar:
        bar.update(len(names) - len(todo))
        workers = parallel_workers(ctx, len(todo), s)
        if workers > 1:
            _train_in_processes(ctx, w, todo, train_x, workers, bar)
        else:
            for name, left in todo.items():
                _train_model(ctx, w, name, left, train_x)
                bar.update(1)
    if rank_and_world()[0] != 0:
        return res  # rank 0 builds the result
    shutil.rmtree(w.dir / "_acts", ignore_errors=True)
    xe, ye = ctx.test_images(s.fidelity_images)
    gap = ablation_gap(ctx.model(ctx.base_name), ctx.prep(xe), ye, s.hook, tokens=s.tokens)
    # the gap with its 95% CI over the images (the report's key numbers and the README quote it); the warning
    # under sae.ablation_warn_nats is the report's (mechvit.study.report.ablation_warning): not a training setting
    res.metrics["ablation_gap"] = {
        **gap.to_dict(),
        "kl_ci": mean_ci(gap.kl_per_image.double().numpy(), seed=ctx.cfg.seed).to_dict(),
    }
    rows = []
    for r in runs:
        _, m = load_sae(w.path(r.dirname))
        rec, spc, conv = m["heldout_metrics"], m["spliced_clean"], m.get("convergence") or {}
        d_sae = rec["d_sae"]
        res.metrics[r.key] = {
            "dir": w.rel(r.dirname), "seed": r.seed, "heldout": rec, "spliced_clean": spc,
            "pca_k_explained_variance": m["pca_k_explained_variance"], "convergence": conv,
            "trained_samples": m.get("trained_samples"), "train_seconds_group": m.get("train_seconds_group"),
        }  # fmt: skip
        rows.append(
            [
                r.architecture,
                r.model,
                r.replicate,
                r.seed,
                d_sae,
                m.get("trained_samples"),
                rec["explained_variance"],
                *_low_high(rec.get("explained_variance_ci"))[1:],
                m["pca_k_explained_variance"],
                rec["l0"],
                *_low_high(rec.get("l0_ci"))[1:],
                rec["dead_features"] / d_sae,
                rec["dense_features"] / d_sae,
                spc["kl_sae"],
                *_low_high(spc.get("kl_sae_ci"))[1:],
                spc["accuracy_clean"],
                spc["accuracy_sae"],
                *_low_high(spc.get("accuracy_drop"), 100),
                conv.get("change"),
            ]  # fmt: skip
        )
    frac = mix(ctx).fraction
    res.tables.append(
        Table(
            f"SAEs on {s.hook} ({token_words(s.tokens)}), trained on one mix for every model ({fmt_fixed(1 - frac, 0, 100)}% clean, "
            f"{fmt_fixed(frac, 0, 100)}% with one of the conditions); metrics on held-out clean + corrupted test images, EV "
            "and L0 with 95% CIs over those images (percentile bootstrap; an image's tokens and copies together). "
            f"PCA-k: EV of the top-{s.train.k} principal components of the same model's training activations "
            "(an SAE with L0 <= k should beat it). Spliced: the SAE's reconstruction in place of the hook on "
            f"{s.fidelity_images} clean test images; KL and top-1 drop (clean minus spliced) with "
            "95% CIs over those images (bootstrap; the drop paired by image). EV change: least-squares change of "
            "the training EV over the last 10% of steps",
            [
                "SAE",
                "model",
                "replicate",
                "seed",
                "d_sae",
                "tokens",
                "EV (held-out)",
                "EV low",
                "EV high",
                "EV PCA-k",
                "L0",
                "L0 low",
                "L0 high",
                "dead (frac)",
                "dense >10% (frac)",
                "spliced KL (nats)",
                "KL low",
                "KL high",
                "acc clean",
                "acc spliced",
                "top-1 drop (pp)",
                "drop low",
                "drop high",
                "EV change (last 10%)",
            ],  # fmt: skip
            rows,
        )
    )
    res.notes.append(
        "SAE folders load with sae_lens.SAE.load_from_disk(<out>/sae/saes/<arch>__<model>__r<replicate>); "
        "BatchTopK SAEs are saved as the JumpReLU SAE they are at inference."
    )
    return res
