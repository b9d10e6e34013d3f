"""Controls for SAE feature overlap: a seed-noise ceiling, a data floor, and tests over model labels.

Two SAEs trained on the *same* model with different seeds do not learn the same dictionary, so "base vs
fine-tuned overlap" means nothing on its own. :func:`overlap_controls` takes several replicate SAEs per
model (each with its own init and data order, see ``mechvit.sae.derive_seed``) and the models' activations
at the hook on the same images, and compares:

- **within** pairs: two replicates of one model (the seed-noise ceiling);
- **between** pairs: a replicate of the reference model (e.g. the base) against one of another model
  (each fine-tune, the clean fine-tune control);
- the **floor**: each reference SAE's live decoder directions matched against as many random activation
  rows (``floor="rows"``, the default: directions the data already contain) or random Gaussian directions
  (``floor="directions"``).

Pair metrics (all over *live* features, i.e. those that fire on their own model's activations, matched
one to one with ``scipy.optimize.linear_sum_assignment`` on the decoder cosine; see
:func:`mechvit.analysis.overlap.feature_overlap`):

- ``matched_cos``: mean signed decoder cosine of the matched pairs;
- ``act_corr``: mean Pearson correlation of matched features' codes over the same tokens (nan pairs left out);
- ``topk_jaccard``: mean Jaccard overlap of matched features' top-k images;
- ``persistent_fraction``: persistent matched pairs over the mean number of live features of the two SAEs;
  *persistent* means matched cosine >= the threshold below;
- ``cross_ev``: mean of EV(SAE a on model b's activations) and EV(SAE b on model a's);
- ``spliced_kl`` (only with ``models`` and ``images``): mean of KL(model b || model b with SAE a spliced in)
  and the converse, nats (Kissane et al. 2024's splicing across models). Lower is more similar.

**Persistent threshold** (documented, data-driven): ``max(q05(within), q99(floor))``, where ``q05(within)``
is the 5th percentile of the matched cosines of every within-model pair of the reference model (95% of the
features two seeds of one model share clear it) and ``q99(floor)`` the 99th percentile of the floor's
matched cosines (1% of chance matches clear it). The floor has only a decoder, so its ``act_corr``,
``topk_jaccard``, ``cross_ev`` and ``spliced_kl`` are nan.

Per comparison (reference vs each other model) and metric: mean and 95% CI over seed pairs of within
(reference), within (other), between and floor (:func:`mechvit.analysis.statistics.mean_ci`; pairs sharing
an SAE are not independent, so these CIs are somewhat narrow: the permutation test is the one to trust), the
ratio between / within (pooled within pairs of both models, :func:`~mechvit.analysis.statistics.ratio_ci`),
and a permutation test over the SAEs' model labels
(:func:`~mechvit.analysis.statistics.pairwise_label_permutation_test`; alternative: within pairs more similar
than between pairs).

:func:`code_cosine_controls`: the seed paper's code cosine (clean vs corrupted copy of the same patch, one
SAE) beside the raw-activation cosine of the same patches and a mismatched-patch baseline (clean patch vs
the corrupted patch at the same position of another image), with CIs over images and over seeds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechvit.analysis.overlap import (
    OverlapConfig,
    SparseCodes,
    encode,
    feature_overlap,
    match_features,
    sae_fit,
    sparse_row_cosine,
)
from mechvit.analysis.similarity import write_rows_csv
from mechvit.analysis.statistics import (
    Estimate,
    TestResult,
    mean_ci,
    pairwise_label_permutation_test,
    ratio_ci,
)

__all__ = [
    "METRICS",
    "CodeCosineControls",
    "ControlsConfig",
    "OverlapControls",
    "code_cosine_controls",
    "floor_matched_cosines",
    "overlap_controls",
    "pair_metrics",
]

# metric -> True when larger means more similar
METRICS: dict[str, bool] = {
    "matched_cos": True,
    "act_corr": True,
    "topk_jaccard": True,
    "persistent_fraction": True,
    "cross_ev": True,
    "spliced_kl": False,
}


@dataclass
class ControlsConfig:
    """Settings of :func:`overlap_controls`."""

    reference: str = "base"  # the model every other model is compared with
    floor: str = "rows"  # "rows" (random activation rows) or "directions" (random Gaussian directions)
    floor_draws: int = 5  # random dictionaries per reference SAE
    within_quantile: float = 0.05  # persistent: matched cos >= this quantile of within-model pairs ...
    floor_quantile: float = 0.99  # ... and >= this quantile of the floor
    top_k: int = 20  # images per feature for the top-k Jaccard
    confidence: float = 0.95
    seed: int = 0
    max_exact: int = 100_000  # permutation test: exact up to this many relabellings
    n_resamples: int = 9999
    spliced_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.floor not in ("rows", "directions"):
            raise ValueError(f"floor must be 'rows' or 'directions', got {self.floor!r}")
        if self.floor_draws < 1:
            raise ValueError(f"floor_draws must be >= 1, got {self.floor_draws}")
        for name in ("within_quantile", "floor_quantile"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


# overlap_controls keeps every SAE's codes sparse (False: the reference path, dense codes up to
# _CODES_CACHE_BYTES, else encoded per pair; the default study's 20 SAEs would take 2.7 GB dense)
_SPARSE_CODES = True
_CODES_CACHE_BYTES = 2 * 2**30


def _nanmean(t: Tensor | None) -> float:
    if t is None or t.numel() == 0:
        return math.nan
    v = t.double()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


def pair_metrics(
    sae_a: Any,
    sae_b: Any,
    acts_a: Tensor,
    acts_b: Tensor,
    *,
    top_k: int = 20,
    spliced_kl: float | None = None,
    codes_a: Tensor | None = None,
    codes_b: Tensor | None = None,
    cross: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, float], Tensor, int, int]:
    """Overlap of one pair of SAEs on the same images: ``(metrics, matched cosines [M], n_live_a, n_live_b)``.

    ``acts_a``/``acts_b``: each SAE's own model's activations at the hook, ``[n_images, n_tokens, d_in]``.
    ``persistent_fraction`` is filled in later (it needs the threshold); ``spliced_kl`` is passed through.
    ``codes_a``/``codes_b``/``cross``: precomputed codes and fits, see :func:`feature_overlap`.
    """
    ov = feature_overlap(
        sae_a,
        sae_b,
        acts_a,
        acts_b,
        OverlapConfig(top_k=top_k),
        codes_a=codes_a,
        codes_b=codes_b,
        cross=cross,
    )
    n_live_a = sum(c != "dead" for c in ov.class_a)
    n_live_b = sum(c != "dead" for c in ov.class_b)
    cross = ov.cross or {}
    metrics = {
        "matched_cos": _nanmean(ov.matched_cos),
        "act_corr": _nanmean(ov.act_corr),
        "topk_jaccard": _nanmean(ov.topk_jaccard),
        "persistent_fraction": math.nan,
        "cross_ev": float(
            np.mean([cross["a_on_b"]["explained_variance"], cross["b_on_a"]["explained_variance"]])
        )
        if cross
        else math.nan,
        "spliced_kl": math.nan if spliced_kl is None else float(spliced_kl),
    }
    return metrics, ov.matched_cos.float(), n_live_a, n_live_b


def floor_matched_cosines(
    sae: Any, acts: Tensor, alive: Tensor, *, kind: str = "rows", generator: torch.Generator
) -> Tensor:
    """Matched decoder cosines of ``sae``'s live features against a random dictionary of the same size:
    random rows of ``acts`` (``kind="rows"``) or random Gaussian directions (``"directions"``)."""
    w = sae.W_dec.detach().float().cpu()[alive.cpu()]
    n = len(w)
    if n == 0:
        return torch.zeros(0)
    if kind == "rows":
        rows = acts.reshape(-1, acts.shape[-1]).float()
        if len(rows) < n:
            raise ValueError(f"the floor needs at least {n} activation rows, got {len(rows)}")
        rand = rows[torch.randperm(len(rows), generator=generator)[:n]].cpu()
    elif kind == "directions":
        rand = torch.randn(n, w.shape[1], generator=generator)
    else:
        raise ValueError(f"kind must be 'rows' or 'directions', got {kind!r}")
    wn = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rn = rand / rand.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return match_features(wn @ rn.T)[2]


@torch.no_grad()
def _alive(sae: Any, acts: Tensor, batch_size: int = 4096) -> Tensor:
    flat = acts.reshape(-1, acts.shape[-1])
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    for s in range(0, len(flat), batch_size):
        fired |= (encode(sae, flat[s : s + batch_size]) > 0).any(0).cpu()
    return fired


@dataclass
class OverlapControls:
    """Result of :func:`overlap_controls`."""

    pairs: list[dict[str, Any]]  # one row per pair: kind, model_a, rep_a, model_b, rep_b, metrics
    summary: dict[str, dict[str, Any]]  # comparison "ref vs other" -> metric -> estimates, ratio, test
    threshold: dict[str, float]  # persistent cosine threshold and its two parts
    live: dict[str, list[int]]  # model -> live features per replicate
    config: ControlsConfig = field(default_factory=ControlsConfig)

    def rows(self) -> list[dict[str, Any]]:
        return list(self.pairs)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per comparison x metric: the four estimates, the ratio and the test, flattened."""
        out = []
        for comp, per_metric in self.summary.items():
            for metric, s in per_metric.items():
                row: dict[str, Any] = {"comparison": comp, "metric": metric}
                for key in ("within_reference", "within_other", "between", "floor", "ratio"):
                    e = s.get(key)
                    for part in ("estimate", "low", "high", "n"):
                        row[f"{key}_{part}"] = None if e is None else getattr(e, part)
                t = s.get("test")
                row["p_value"] = None if t is None else t.p_value
                row["test"] = None if t is None else t.method
                out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if isinstance(v, (Estimate, TestResult)):
                return v.to_dict()
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            return v

        return {
            "pairs": self.pairs,
            "summary": conv(self.summary),
            "threshold": self.threshold,
            "live": self.live,
            "config": asdict(self.config),
        }

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.summary_rows(), path)


