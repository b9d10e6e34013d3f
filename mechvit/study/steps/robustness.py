"""Robustness: the model x corruption x severity matrix, accuracy on seen / unseen (same family, other
families) corruptions with 95% CIs over images, paired differences of each fine-tune against the base and
against the clean fine-tune control, exact McNemar tests per seen cell with Holm-adjusted p-values (the family:
every test of the step), mCE, top-5 / confidence / ECE / NLL with bootstrap CIs over images; corruptions that
leave the images unchanged are excluded from unseen and mCE. Each fine-tune's seen corruptions are also scored
at the severities it was trained at (its checkpoint card), apart from the study's severities (group
``seen_trained``), for the models its claims compare: the fine-tunes trained there, the base and the clean
controls (:func:`trained_cell_models`); no other corruption or model is added at those severities."""

from __future__ import annotations

from mechvit.analysis.robustness import (
    corruption_error_cis,
    corruption_errors,
    metric_cis,
    robustness_estimates,
    robustness_matrix,
    seen_unseen_summary,
    unchanged_corruptions,
)
from mechvit.analysis.statistics import bootstrap_weights, holm, mcnemar
from mechvit.study.context import StudyContext, parallel_workers
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

N_RESAMPLES = 2000  # bootstrap resamples of the images for the CIs of top-5, ECE, NLL, mCE (percentile)

TITLE = "Robustness: seen vs unseen corruptions"
SECTION = "robustness"

GROUPS = {
    "clean": "clean",
    "seen_trained": "seen, trained severity",
    "seen": "seen",
    "unseen_same_family": "unseen, same family",
    "unseen_other": "unseen, other families",
    "all_corrupted": "all corruptions",
}


def _ci(e) -> list:
    return [None, None, None] if e is None else [100 * e.estimate, 100 * e.low, 100 * e.high]


def trained_severities(ctx: StudyContext) -> dict[str, list[int]]:
    """``{model: severities it was fine-tuned at}`` from each checkpoint card (``config.corruption.severities``),
    for the models with seen corruptions whose card says."""
    out = {}
    for n, info in ctx.infos.items():
        c = ((info.card or {}).get("config") or {}).get("corruption") or {}
        if info.seen and c.get("severities"):
            out[n] = sorted({int(s) for s in c["severities"]})
    return out


def extra_cells(
    seen: dict[str, list[str]], trained: dict[str, list[int]], severities, corruptions
) -> dict[str, list[int]]:
    """``{corruption: severities}`` to score beyond the study's ``severities``: each fine-tune's seen
    corruptions (among ``corruptions``) at the severities it was trained at, nothing else."""
    out: dict[str, set[int]] = {}
    for n, sevs in trained.items():
        for c in seen.get(n, []):
            if c in corruptions:
                out.setdefault(c, set()).update(s for s in sevs if s not in severities)
    return {c: sorted(v) for c, v in out.items() if v}


def trained_cell_models(
    names: list[str],
    base: str,
    ctrl: list[str],
    seen: dict[str, list[str]],
    trained: dict[str, list[int]],
    corruption: str,
    severity: int,
) -> list[str]:
    """The models scored on an extra trained-severity cell: the fine-tunes trained on ``corruption`` at
    ``severity`` (their seen gain there), the base and the clean controls (its references), in ``names``'
    order. Other fine-tunes there would feed no claim, table or test; in the default study they were 20 of
    its 192 model x input forwards (~10% of the step)."""
    return [
        n for n in names
        if n == base or n in ctrl or (corruption in seen.get(n, []) and severity in trained.get(n, []))
    ]  # fmt: skip


