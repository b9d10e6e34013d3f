"""The study's steps. Each takes the context, a writer for its files and the results of earlier steps,
and returns a :class:`StepResult`; the pipeline caches it (see ``pipeline.py``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from mechvit.study import plots
from mechvit.study.context import StudyContext
from mechvit.study.pipeline import Step, StepResult, StepWriter


def _bar(ctx: StudyContext, total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="run", leave=False, disable=not ctx.progress)


def _slug(label: str) -> str:
    return label.replace("/", "-")


def _md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _inputs(ctx: StudyContext, n: int) -> dict[str, torch.Tensor]:
    """{"clean": x, "<corruption>/<severity>": corrupted x} for the first ``n`` test images ([0, 1], CPU)."""
    x, _ = ctx.test_images(n)
    return {"clean": x, **{c.label: ctx.corrupted(c, n) for c in ctx.cfg.conditions}}


# ---------------------------------------------------------------------------------------------------------
# robustness


def _topk_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    from mechvit.training.evaluate import classification_metrics

    m = classification_metrics(logits, y)
    k = min(10, logits.shape[-1])
    m["top10"] = float((logits.topk(k, -1).indices == y[:, None]).any(-1).double().mean())
    return m


def robustness(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.corruptions import CORRUPTIONS
    from mechvit.training.evaluate import (
        corruption_errors,
        robustness_matrix,
        seen_unseen_summary,
        summary_markdown,
    )

    cfg, r = ctx.cfg, ctx.cfg.robustness
    x, y = ctx.test_images(r.n_images)
    names = ctx.model_names
    corrs = list(r.corruptions or CORRUPTIONS)
    rows = robustness_matrix(
        {n: ctx.wrapped(n) for n in names},
        x,
        y,
        corrs,
        r.severities,
        seed=cfg.seed,
        batch_size=r.batch_size,
        device=ctx.device,
        progress=ctx.progress,
    )
    ce = corruption_errors(rows, ctx.base_name)
    seen = {n: ctx.infos[n].seen for n in names}
    summary = seen_unseen_summary(rows, seen, ce)

    # the seed paper's table: top-1/5/10, certainty and ECE on clean and each condition (the analysis images)
    paper: dict[str, dict[str, dict]] = {}
    inputs = _inputs(ctx, r.n_images)
    with torch.no_grad():
        for n in names:
            model = ctx.model(n)
            paper[n] = {}
            for label, xi in inputs.items():
                logits = torch.cat(
                    [model(ctx.prep(xi[s : s + r.batch_size])).cpu() for s in range(0, len(xi), r.batch_size)]
                )
                paper[n][label] = _topk_metrics(logits, y)
    transfer = {
        n: {lab: paper[n][lab]["top1"] - paper[ctx.base_name][lab]["top1"] for lab in inputs}
        for n in ctx.finetuned_names
    }

    res = StepResult(
        metrics={
            "rows": rows,
            "corruption_errors": ce,
            "seen_unseen": summary,
            "paper": paper,
            "transfer_top1": transfer,
            "n_images": int(len(y)),
            "corruptions": corrs,
            "severities": list(r.severities),
        }
    )
    res.tables.append(
        {
            "title": "Seen vs unseen corruptions (top-1 %, mean over corruptions and severities; "
            "mCE relative to the base model, 100 = as good as the base)",
            "markdown": summary_markdown(summary),
        }
    )
    header = ["model", "input", "top-1", "top-5", "top-10", "confidence", "correct-class prob.", "ECE", "NLL"]
    table = [
        [n, lab, m["top1"], m["top5"], m["top10"], m["confidence"], m["correct_prob"], m["ece"], m["nll"]]
        for n in names
        for lab, m in paper[n].items()
    ]
    res.tables.append(
        {"title": "Seed-paper metrics per input condition", "markdown": _md_table(header, table)}
    )
    if transfer:
        labs = list(inputs)
        rows_t = [[n, ", ".join(seen[n]) or "–", *[100 * transfer[n][lab] for lab in labs]] for n in transfer]
        res.tables.append(
            {
                "title": "Top-1 change of each fine-tuned model against the base (percentage points)",
                "markdown": _md_table(["model", "seen", *labs], rows_t),
            }
        )

    # heatmap: model x corruption (mean over severities), seen cells outlined
    cols = ["clean", *corrs]
    mat = (
        np.array(
            [
                [np.mean([q["top1"] for q in rows if q["model"] == n and q["corruption"] == c]) for c in cols]
                for n in names
            ]
        )
        * 100
    )
    marks = np.array([[c in seen[n] for c in cols] for n in names])
    fig, ax = plots.new_figure(w=max(5.0, 0.42 * len(cols) + 2.5), h=1.1 + 0.45 * len(names))
    plots.heatmap(ax[0, 0], mat, cols, names, cbar_label="top-1 accuracy (%)", vmin=0, vmax=100, marks=marks)
    ax[0, 0].set_xlabel("corruption (mean over severities " + ", ".join(map(str, r.severities)) + ")")
    ax[0, 0].set_ylabel("model")
    res.figures.append(
        plots.save_figure(
            fig,
            w,
            "robustness_heatmap",
            "Top-1 accuracy per model and corruption; outlined cells are the "
            "corruptions a model was fine-tuned on (seen).",
        )
    )
    fig, ax = plots.new_figure(w=max(4.5, 1.1 * len(names) + 1.5))
    width = 0.27
    for i, (key, lab) in enumerate(
        (("clean_top1", "clean"), ("seen_top1", "seen"), ("unseen_top1", "unseen"))
    ):
        vals = [100 * s[key] if s[key] == s[key] else 0 for s in summary]
        ax[0, 0].bar(np.arange(len(summary)) + (i - 1) * width, vals, width, label=lab, color=plots.color(i))
    ax[0, 0].set_xticks(range(len(summary)), [s["model"] for s in summary], rotation=20, ha="right")
    ax[0, 0].set_ylabel("top-1 accuracy (%)")
    ax[0, 0].set_ylim(0, 100)
    ax[0, 0].legend(frameon=False, ncols=3, loc="lower right")
    res.figures.append(
        plots.save_figure(
            fig,
            w,
            "seen_unseen",
            "Clean, seen and unseen top-1 accuracy per model (the base model has seen no corruption).",
        )
    )
    return res


# ---------------------------------------------------------------------------------------------------------
# logit lens


def logit_lens_step(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.analysis import LogitLensSweep, logit_lens

    s = ctx.cfg.logit_lens
    _, y = ctx.test_images(s.n_images)
    inputs = _inputs(ctx, s.n_images)
    results = {}
    with _bar(ctx, len(ctx.model_names) * len(inputs), "logit lens") as bar:
        for n in ctx.model_names:
            for lab, xi in inputs.items():
                results[(n, lab)] = logit_lens(
                    ctx.model(n),
                    ctx.prep(xi),
                    y,
                    include_embed=s.include_embed,
                    mode=s.mode,
                    batch_size=s.batch_size,
                    meta={"model": n, "condition": lab},
                    progress=False,
                )
                bar.update(1)
    sweep = LogitLensSweep(results)
    sweep.save_csv(w.path("logit_lens.csv"))
    metrics = {f"{n}|{lab}": r.to_dict() for (n, lab), r in results.items()}
    res = StepResult(metrics=metrics)
    header = ["model", "input", "final top-1", "mean first correct layer", "correct at some layer"]
    table = [
        [
            n,
            lab,
            float(r.top1[:, -1].double().mean()),
            r.mean_first_correct,
            f"{int((r.first_correct >= 0).sum())}/{r.top1.shape[0]}",
        ]
        for (n, lab), r in results.items()
    ]
    res.tables.append(
        {
            "title": f"Logit lens: first layer at which the correct class is top-1 (mode "
            f"'{s.mode}', averaged over images correct at some layer; layer index counts "
            f"{'embed, then blocks' if s.include_embed else 'blocks'})",
            "markdown": _md_table(header, table),
        }
    )
    layers = next(iter(results.values())).layers
    fig, ax = plots.new_figure(2, len(inputs), w=3.4, h=2.8, sharey="row")
    for j, lab in enumerate(inputs):
        for i, n in enumerate(ctx.model_names):
            r = results[(n, lab)].summary()
            kw = {"color": plots.color(i), "marker": "o", "ms": 3, "label": n}
            ax[0, j].plot(layers, r["correct_prob"].numpy(), **kw)
            ax[1, j].plot(layers, 100 * r["top1_acc"].numpy(), **kw)
        ax[0, j].set_title(lab)
        ax[1, j].set_xlabel("layer (residual stream after block)")
    ax[0, 0].set_ylabel("mean correct-class prob.")
    ax[1, 0].set_ylabel("logit-lens top-1 (%)")
    ax[0, -1].legend(frameon=False)
    res.figures.append(
        plots.save_figure(
            fig,
            w,
            "logit_lens",
            "Logit lens: the model's own readout (final norm, CLS pooling, head) applied after every block.",
        )
    )
    res.links.append({"file": w.rel("logit_lens.csv"), "title": "logit lens per layer (CSV)"})
    return res


# ---------------------------------------------------------------------------------------------------------
# attention


def attention_step(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.analysis import attention_stats, compare_attention, model_cls_attention
    from mechvit.viz.circuits import attention_views_page

    s = ctx.cfg.attention
    inputs = _inputs(ctx, s.n_images)
    conds = [lab for lab in inputs if lab != "clean"]
    names, base = ctx.model_names, ctx.base_name
    stats, paired, between = {}, {}, {}
    total = len(names) * (1 + len(conds)) + len(ctx.finetuned_names) * len(inputs)
    with _bar(ctx, total, "attention") as bar:
        for n in names:
            m = ctx.model(n)
            stats[n] = attention_stats(m, ctx.prep(inputs["clean"]), batch_size=s.batch_size, progress=False)
            bar.update(1)
            for lab in conds:
                paired[(n, lab)] = compare_attention(
                    m,
                    ctx.prep(inputs["clean"]),
                    images_b=ctx.prep(inputs[lab]),
                    labels=("clean", lab),
                    batch_size=s.batch_size,
                    progress=False,
                )
                bar.update(1)
        for n in ctx.finetuned_names:
            for lab, xi in inputs.items():
                between[(n, lab)] = compare_attention(
                    ctx.model(base),
                    ctx.prep(xi),
                    ctx.model(n),
                    labels=(base, n),
                    batch_size=s.batch_size,
                    progress=False,
                )
                bar.update(1)
    metrics = {
        "stats": {n: v.to_dict() for n, v in stats.items()},
        "clean_vs_corrupted": {
            f"{n}|{lab}": {k: v.tolist() for k, v in p.per_layer().items()} for (n, lab), p in paired.items()
        },
        "base_vs_finetuned": {
            f"{n}|{lab}": {k: v.tolist() for k, v in p.per_layer().items()} for (n, lab), p in between.items()
        },
    }
    res = StepResult(metrics=metrics)
    L = ctx.model(base).cfg.n_layers
    layers = list(range(L))

    fig, ax = plots.new_figure(1, 3, w=3.6, h=2.9)
    for k, (key, ylabel) in enumerate(
        (
            ("entropy_diff", "entropy change (nats)"),
            ("mse", "mean squared diff."),
            ("cosine", "cosine similarity"),
        )
    ):
        for i, n in enumerate(names):
            for j, lab in enumerate(conds):
                ax[0, k].plot(
                    layers,
                    paired[(n, lab)].per_layer()[key].numpy(),
                    color=plots.color(i),
                    ls=("-", "--", ":", "-.")[j % 4],
                    marker="o",
                    ms=3,
                    label=f"{n}, {lab}",
                )
        ax[0, k].set_xlabel("layer")
        ax[0, k].set_ylabel(ylabel)
    ax[0, 0].axhline(0, color=plots.PALETTE[6], lw=0.8, ls=":")
    ax[0, 2].legend(frameon=False, fontsize=6)
    fig.suptitle("Attention maps, clean vs corrupted copy of each image (head mean)")
    res.figures.append(
        plots.save_figure(
            fig,
            w,
            "attention_clean_vs_corrupted",
            "Per layer: entropy of the corrupted minus the clean attention, mean "
            "squared difference and cosine similarity of the maps (colour: model; "
            "line style: condition).",
        )
    )
    fig, ax = plots.new_figure(1, 2, w=3.8, h=2.9)
    for i, n in enumerate(names):
        ax[0, 0].plot(
            layers, stats[n].entropy.mean(1).numpy(), color=plots.color(i), marker="o", ms=3, label=n
        )
        ax[0, 1].plot(
            layers, stats[n].distance.mean(1).numpy(), color=plots.color(i), marker="o", ms=3, label=n
        )
    ax[0, 0].set(xlabel="layer", ylabel="attention entropy (nats)")
    ax[0, 1].set(xlabel="layer", ylabel="mean attention distance (px)")
    ax[0, 1].legend(frameon=False)
    res.figures.append(
        plots.save_figure(
            fig,
            w,
            "attention_stats",
            "Attention entropy and mean attention distance per layer on clean images (head mean).",
        )
    )
    if between:
        fig, ax = plots.new_figure(1, 2, w=3.8, h=2.9)
        for (n, lab), p in between.items():
            kw = {
                "color": plots.color(ctx.finetuned_names.index(n) + 1),
                "ls": ("-", "--", ":", "-.")[list(inputs).index(lab) % 4],
                "marker": "o",
                "ms": 3,
            }
            ax[0, 0].plot(layers, p.per_layer()["cosine"].numpy(), label=f"{n}, {lab}", **kw)
            ax[0, 1].plot(layers, p.per_layer()["entropy_diff"].numpy(), label=f"{n}, {lab}", **kw)
        ax[0, 0].set(xlabel="layer", ylabel=f"cosine to {base}'s maps")
        ax[0, 1].set(xlabel="layer", ylabel=f"entropy minus {base}'s (nats)")
        ax[0, 1].axhline(0, color=plots.PALETTE[6], lw=0.8, ls=":")
        ax[0, 1].legend(frameon=False, fontsize=6)
        res.figures.append(
            plots.save_figure(
                fig, w, "attention_base_vs_finetuned", "Fine-tuned against base attention on the same images."
            )
        )

    # CLS attention of the last layer (head mean) on the first view images
    n_views = min(s.n_views, s.n_images)
    if n_views:
        cls = {
            (n, lab): model_cls_attention(ctx.model(n), ctx.prep(inputs[lab][:n_views]))[-1].mean(1)
            for n in names
            for lab in inputs
        }  # [views, gh, gw]
        fig, ax = plots.new_figure(len(names), len(inputs) * n_views, w=1.45, h=1.55)
        vmax = max(float(v.max()) for v in cls.values())
        for i, n in enumerate(names):
            for j, lab in enumerate(inputs):
                for v in range(n_views):
                    im = plots.image_overlay(
                        ax[i, j * n_views + v],
                        inputs[lab][v].numpy(),
                        cls[(n, lab)][v].numpy(),
                        vmax=vmax,
                        title=f"{lab} #{v}" if i == 0 else "",
                    )
            ax[i, 0].set_ylabel(n, fontsize=7)
        fig.colorbar(im, ax=ax.ravel().tolist(), label="CLS attention (last layer, head mean)", fraction=0.02)
        res.figures.append(
            plots.save_figure(
                fig,
                w,
                "cls_attention",
                "CLS-to-patch attention of the last layer over the image (rows: models).",
            )
        )
        with _bar(ctx, len(names), "attention views") as bar:
            for n in names:
                m = ctx.model(n)
                views = []
                for v in range(n_views):
                    for lab in inputs:
                        _, cache = m.run_with_cache(
                            ctx.prep(inputs[lab][v : v + 1]),
                            names_filter=lambda h: h.endswith("hook_pattern"),
                        )
                        pats = torch.stack(
                            [cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in layers]
                        )
                        views.append(
                            {
                                "title": f"{n}: image #{v}, {lab}",
                                "pattern": pats.cpu(),
                                "image": inputs[lab][v],
                            }
                        )
                page = attention_views_page(views, m.token_labels(), title=f"Attention heads of {n}")
                p = w.path(f"attention_views_{n}.html")
                p.write_text(page)
                res.links.append(
                    {
                        "file": w.rel(p.name),
                        "title": f"circuitsvis attention views: {n} (offline, JS inlined)",
                    }
                )
                bar.update(1)
    return res


# ---------------------------------------------------------------------------------------------------------
# SAEs


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
    return f"saes/{arch}__{model}__{_slug(cond.label)}"


def _n_tokens(model, tokens: str) -> int:
    c = model.cfg
    return {"patches": c.n_patches, "all": c.n_tokens, "cls": 1, "prefix": c.n_prefix_tokens}[tokens]


def sae_step(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    import shutil
    import time

    from mechvit.analysis import collect_activations
    from mechvit.sae import (
        ActivationStoreConfig,
        CorruptionMix,
        SAETrainingConfig,
        load_sae,
        reconstruction_metrics,
        spliced_metrics,
        train_sae_for_hook,
    )

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
    table = []
    with _bar(ctx, len(runs), "SAEs") as bar:
        for arch, n, cond in runs:
            model = ctx.model(n)
            folder = w.path(sae_dirname(arch, n, cond))
            if not (folder / "cfg.json").is_file():  # a finished SAE survives an interrupted step
                rows_per_epoch = len(train_x) * _n_tokens(model, s.tokens)
                total = max(s.batch_size, int(s.epochs * rows_per_epoch) // s.batch_size * s.batch_size)
                store = ActivationStoreConfig(
                    hook=s.hook,
                    tokens=s.tokens,
                    model_batch_size=128,
                    seed=ctx.cfg.seed,
                    mix=CorruptionMix(s.mix_fraction, ((cond.corruption, cond.severity),)),
                    buffer_size=max(4 * s.batch_size, 16384),
                )
                tcfg = SAETrainingConfig(
                    architecture=arch,
                    expansion_factor=s.expansion_factor,
                    k=s.k,
                    aux_coefficient=s.aux_coefficient,
                    l1_coefficient=s.l1_coefficient,
                    lr=s.lr,
                    lr_schedule=s.lr_schedule,
                    batch_size=s.batch_size,
                    total_samples=total,
                    seed=ctx.cfg.seed,
                    device=str(ctx.device),
                    log_every=max(1, total // s.batch_size // 20),
                )
                t0 = time.time()
                trained = train_sae_for_hook(
                    model,
                    train_x,
                    store,
                    tcfg,
                    cache_dir=w.path(f"_acts/{n}__{_slug(cond.label)}"),
                    transform=ctx.prep,
                )
                clean = collect_activations(model, ctx.prep(xe), s.hook, tokens=s.tokens, progress=False)
                corr = collect_activations(
                    model,
                    ctx.prep(ctx.corrupted(cond, s.n_eval_images)),
                    s.hook,
                    tokens=s.tokens,
                    progress=False,
                )
                held = torch.cat([clean, corr]).reshape(-1, clean.shape[-1])
                rec = reconstruction_metrics(trained.sae, held)
                sp_clean = spliced_metrics(model, trained.sae, ctx.prep(xe), ye, s.hook, tokens=s.tokens)
                sp_corr = spliced_metrics(
                    model,
                    trained.sae,
                    ctx.prep(ctx.corrupted(cond, s.n_eval_images)),
                    ye,
                    s.hook,
                    tokens=s.tokens,
                )
                trained.manifest.update(
                    heldout_metrics=rec.to_dict(),
                    spliced_clean=sp_clean.to_dict(),
                    spliced_corrupted=sp_corr.to_dict(),
                    train_seconds=round(time.time() - t0, 2),
                    study={"architecture": arch, "model": n, "condition": cond.label},
                )
                from mechvit.sae import save_trained

                save_trained(trained, folder)
            _, manifest = load_sae(folder)
            key = f"{arch}|{n}|{cond.label}"
            rec, spc, spx = (
                manifest["heldout_metrics"],
                manifest["spliced_clean"],
                manifest["spliced_corrupted"],
            )
            res.metrics[key] = {
                "dir": w.rel(sae_dirname(arch, n, cond)),
                "heldout": rec,
                "spliced_clean": spc,
                "spliced_corrupted": spx,
                "train_seconds": manifest.get("train_seconds"),
                "trained_samples": manifest.get("trained_samples"),
            }
            table.append(
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
                ]
            )
            bar.update(1)
    shutil.rmtree(w.dir / "_acts", ignore_errors=True)
    header = [
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
    ]
    res.tables.append(
        {
            "title": f"SAEs on {s.hook} ({s.tokens} tokens), trained on {1 - s.mix_fraction:.0%} clean "
            f"and {s.mix_fraction:.0%} corrupted images; metrics on held-out clean + corrupted "
            "test images",
            "markdown": _md_table(header, table),
        }
    )
    res.notes.append(
        "SAE folders load with sae_lens.SAE.load_from_disk(<out>/sae/saes/<name>); BatchTopK SAEs are "
        "saved as the JumpReLU SAE they are at inference."
    )
    return res


def sae_analysis_step(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.analysis import OverlapConfig, collect_activations, feature_overlap, model_code_similarity
    from mechvit.sae import load_sae
    from mechvit.viz.features import feature_comparison_figure, feature_maps, top_features

    s = ctx.cfg.sae
    runs = sae_runs(ctx)
    res = StepResult()
    sae_dir = ctx.out / "sae"
    saes = {
        (a, n, c.label): load_sae(sae_dir / sae_dirname(a, n, c), device=str(ctx.device))[0]
        for a, n, c in runs
    }
    xe, _ = ctx.test_images(s.n_eval_images)
    code_sim, overlaps = {}, {}
    pairs = [(a, n, c) for a, n, c in runs if n != ctx.base_name and (a, ctx.base_name, c.label) in saes]
    acts_cache: dict = {}

    def acts(n: str, c) -> torch.Tensor:  # [2N, T', D]: clean then corrupted images
        if (n, c.label) not in acts_cache:
            pool = torch.cat([xe, ctx.corrupted(c, s.n_eval_images)])
            acts_cache[(n, c.label)] = collect_activations(
                ctx.model(n), ctx.prep(pool), s.hook, tokens=s.tokens, progress=False
            )
        return acts_cache[(n, c.label)]

    with _bar(ctx, len(runs) + len(pairs), "SAE analysis") as bar:
        for a, n, c in runs:
            cs = model_code_similarity(
                ctx.model(n),
                saes[(a, n, c.label)],
                s.hook,
                ctx.prep(xe),
                ctx.prep(ctx.corrupted(c, s.n_eval_images)),
                tokens=s.tokens,
                bins=s.histogram_bins,
                label=n,
                progress=False,
            )
            code_sim[(a, n, c.label)] = cs
            bar.update(1)
        oc = OverlapConfig(
            persistent_cos=s.overlap.persistent_cos, shifted_cos=s.overlap.shifted_cos, top_k=s.overlap.top_k
        )
        for a, n, c in pairs:
            overlaps[(a, n, c.label)] = feature_overlap(
                saes[(a, ctx.base_name, c.label)],
                saes[(a, n, c.label)],
                acts(ctx.base_name, c),
                acts(n, c),
                oc,
            )
            bar.update(1)
    res.metrics["code_similarity"] = {"|".join(k): v.to_dict() for k, v in code_sim.items()}
    res.metrics["overlap"] = {"|".join(k): v.to_dict() for k, v in overlaps.items()}

    # code-cosine histograms: one panel per architecture x condition, base vs fine-tuned
    panels = sorted({(a, c.label) for a, _, c in runs}, key=lambda t: (s.architectures.index(t[0]), t[1]))
    fig, ax = plots.new_figure(1, len(panels), w=3.5, h=2.8)
    for p, (a, lab) in enumerate(panels):
        for i, n in enumerate(ctx.model_names):
            cs = code_sim.get((a, n, lab))
            if cs is None:
                continue
            edges = cs.edges.numpy()
            dens = cs.counts.numpy() / max(1, cs.counts.sum().item()) / np.diff(edges)
            ax[0, p].stairs(dens, edges, color=plots.color(i), lw=1.4, label=f"{n} (mean {cs.mean:.2f})")
        ax[0, p].set(title=f"{a}, {lab}", xlabel="cosine(code clean, code corrupted)", ylabel="density")
        ax[0, p].legend(frameon=False, fontsize=6, loc="upper left")
    res.figures.append(
        plots.save_figure(
            fig,
            w,
            "code_cosine",
            "The seed paper's measure: cosine similarity between "
            "the SAE codes of each patch of a clean image and of "
            "its corrupted copy, per model's own SAE.",
        )
    )
    header = ["SAE", "model", "condition", "mean cosine", "median", "tokens", "undefined (zero code)"]
    rows = [
        [a, n, lab, v.mean, v.to_dict()["median"], int(v.cosines.numel()), v.n_undefined]
        for (a, n, lab), v in code_sim.items()
    ]
    res.tables.append(
        {"title": "SAE code similarity, clean vs corrupted patches", "markdown": _md_table(header, rows)}
    )

    if overlaps:
        header = [
            "SAE",
            f"{ctx.base_name} vs",
            "condition",
            "mean max cos (base→ft)",
            "mean max cos (ft→base)",
            "persistent",
            "shifted",
            "lost",
            "new",
            "dead (base)",
            "dead (ft)",
            "mean act. corr.",
            "top-k Jaccard",
            "EV base SAE on ft acts",
        ]
        rows = []
        for (a, n, lab), o in overlaps.items():
            d = o.to_dict()
            cnt = d["counts"]
            rows.append(
                [
                    a,
                    n,
                    lab,
                    d["mean_max_cos_a_to_b"],
                    d["mean_max_cos_b_to_a"],
                    cnt["persistent"],
                    cnt["shifted"],
                    cnt["lost"],
                    cnt["new"],
                    cnt["dead_a"],
                    cnt["dead_b"],
                    d["mean_act_corr"] or float("nan"),
                    d["mean_topk_jaccard"] or float("nan"),
                    d["cross_application"]["a_on_b"]["explained_variance"],
                ]
            )
        res.tables.append(
            {
                "title": f"Feature overlap between the base model's SAE and each fine-tuned model's SAE "
                f"(matched one to one; persistent: cosine >= {s.overlap.persistent_cos}, shifted: "
                f">= {s.overlap.shifted_cos}; features that never fire on the images are dead and "
                f"left out of the matching)",
                "markdown": _md_table(header, rows),
            }
        )
        fig, ax = plots.new_figure(1, 2, w=3.8, h=2.9)
        keys = list(overlaps)
        for i, k in enumerate(keys):
            o = overlaps[k]
            ax[0, 0].hist(
                o.matched_cos.numpy(),
                bins=40,
                range=(-1, 1),
                histtype="step",
                lw=1.4,
                color=plots.color(i + 1),
                label="/".join(k),
            )
            cnt = o.counts()
            ax[0, 1].bar(
                np.arange(6) + (i - (len(keys) - 1) / 2) * 0.8 / len(keys),
                [cnt[c] for c in ("persistent", "shifted", "lost", "new", "dead_a", "dead_b")],
                0.8 / len(keys),
                color=plots.color(i + 1),
                label="/".join(k),
            )
        ax[0, 0].axvline(s.overlap.persistent_cos, color=plots.PALETTE[6], ls=":", lw=0.8)
        ax[0, 0].axvline(s.overlap.shifted_cos, color=plots.PALETTE[6], ls=":", lw=0.8)
        ax[0, 0].set(xlabel="decoder cosine of matched pair", ylabel="feature pairs")
        ax[0, 1].set_xticks(
            range(6), ["persistent", "shifted", "lost", "new", "dead\n(base)", "dead\n(ft)"], fontsize=6
        )
        ax[0, 1].set(ylabel="features")
        ax[0, 1].legend(frameon=False, fontsize=6)
        res.figures.append(
            plots.save_figure(
                fig,
                w,
                "feature_overlap",
                "Matched decoder cosines and feature classes, base SAE vs fine-tuned SAE.",
            )
        )

    # feature pages: the top features of each SAE with their best match in the other, side by side
    if s.tokens != "patches":
        res.notes.append("feature pages need patch tokens (sae.tokens: patches); skipped")
        return res
    pool_x = {c.label: torch.cat([xe, ctx.corrupted(c, s.n_eval_images)]) for c in ctx.cfg.conditions}
    grid = ctx.model(ctx.base_name).cfg.grid_size
    for (a, n, lab), o in overlaps.items():
        c = next(cc for cc in ctx.cfg.conditions if cc.label == lab)
        sae_a, sae_b = saes[(a, ctx.base_name, lab)], saes[(a, n, lab)]
        acts_a, acts_b = acts(ctx.base_name, c), acts(n, c)
        match_ab = dict(zip(o.idx_a.tolist(), o.idx_b.tolist(), strict=True))
        match_ba = {j: i for i, j in match_ab.items()}
        n_img = len(xe)
        short = lab.replace("gaussian_", "")
        tags = [f"clean #{i}" for i in range(n_img)] + [f"{short} #{i}" for i in range(n_img)]
        for side, (sae_x, sae_y, acts_x, acts_y, match, nx, ny) in {
            "base": (sae_a, sae_b, acts_a, acts_b, match_ab, ctx.base_name, n),
            "finetuned": (sae_b, sae_a, acts_b, acts_a, match_ba, n, ctx.base_name),
        }.items():
            feats = [f for f in top_features(sae_x, acts_x, s.top_features * 3) if f in match][
                : s.top_features
            ]
            if not feats:
                continue
            partners = [match[f] for f in feats]
            maps_x = feature_maps(sae_x, acts_x, feats, grid)
            maps_y = feature_maps(sae_y, acts_y, partners, grid)
            cos = o.cosine[feats, partners] if side == "base" else o.cosine[partners, feats]
            fig = feature_comparison_figure(
                pool_x[lab],
                maps_x,
                maps_y,
                feats,
                partners,
                (nx, ny),
                tags,
                top_images=s.top_images,
                pair_cosine=cos.tolist(),
            )
            stem = f"features_{a}_{n}_{_slug(lab)}_{side}"
            res.figures.append(
                plots.save_figure(
                    fig,
                    w,
                    stem,
                    f"Feature page ({a}, {lab}): the top features of {nx}'s SAE (left, by mean activation) "
                    f"and their matched features in {ny}'s SAE (right); each shows its most activating "
                    "images (clean and corrupted pool) with the feature's per-patch activation overlaid.",
                )
            )
    return res


# ---------------------------------------------------------------------------------------------------------
# patching and CKA


def _patching_grid_figure(results: dict, grid, tokens: list[str], title: str):
    keys = list(results)
    L = results[keys[0]].values.shape[0]
    lim = max(float(r.values.abs().max()) for r in results.values()) or 1.0
    fig, ax = plots.new_figure(len(keys), L, w=1.7, h=1.9)
    for i, k in enumerate(keys):
        prefix, g = results[k].on_grid()
        for layer in range(L):
            im = ax[i, layer].imshow(g[layer].numpy(), cmap=plots.DIVERGING, vmin=-lim, vmax=lim)
            pre = ", ".join(f"{t} {float(v[layer]):.2f}" for t, v in prefix.items())
            ax[i, layer].set_title(f"layer {layer}" + (f"\n{pre}" if pre else ""), fontsize=7)
            ax[i, layer].set_xticks([])
            ax[i, layer].set_yticks([])
        ax[i, 0].set_ylabel(k, fontsize=7)
    fig.colorbar(im, ax=ax.ravel().tolist(), label="normalised logit difference restored", fraction=0.02)
    fig.suptitle(title, fontsize=9)
    return fig


def patching_step(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.analysis import activation_patching

    s = ctx.cfg.patching
    x, y = ctx.test_images(s.n_images)
    base = ctx.model(ctx.base_name)
    kw = {"batch_size": s.batch_size, "max_rows": s.max_rows, "progress": False}
    by_pos, by_head, by_layer, across = {}, {}, {}, {}
    res = StepResult()
    jobs = [("within", c, None) for c in ctx.cfg.conditions]
    if s.across_models:
        jobs += [("across", c, n) for n in ctx.finetuned_names for c in ctx.cfg.conditions]
    with _bar(ctx, len(jobs), "patching") as bar:
        for kind, c, n in jobs:
            xc = ctx.prep(ctx.corrupted(c, s.n_images))
            try:
                if kind == "within":
                    args = (base, ctx.prep(x), xc, y)
                    by_pos[c.label] = activation_patching(*args, component=s.component, by="position", **kw)
                    by_layer[c.label] = activation_patching(*args, component=s.component, by="layer", **kw)
                    if s.heads:
                        by_head[c.label] = activation_patching(*args, component="z", by="head", **kw)
                else:
                    across[f"{n} → {ctx.base_name}, {c.label}"] = activation_patching(
                        ctx.model(n),
                        xc,
                        xc,
                        y,
                        corrupted_model=base,
                        component=s.component,
                        by="position",
                        **kw,
                    )
            except ValueError as e:  # e.g. both runs give the same logit difference: the metric is undefined
                res.notes.append(f"patching {kind} {c.label} {n or ''}: skipped ({e})")
            bar.update(1)
    res.metrics = {
        "within_by_position": {k: v.to_dict() for k, v in by_pos.items()},
        "within_by_layer": {k: v.to_dict() for k, v in by_layer.items()},
        "within_by_head": {k: v.to_dict() for k, v in by_head.items()},
        "across_models": {k: v.to_dict() for k, v in across.items()},
    }
    tokens = base.token_labels()
    if by_pos:
        res.figures.append(
            plots.save_figure(
                _patching_grid_figure(
                    by_pos,
                    base.cfg.grid_size,
                    tokens,
                    f"{ctx.base_name}: clean {s.component} patched into the corrupted run",
                ),
                w,
                "patching_within",
                "Activation patching (clean → corrupted) in the base model, per layer and "
                "position on the patch grid; the prefix tokens' scores are in the titles. 1 = the "
                "clean answer restored, 0 = the corrupted run.",
            )
        )
    if by_head:
        keys = list(by_head)
        fig, ax = plots.new_figure(1, len(keys), w=3.4, h=2.8)
        for j, k in enumerate(keys):
            r = by_head[k]
            plots.heatmap(
                ax[0, j],
                r.values.numpy(),
                r.labels["head"],
                r.labels["layer"],
                cbar_label="restored",
                cmap=plots.DIVERGING,
                fmt="{:.2f}",
            )
            ax[0, j].set(title=k, xlabel="head", ylabel="layer")
        res.figures.append(
            plots.save_figure(
                fig,
                w,
                "patching_heads",
                "Patching each head's output z (clean → corrupted) in the base model.",
            )
        )
    if across:
        res.figures.append(
            plots.save_figure(
                _patching_grid_figure(
                    across,
                    base.cfg.grid_size,
                    tokens,
                    f"fine-tuned {s.component} patched into {ctx.base_name} (corrupted images)",
                ),
                w,
                "patching_across",
                "Across models on corrupted images: the fine-tuned model's activation at one "
                "layer and position patched into the base model; 1 = the fine-tuned model's "
                "answer, 0 = the base model's.",
            )
        )
    header = ["run", "layer", *[str(i) for i in range(base.cfg.n_layers)]]
    rows = [["whole-layer restore", k, *v.values.tolist()] for k, v in by_layer.items()]
    rows += [["best position", k, *v.values.max(1).values.tolist()] for k, v in {**by_pos, **across}.items()]
    if rows:
        res.tables.append(
            {
                "title": f"Patching scores per layer ({s.component}; 1 = clean/fine-tuned answer restored)",
                "markdown": _md_table(["measure", "run", *header[2:]], rows),
            }
        )
    return res


def cka_step(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.analysis import layer_cka

    s = ctx.cfg.cka
    inputs = _inputs(ctx, s.n_images)
    conds = [lab for lab in inputs if lab != "clean"]
    kw = {"hook": s.hook, "token_reduction": s.token_reduction, "batch_size": s.batch_size, "progress": False}
    between, within = {}, {}
    with _bar(ctx, len(ctx.finetuned_names) * len(inputs) + len(ctx.model_names) * len(conds), "CKA") as bar:
        for n in ctx.finetuned_names:
            for lab, xi in inputs.items():
                between[f"{ctx.base_name} vs {n}, {lab}"] = layer_cka(
                    ctx.model(ctx.base_name), ctx.prep(xi), ctx.model(n), **kw
                )
                bar.update(1)
        for n in ctx.model_names:
            for lab in conds:
                within[f"{n}: clean vs {lab}"] = layer_cka(
                    ctx.model(n), ctx.prep(inputs["clean"]), images_b=ctx.prep(inputs[lab]), **kw
                )
                bar.update(1)
    res = StepResult(
        metrics={
            "between_models": {k: v.to_dict() for k, v in between.items()},
            "clean_vs_corrupted": {k: v.to_dict() for k, v in within.items()},
        }
    )
    fig, ax = plots.new_figure(1, 2, w=3.9, h=3.0, sharey=True)
    for j, (group, title) in enumerate(
        ((between, "base vs fine-tuned, same images"), (within, "clean vs corrupted, same model"))
    ):
        for i, (k, r) in enumerate(group.items()):
            ax[0, j].plot(r.layers, r.linear.numpy(), color=plots.color(i), marker="o", ms=3, label=k)
        ax[0, j].set(title=title, xlabel=f"layer ({s.hook})")
        ax[0, j].legend(frameon=False, fontsize=6)
    ax[0, 0].set_ylabel(f"linear CKA ({s.token_reduction})")
    res.figures.append(
        plots.save_figure(fig, w, "cka", "Linear CKA per layer (debiased values in metrics.json).")
    )
    rows = [
        [k, *[f"{a:.3f} / {b:.3f}" for a, b in zip(r.linear.tolist(), r.debiased.tolist(), strict=True)]]
        for k, r in {**between, **within}.items()
    ]
    L = ctx.model(ctx.base_name).cfg.n_layers
    res.tables.append(
        {
            "title": "CKA per layer (linear / debiased)",
            "markdown": _md_table(["pair", *[f"layer {i}" for i in range(L)]], rows),
        }
    )
    return res


STEPS: list[Step] = [
    Step("robustness", "Robustness: seen vs unseen corruptions", "robustness", robustness),
    Step("logit_lens", "Logit lens: how the answer forms layer by layer", "logit_lens", logit_lens_step),
    Step("attention", "Attention", "attention", attention_step),
    Step("sae", "Sparse autoencoders", "sae", sae_step),
    Step(
        "sae_analysis",
        "SAE features: code similarity, overlap, feature pages",
        "sae",
        sae_analysis_step,
        deps=("sae",),
        version=4,
    ),  # 4: dead features left out of the overlap
    Step("patching", "Activation patching", "patching", patching_step),
    Step("cka", "Representation similarity (CKA)", "cka", cka_step),
]
