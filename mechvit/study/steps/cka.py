"""Representation similarity: linear and debiased CKA per layer, base vs each fine-tuned model on the same
images, and clean vs corrupted images within each model. The headline (``cka.token_reduction``, the readout
token by default) carries a 95% percentile bootstrap CI over images of the linear CKA per layer and pair
(``N_RESAMPLES`` resamples, :func:`mechvit.analysis.similarity.linear_cka_ci`); the secondary reduction (every
token an example) is a point estimate without CI."""

from __future__ import annotations

from mechvit._numbers import fmt_fixed
from mechvit.analysis.similarity import cka_ci_biased, cka_from_activations, layer_activations
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Representation similarity (CKA)"
SECTION = "cka"
SIDE_BY_SIDE = True  # small products and Python: one thread each beside another step beats two threads
N_RESAMPLES = 1000  # bootstrap resamples over images of the headline linear CKA (each pair x layer: ~10 ms)


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.cka
    inputs = ctx.inputs(s.n_images)
    conds = [lab for lab in inputs if lab != "clean"]
    n_boot = 0 if s.token_reduction == "tokens" else N_RESAMPLES  # a CI over images needs one row per image
    head = {"hook": s.hook, "token_reduction": s.token_reduction, "n_resamples": n_boot, "seed": ctx.cfg.seed}
    second_red = (
        s.secondary_reduction
        if s.secondary_reduction and s.secondary_reduction != s.token_reduction
        else None
    )
    reductions = (s.token_reduction,) + ((second_red,) if second_red else ())

    def activations(n: str) -> dict[str, dict]:
        """Model ``n``'s activations on every input, each reduction, from one pass per input (each run is
        compared with several others: computed once, not once per pair)."""
        return {
            lab: layer_activations(
                ctx.model(n), ctx.prep(xi), hook=s.hook, token_reductions=reductions, batch_size=s.batch_size
            )
            for lab, xi in inputs.items()
        }

    between, within, second = {}, {}, {}
    with ctx.bar(len(ctx.model_names), "CKA (per model)") as bar:
        base = activations(ctx.base_name)
        for n in ctx.model_names:
            acts = base if n == ctx.base_name else activations(n)
            if n != ctx.base_name:
                for lab in inputs:
                    between[f"{ctx.base_name} vs {n}, {lab}"] = cka_from_activations(
                        base[lab][s.token_reduction], acts[lab][s.token_reduction], **head
                    )
                    if second_red:
                        second[f"{ctx.base_name} vs {n}, {lab} ({second_red})"] = cka_from_activations(
                            base[lab][second_red],
                            acts[lab][second_red],
                            hook=s.hook,
                            token_reduction=second_red,
                        )
            for lab in conds:
                within[f"{n}: clean vs {lab}"] = cka_from_activations(
                    acts["clean"][s.token_reduction], acts[lab][s.token_reduction], **head
                )
            bar.update(1)
    within = {
        f"{n}: clean vs {lab}": within[f"{n}: clean vs {lab}"] for n in ctx.model_names for lab in conds
    }
    res = StepResult(
        metrics={
            "between_models": {k: v.to_dict() for k, v in between.items()},
            "clean_vs_corrupted": {k: v.to_dict() for k, v in within.items()},
        }
    )
    if second_red:
        res.metrics["between_models_secondary"] = {k: v.to_dict() for k, v in second.items()}
        res.notes.append(
            f"Headline CKA on the {s.token_reduction} token(s) (what the readout sees); base vs fine-tuned with "
            f"{second_red} as examples (secondary, rows marked ({second_red})) in "
            "metrics.json and the table: those are point estimates without a CI."
        )
    n_img = next(iter({**between, **within}.values())).n_examples if between or within else 0
    n_ci, biased = _bias_check(
        [*res.metrics["between_models"].values(), *res.metrics["clean_vs_corrupted"].values()]
    )
    res.metrics["ci_bias_check"] = {"intervals": n_ci, "failing": biased}
    res.notes.append(
        f"CKA CIs: 95% percentile bootstrap over the {n_img} images ({N_RESAMPLES} resamples, the same images "
        "for both sides of a pair) of the linear CKA; the debiased value has none. The plug-in CKA of a "
        "resample with repeated images is biased slightly upwards, so the interval can sit a little above the "
        "estimate when CKA is far from 1. Bias check (mechvit.analysis.linear_cka_ci): "
        + (
            f"{biased} of {n_ci} intervals exclude their estimate or lie more than half their width from the "
            "debiased value; there the interval is the spread of plain CKA, not where the population CKA is: "
            "read the debiased value."
            if biased
            else f"none of the {n_ci} intervals excludes its estimate or lies more than half its width from the "
            "debiased value."
        )
        if n_boot
        else f"CKA on {s.token_reduction} (every token an example): point estimates without a CI (the tokens of "
        "one image are not independent examples)"
    )
    # the figure: one panel per input (a panel of every curve was 21 banded lines), the comparisons of the
    # base with each fine-tune on the first row and each model's clean vs corrupted on the second; colour =
    # model, line style = input (in a clean vs corrupted panel: the corrupted input)
    base = ctx.base_name
    groups = {
        **{
            f"{base} vs fine-tuned, {lab} images": {
                (n, lab): between[f"{base} vs {n}, {lab}"] for n in ctx.model_names if n != base
            }
            for lab in inputs
        },
        **{
            f"clean vs {lab}, same model": {(n, lab): within[f"{n}: clean vs {lab}"] for n in ctx.model_names}
            for lab in conds
        },
    }
    groups = {t: g for t, g in groups.items() if g}
    n_between = sum(t.startswith(f"{base} vs fine-tuned") for t in groups)
    rows_said = [
        *(["the base against each fine-tune on the same images, one panel per input"] if n_between else []),
        *(["each model's clean image against its corrupted copy, one panel per condition"] if conds else []),
    ]
    layout = (
        f"first row: {rows_said[0]}; second row: {rows_said[1]}"
        if len(rows_said) == 2
        else "; ".join(rows_said)
    )
    band = (
        f"bands: 95% percentile bootstrap CI over the {n_img} images ({N_RESAMPLES} resamples; in "
        "metrics.json: between_models / clean_vs_corrupted .cka_linear_ci95)"
        if n_boot
        else f"no bands: CKA on {s.token_reduction} has no CI over images"
    )
    res.figures.append(
        w.figure(
            figures.cka_curves(
                groups,
                f"linear CKA ({s.token_reduction})",
                xlabel=f"layer ({s.hook})",
                models=ctx.model_names,
                inputs=list(inputs),
                ncols=n_between or len(groups),  # the comparisons with the base on a row of their own
            ),  # fmt: skip
            "cka",
            f"Linear CKA per layer (token reduction {s.token_reduction}; {layout}; colour: model; line style: "
            f"input); {band}. Debiased values in metrics.json.",
        )
    )
    rows = [[k, *cells(r)] for k, r in {**between, **within, **second}.items()]
    L = ctx.model(ctx.base_name).cfg.n_layers
    res.tables.append(
        Table(
            "CKA per layer (linear [95% CI over images] / debiased; rows marked with a token reduction in "
            "parentheses: secondary, no CI)",
            ["pair", *[f"layer {i}" for i in range(L)]],
            rows,
        )
    )
    return res


