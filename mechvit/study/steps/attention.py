"""Attention: entropy and distance per layer, clean vs corrupted maps per model, fine-tuned vs base maps, CLS
attention over the images and circuitsvis head views (one shared copy of the circuitsvis bundle,
``attention/circuitsvis.js``, for every view page).

Every per-layer curve carries a 95% CI over the images (the logit-lens step's :func:`layer_cis` of the
per-image, head-mean values the analyses keep), stored beside the means in metrics.json (``ci95`` of each
entry of ``stats``, ``clean_vs_corrupted`` and ``base_vs_finetuned``)."""

from __future__ import annotations

import torch

from mechvit.analysis import attention_stats, compare_attention, model_cls_attention
from mechvit.analysis.statistics import mean_ci, paired_difference_ci
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.study.steps.logit_lens import band_words, layer_cis
from mechvit.viz import figures
from mechvit.viz.circuits import BUNDLE_NAME, save_attention_views

TITLE = "Attention"
SECTION = "attention"


# the per-layer metrics each figure draws, and so the ones with a CI band
CHANGE_KEYS = ("entropy_diff", "mse", "cosine")  # clean vs corrupted
BETWEEN_KEYS = ("cosine", "entropy_diff")  # fine-tuned vs base
STATS_KEYS = ("entropy", "distance_px")


def _cis(result, keys, seed: int) -> dict:
    """``{key: layer_cis(...)}``: the 95% CI over images of each layer's mean of ``result.per_image[key]``."""
    return {k: layer_cis(result.per_image[k], seed=seed) for k in keys}


