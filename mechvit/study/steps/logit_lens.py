"""Logit lens: the model's own readout applied after every block, per model and input condition."""

from __future__ import annotations

from mechvit.analysis import LogitLensSweep, logit_lens
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
    rows = [
        [
            n,
            lab,
            float(r.top1[:, -1].double().mean()),
            r.mean_first_correct,
            f"{int((r.first_correct >= 0).sum())}/{r.top1.shape[0]}",
        ]  # fmt: skip
        for (n, lab), r in results.items()
    ]
    res.tables.append(
        Table(
            f"Logit lens: first layer at which the correct class is top-1 (mode '{s.mode}', averaged over "
            f"images correct at some layer; layer index counts "
            f"{'embed, then blocks' if s.include_embed else 'blocks'})",
            ["model", "input", "final top-1", "mean first correct layer", "correct at some layer"],
            rows,
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
