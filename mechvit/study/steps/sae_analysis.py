"""SAE features against their controls: overlap of the base model's replicate SAEs with each other model's
(within-model seed pairs are the ceiling, matching against random activation rows the floor, a permutation
test over model labels the verdict); the seed paper's code cosine (clean vs corrupted patch, same SAE) beside
the raw-activation cosine and a mismatched-patch baseline, with each model's own SAEs and with the base's
SAEs shared by both; feature pages of the top features of replicate 0 side by side. A model of
``sae.single_models`` (one SAE) is in the code cosine (its CI over images only), not in the overlap (it has no
seed pair of its own) nor the feature pages (its latents are in the explorer)."""

from __future__ import annotations

import dataclasses

import torch

from mechvit.analysis import code_cosine_controls, collect_activations, feature_overlap, overlap_controls
from mechvit.analysis.overlap import SparseCodes
from mechvit.sae import load_sae
from mechvit.study.context import StudyContext, slug
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.study.steps.sae import sae_runs
from mechvit.viz import figures
from mechvit.viz.features import feature_comparison_figure, feature_maps, top_features

TITLE = "SAE features: overlap and code similarity against seed controls"
SECTION = "sae"
DEPS = ("sae",)
SIDE_BY_SIDE = True  # small products and Python: one thread each beside another step beats two threads

_METRIC_LABELS = {
    "matched_cos": "matched decoder cosine",
    "act_corr": "activation correlation",
    "topk_jaccard": "top-k image Jaccard",
    "persistent_fraction": "persistent fraction of live features",
    "cross_ev": "cross-application EV",
    "spliced_kl": "cross-spliced KL (nats, lower = closer)",
}


def _est(e) -> list:
    return [None, None, None] if e is None else [e.estimate, e.low, e.high]