def _per_layer(pairs: dict, bands: dict) -> dict:
    return {
        f"{n}|{lab}": {**{k: v.tolist() for k, v in p.per_layer().items()}, "ci95": bands[(n, lab)]}
        for (n, lab), p in pairs.items()
    }


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.attention
    inputs = ctx.inputs(s.n_images)
    conds = [lab for lab in inputs if lab != "clean"]
    names, base = ctx.model_names, ctx.base_name
    kw = {"batch_size": s.batch_size, "progress": False}
    stats, paired, between = {}, {}, {}
    n_img = len(inputs["clean"])
    with ctx.bar(len(names) * (1 + len(conds)) + len(ctx.finetuned_names) * len(inputs), "attention") as bar:
        for n in names:
            m, clean = ctx.model(n), ctx.prep(inputs["clean"])
            stats[n] = attention_stats(m, clean, **kw)
            bar.update(1)
            for lab in conds:
                paired[(n, lab)] = compare_attention(
                    m, clean, images_b=ctx.prep(inputs[lab]), labels=("clean", lab), **kw
                )
                bar.update(1)
        for n in ctx.finetuned_names:
            for lab, xi in inputs.items():
                between[(n, lab)] = compare_attention(
                    ctx.model(base), ctx.prep(xi), ctx.model(n), labels=(base, n), **kw
                )
                bar.update(1)
    seed = ctx.cfg.seed
    bands = {
        "stats": {n: _cis(v, STATS_KEYS, seed) for n, v in stats.items()},
        "paired": {k: _cis(p, CHANGE_KEYS, seed) for k, p in paired.items()},
        "between": {k: _cis(p, BETWEEN_KEYS, seed) for k, p in between.items()},
    }
    res = StepResult(
        metrics={
            "stats": {
                n: {
                    **v.to_dict(),
                    "per_layer": {k: t.tolist() for k, t in v.per_layer().items()},
                    "ci95": bands["stats"][n],
                }
                for n, v in stats.items()
            },
            "clean_vs_corrupted": _per_layer(paired, bands["paired"]),
            "base_vs_finetuned": _per_layer(between, bands["between"]),
        }
    )
    # how far each fine-tune's attention moved from the base's, per image (1 - cosine of the maps, mean over
    # layers, heads, queries), against how far the clean fine-tune control's moved on the same images
    change, rows = {}, []
    ctrls = ctx.control_names
    for n in ctx.finetuned_names:
        d_n = {lab: 1 - between[(n, lab)].cosine_per_image.double() for lab in inputs}
        for lab in inputs:
            e = mean_ci(d_n[lab].numpy(), seed=ctx.cfg.seed)
            entry = {"change": e.to_dict()}
            row = [n, lab, e.estimate, e.low, e.high, None, None, None, None]
            for c in ctrls:
                if c == n:
                    continue
                dc = 1 - between[(c, lab)].cosine_per_image.double()
                diff = paired_difference_ci(d_n[lab].numpy(), dc.numpy(), seed=ctx.cfg.seed)
                entry[f"minus_{c}"] = diff.to_dict()
                row[5:9] = [c, diff.estimate, diff.low, diff.high]
            change[f"{n}|{lab}"] = entry
            rows.append(row)
    res.metrics["change_from_base"] = change
    if rows:
        res.tables.append(
            Table(
                f"Attention change from the base model: 1 - cosine of the attention maps (mean over layers, heads "
                f"and queries), mean and 95% CI over {s.n_images} images, and its paired difference from the "
                "clean fine-tune control's change on the same images",
                ["model", "input", "change", "low", "high", "control", "minus control", "low", "high"],
                rows,
                digits=4,
            )
        )
    res.figures.append(
        w.figure(
            figures.attention_change_curves(paired, names, conds, bands["paired"]),
            "attention_clean_vs_corrupted",
            "Per layer: entropy of the corrupted minus the clean attention, mean squared difference and cosine "
            f"similarity of the maps, head mean, mean over {n_img} images (colour: model; line style: "
            f"condition); {band_words(n_img)}; in metrics.json: clean_vs_corrupted.<model>|<condition>.ci95.",
        )
    )
    res.figures.append(
        w.figure(
            figures.attention_layer_stats(stats, bands["stats"]),
            "attention_stats",
            f"Attention entropy and mean attention distance per layer on {n_img} clean images (head mean); "
            f"{band_words(n_img)}; in metrics.json: stats.<model>.per_layer and .ci95.",
        )
    )
    if between:
        res.figures.append(
            w.figure(
                figures.attention_between_models(between, names, inputs, base, bands["between"]),
                "attention_base_vs_finetuned",
                f"Fine-tuned against base attention on the same {n_img} images, per layer (head mean): cosine "
                f"of each fine-tune's maps to {base}'s and its entropy minus {base}'s (colour: model; line "
                f"style: input); {band_words(n_img)}; in metrics.json: base_vs_finetuned.<model>|<input>.ci95.",
            )
        )

    # CLS attention of the last layer (head mean) on the first view images, and the circuitsvis views
    n_views = min(s.n_views, s.n_images)
    if not n_views:
        return res
    views_x = {lab: xi[:n_views] for lab, xi in inputs.items()}
    cls = {
        (n, lab): model_cls_attention(ctx.model(n), ctx.prep(xi))[-1].mean(1)
        for n in names
        for lab, xi in views_x.items()
    }  # [views, gh, gw]
    res.figures.append(
        w.figure(
            figures.cls_attention_grid(cls, views_x, names),
            "cls_attention",
            "CLS-to-patch attention of the last layer over the image (rows: models).",
        )
    )
    with ctx.bar(len(names), "attention views") as bar:
        for n in names:
            m = ctx.model(n)
            depth = m.cfg.n_layers
            layers = sorted(i % depth for i in s.view_layers) if s.view_layers is not None else range(depth)
            keep = {f"blocks.{i}.attn.hook_pattern" for i in layers}
            heads = [f"L{i}H{h}" for i in layers for h in range(m.cfg.n_heads)]
            views = []
            for v in range(n_views):
                for lab, xi in views_x.items():
                    _, cache = m.run_with_cache(ctx.prep(xi[v : v + 1]), names_filter=lambda h: h in keep)  # noqa: B023
                    pats = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0] for i in layers])
                    views.append(
                        {
                            "title": f"{n}: image #{v}, {lab}",
                            "pattern": pats.cpu(),
                            "image": xi[v],
                            "head_names": heads,
                        }
                    )
            name = f"attention_views_{n}.html"
            # every view page loads one shared copy of the circuitsvis bundle, attention/circuitsvis.js
            save_attention_views(
                w.path(name),
                views,
                m.token_labels(),
                title=f"Attention heads of {n}",
                shared_bundle=w.path(name).parent,
            )
            res.links.append(
                {
                    "file": w.rel(name),
                    "title": f"circuitsvis attention views: {n} (offline; loads the shared "
                    f"{w.rel(BUNDLE_NAME)})",
                }
            )
            bar.update(1)
    return res
