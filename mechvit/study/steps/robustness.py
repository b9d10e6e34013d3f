"""Robustness: the model x corruption x severity matrix, accuracy on seen / unseen (same family, other
families) corruptions with 95% CIs over images, paired differences of each fine-tune against the base and
against the clean fine-tune control, exact McNemar tests per seen cell, mCE; corruptions that leave the
images unchanged are excluded from unseen and mCE."""

from __future__ import annotations

from mechvit.analysis.robustness import (
    corruption_errors,
    robustness_estimates,
    robustness_matrix,
    seen_unseen_summary,
    unchanged_corruptions,
)
from mechvit.analysis.statistics import mcnemar
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Robustness: seen vs unseen corruptions"
SECTION = "robustness"

GROUPS = {
    "clean": "clean",
    "seen": "seen",
    "unseen_same_family": "unseen, same family",
    "unseen_other": "unseen, other families",
    "all_corrupted": "all corruptions",
}


def _ci(e) -> list:
    return [None, None, None] if e is None else [100 * e.estimate, 100 * e.low, 100 * e.high]


def controls(ctx: StudyContext) -> list[str]:
    """The fine-tuned models that saw no corruption: clean fine-tune controls."""
    return [n for n in ctx.finetuned_names if not ctx.infos[n].seen]


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.corruptions import CORRUPTIONS

    cfg, r = ctx.cfg, ctx.cfg.robustness
    x, y = ctx.test_images(r.n_images)
    names, base = ctx.model_names, ctx.base_name
    corrs = list(r.corruptions or CORRUPTIONS)
    models = {n: ctx.wrapped(n) for n in names}
    rows, correct = robustness_matrix(
        models, x, y, corrs, r.severities, seed=cfg.seed, batch_size=r.batch_size, device=ctx.device,
        progress=ctx.progress, return_correct=True,
    )  # fmt: skip
    noop = unchanged_corruptions(x[:16], corrs, r.severities, seed=cfg.seed)
    kept = [row for row in rows if row["corruption"] not in noop]
    ce = corruption_errors(kept, base)
    seen = {n: ctx.infos[n].seen for n in names}
    summary = seen_unseen_summary(kept, seen, ce)
    est = robustness_estimates(correct, seen, base, exclude=noop, seed=cfg.seed)
    ctrl = controls(ctx)
    tests = []
    for n in names:
        for c in seen[n]:
            for sev in r.severities:
                if (n, c, sev) not in correct:
                    continue
                for ref in [base, *ctrl]:
                    t = mcnemar(correct[(n, c, sev)].numpy(), correct[(ref, c, sev)].numpy(), seed=cfg.seed)
                    tests.append({"model": n, "reference": ref, "cell": f"{c}/{sev}", **t.to_dict()})

    def conv(e):
        return {g: v.to_dict() for g, v in e.items()}

    res = StepResult(
        metrics={
            "rows": rows, "corruption_errors": ce, "seen_unseen": summary, "n_images": int(len(y)),
            "corruptions": corrs, "severities": list(r.severities), "excluded_unchanged": noop,
            "controls": ctrl,
            "estimates": {
                n: {"seen": e["seen"], "groups": e["groups"], "accuracy": conv(e["accuracy"]),
                    "vs": {o: conv(d) for o, d in e["vs"].items()}}
                for n, e in est.items()
            },
            "mcnemar": tests,
        }
    )  # fmt: skip
    if noop:
        res.notes.append(
            f"{', '.join(noop)} leave these images unchanged at every severity (colour-only on grayscale): "
            "excluded from unseen, mCE and the estimates; still in the matrix."
        )
    acc_rows = []
    for n in names:
        for g, e in est[n]["accuracy"].items():
            acc_rows.append([n, ", ".join(seen[n]) or "–", GROUPS[g], *_ci(e), len(est[n]["groups"][g])])
    res.tables.append(
        Table(
            f"Top-1 accuracy with 95% CIs over {len(y)} test images (bootstrap; per image, the fraction of the "
            "group's corruption x severity cells classified correctly)",
            ["model", "seen", "group", "top-1", "low", "high", "cells"],
            acc_rows,
            units=["", "", "", "%", "%", "%", ""],
            digits=1,
        )
    )
    diff_rows = []
    for n in ctx.finetuned_names:
        for ref in [base, *ctrl]:
            if ref == n:
                continue
            for g, e in est[n]["vs"][ref].items():
                diff_rows.append([n, ref, GROUPS[g], *_ci(e)])
    if diff_rows:
        res.tables.append(
            Table(
                "Paired top-1 difference, fine-tuned model minus reference (the base; the clean fine-tune "
                "control), on the fine-tuned model's groups; 95% CI over images, pairs kept",
                ["model", "reference", "group", "difference", "low", "high"],
                diff_rows,
                units=["", "", "", "pp", "pp", "pp"],
                digits=2,
            )
        )
    if tests:
        res.tables.append(
            Table(
                "Exact McNemar tests on each seen cell (discordant images: model right / reference right)",
                ["model", "reference", "cell", "model only", "reference only", "p"],
                [
                    [t["model"], t["reference"], t["cell"], t["a_only"], t["b_only"], t["p_value"]]
                    for t in tests
                ],
                digits=4,
            )
        )
    labels = [("clean", 0)] + [(c.corruption, c.severity) for c in cfg.conditions]
    paper = [row for lab in labels for row in rows if (row["corruption"], row["severity"]) == lab]
    keys = ("top1", "top5", "confidence", "correct_prob", "ece", "nll")
    res.tables.append(
        Table(
            "Seed-paper metrics on clean images and each study condition (top-10 is left out: with 10 classes "
            "it is 100% by construction)",
            ["model", "input", "top-1", "top-5", "confidence", "correct-class prob.", "ECE", "NLL"],
            [
                [
                    row["model"],
                    "clean" if row["corruption"] == "clean" else f"{row['corruption']}/{row['severity']}",
                    *[row.get(k) for k in keys],
                ]
                for row in paper
            ],
        )  # fmt: skip
    )
    res.tables.append(
        Table(
            "mCE relative to the base model (100 = as good as the base), corruptions that change the images",
            ["model", "mCE"],
            [[s["model"], 100 * s["mCE"]] for s in summary],
            digits=1,
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
            figures.robustness_group_bars(res.metrics["estimates"], names, GROUPS),
            "seen_unseen",
            "Top-1 per model on clean, seen, unseen same-family and unseen other-family corruptions, with 95% "
            "CIs over images.",
        )
    )
    return res
