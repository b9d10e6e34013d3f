"""Activation patching: clean -> corrupted within the base model (by layer x position, by layer, by head) and
across models on corrupted images (fine-tuned activations into the base model). ``patching.method``:
``exact`` (:func:`mechvit.analysis.activation_patching`) or ``attribution`` (its first-order estimate,
:func:`mechvit.analysis.attribution_patching`, same arguments and result layout).

``patching.positions`` (None: every token) restricts the by-position sweeps (within, across, held-out) to
those token indices: the exact sweep costs one forward from the patched layer per layer x position x image,
197 positions on ViT-B/16 at 224 px. Their figures are then layer x position heatmaps instead of maps on the
patch grid."""

from __future__ import annotations

from mechvit.analysis import activation_patching, attribution_patching
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Activation patching"
SECTION = "patching"


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
    rows = [["whole-layer restore", k, *v.values.tolist()] for k, v in by_layer.items()]
    rows += [
        ["best position (in-sample)", k, *v.values.max(1).values.tolist()]
        for k, v in {**by_pos, **across}.items()
    ]
    # the best position per layer is a maximum over ~50 noisy scores: choose it on one half of the images and
    # score it on the other (and the converse), so that the number is not inflated by the selection
    heldout = {}
    if len(y) >= 4:
        h = len(y) // 2
        halves = (slice(0, h), slice(h, 2 * h))
        for c in ctx.cfg.conditions:
            if c.label not in by_pos:
                continue
            xc = ctx.prep(ctx.corrupted(c, s.n_images))
            try:
                parts = [
                    patch(base, ctx.prep(x[sl]), xc[sl], y[sl], component=s.component, **pos, **kw).values
                    for sl in halves
                ]
            except ValueError as e:
                res.notes.append(f"held-out best position {c.label}: skipped ({e})")
                continue
            score = [
                0.5
                * (
                    float(parts[1][layer, parts[0][layer].argmax()])
                    + float(parts[0][layer, parts[1][layer].argmax()])
                )
                for layer in range(parts[0].shape[0])
            ]
            heldout[c.label] = score
            rows.append(["best position (chosen on one half, scored on the other)", c.label, *score])
    res.metrics["best_position_heldout"] = heldout
    for k, v in {**by_layer, **by_pos, **across}.items():
        if v.n_sign_flipped or (v.denominator_ci and v.denominator_ci[0] <= 0):
            res.notes.append(
                f"patching {k}: {v.n_sign_flipped} of {v.n_images} images have LD(clean) <= LD(corrupted), "
                f"denominator 95% CI {v.denominator_ci}: the normalised score is unstable there"
            )
    if rows:
        res.tables.append(
            Table(
                f"Patching scores per layer ({s.component}; 1 = clean/fine-tuned answer restored)",
                ["measure", "run", *[str(i) for i in range(base.cfg.n_layers)]],
                rows,
            )
        )
    return res


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
