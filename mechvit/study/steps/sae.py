"""SAEs: one per architecture x model x condition (``sae.scope``), trained with sae-lens on a clean/corrupted
mix of the model's activations, measured on held-out clean + corrupted images (EV, L0, dead, spliced)."""

from __future__ import annotations

import dataclasses
import shutil
import time

import torch

from mechvit.analysis import collect_activations
from mechvit.sae import (
    CorruptionMix,
    load_sae,
    reconstruction_metrics,
    save_trained,
    spliced_metrics,
    train_sae_for_hook,
)
from mechvit.study.context import StudyContext, slug
from mechvit.study.result import StepResult, StepWriter, Table

TITLE = "Sparse autoencoders"
SECTION = "sae"


def sae_runs(ctx: StudyContext) -> list[tuple[str, str, object]]:
    """(architecture, model, condition) for every SAE the config asks for."""
    s = ctx.cfg.sae
    out = []
    for arch in s.architectures:
        for n in ctx.model_names:
            conds = ctx.cfg.conditions if (n == ctx.base_name or s.scope == "all") else ctx.seen_conditions(n)
            out += [(arch, n, c) for c in conds]
    return out


def sae_dirname(arch: str, model: str, cond) -> str:
    return f"saes/{arch}__{model}__{slug(cond.label)}"


def _n_tokens(model, tokens: str) -> int:
    c = model.cfg
    return {"patches": c.n_patches, "all": c.n_tokens, "cls": 1, "prefix": c.n_prefix_tokens}[tokens]


def run_configs(ctx: StudyContext, arch: str, cond, rows_per_epoch: int):
    """The activation-store and SAE-training configs of one SAE: the config's ``sae.store``/``sae.train`` with
    the fields the study sets per run (architecture, sample count, seed, device, the condition's corruption)."""
    s = ctx.cfg.sae
    b = s.train.batch_size
    total = max(b, int(s.epochs * rows_per_epoch) // b * b)
    store = dataclasses.replace(
        s.store,
        seed=ctx.cfg.seed,
        mix=CorruptionMix(s.store.mix.fraction, ((cond.corruption, cond.severity),)),
    )
    train = dataclasses.replace(
        s.train,
        architecture=arch,
        total_samples=total,
        seed=ctx.cfg.seed,
        device=str(ctx.device),
        log_every=max(1, total // b // 20),
    )
    return store, train


def _train_one(ctx: StudyContext, w: StepWriter, arch: str, n: str, cond, train_x, xe, ye) -> None:
    s = ctx.cfg.sae
    model = ctx.model(n)
    store, tcfg = run_configs(ctx, arch, cond, len(train_x) * _n_tokens(model, s.tokens))
    t0 = time.time()
    trained = train_sae_for_hook(
        model, train_x, store, tcfg, cache_dir=w.path(f"_acts/{n}__{slug(cond.label)}"), transform=ctx.prep
    )
    xc = ctx.prep(ctx.corrupted(cond, s.n_eval_images))
    clean = collect_activations(model, ctx.prep(xe), s.hook, tokens=s.tokens, progress=False)
    corr = collect_activations(model, xc, s.hook, tokens=s.tokens, progress=False)
    held = torch.cat([clean, corr]).reshape(-1, clean.shape[-1])
    trained.manifest.update(
        heldout_metrics=reconstruction_metrics(trained.sae, held).to_dict(),
        spliced_clean=spliced_metrics(
            model, trained.sae, ctx.prep(xe), ye, s.hook, tokens=s.tokens
        ).to_dict(),
        spliced_corrupted=spliced_metrics(model, trained.sae, xc, ye, s.hook, tokens=s.tokens).to_dict(),
        train_seconds=round(time.time() - t0, 2),
        study={"architecture": arch, "model": n, "condition": cond.label},
    )
    save_trained(trained, w.path(sae_dirname(arch, n, cond)))


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.sae
    runs = sae_runs(ctx)
    res = StepResult()
    if not runs:
        res.notes.append(
            "no SAE to train: no fine-tuned model has seen a corruption of the study's conditions "
            "(set sae.scope: all to train every pair)"
        )
        return res
    train_x = ctx.train_images(s.n_train_images)
    xe, ye = ctx.test_images(s.n_eval_images)
    rows = []
    with ctx.bar(len(runs), "SAEs") as bar:
        for arch, n, cond in runs:
            folder = w.path(sae_dirname(arch, n, cond))
            if not (folder / "cfg.json").is_file():  # a finished SAE survives an interrupted step
                _train_one(ctx, w, arch, n, cond, train_x, xe, ye)
            _, manifest = load_sae(folder)
            rec, spc, spx = (
                manifest["heldout_metrics"],
                manifest["spliced_clean"],
                manifest["spliced_corrupted"],
            )
            res.metrics[f"{arch}|{n}|{cond.label}"] = {
                "dir": w.rel(sae_dirname(arch, n, cond)), "heldout": rec, "spliced_clean": spc,
                "spliced_corrupted": spx, "train_seconds": manifest.get("train_seconds"),
                "trained_samples": manifest.get("trained_samples"),
            }  # fmt: skip
            rows.append(
                [
                    arch,
                    n,
                    cond.label,
                    rec["d_sae"],
                    rec["explained_variance"],
                    rec["l0"],
                    rec["dead_features"],
                    spc["accuracy_clean"],
                    spc["accuracy_sae"],
                    spx["accuracy_clean"],
                    spx["accuracy_sae"],
                    spc["loss_recovered"],
                ]  # fmt: skip
            )
            bar.update(1)
    shutil.rmtree(w.dir / "_acts", ignore_errors=True)
    mix = s.store.mix.fraction
    res.tables.append(
        Table(
            f"SAEs on {s.hook} ({s.tokens} tokens), trained on {1 - mix:.0%} clean and {mix:.0%} corrupted "
            "images; metrics on held-out clean + corrupted test images",
            [
                "SAE",
                "model",
                "mix",
                "d_sae",
                "EV (held-out)",
                "L0",
                "dead",
                "acc clean",
                "acc clean + SAE",
                "acc corrupted",
                "acc corrupted + SAE",
                "loss recovered (clean)",
            ],  # fmt: skip
            rows,
        )
    )
    res.notes.append(
        "SAE folders load with sae_lens.SAE.load_from_disk(<out>/sae/saes/<name>); BatchTopK SAEs are "
        "saved as the JumpReLU SAE they are at inference."
    )
    return res