def run(ctx: StudyContext, w: StepWriter, prev: dict) -> StepResult:
    s, base = ctx.cfg.sae, ctx.base_name
    models = ctx.sae_model_names  # replicated SAEs: the overlap against seed controls
    # sae.single_models (one SAE each, no seed pair within the model): in the code cosine (CIs over images only),
    # in no overlap comparison
    every = [n for n in ctx.model_names if n in models or n in ctx.sae_single_names]  # the study's order
    res = StepResult()
    saes: dict[tuple[str, str], list] = {}
    for r in sae_runs(ctx):
        sae, _ = load_sae(ctx.out / "sae" / r.dirname, device=str(ctx.device))
        saes.setdefault((r.architecture, r.model), []).append(sae)
    xe, _ = ctx.test_images(s.n_eval_images)
    pool = torch.cat([xe] + [ctx.corrupted(c, s.n_eval_images) for c in ctx.cfg.conditions])
    acts = {
        n: collect_activations(ctx.model(n), ctx.prep(pool), s.hook, tokens=s.tokens, progress=False)
        for n in every
    }
    n = len(xe)
    controls_cfg = dataclasses.replace(s.controls, reference=base, seed=ctx.cfg.seed)

    # ---- overlap with controls, per architecture ---------------------------------------------------------
    rows, overlap_metrics = [], {}
    # every replicated SAE's codes on its own model's activations, encoded once (sparse) for the controls and the
    # pages (the single SAEs' clean codes are the code cosine's own)
    codes = {
        (a, m, r): SparseCodes.encode(sae, acts[m])
        for a in s.architectures
        for m in models
        for r, sae in enumerate(saes[(a, m)])
    }
    for a in s.architectures:
        with ctx.bar(1, f"overlap controls ({a})"):
            oc = overlap_controls(
                {m: saes[(a, m)] for m in models}, {m: acts[m] for m in models}, controls_cfg,
                models={m: ctx.model(m) for m in models}, images=ctx.prep(pool), hook=s.hook, tokens=s.tokens,
                codes={(m, r): c for (a_, m, r), c in codes.items() if a_ == a},
            )  # fmt: skip
        overlap_metrics[a] = oc.to_dict()
        oc.save_csv(w.path(f"overlap_controls_{a}.csv"))
        res.links.append(
            {"file": w.rel(f"overlap_controls_{a}.csv"), "title": f"SAE overlap against controls, {a} (CSV)"}
        )
        for comp, per_metric in oc.summary.items():
            for metric, v in per_metric.items():
                t = v.get("test")
                rows.append(
                    [a, comp, _METRIC_LABELS[metric], *_est(v["within_reference"]), *_est(v["within_other"]),
                     *_est(v["between"]), *_est(v["floor"]), *_est(v["ratio"]), None if t is None else t.p_value]
                )  # fmt: skip
        res.figures.append(
            w.figure(
                figures.overlap_controls_figure(oc.summary, _METRIC_LABELS),
                f"overlap_controls_{a}",
                f"{a} SAEs: each metric for seed pairs within the base model, within the other model, between "
                "the two, and against random activation rows (the floor); mean and 95% CI over pairs. A "
                "between-model bar below both within-model bars means the dictionaries differ by more than "
                "seed noise.",
            )
        )
    res.metrics["overlap_controls"] = overlap_metrics
    cols = ["SAE", "comparison", "metric"]
    for g in ("within base", "within other", "between", "floor", "between / within"):
        cols += [g, "low", "high"]
    res.tables.append(
        Table(
            f"Feature overlap against controls ({s.replicates} seeds per model; mean and 95% CI over seed pairs; "
            "pairs sharing an SAE are not independent, so the CIs are somewhat narrow and the permutation test "
            "over model labels (p, one-sided: within pairs more similar than between) is the one to trust). "
            "Persistent: matched cosine >= max(5th percentile of the base's within-model pairs, 99th "
            "percentile of the floor).",
            [*cols, "p (permutation)"],
            rows,
        )
    )

    # ---- the seed paper's code cosine, with its controls ---------------------------------------------------
    code_rows, code_metrics = [], {}
    clean_codes: dict[tuple[str, str, str], list] = {}  # the clean images' codes: one for every condition
    for a in s.architectures:
        for ci, c in enumerate(ctx.cfg.conditions):
            sl = slice((ci + 1) * n, (ci + 2) * n)
            for m in every:
                for sae_of in dict.fromkeys((m, base)):  # own SAEs, then the base's shared by both models
                    key = (a, m, sae_of)
                    if key not in clean_codes:
                        clean_codes[key] = [SparseCodes.encode(sae, acts[m][:n]) for sae in saes[(a, sae_of)]]
                    cc = code_cosine_controls(
                        saes[(a, sae_of)],
                        acts[m][:n],
                        acts[m][sl],
                        label=f"{m} ({sae_of} SAEs)",
                        seed=ctx.cfg.seed,
                        clean_codes=clean_codes[key],
                    )
                    est = cc.estimates()
                    code_metrics[f"{a}|{m}|{sae_of}|{c.label}"] = cc.to_dict()
                    code_rows.append(
                        [a, c.label, m, sae_of, *_est(est["code"]["over_images"]), *_est(est["code"]["over_seeds"]),
                         *_est(est["raw"]["over_images"]), *_est(est["mismatched"]["over_images"])]
                    )  # fmt: skip
    res.metrics["code_cosine"] = code_metrics
    res.tables.append(
        Table(
            "The seed paper's code cosine (SAE code of a clean patch vs of its corrupted copy, mean over "
            "patches), beside the raw-activation cosine of the same patches and the mismatched baseline (the "
            "clean patch vs the corrupted patch at the same position of another image); 95% CI over images "
            "(seed-averaged) and over seeds (none for a model with one SAE, sae.single_models). 'SAEs of' the base "
            "model on a fine-tuned model's activations: one shared dictionary for both models.",
            [
                "SAE",
                "condition",
                "model",
                "SAEs of",
                "code cos",
                "low",
                "high",
                "over seeds",
                "low",
                "high",
                "raw cos",
                "low",
                "high",
                "mismatched",
                "low",
                "high",
            ],  # fmt: skip
            code_rows,
        )
    )
    res.figures.append(
        w.figure(
            figures.code_cosine_controls_figure(
                code_metrics, s.architectures, [c.label for c in ctx.cfg.conditions]
            ),
            "code_cosine",
            "Code cosine (own SAEs) per model and condition with 95% CIs over images, against the raw-activation "
            "cosine and the mismatched-patch baseline.",
        )
    )

    # ---- feature pages: replicate 0 of the base vs replicate 0 of each other model --------------------------
    if s.tokens != "patches":
        res.notes.append("feature pages need patch tokens (sae.store.tokens: patches); skipped")
        return res
    tags = [f"clean #{i}" for i in range(n)]
    for c in ctx.cfg.conditions:
        tags += [f"{c.label.replace('gaussian_', '')} #{i}" for i in range(n)]
    grid = ctx.model(base).cfg.grid_size
    for a in s.architectures:
        # the replicated models: a single-SAE model's latents and their nearest base latents are in the explorer
        # (left out at 236c820 for time; the run after showed the pages cost ~1 s in all, the time had gone to
        # encoding the single SAEs on the whole pool)
        for m in models:
            if m == base:
                continue
            sa, sb = saes[(a, base)][0], saes[(a, m)][0]
            # the page needs the matching only: live features (those firing on their own model's
            # activations) matched on the decoder cosine, as feature_overlap with the activations does
            o = feature_overlap(
                sa,
                sb,
                config=s.overlap,
                alive_a=codes[(a, base, 0)].fired(),
                alive_b=codes[(a, m, 0)].fired(),
            )
            match = dict(zip(o.idx_a.tolist(), o.idx_b.tolist(), strict=True))
            feats = [f for f in top_features(sa, acts[base], s.top_features * 3) if f in match][
                : s.top_features
            ]
            if not feats:
                continue
            partners = [match[f] for f in feats]
            fig = feature_comparison_figure(
                pool, feature_maps(sa, acts[base], feats, grid), feature_maps(sb, acts[m], partners, grid),
                feats, partners, (base, m), tags, top_images=s.top_images,
                pair_cosine=o.cosine[feats, partners].tolist(),
            )  # fmt: skip
            res.figures.append(
                w.figure(
                    fig,
                    f"features_{a}_{slug(m)}",
                    f"Feature page ({a}, seed replicate 0): the top features of {base}'s SAE (left), ranked by "
                    f"mean activation over all patch tokens of the {n} clean and {len(pool) - n} corrupted images "
                    "(firing rate x mean when firing; the explorer's 'mean activation' is the mean when firing), "
                    f"and their matched features in {m}'s SAE (right); each shows its most activating images "
                    "(clean and corrupted pool) with the feature's per-patch activation.",
                )
            )
    return res