def cells(r) -> list[str]:
    """``linear [low, high] / debiased`` per layer (no interval where the result has none)."""
    lin, deb = r.linear.tolist(), r.debiased.tolist()
    if r.linear_ci is None:
        return [f"{fmt_fixed(a, 3)} / {fmt_fixed(b, 3)}" for a, b in zip(lin, deb, strict=True)]
    lo, hi = r.linear_ci[0].tolist(), r.linear_ci[1].tolist()
    return [
        f"{fmt_fixed(a, 3)} [{fmt_fixed(x, 3)}, {fmt_fixed(y, 3)}] / {fmt_fixed(b, 3)}"
        for a, x, y, b in zip(lin, lo, hi, deb, strict=True)
    ]


def _bias_check(results: list[dict]) -> tuple[int, int]:
    """(intervals, failing): layers whose plain CKA lies outside its CI or more than half the CI's width from
    the debiased value (the condition under which ``linear_cka_ci`` warns)."""
    n = bad = 0
    for r in results:
        ci = r.get("cka_linear_ci95")
        if not ci:
            continue
        for e, d, lo, hi in zip(r["cka_linear"], r["cka_debiased"], ci["low"], ci["high"], strict=True):
            n += 1
            bad += cka_ci_biased(e, d, lo, hi)
    return n, bad
