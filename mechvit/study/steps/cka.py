"""Representation similarity: linear and debiased CKA per layer, base vs each fine-tuned model on the same
images, and clean vs corrupted images within each model."""

from __future__ import annotations

from mechvit.analysis import layer_cka
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Representation similarity (CKA)"
SECTION = "cka"


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.cka
    inputs = ctx.inputs(s.n_images)
    conds = [lab for lab in inputs if lab != "clean"]
    kw = {"hook": s.hook, "token_reduction": s.token_reduction, "batch_size": s.batch_size, "progress": False}
    between, within = {}, {}
    with ctx.bar(len(ctx.finetuned_names) * len(inputs) + len(ctx.model_names) * len(conds), "CKA") as bar:
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
    if s.secondary_reduction and s.secondary_reduction != s.token_reduction:
        kw2 = {**kw, "token_reduction": s.secondary_reduction}
        second = {
            f"{ctx.base_name} vs {n}, {lab} ({s.secondary_reduction})": layer_cka(
                ctx.model(ctx.base_name), ctx.prep(xi), ctx.model(n), **kw2
            )
            for n in ctx.finetuned_names
            for lab, xi in inputs.items()
        }
        res.metrics["between_models_secondary"] = {k: v.to_dict() for k, v in second.items()}
        res.notes.append(
            f"Headline CKA on the {s.token_reduction} token(s) (what the readout sees); base vs fine-tuned with "
            f"{s.secondary_reduction} as examples (secondary) in metrics.json and the table. CKA values carry "
            "no CI here (one estimate per layer on the same images)."
        )
    else:
        second = {}
    groups = {"base vs fine-tuned, same images": between, "clean vs corrupted, same model": within}
    res.figures.append(
        w.figure(
            figures.cka_curves(groups, f"linear CKA ({s.token_reduction})", xlabel=f"layer ({s.hook})"),
            "cka",
            "Linear CKA per layer (debiased values in metrics.json).",
        )
    )
    rows = [
        [k, *[f"{a:.3f} / {b:.3f}" for a, b in zip(r.linear.tolist(), r.debiased.tolist(), strict=True)]]
        for k, r in {**between, **within, **second}.items()
    ]
    L = ctx.model(ctx.base_name).cfg.n_layers
    res.tables.append(
        Table("CKA per layer (linear / debiased)", ["pair", *[f"layer {i}" for i in range(L)]], rows)
    )
    return res