def overlap_controls(
    saes: Mapping[str, Sequence[Any]],
    acts: Mapping[str, Tensor],
    config: ControlsConfig | None = None,
    *,
    models: Mapping[str, Any] | None = None,
    images: Tensor | None = None,
    hook: str | None = None,
    tokens: str = "patches",
    codes: Mapping[tuple[str, int], SparseCodes] | None = None,
) -> OverlapControls:
    """Within-model, between-model and floor overlap of replicate SAEs (see the module docstring).

    ``saes``: model name -> its replicate SAEs (same hook; at least two for the reference model).
    ``acts``: model name -> that model's activations at the hook on the SAME images, ``[n_images, n_tokens,
    d_in]``. With ``models`` (name -> HookedViT), ``images`` and ``hook`` the spliced KL is computed too.
    ``codes``: ``(model, replicate) -> SparseCodes.encode(saes[model][replicate], acts[model])`` where the
    caller has them already (the others are encoded here).
    """
    cfg = config or ControlsConfig()
    ref = cfg.reference
    if ref not in saes:
        raise ValueError(f"reference model {ref!r} has no SAEs; models given: {sorted(saes)}")
    if len(saes[ref]) < 2:
        raise ValueError(
            f"the reference model {ref!r} needs at least 2 replicate SAEs for the seed-noise ceiling, "
            f"got {len(saes[ref])}"
        )
    missing = [m for m in saes if m not in acts]
    if missing:
        raise ValueError(f"no activations for model(s) {missing}; acts has {sorted(acts)}")
    shapes = {m: tuple(acts[m].shape) for m in saes}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
        raise ValueError(
            f"acts must be [n_images, n_tokens, d_in] on the same images for every model, got {shapes}"
        )
    want_kl = models is not None
    if want_kl and (images is None or hook is None or any(m not in models for m in saes)):
        raise ValueError("the spliced KL needs models for every SAE's model, images and hook")

    units = [(m, r) for m in saes for r in range(len(saes[m]))]
    # Each SAE meets up to 2 x replicates others: its codes on its own model's activations and its fits
    # (EV, L0) on each model's are computed once, not per pair (the default study: 115 pairs of 20 SAEs).
    # The codes are kept sparse (SparseCodes: ~k of d_sae per token), so every SAE's fit in memory and the
    # pairs' per-feature reductions run over the non-zero codes only (the same numbers, see feature_overlap).
    if _SPARSE_CODES:
        given = dict(codes or {})
        codes_of: dict[tuple[str, int], Any] = {
            u: given[u] if u in given else SparseCodes.encode(saes[u[0]][u[1]], acts[u[0]]) for u in units
        }
        alive = {u: codes_of[u].fired() for u in units}
    else:  # the reference path (tests): dense codes while they fit in _CODES_CACHE_BYTES
        n_tok = math.prod(next(iter(acts.values())).shape[:-1])
        keep_codes = sum(n_tok * int(saes[m][r].cfg.d_sae) * 4 for m, r in units) <= _CODES_CACHE_BYTES
        codes_of = {(m, r): encode(saes[m][r], acts[m]) for m, r in units} if keep_codes else {}
        alive = {
            u: (codes_of[u] > 0).flatten(0, -2).any(0) if keep_codes else _alive(saes[u[0]][u[1]], acts[u[0]])
            for u in units
        }
    fits: dict[tuple[str, int, str], dict[str, float]] = {}

    def fit(m_sae: str, r: int, m_acts: str) -> dict[str, float]:
        if (m_sae, r, m_acts) not in fits:
            own = codes_of.get((m_sae, r)) if m_sae == m_acts and _SPARSE_CODES else None
            fits[(m_sae, r, m_acts)] = sae_fit(saes[m_sae][r], acts[m_acts], codes=own)
        return fits[(m_sae, r, m_acts)]

    from mechvit.sae.metrics import Splicer

    kl_cache: dict[tuple[str, int, str], float] = {}
    # one Splicer per model: its clean logits and the stream at the hook are computed once, and each of the
    # model's splices reruns only the blocks after the hook (in the default study about a quarter of the block
    # passes of spliced_kl_per_image per SAE, which was ~45% of the sae_analysis step's time)
    splicers: dict[str, Splicer] = {}

    def kl(m_sae: str, r: int, m_model: str) -> float:
        key = (m_sae, r, m_model)
        if key not in kl_cache:
            if m_model not in splicers:
                splicers[m_model] = Splicer(
                    models[m_model], images, hook, tokens=tokens, batch_size=cfg.spliced_batch_size
                )
            kl_cache[key] = float(splicers[m_model].kl_per_image(saes[m_sae][r]).mean())
        return kl_cache[key]

    pair_cache: dict[tuple[tuple[str, int], tuple[str, int]], tuple[dict[str, float], Tensor, int, int]] = {}

    def pair(u: tuple[str, int], v: tuple[str, int]) -> tuple[dict[str, float], Tensor, int, int]:
        key = (u, v) if u <= v else (v, u)
        if key not in pair_cache:
            (ma, ra), (mb, rb) = key
            skl = 0.5 * (kl(ma, ra, mb) + kl(mb, rb, ma)) if want_kl else None
            cross = {
                "a_on_a": fit(ma, ra, ma), "a_on_b": fit(ma, ra, mb),
                "b_on_b": fit(mb, rb, mb), "b_on_a": fit(mb, rb, ma),
            }  # fmt: skip
            pair_cache[key] = pair_metrics(
                saes[ma][ra], saes[mb][rb], acts[ma], acts[mb], top_k=cfg.top_k, spliced_kl=skl,
                codes_a=codes_of.get((ma, ra)), codes_b=codes_of.get((mb, rb)), cross=cross,
            )  # fmt: skip
        return pair_cache[key]

    others = [m for m in saes if m != ref]
    for m in saes:  # every pair that a comparison needs: within each model, ref x each other model
        reps = range(len(saes[m]))
        for i in reps:
            for j in reps:
                if i < j:
                    pair((m, i), (m, j))
            if m != ref:
                for k in range(len(saes[ref])):
                    pair((ref, k), (m, i))

    # floor: random dictionaries against each reference SAE's live features
    g = torch.Generator().manual_seed(cfg.seed)
    floor_rows: list[dict[str, Any]] = []
    floor_cos: list[Tensor] = []
    for r in range(len(saes[ref])):
        for d in range(cfg.floor_draws):
            c = floor_matched_cosines(saes[ref][r], acts[ref], alive[(ref, r)], kind=cfg.floor, generator=g)
            floor_cos.append(c)
            floor_rows.append(
                {
                    "kind": "floor",
                    "model_a": ref,
                    "rep_a": r,
                    "model_b": f"random {cfg.floor}",
                    "rep_b": d,
                    "n_live_a": int(alive[(ref, r)].sum()),
                    "n_live_b": int(alive[(ref, r)].sum()),
                    "matched": c,
                    **{k: math.nan for k in METRICS},
                    "matched_cos": _nanmean(c),
                }
            )

    within_ref_cos = torch.cat([pair_cache[k][1] for k in pair_cache if k[0][0] == ref and k[1][0] == ref])
    all_floor = torch.cat(floor_cos) if floor_cos else torch.zeros(0)
    q_within = (
        float(torch.quantile(within_ref_cos.double(), cfg.within_quantile))
        if len(within_ref_cos)
        else math.nan
    )
    q_floor = float(torch.quantile(all_floor.double(), cfg.floor_quantile)) if len(all_floor) else -math.inf
    threshold = max(q_within, q_floor)

    def persistent(matched: Tensor, n_a: int, n_b: int) -> float:
        live = 0.5 * (n_a + n_b)
        # a relative tolerance of 1e-6: a permuted copy of an SAE matches at cos 1 up to rounding
        return float((matched >= threshold - 1e-6).sum()) / live if live > 0 else math.nan

    rows: list[dict[str, Any]] = []
    for ((ma, ra), (mb, rb)), (metrics, matched, na, nb) in pair_cache.items():
        metrics = {**metrics, "persistent_fraction": persistent(matched, na, nb)}
        kind = "within" if ma == mb else "between"
        rows.append(
            {
                "kind": kind,
                "model_a": ma,
                "rep_a": ra,
                "model_b": mb,
                "rep_b": rb,
                "n_live_a": na,
                "n_live_b": nb,
                **metrics,
            }
        )
    for fr in floor_rows:
        matched = fr.pop("matched")
        fr["persistent_fraction"] = persistent(matched, fr["n_live_a"], fr["n_live_b"])
        rows.append(fr)

    def values(metric: str, pred) -> list[float]:
        return [r[metric] for r in rows if pred(r) and not math.isnan(r[metric])]

    def est(vals: list[float]) -> Estimate | None:
        if not vals:
            return None
        return mean_ci(vals, confidence=cfg.confidence, seed=cfg.seed, n_resamples=cfg.n_resamples)

    summary: dict[str, dict[str, Any]] = {}
    for other in others:
        comp = f"{ref} vs {other}"
        summary[comp] = {}
        units_c = [(ref, r) for r in range(len(saes[ref]))] + [(other, r) for r in range(len(saes[other]))]
        for metric, higher_similar in METRICS.items():
            w_ref = values(metric, lambda r: r["kind"] == "within" and r["model_a"] == ref)
            w_oth = values(metric, lambda r, o=other: r["kind"] == "within" and r["model_a"] == o)
            btw = values(
                metric,
                lambda r, o=other: r["kind"] == "between" and {r["model_a"], r["model_b"]} == {ref, o},
            )
            flo = values(metric, lambda r: r["kind"] == "floor")
            s: dict[str, Any] = {
                "within_reference": est(w_ref),
                "within_other": est(w_oth),
                "between": est(btw),
                "floor": est(flo),
                "ratio": None,
                "test": None,
            }
            within = w_ref + w_oth
            if len(btw) >= 2 and len(within) >= 2 and abs(np.mean(within)) > 1e-12:
                s["ratio"] = ratio_ci(
                    btw, within, confidence=cfg.confidence, seed=cfg.seed, n_resamples=cfg.n_resamples
                )
            if btw and within:
                n = len(units_c)
                mat = np.full((n, n), np.nan)
                for i, u in enumerate(units_c):
                    for j, v in enumerate(units_c):
                        if i != j:
                            key = (u, v) if u <= v else (v, u)
                            mat[i, j] = pair_metrics_value(pair_cache[key], metric, persistent)
                if np.isfinite(mat[~np.eye(n, dtype=bool)]).all():
                    s["test"] = pairwise_label_permutation_test(
                        np.nan_to_num(mat),
                        [u[0] for u in units_c],
                        alternative="greater" if higher_similar else "less",
                        max_exact=cfg.max_exact,
                        n_resamples=cfg.n_resamples,
                        seed=cfg.seed,
                    )
            summary[comp][metric] = s
    live = {m: [int(alive[(m, r)].sum()) for r in range(len(saes[m]))] for m in saes}
    return OverlapControls(
        pairs=rows,
        summary=summary,
        threshold={
            "persistent_cos": threshold,
            "within_quantile_value": q_within,
            "floor_quantile_value": q_floor,
        },
        live=live,
        config=cfg,
    )


def pair_metrics_value(entry: tuple[dict[str, float], Tensor, int, int], metric: str, persistent) -> float:
    metrics, matched, na, nb = entry
    return persistent(matched, na, nb) if metric == "persistent_fraction" else metrics[metric]


# ---- the seed paper's code cosine, with its controls -----------------------------------------------


@dataclass
class CodeCosineControls:
    """Per SAE (seed) and image: mean over patches of the code cosine (clean vs corrupted copy of the same
    patch), the raw-activation cosine of the same patches, and the mismatched-patch baseline."""

    code: Tensor  # [n_saes, n_images] (nan where every patch's code is all zero in either image)
    raw: Tensor  # [n_images]
    mismatched: Tensor  # [n_saes, n_images]
    label: str = ""
    confidence: float = 0.95
    seed: int = 0

    def estimates(self) -> dict[str, dict[str, Estimate | None]]:
        """For ``code``, ``raw`` and ``mismatched``: CI over images (of the seed-averaged value) and CI
        over seeds (of each seed's image-averaged value; None with one seed or for ``raw``)."""
        out: dict[str, dict[str, Estimate | None]] = {}
        for name, t in (("code", self.code), ("raw", self.raw[None]), ("mismatched", self.mismatched)):
            per_image = torch.nanmean(t.double(), 0)
            per_image = per_image[~torch.isnan(per_image)]
            per_seed = torch.nanmean(t.double(), 1)
            per_seed = per_seed[~torch.isnan(per_seed)]  # a seed whose codes are all zero has no cosine
            out[name] = {
                "over_images": mean_ci(per_image.numpy(), confidence=self.confidence, seed=self.seed)
                if per_image.numel()
                else None,
                "over_seeds": mean_ci(per_seed.numpy(), confidence=self.confidence, seed=self.seed)
                if name != "raw" and len(per_seed) > 1
                else None,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n_saes": int(self.code.shape[0]),
            "n_images": int(self.code.shape[1]),
            **{
                name: {k: (None if v is None else v.to_dict()) for k, v in d.items()}
                for name, d in self.estimates().items()
            },
        }

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"label": self.label, "measure": name, "ci_over": over, **(e.to_dict() if e else {})}
            for name, d in self.estimates().items()
            for over, e in d.items()
        ]

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)


def _row_cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine per row of [..., d]; nan where either row is zero."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    c = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    return torch.where((na > 0) & (nb > 0), c, torch.full_like(c, math.nan))


@torch.no_grad()
def code_cosine_controls(
    saes: Sequence[Any],
    clean_acts: Tensor,
    corrupted_acts: Tensor,
    *,
    label: str = "",
    seed: int = 0,
    confidence: float = 0.95,
    clean_codes: Sequence[SparseCodes] | None = None,
) -> CodeCosineControls:
    """The seed paper's code cosine for each SAE in ``saes`` (replicates), with the raw-activation cosine
    and a mismatched-patch baseline (each image's clean patches against the corrupted patches at the same
    positions of another image: a fixed random derangement from ``seed``).

    ``clean_acts``/``corrupted_acts``: ``[n_images, n_tokens, d_in]``, image ``i`` of one the corrupted copy
    of image ``i`` of the other. Pass the fine-tune's SAEs on its own activations, or one shared SAE (the
    base's) on both models' activations, as the comparison requires. ``clean_codes``: each SAE's
    ``SparseCodes.encode(sae, clean_acts)`` when the caller reuses them (e.g. across corruptions).

    The cosines are summed over the non-zero codes only (:func:`mechvit.analysis.overlap.sparse_row_cosine`:
    the dense float64 formula up to the order of its additions, ~1e-16 relative before the float32 result).
    """
    if clean_acts.shape != corrupted_acts.shape or clean_acts.ndim != 3:
        raise ValueError(
            "clean and corrupted activations must be paired [n_images, n_tokens, d_in], got "
            f"{tuple(clean_acts.shape)} and {tuple(corrupted_acts.shape)}"
        )
    n = clean_acts.shape[0]
    if n < 2:
        raise ValueError(f"the mismatched baseline needs at least 2 images, got {n}")
    if not saes:
        raise ValueError("need at least one SAE")
    if clean_codes is not None and (
        len(clean_codes) != len(saes) or any(c.lead != tuple(clean_acts.shape[:-1]) for c in clean_codes)
    ):
        raise ValueError("clean_codes must hold one SparseCodes of clean_acts per SAE")
    g = torch.Generator().manual_seed(seed)
    # a derangement: a random cyclic shift of a random order never maps an image to itself
    order = torch.randperm(n, generator=g)
    shift = int(torch.randint(1, n, (1,), generator=g))
    other = torch.empty(n, dtype=torch.long)
    other[order] = order.roll(shift)
    raw = torch.nanmean(_row_cos(clean_acts, corrupted_acts), 1)
    code, mism = [], []
    for i, sae in enumerate(saes):
        if _SPARSE_CODES:
            sa = clean_codes[i] if clean_codes is not None else SparseCodes.encode(sae, clean_acts)
            sb = SparseCodes.encode(sae, corrupted_acts)
            code.append(torch.nanmean(sparse_row_cosine(sa, sb), 1))
            mism.append(torch.nanmean(sparse_row_cosine(sa, sb.take_images(other)), 1))
            continue
        za = clean_codes[i].to_dense() if clean_codes is not None else encode(sae, clean_acts)
        zb = encode(sae, corrupted_acts)
        code.append(torch.nanmean(_row_cos(za, zb), 1))
        mism.append(torch.nanmean(_row_cos(za, zb[other]), 1))
    return CodeCosineControls(
        code=torch.stack(code).float(),
        raw=raw.float(),
        mismatched=torch.stack(mism).float(),
        label=label,
        confidence=confidence,
        seed=seed,
    )
