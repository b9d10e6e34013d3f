"""Logit lens: the model's own readout applied after every block, per model and input condition."""

from __future__ import annotations

from mechvit.analysis import LogitLensSweep, logit_lens
from mechvit.analysis.statistics import mean_ci, paired_difference_ci
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Logit lens: how the answer forms layer by layer"
SECTION = "logit_lens"


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.logit_lens
    _, y = ctx.test_images(s.n_images)
    inputs = ctx.inputs(s.n_images)
    results = {}
    with ctx.bar(len(ctx.model_names) * len(inputs), "logit lens") as bar:
        for n in ctx.model_names:
            for lab, xi in inputs.items():
                results[(n, lab)] = logit_lens(
                    ctx.model(n), ctx.prep(xi), y, include_embed=s.include_embed, mode=s.mode,
                    batch_size=s.batch_size, meta={"model": n, "condition": lab}, progress=False,
                )  # fmt: skip
                bar.update(1)
    LogitLensSweep(results).save_csv(w.path("logit_lens.csv"))
    res = StepResult(metrics={f"{n}|{lab}": r.to_dict() for (n, lab), r in results.items()})

    firsts = {k: r.first_correct_block for k, r in results.items()}  # the embed row does not see the image
    rows = []
    for (n, lab), r in results.items():
        f = firsts[(n, lab)]
        ok = f >= 0
        e = mean_ci(f[ok].double().numpy(), seed=ctx.cfg.seed) if ok.any() else None
        rows.append(
            [n, lab, float(r.top1[:, -1].double().mean()), *([e.estimate, e.low, e.high] if e else [None] * 3),
             f"{int(ok.sum())}/{r.top1.shape[0]}"]
        )  # fmt: skip
    res.tables.append(
        Table(
            f"Logit lens: first block after which the correct class is top-1 (mode '{s.mode}'; 0 = after block 0; "
            "the embed row is left out: before block 0 the class token does not depend on the image), mean and "
            "95% CI over the images correct after some block",
            [
                "model",
                "input",
                "final top-1",
                "mean first correct block",
                "low",
                "high",
                "correct after some block",
            ],
            rows,
        )
    )
    paired, prow = {}, []
    refs = [ctx.base_name, *ctx.control_names]
    for n in ctx.finetuned_names:
        for ref in refs:
            if ref == n:
                continue
            for lab in inputs:
                a, b = firsts[(n, lab)], firsts[(ref, lab)]
                common = (a >= 0) & (b >= 0)
                if int(common.sum()) < 2:
                    continue
                d = paired_difference_ci(
                    a[common].double().numpy(), b[common].double().numpy(), seed=ctx.cfg.seed
                )
                paired[f"{n}|{ref}|{lab}"] = {"n_common": int(common.sum()), "difference": d.to_dict()}
                prow.append([n, ref, lab, int(common.sum()), d.estimate, d.low, d.high])
    res.metrics["paired_first_correct"] = paired
    if prow:
        res.tables.append(
            Table(
                "First correct block, fine-tuned model minus reference, paired on the images correct after some "
                "block for both models (negative: the answer forms earlier); 95% CI over images",
                ["model", "reference", "input", "images", "difference (blocks)", "low", "high"],
                prow,
            )
        )
    res.figures.append(
        w.figure(
            figures.logit_lens_curves(results, ctx.model_names, list(inputs)),
            "logit_lens",
            "Logit lens: the model's own readout (final norm, CLS pooling, head) applied after every block.",
        )
    )
    res.links.append({"file": w.rel("logit_lens.csv"), "title": "logit lens per layer (CSV)"})
    return res
