"""Activation patching: clean -> corrupted within the base model (by layer x position, by layer, by head) and
across models on corrupted images (fine-tuned activations into the base model). ``patching.method``:
``exact`` (:func:`mechvit.analysis.activation_patching`) or ``attribution`` (its first-order estimate,
:func:`mechvit.analysis.attribution_patching`, same arguments and result layout).

``patching.positions`` (None: every token) restricts the by-position sweeps (within, across, held-out) to
those token indices: the exact sweep costs one forward from the patched layer per layer x position x image,
197 positions on ViT-B/16 at 224 px. Their figures are then layer x position heatmaps instead of maps on the
patch grid."""

from __future__ import annotations

from mechvit._numbers import fmt_fixed, fmt_sig
from mechvit.analysis import activation_patching, attribution_patching
from mechvit.analysis.patching import DENOM_NA_LOGITS, DENOM_UNSTABLE_LOGITS
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Activation patching"
SECTION = "patching"
SIDE_BY_SIDE = True  # small products and Python: one thread each beside another step beats two threads


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s = ctx.cfg.patching
    patch = attribution_patching if s.method == "attribution" else activation_patching
    x, y = ctx.test_images(s.n_images)
    base = ctx.model(ctx.base_name)
    kw = {"batch_size": s.batch_size, "max_rows": s.max_rows, "progress": False}
    pos = {"by": "position", "positions": s.positions}
    by_pos, by_head, by_layer, across = {}, {}, {}, {}
    res = StepResult()
    jobs = [("within", c, None) for c in ctx.cfg.conditions]
    if s.across_models:
        jobs += [("across", c, n) for n in ctx.finetuned_names for c in ctx.cfg.conditions]
    with ctx.bar(len(jobs), "patching") as bar:
        for kind, c, n in jobs:
            xc = ctx.prep(ctx.corrupted(c, s.n_images))
            try:
                if kind == "within":
                    args = (base, ctx.prep(x), xc, y)
                    by_pos[c.label] = patch(*args, component=s.component, **pos, **kw)
                    by_layer[c.label] = patch(*args, component=s.component, by="layer", **kw)
                    if s.heads:
                        by_head[c.label] = patch(*args, component="z", by="head", **kw)
                else:
                    across[f"{n} → {ctx.base_name}, {c.label}"] = patch(
                        ctx.model(n),
                        xc,
                        xc,
                        y,
                        corrupted_model=base,
                        component=s.component,
                        **pos,
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
    if s.method != "exact":
        res.notes.append(f"patching method: {s.method} (first-order estimate of activation patching)")
    grids = figures.patching_grids if s.positions is None else position_heatmaps
    where = (
        "on the patch grid; the prefix tokens' scores are in the titles"
        if s.positions is None
        else f"at the {len(s.positions)} token positions of patching.positions"
    )
    if by_pos:
        res.figures.append(
            w.figure(
                grids(by_pos, f"{ctx.base_name}: clean {s.component} patched into the corrupted run"),
                "patching_within",
                f"Activation patching (clean → corrupted) in the base model, per layer and position {where}. "
                "1 = the clean answer restored, 0 = the corrupted run.",
            )
        )
    if by_head:
        res.figures.append(
            w.figure(
                figures.patching_head_maps(by_head),
                "patching_heads",
                "Patching each head's output z (clean → corrupted) in the base model.",
            )
        )
    if across:
        res.figures.append(
            w.figure(
                grids(across, f"fine-tuned {s.component} patched into {ctx.base_name} (corrupted images)"),
                "patching_across",
                "Across models on corrupted images: the fine-tuned model's activation at one layer and position "
                f"({where}) patched into the base model; 1 = the fine-tuned model's answer, 0 = the base model's.",
            )
        )
    rows = uncertainty(res, by_pos, by_layer, by_head, across, seed=ctx.cfg.seed)
    if rows:
        res.tables.append(
            Table(
                f"Patching scores per layer ({s.component}; 1 = clean/fine-tuned answer restored; "
                f"score [95% CI over images]; n/a: denominator guard, see the notes)",
                ["measure", "run", *[str(i) for i in range(base.cfg.n_layers)]],
                rows,
            )
        )
    return res


N_RESAMPLES = 2000  # bootstrap resamples over images per result (one matmul each way: cheap)
HEADLINE = "best position (chosen on one half, scored on the other)"
IN_SAMPLE = "best position (in-sample max, optimistic; secondary)"


def _cell(est: float, lo: float, hi: float) -> str:
    return f"{fmt_fixed(est, 3)} [{fmt_fixed(lo, 2)}, {fmt_fixed(hi, 2)}]"


def uncertainty(res: StepResult, by_pos, by_layer, by_head, across, *, seed: int = 0) -> list[list]:
    """CIs over images, split-half best position and the denominator guard for every result of the step: adds
    their metrics (``values_ci95``, ``denominator_status``, ``best_position``), the table rows (headline:
    best position chosen on one half and scored on the other; in-sample maximum secondary; n/a where the
    denominator guard says so; returned) and the notes."""
    m = res.metrics
    groups = {"within_by_position": by_pos, "within_by_layer": by_layer, "within_by_head": by_head}
    groups["across_models"] = across
    for key, results in groups.items():
        for k, r in results.items():
            d = m[key][k]
            status, reason = r.denominator_status()
            d["denominator_status"], d["denominator_reason"] = status, reason
            if r.per_image_ld is None or r.n_images < 2:  # attribution estimate: no per-image LDs
                continue
            if status == "n/a":
                continue
            lo, hi = r.score_ci(n_resamples=N_RESAMPLES, seed=seed)
            d["values_ci95"] = {"low": lo.tolist(), "high": hi.tolist(), "n_resamples": N_RESAMPLES}
            if key in ("within_by_position", "across_models") and r.n_images >= 4:
                d["best_position"] = r.best_position(n_resamples=N_RESAMPLES, seed=seed)
    heldout, rows = {}, []
    for key, results in (("within_by_position", by_pos), ("across_models", across)):
        for k, r in results.items():
            d = m[key][k]
            n_layers = len(r.labels["layer"])
            if d["denominator_status"] == "n/a":
                rows.append([HEADLINE, k, *["n/a"] * n_layers])
                res.notes.append(f"patching {k}: scores shown as n/a ({d['denominator_reason']})")
                continue
            if d["denominator_status"] == "unstable":
                res.notes.append(
                    f"patching {k}: unstable normalisation ({d['denominator_reason']}; {r.n_sign_flipped} of "
                    f"{r.n_images} images have LD(clean) <= LD(corrupted))"
                )
            bp = d.get("best_position")
            if bp is None:  # attribution estimate or under 4 images: the in-sample maximum only, no CI
                rows.append([IN_SAMPLE, k, *r.values.max(1).values.tolist()])
                continue
            sh, ins = bp["split_half"], bp["in_sample"]
            heldout[k] = sh
            rows.append([HEADLINE, k, *map(_cell, sh["estimate"], sh["low"], sh["high"])])
            rows.append([IN_SAMPLE, k, *map(_cell, ins["estimate"], ins["low"], ins["high"])])
    m["best_position_heldout"] = heldout
    rows.sort(key=lambda row: row[0] != HEADLINE)  # the headline rows first, in their run order (stable)
    exact = [r for r in by_layer.values() if r.per_image_ld is not None]
    if exact:  # patching the whole residual stream restores the source run exactly: a sanity check only
        dev = max(float((r.values - 1).abs().max()) for r in exact)
        res.notes.append(
            "sanity check (not a finding): patching the whole layer restores the clean answer by construction; "
            f"largest |score - 1| over layers and conditions {fmt_sig(dev, 2)}"
            + ("" if dev < 1e-3 else " (unexpected)")
        )
    if rows and any(row[0] == HEADLINE for row in rows):
        res.notes.append(
            f"patching CIs: 95% percentile bootstrap over images ({N_RESAMPLES} resamples, the normalised score "
            "recomputed as a ratio of means per resample). Headline: the best position per layer chosen on one "
            "random half of the images and scored on the other (and conversely, averaged), its CI repeating "
            "the choice per resample; the in-sample maximum over positions is optimistic (a maximum of noisy "
            f"scores) and secondary. n/a: the denominator's 95% CI reaches below {DENOM_NA_LOGITS} logits "
            f"(0 included); unstable: below {DENOM_UNSTABLE_LOGITS} logit."
        )
    return rows


@figures.styled
def position_heatmaps(results: dict, title: str):
    """By layer x position results over a subset of the tokens (``patching.positions``): one layer x position
    heatmap per result, one shared colour scale centred on 0."""
    keys = list(results)
    lim = max(float(r.values.abs().max()) for r in results.values()) or 1.0
    fig, ax = figures.new_figure(len(keys), 1, w=max(4.0, 0.3 * len(results[keys[0]].labels["position"]) + 2))
    for i, k in enumerate(keys):
        r = results[k]
        figures.heatmap(
            ax[i, 0], r.values, r.labels["position"], r.labels["layer"], cmap=figures.DIVERGING, vmin=-lim,
            vmax=lim, xlabel="position", ylabel="layer", fmt="{:.2f}", cbar_label="restored",
        )  # fmt: skip
        ax[i, 0].set_title(k, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig
