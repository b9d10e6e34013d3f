"""Logit lens: the model's own readout applied after every block, per model and input condition.

Each curve of the figure (mean correct-class probability and top-1 per layer) carries a 95% CI over the images
per layer (:func:`layer_cis`: :func:`mechvit.analysis.statistics.mean_ci` of each layer's per-image values, as the
step's tables), stored beside the means in metrics.json (``<model>|<input>.ci95``)."""

from __future__ import annotations

import numpy as np

from mechvit.analysis import LogitLensSweep, logit_lens
from mechvit.analysis.statistics import BOOTSTRAP_MIN_N, mean_ci, paired_difference_ci
from mechvit.study.context import StudyContext
from mechvit.study.result import StepResult, StepWriter, Table
from mechvit.viz import figures

TITLE = "Logit lens: how the answer forms layer by layer"
SECTION = "logit_lens"
CI_METHOD = "mean_ci per layer: BCa bootstrap over the images (9999 resamples; Student's t under 20 images)"


def layer_cis(values, *, seed: int, confidence: float = 0.95) -> dict:
    """The CI over images of each layer's mean: ``values [N, L]`` (one row per image, one column per layer),
    :func:`mean_ci` of each column (BCa bootstrap over the images, 9999 resamples, seed ``seed``; Student's t
    under 20 images), the helper every "mean and 95% CI over images" of the study uses. Returns ``{"low": [L],
    "high": [L], "n": N, "confidence": ..., "method": ...}`` (an undefined bound, e.g. of one image, is NaN)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"values must be [images, layers], got shape {x.shape}")
    es = [mean_ci(x[:, j], confidence=confidence, seed=seed) for j in range(x.shape[1])]
    return {
        "low": [e.low for e in es],
        "high": [e.high for e in es],
        "n": int(x.shape[0]),
        "confidence": confidence,
        "method": CI_METHOD,
    }


def band_words(n: int) -> str:
    """What a figure's CI band is, for its caption: ``n`` images, the interval :func:`layer_cis` computes."""
    how = "BCa bootstrap" if n >= BOOTSTRAP_MIN_N else "Student's t"
    return f"bands: 95% CI over the {n} images of each layer's mean ({how})"


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
    # the figure's bands: 95% CI over the images of each layer's mean, beside the means in metrics.json
    bands = {
        k: {
            "correct_prob": layer_cis(r.correct_prob, seed=ctx.cfg.seed),
            "top1_acc": layer_cis(r.top1.double(), seed=ctx.cfg.seed),
        }
        for k, r in results.items()
    }
    res = StepResult(
        metrics={f"{n}|{lab}": {**r.to_dict(), "ci95": bands[(n, lab)]} for (n, lab), r in results.items()}
    )

    firsts = {k: r.first_correct_block for k, r in results.items()}  # the embed row does not see the image
    rows = []
    for (n, lab), r in results.items():
        f = firsts[(n, lab)]
        ok = f >= 0
        e = mean_ci(f[ok].double().numpy(), seed=ctx.cfg.seed) if ok.any() else None
        top = bands[(n, lab)]["top1_acc"]  # the last layer's 95% CI over the images: the final top-1's
        rows.append(
            [n, lab, float(r.top1[:, -1].double().mean()), top["low"][-1], top["high"][-1],
             *([e.estimate, e.low, e.high] if e else [None] * 3),
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
                "final top-1 low",
                "final top-1 high",
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
            figures.logit_lens_curves(results, ctx.model_names, list(inputs), bands),
            "logit_lens",
            "Logit lens: the model's own readout (final norm, CLS pooling, head) applied after every block: "
            f"mean over the {len(y)} test images per layer (each column an input, each colour a model); "
            f"{band_words(len(y))}; in metrics.json: <model>|<input>.ci95.",
        )
    )
    res.links.append({"file": w.rel("logit_lens.csv"), "title": "logit lens per layer (CSV)"})
    return res
