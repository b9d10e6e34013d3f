"""Robustness: the model x corruption x severity matrix (seen vs unseen, mCE) and the seed paper's per-condition
metrics (top-1/5/10, certainty, ECE, NLL) on the analysis images."""

from __future__ import annotations

import torch

from mechvit.analysis.robustness import (
    classification_metrics,
    corruption_errors,
    robustness_matrix,
    seen_unseen_summary,
    topk_accuracy,
)
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Robustness: seen vs unseen corruptions"
SECTION = "robustness"


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.corruptions import CORRUPTIONS

    cfg, r = ctx.cfg, ctx.cfg.robustness
    x, y = ctx.test_images(r.n_images)
    names = ctx.model_names
    corrs = list(r.corruptions or CORRUPTIONS)
    models = {n: ctx.wrapped(n) for n in names}
    rows = robustness_matrix(
        models, x, y, corrs, r.severities, seed=cfg.seed, batch_size=r.batch_size, device=ctx.device,
        progress=ctx.progress,
    )  # fmt: skip
    ce = corruption_errors(rows, ctx.base_name)
    seen = {n: ctx.infos[n].seen for n in names}
    summary = seen_unseen_summary(rows, seen, ce)

    # the seed paper's table: top-1/5/10, certainty and ECE on clean and each condition (the analysis images)
    paper: dict[str, dict[str, dict]] = {}
    inputs = ctx.inputs(r.n_images)
    with torch.no_grad():
        for n in names:
            model, paper[n] = ctx.model(n), {}
            for label, xi in inputs.items():
                logits = torch.cat(
                    [model(ctx.prep(xi[s : s + r.batch_size])).cpu() for s in range(0, len(xi), r.batch_size)]
                )
                paper[n][label] = {**classification_metrics(logits, y), "top10": topk_accuracy(logits, y, 10)}
    transfer = {
        n: {lab: paper[n][lab]["top1"] - paper[ctx.base_name][lab]["top1"] for lab in inputs}
        for n in ctx.finetuned_names
    }

    res = StepResult(
        metrics={
            "rows": rows, "corruption_errors": ce, "seen_unseen": summary, "paper": paper,
            "transfer_top1": transfer, "n_images": int(len(y)), "corruptions": corrs,
            "severities": list(r.severities),
        }
    )  # fmt: skip
    pct = ("clean_top1", "seen_top1", "unseen_top1", "seen_confidence", "unseen_confidence")
    res.tables.append(
        Table(
            "Seen vs unseen corruptions (mean over corruptions and severities; mCE relative to the base "
            "model, 100 = as good as the base)",
            [
                "model",
                "seen",
                "clean top-1",
                "seen top-1",
                "unseen top-1",
                "seen confidence",
                "unseen confidence",
                "mCE",
            ],  # fmt: skip
            [
                [s["model"], ", ".join(s["seen"]) or "–", *[100 * s[k] for k in pct], 100 * s["mCE"]]
                for s in summary
            ],
            units=["", "", "%", "%", "%", "%", "%", ""],
            digits=1,
        )
    )
    keys = ("top1", "top5", "top10", "confidence", "correct_prob", "ece", "nll")
    res.tables.append(
        Table(
            "Seed-paper metrics per input condition",
            ["model", "input", "top-1", "top-5", "top-10", "confidence", "correct-class prob.", "ECE", "NLL"],
            [[n, lab, *[m[k] for k in keys]] for n in names for lab, m in paper[n].items()],
        )
    )
    if transfer:
        labs = list(inputs)
        res.tables.append(
            Table(
                "Top-1 change of each fine-tuned model against the base",
                ["model", "seen", *labs],
                [[n, ", ".join(seen[n]) or "–", *[100 * transfer[n][lab] for lab in labs]] for n in transfer],
                units=["", "", *["pp"] * len(labs)],
            )
        )
    res.figures.append(
        w.figure(
            figures.robustness_heatmap(rows, names, corrs, seen, r.severities),
            "robustness_heatmap",
            "Top-1 accuracy per model and corruption; outlined cells are the corruptions a model was "
            "fine-tuned on (seen).",
        )
    )
    res.figures.append(
        w.figure(
            figures.seen_unseen_bars(summary),
            "seen_unseen",
            "Clean, seen and unseen top-1 accuracy per model (the base model has seen no corruption).",
        )
    )
    return res
