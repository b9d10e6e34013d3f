"""SAE features: the seed paper's code similarity (clean vs corrupted patch, same SAE), feature overlap between
the base model's and each fine-tuned model's SAE, and feature pages of the top features side by side."""

from __future__ import annotations

import torch

from mechvit.analysis import collect_activations, feature_overlap, model_code_similarity
from mechvit.sae import load_sae
from mechvit.study.context import StudyContext, slug
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.study.steps.sae import sae_dirname, sae_runs
from mechvit.viz import figures
from mechvit.viz.features import feature_comparison_figure, feature_maps, top_features

TITLE = "SAE features: code similarity, overlap, feature pages"
SECTION = "sae"
DEPS = ("sae",)


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s, base = ctx.cfg.sae, ctx.base_name
    runs = sae_runs(ctx)
    res = StepResult()
    saes = {
        (a, n, c.label): load_sae(ctx.out / "sae" / sae_dirname(a, n, c), device=str(ctx.device))[0]
        for a, n, c in runs
    }
    xe, _ = ctx.test_images(s.n_eval_images)
    pairs = [(a, n, c) for a, n, c in runs if n != base and (a, base, c.label) in saes]
    acts_cache: dict = {}

    def acts(n: str, c) -> torch.Tensor:  # [2N, T', D]: clean then corrupted images
        if (n, c.label) not in acts_cache:
            pool = torch.cat([xe, ctx.corrupted(c, s.n_eval_images)])
            acts_cache[(n, c.label)] = collect_activations(
                ctx.model(n), ctx.prep(pool), s.hook, tokens=s.tokens, progress=False
            )
        return acts_cache[(n, c.label)]

    code_sim, overlaps = {}, {}
    with ctx.bar(len(runs) + len(pairs), "SAE analysis") as bar:
        for a, n, c in runs:
            code_sim[(a, n, c.label)] = model_code_similarity(
                ctx.model(n), saes[(a, n, c.label)], s.hook, ctx.prep(xe),
                ctx.prep(ctx.corrupted(c, s.n_eval_images)), tokens=s.tokens, bins=s.histogram_bins, label=n,
                progress=False,
            )  # fmt: skip
            bar.update(1)
        for a, n, c in pairs:
            overlaps[(a, n, c.label)] = feature_overlap(
                saes[(a, base, c.label)], saes[(a, n, c.label)], acts(base, c), acts(n, c), s.overlap
            )
            bar.update(1)
    res.metrics["code_similarity"] = {"|".join(k): v.to_dict() for k, v in code_sim.items()}
    res.metrics["overlap"] = {"|".join(k): v.to_dict() for k, v in overlaps.items()}

    panels = sorted({(a, c.label) for a, _, c in runs}, key=lambda t: (s.architectures.index(t[0]), t[1]))
    res.figures.append(
        w.figure(
            figures.code_cosine_histograms(code_sim, panels, ctx.model_names),
            "code_cosine",
            "The seed paper's measure: cosine similarity between the SAE codes of each patch of a clean image "
            "and of its corrupted copy, per model's own SAE.",
        )
    )
    res.tables.append(
        Table(
            "SAE code similarity, clean vs corrupted patches",
            ["SAE", "model", "condition", "mean cosine", "median", "tokens", "undefined (zero code)"],
            [
                [a, n, lab, v.mean, v.to_dict()["median"], int(v.cosines.numel()), v.n_undefined]
                for (a, n, lab), v in code_sim.items()
            ],
        )
    )
    if overlaps:
        res.tables.append(_overlap_table(overlaps, s.overlap, base))
        res.figures.append(
            w.figure(
                figures.feature_overlap_summary(overlaps, s.overlap.persistent_cos, s.overlap.shifted_cos),
                "feature_overlap",
                "Matched decoder cosines and feature classes, base SAE vs fine-tuned SAE.",
            )
        )
    if s.tokens != "patches":
        res.notes.append("feature pages need patch tokens (sae.store.tokens: patches); skipped")
        return res
    _feature_pages(ctx, w, res, saes, overlaps, acts, xe)
    return res