def _fmt(e, scale: float = 100.0, digits: int = 1) -> str:
    """``estimate [low, high]`` of an Estimate (scaled), for the tables with several CIs per row."""
    f = f"{{:.{digits}f}}"
    vals = [scale * v for v in e.as_tuple()]
    if any(v != v for v in vals[1:]):
        return f.format(vals[0])
    return f"{f.format(vals[0])} [{f.format(vals[1])}, {f.format(vals[2])}]"


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    from mechvit.corruptions import CORRUPTIONS

    cfg, r = ctx.cfg, ctx.cfg.robustness
    x, y = ctx.test_images(r.n_images)
    names, base = ctx.model_names, ctx.base_name
    corrs = list(r.corruptions or CORRUPTIONS)
    models = {n: ctx.wrapped(n) for n in names}
    workers = parallel_workers(ctx, len(models), r)
    rows, per_image = robustness_matrix(
        models, x, y, corrs, r.severities, seed=cfg.seed, batch_size=r.batch_size, device=ctx.device,
        progress=ctx.progress, return_per_image=True, workers=workers,
    )  # fmt: skip
    seen = {n: ctx.infos[n].seen for n in names}
    trained = trained_severities(ctx)
    extra = extra_cells(seen, trained, r.severities, corrs)
    trained_rows = []
    ctrl = ctx.control_names
    for c, sevs in extra.items():  # the seen corruptions at their trained severities (the same images: the
        for sev in sevs:  # corruption seeds depend on corruption, severity and batch, not on the model)
            who = trained_cell_models(names, base, ctrl, seen, trained, c, sev)
            more, pi = robustness_matrix(
                {n: models[n] for n in who}, x, y, [c], [sev], seed=cfg.seed, batch_size=r.batch_size,
                device=ctx.device, include_clean=False, progress=ctx.progress, return_per_image=True,
                workers=workers,
            )  # fmt: skip
            trained_rows += more
            per_image.update(pi)
    correct = {k: v["top1"].bool() for k, v in per_image.items()}
    noop = unchanged_corruptions(x[:16], corrs, r.severities, seed=cfg.seed)
    kept = [row for row in rows if row["corruption"] not in noop]
    ce = corruption_errors(kept, base)
    summary = seen_unseen_summary(kept, seen, ce)
    # the forked_maps of robustness_matrix above have finished (forked_map does not nest): the models' CIs in
    # as many one-thread processes, the same numbers bit for bit
    est = robustness_estimates(
        correct, seen, base, exclude=noop, severities=r.severities, trained=trained, seed=cfg.seed,
        workers=workers,
    )  # fmt: skip
    weights = bootstrap_weights(len(y), N_RESAMPLES, seed=cfg.seed)  # one resampling of the images for all
    main = {k: v for k, v in correct.items() if k[1] == "clean" or k[2] in r.severities}
    ce_ci = corruption_error_cis(main, base, exclude=noop, weights=weights)
    tests = []
    for n in names:
        for c in seen[n]:
            for sev in sorted({*r.severities, *trained.get(n, [])}):
                if (n, c, sev) not in correct:
                    continue
                for ref in [base, *ctrl]:
                    t = mcnemar(correct[(n, c, sev)].numpy(), correct[(ref, c, sev)].numpy(), seed=cfg.seed)
                    tests.append({"model": n, "reference": ref, "cell": f"{c}/{sev}",
                                  "trained_severity": sev in trained.get(n, []), **t.to_dict()})  # fmt: skip
    if tests:
        for t, q in zip(tests, holm([t["p_value"] for t in tests]), strict=True):
            t["p_holm"] = float(q)
    family = (
        f"Holm over the family of all {len(tests)} McNemar tests of this table (every fine-tune x seen cell, at "
        "the study's severities and at its trained severities, x reference)"
    )
    labels = [("clean", 0)] + [(c.corruption, c.severity) for c in cfg.conditions]
    paper_cells = [(m, c, sv) for c, sv in labels for m in names if (m, c, sv) in per_image]
    paper_ci = {
        f"{m}|{'clean' if c == 'clean' else f'{c}/{sv}'}": metric_cis(per_image[(m, c, sv)], weights=weights)
        for m, c, sv in paper_cells
    }
    sev_label = ", ".join(str(v) for v in r.severities)
    glabels = {**GROUPS, "seen": f"seen, severity {sev_label}", "seen_trained": "seen, trained severity"}

    def conv(e):
        return {g: v.to_dict() for g, v in e.items()}

    res = StepResult(
        metrics={
            "rows": rows, "corruption_errors": ce, "seen_unseen": summary, "n_images": int(len(y)),
            "corruptions": corrs, "severities": list(r.severities), "excluded_unchanged": noop,
            "controls": ctrl, "trained_severities": trained, "trained_rows": trained_rows,
            "corruption_error_cis": {m: conv(d) for m, d in ce_ci.items()},
            "metric_cis": {k: conv(d) for k, d in paper_ci.items()},
            "mcnemar_family": family,
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
    if extra:
        res.notes.append(
            "'Seen, trained severity' scores each fine-tune's seen corruptions at the severities its checkpoint "
            "card says it was trained at ("
            + "; ".join(f"{n}: {', '.join(map(str, v))}" for n, v in trained.items())
            + f"); 'seen, severity {sev_label}' at the study's severities. The extra cells ("
            + "; ".join(f"{c} at {', '.join(map(str, v))}" for c, v in extra.items())
            + ") are scored for the fine-tunes trained there, the base and the clean control(s), the models the "
            "seen-gain claim compares; they are in no other group, nor in mCE or the heatmap."
        )
    acc_rows = []
    for n in names:
        for g, e in est[n]["accuracy"].items():
            cells = est[n]["groups"][g]
            acc_rows.append([n, ", ".join(seen[n]) or "–", glabels[g], *_ci(e), len(cells),
                             ", ".join(cells) if len(cells) <= 2 else f"{len(cells)} cells"])  # fmt: skip
    res.tables.append(
        Table(
            f"Top-1 accuracy with 95% CIs over {len(y)} test images (bootstrap; per image, the fraction of the "
            "group's corruption x severity cells classified correctly)",
            ["model", "seen", "group", "top-1", "low", "high", "cells", "which"],
            acc_rows,
            units=["", "", "", "%", "%", "%", "", ""],
            digits=1,
        )
    )
    diff_rows = []
    for n in ctx.finetuned_names:
        for ref in [base, *ctrl]:
            if ref == n:
                continue
            for g, e in est[n]["vs"][ref].items():
                diff_rows.append([n, ref, glabels[g], *_ci(e)])
    if diff_rows:
        res.tables.append(
            Table(
                "Paired top-1 difference, fine-tuned model minus reference (the base; the clean fine-tune "
                "control), on the fine-tuned model's groups; 95% CI over images, pairs kept; the seen gain at "
                f"the trained severity is the 'seen, trained severity' row, at the study's severity the "
                f"'seen, severity {sev_label}' row",
                ["model", "reference", "group", "difference", "low", "high"],
                diff_rows,
                units=["", "", "", "pp", "pp", "pp"],
                digits=2,
            )
        )
    if tests:
        res.tables.append(
            Table(
                "Exact McNemar tests on each seen cell (discordant images: model right / reference right); "
                f"p raw and Holm-adjusted ({family}); 'trained' marks a cell at a severity the model was "
                "trained at",
                ["model", "reference", "cell", "trained", "model only", "reference only", "p", "p (Holm)"],
                [
                    [
                        t["model"],
                        t["reference"],
                        t["cell"],
                        "yes" if t["trained_severity"] else "no",
                        t["a_only"],
                        t["b_only"],
                        t["p_value"],
                        t["p_holm"],
                    ]
                    for t in tests
                ],  # fmt: skip
                digits=4,
            )
        )
    metric_cols = (("top1", "top-1"), ("top5", "top-5"), ("confidence", "confidence"),
                   ("correct_prob", "correct-class prob."), ("ece", "ECE, lower is better"),
                   ("nll", "NLL, lower is better"))  # fmt: skip
    res.tables.append(
        Table(
            "Seed-paper metrics on clean images and each study condition, estimate [95% CI] (percentile "
            f"bootstrap over the {len(y)} images, {N_RESAMPLES} resamples; top-10 is left out: with 10 classes "
            "it is 100% by construction); ECE with 15 equal-width confidence bins",
            ["model", "input", *[lab for _, lab in metric_cols]],
            [
                [
                    k.split("|")[0],
                    k.split("|")[1],
                    *[
                        _fmt(d[m], 1.0 if m == "nll" else 100.0, 3 if m == "nll" else 1)
                        for m, _ in metric_cols
                    ],
                ]
                for k, d in paper_ci.items()
            ],  # fmt: skip
            units=["", "", "%", "%", "%", "%", "%", "nats"],
        )
    )
    mce_rows = []
    for sm in summary:
        d = ce_ci.get(sm["model"], {})
        mce_rows.append([sm["model"], *_ci(d.get("mCE")), *_ci(d.get("relative_mCE"))])
    res.tables.append(
        Table(
            "mCE relative to the base model (100 = as good as the base; lower is better) over the corruptions "
            f"that change the images at severity {sev_label}, with 95% CIs (percentile bootstrap over images, the "
            "same images resampled for the model and the base); relative mCE subtracts each model's clean error "
            "first",
            ["model", "mCE", "low", "high", "relative mCE", "low", "high"],
            mce_rows,
            units=["", "%", "%", "%", "%", "%", "%"],
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
            figures.robustness_group_bars(res.metrics["estimates"], names, glabels),
            "seen_unseen",
            "Top-1 per model on clean, seen (at the trained severity and at the study's), unseen same-family and "
            "unseen other-family corruptions, with 95% CIs over images.",
        )
    )
    return res