def _overlap_table(overlaps: dict, oc, base: str) -> Table:
    rows = []
    for (a, n, lab), o in overlaps.items():
        d = o.to_dict()
        cnt = d["counts"]
        rows.append(
            [a, n, lab, d["mean_max_cos_a_to_b"], d["mean_max_cos_b_to_a"], cnt["persistent"], cnt["shifted"],
             cnt["lost"], cnt["new"], cnt["dead_a"], cnt["dead_b"], d["mean_act_corr"] or float("nan"),
             d["mean_topk_jaccard"] or float("nan"), d["cross_application"]["a_on_b"]["explained_variance"]]
        )  # fmt: skip
    return Table(
        f"Feature overlap between the base model's SAE and each fine-tuned model's SAE (matched one to one; "
        f"persistent: cosine >= {oc.persistent_cos}, shifted: >= {oc.shifted_cos}; features that never fire on "
        "the images are dead and left out of the matching)",
        [
            "SAE",
            f"{base} vs",
            "condition",
            "mean max cos (base→ft)",
            "mean max cos (ft→base)",
            "persistent",
            "shifted",
            "lost",
            "new",
            "dead (base)",
            "dead (ft)",
            "mean act. corr.",
            "top-k Jaccard",
            "EV base SAE on ft acts",
        ],  # fmt: skip
        rows,
    )


def _feature_pages(ctx: StudyContext, w: StepWriter, res: StepResult, saes, overlaps, acts, xe) -> None:
    """The top features of each SAE with their best match in the other, side by side."""
    s, base = ctx.cfg.sae, ctx.base_name
    pool_x = {c.label: torch.cat([xe, ctx.corrupted(c, s.n_eval_images)]) for c in ctx.cfg.conditions}
    grid = ctx.model(base).cfg.grid_size
    for (a, n, lab), o in overlaps.items():
        c = next(cc for cc in ctx.cfg.conditions if cc.label == lab)
        match_ab = dict(zip(o.idx_a.tolist(), o.idx_b.tolist(), strict=True))
        match_ba = {j: i for i, j in match_ab.items()}
        short = lab.replace("gaussian_", "")
        tags = [f"clean #{i}" for i in range(len(xe))] + [f"{short} #{i}" for i in range(len(xe))]
        sides = {
            "base": (saes[(a, base, lab)], saes[(a, n, lab)], acts(base, c), acts(n, c), match_ab, base, n),
            "finetuned": (
                saes[(a, n, lab)],
                saes[(a, base, lab)],
                acts(n, c),
                acts(base, c),
                match_ba,
                n,
                base,
            ),
        }
        for side, (sae_x, sae_y, acts_x, acts_y, match, nx, ny) in sides.items():
            feats = [f for f in top_features(sae_x, acts_x, s.top_features * 3) if f in match][
                : s.top_features
            ]
            if not feats:
                continue
            partners = [match[f] for f in feats]
            cos = o.cosine[feats, partners] if side == "base" else o.cosine[partners, feats]
            fig = feature_comparison_figure(
                pool_x[lab], feature_maps(sae_x, acts_x, feats, grid), feature_maps(sae_y, acts_y, partners, grid),
                feats, partners, (nx, ny), tags, top_images=s.top_images, pair_cosine=cos.tolist(),
            )  # fmt: skip
            res.figures.append(
                w.figure(
                    fig,
                    f"features_{a}_{n}_{slug(lab)}_{side}",
                    f"Feature page ({a}, {lab}): the top features of {nx}'s SAE (left, by mean activation) and "
                    f"their matched features in {ny}'s SAE (right); each shows its most activating images "
                    "(clean and corrupted pool) with the feature's per-patch activation overlaid.",
                )
            )
