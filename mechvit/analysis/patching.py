"""Activation patching for images, batched: many patched variants run in one forward.

Two runs are compared, "clean" and "corrupted", each a (model, images) pair on the *same* labels:

- clean -> corrupted (``direction="clean_to_corrupted"``, denoising): the corrupted run receives activations
  from the clean run; a high score marks a component whose clean value restores the answer.
- corrupted -> clean (``"corrupted_to_clean"``, noising): the clean run receives corrupted activations; a low
  score marks a component whose corrupted value destroys the answer.
- across models: pass ``corrupted_model`` (e.g. the base model) and use the same images for both runs, so the
  "clean" run is the fine-tuned model: ``corrupted_to_clean`` patches base activations into the fine-tuned
  model, ``clean_to_corrupted`` patches fine-tuned activations into the base model.

Metric (normalised logit difference). For each image, ``LD = logit[correct] - logit[other]`` where ``other``
is the best *incorrect* class of the corrupted run, fixed once per image so that every run (clean,
corrupted, each patched variant) is scored on the same two classes. The score of a variant is
``(mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)`` with means over images:
0 = the corrupted run, 1 = the clean run, in both directions (so an unpatched corrupted->clean sweep
scores 1). Averaging before dividing keeps the score stable when single images barely change.

Denominator guard. No images is a ValueError, and so is a mean denominator ``D = mean LD_clean - mean
LD_corrupted`` of (numerically) zero. Otherwise the scores are computed as defined (no image is masked:
dropping images whose own denominator is small or negative would select the images by their outcome) and the
result carries ``denominator_ci`` (95% t interval of the mean of the per-image denominators) and
``n_sign_flipped`` (images with ``LD_clean <= LD_corrupted``); a ``RuntimeWarning`` is raised when the
interval contains 0 or ``D < 0`` (the scores are then noise-dominated or of the opposite sense).
``method="attribution"`` estimates the same scores to first order (``mechvit.analysis.attribution``).
:func:`denominator_status` is the guard a report applies: ``n/a`` (no number) when the interval's lower end is
under ``DENOM_NA_LOGITS`` (0.25 logits; a CI reaching 0 or a negative mean included), ``unstable`` under
``DENOM_UNSTABLE_LOGITS`` (1 logit), else ``ok`` (a few sign-flipped images alone do not make a score unstable).

Uncertainty. Exact sweeps keep the per-image logit differences (``per_image_ld``); :func:`bootstrap_scores`
(``PatchingResult.score_ci``) gives a percentile bootstrap CI over images of every score (the ratio of means
recomputed per resample), and :func:`best_position_scores` (``PatchingResult.best_position``) the best position
per layer chosen on one random half of the images and scored on the other (and conversely), with a CI that
repeats the selection per resample, beside the optimistic in-sample maximum.

Positions index dimension 1 (tokens) of ``[B, T, D]`` activations, in the model's token order
``model.token_labels()`` (cls, dist, registers, patches row-major), whatever prefix tokens the model has.

Batching: the receiving batch is repeated ``P`` times along the batch dimension and a boolean mask
``[P, ...]`` says which slice each copy takes from the source run. Variants are grouped by layer and the
forward starts at that layer from the receiving run's cached ``resid_pre`` (``start_at_layer``), so the
earlier blocks are not recomputed; when nothing inside the last block is patched, that block computes only
the rows the readout pools (``readout_only``: the class token of a token-pooled model). ``max_rows`` bounds
the rows (``P * images``) of one forward (default 256 on CPU, where larger batches only cost cache misses,
and 4096 elsewhere).
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechvit.analysis._utils import batches, bootstrap_counts, check_images, check_labels, model_device
from mechvit.analysis.similarity import write_rows_csv

RESID_COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
COMPONENTS = RESID_COMPONENTS + ("z", "pattern", "sae")
GRANULARITY = {
    **{c: ("position", "layer") for c in RESID_COMPONENTS},
    "z": ("head", "head_position", "position", "layer"),
    "pattern": ("head", "head_position", "layer"),
    "sae": ("feature", "feature_position"),
}
DIRECTIONS = ("clean_to_corrupted", "corrupted_to_clean")
DEFAULT_MAX_ROWS = {"cpu": 256}  # rows (variants x images) per patched forward; other devices: 4096
_ALL = slice(None)


def hook_name(component: str, layer: int) -> str:
    if component in RESID_COMPONENTS:
        return f"blocks.{layer}.hook_{component}"
    if component in ("z", "pattern"):
        return f"blocks.{layer}.attn.hook_{component}"
    raise ValueError(f"component must be one of {COMPONENTS[:-1]} here, got {component!r}")


def _sae_layer(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------
# Variants: (layer, index) where index selects, in one example's activation, what is patched.
# resid [T, D]: (t,) or ();  z [T, H, dh]: (:, h), (t, h), (t,), ();  pattern [H, Tq, Tk]: (h,), (h, t), ();
# sae codes [T, F]: (:, f), (t, f).
# ----------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    variants: list[tuple[int | None, tuple]]  # row-major over dims
    mask_shape: tuple[int, ...]  # per-example shape the index applies to (leading dims of the activation)


def _plan(model, component: str, by: str, layers, positions, heads, features, sae, sae_hook) -> _Plan:
    cfg = model.cfg
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    if by not in GRANULARITY[component]:
        raise ValueError(
            f"by={by!r} is not available for component {component!r}; choose from {GRANULARITY[component]}"
        )
    T, H = cfg.n_tokens, cfg.n_heads
    layers = list(range(cfg.n_layers)) if layers is None else [int(x) for x in layers]
    positions = list(range(T)) if positions is None else [int(x) for x in positions]
    heads = list(range(H)) if heads is None else [int(x) for x in heads]
    for name, vals, n in (("layers", layers, cfg.n_layers), ("positions", positions, T), ("heads", heads, H)):
        if not vals or min(vals) < 0 or max(vals) >= n:
            raise ValueError(f"{name} must be a non-empty list of indices in [0, {n}), got {vals}")
    tok = model.token_labels()
    lab = {
        "layer": [str(x) for x in layers],
        "position": [tok[p] for p in positions],
        "head": [str(h) for h in heads],
    }
    if component == "sae":
        if sae is None or sae_hook is None:
            raise ValueError("component='sae' needs sae=<sae_lens SAE> and sae_hook=<hook name it reads>")
        from mechvit.sae.metrics import check_sae_hook

        check_sae_hook(sae, sae_hook)  # an SAE of another hook (same width) would run and mean nothing
        d_sae = sae.cfg.d_sae
        features = list(range(d_sae)) if features is None else [int(x) for x in features]
        if not features or min(features) < 0 or max(features) >= d_sae:
            raise ValueError(f"features must be a non-empty list of indices in [0, {d_sae}), got {features}")
        lab["feature"] = [str(f) for f in features]
        if by == "feature":
            return _Plan(
                ("feature",), {"feature": lab["feature"]}, [(None, (_ALL, f)) for f in features], (T, d_sae)
            )
        return _Plan(
            ("feature", "position"),
            {"feature": lab["feature"], "position": lab["position"]},
            [(None, (t, f)) for f in features for t in positions],
            (T, d_sae),
        )
    if component in RESID_COMPONENTS:
        shape = (T,)
        if by == "layer":
            return _Plan(("layer",), {"layer": lab["layer"]}, [(lay, ()) for lay in layers], shape)
        return _Plan(
            ("layer", "position"),
            {k: lab[k] for k in ("layer", "position")},
            [(lay, (t,)) for lay in layers for t in positions],
            shape,
        )
    shape = (T, H) if component == "z" else (H, T)
    if by == "layer":
        return _Plan(("layer",), {"layer": lab["layer"]}, [(lay, ()) for lay in layers], shape)
    if by == "position":  # z only: every head at one position
        return _Plan(
            ("layer", "position"),
            {k: lab[k] for k in ("layer", "position")},
            [(lay, (t,)) for lay in layers for t in positions],
            shape,
        )
    if by == "head":
        idx = (lambda h: (_ALL, h)) if component == "z" else (lambda h: (h,))
        return _Plan(
            ("layer", "head"),
            {k: lab[k] for k in ("layer", "head")},
            [(lay, idx(h)) for lay in layers for h in heads],
            shape,
        )
    idx2 = (lambda h, t: (t, h)) if component == "z" else (lambda h, t: (h, t))
    return _Plan(
        ("layer", "head", "position"),
        {k: lab[k] for k in ("layer", "head", "position")},
        [(lay, idx2(h, t)) for lay in layers for h in heads for t in positions],
        shape,
    )


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------


@dataclass
class PatchingResult:
    """Normalised patching scores as a labelled tensor: ``values[i, j, ...]`` along ``dims``."""

    values: Tensor  # normalised score, shape = [len(labels[d]) for d in dims]
    logit_diff: Tensor  # mean patched logit difference, same shape
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    component: str
    direction: str
    clean_logit_diff: float
    corrupted_logit_diff: float
    n_images: int
    grid_size: tuple[int, int]
    n_prefix_tokens: int
    meta: dict = field(default_factory=dict)
    denominator_ci: tuple[float, float] | None = None  # 95% t interval of the mean per-image denominator
    n_sign_flipped: int = 0  # images whose own LD_clean - LD_corrupted is <= 0
    # per-image logit differences (exact sweeps; None for the attribution estimate): patched [*shape, n],
    # clean and corrupted [n]; what the bootstrap over images (score_ci, best_position) resamples
    per_image_ld: Tensor | None = None
    ld_clean: Tensor | None = None
    ld_corrupted: Tensor | None = None

    def denominator_status(self) -> tuple[str, str]:
        """``("ok" | "unstable" | "n/a", reason)`` of :func:`denominator_status` for this result."""
        return denominator_status(self.clean_logit_diff - self.corrupted_logit_diff, self.denominator_ci)

    def _per_image(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.per_image_ld is None or self.ld_clean is None or self.ld_corrupted is None:
            raise ValueError(
                "this result has no per-image logit differences (an attribution estimate, or loaded from a "
                "dict): the bootstrap over images needs the exact sweep's result"
            )
        return self.per_image_ld, self.ld_clean, self.ld_corrupted

    def score_ci(self, *, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95):
        """Percentile bootstrap CI over images of every normalised score (:func:`bootstrap_scores`)."""
        return bootstrap_scores(*self._per_image(), n_resamples=n_resamples, seed=seed, confidence=confidence)

    def best_position(self, *, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
        """:func:`best_position_scores` of a layer x position result."""
        if self.dims != ("layer", "position"):
            raise ValueError(f"best_position needs dims ('layer', 'position'), got {self.dims}")
        return best_position_scores(
            *self._per_image(), n_resamples=n_resamples, seed=seed, confidence=confidence
        )

    def rows(self) -> list[dict]:
        out = []
        for idx in itertools.product(*(range(len(self.labels[d])) for d in self.dims)):
            row = {d: self.labels[d][i] for d, i in zip(self.dims, idx, strict=True)}
            row.update(
                component=self.component,
                direction=self.direction,
                score=float(self.values[idx]),
                logit_diff=float(self.logit_diff[idx]),
                **self.meta,
            )
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "direction": self.direction,
            "dims": list(self.dims),
            "labels": self.labels,
            "values": self.values.tolist(),
            "logit_diff": self.logit_diff.tolist(),
            "clean_logit_diff": self.clean_logit_diff,
            "corrupted_logit_diff": self.corrupted_logit_diff,
            "n_images": self.n_images,
            "grid_size": list(self.grid_size),
            "n_prefix_tokens": self.n_prefix_tokens,
            "denominator_ci": list(self.denominator_ci) if self.denominator_ci is not None else None,
            "n_sign_flipped": self.n_sign_flipped,
            **self.meta,
        }

    def save_csv(self, path: str | os.PathLike) -> None:
        write_rows_csv(self.rows(), path)

    def on_grid(self) -> tuple[dict[str, Tensor], Tensor]:
        """Split the ``position`` dim (which must be last and complete) into prefix tokens and the patch grid.

        Returns ``({prefix label: values[...]}, grid values [..., gh, gw])``.
        """
        if not self.dims or self.dims[-1] != "position":
            raise ValueError(f"on_grid needs 'position' as the last dim, got dims {self.dims}")
        gh, gw = self.grid_size
        n_pos = len(self.labels["position"])
        if n_pos != self.n_prefix_tokens + gh * gw:
            raise ValueError(f"on_grid needs every position ({self.n_prefix_tokens + gh * gw}), got {n_pos}")
        prefix = {
            lab: self.values[..., i] for i, lab in enumerate(self.labels["position"][: self.n_prefix_tokens])
        }
        return prefix, self.values[..., self.n_prefix_tokens :].reshape(*self.values.shape[:-1], gh, gw)


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def logit_diff(logits: Tensor, correct: Tensor, other: Tensor) -> Tensor:
    """Per-image ``logits[correct] - logits[other]`` for logits ``[B, C]``."""
    return logits.gather(1, correct[:, None]).squeeze(1) - logits.gather(1, other[:, None]).squeeze(1)


def best_other(logits: Tensor, correct: Tensor) -> Tensor:
    """The highest-scoring incorrect class per image."""
    masked = logits.clone()
    masked.scatter_(1, correct[:, None], -math.inf)
    return masked.argmax(1)


def _names(plan: _Plan, component: str, sae_hook: str | None) -> list[str]:
    if component == "sae":
        return [sae_hook]
    return sorted({hook_name(component, lay) for lay, _ in plan.variants}, key=lambda n: int(n.split(".")[1]))


@torch.no_grad()
def _cache(model, x: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    wanted = set(names)
    logits, cache = model.run_with_cache(x, names_filter=lambda n: n in wanted)
    return logits, {n: cache[n] for n in names}


def _supports(model, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _supports_start(model) -> bool:
    return _supports(model, "start_at_layer")


def _check_pair(model_a, model_b) -> None:
    ca, cb = model_a.cfg, model_b.cfg
    keys = ("d_model", "n_layers", "n_heads", "d_head", "n_tokens", "n_prefix_tokens", "num_classes")
    da, db = {k: getattr(ca, k) for k in keys}, {k: getattr(cb, k) for k in keys}
    if da != db:
        raise ValueError(f"models must share the architecture to patch between them, got {da} and {db}")


def _check_inputs(
    model, corrupted_model, clean_images, corrupted_images, labels, direction, sae_hook
) -> Tensor:
    """Shared argument checks of the exact and the attribution sweeps; returns the labels as int64."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    _check_pair(model, corrupted_model)
    check_images(clean_images, "clean_images")
    check_images(corrupted_images, "corrupted_images")
    if clean_images.shape != corrupted_images.shape:
        raise ValueError(
            f"clean and corrupted images must be paired, got {tuple(clean_images.shape)} and "
            f"{tuple(corrupted_images.shape)}"
        )
    if sae_hook is not None and sae_hook not in model.hook_dict:
        raise ValueError(f"unknown sae_hook {sae_hook!r}")
    return check_labels(labels, clean_images.shape[0], model.cfg.num_classes)


def _denominator(ld_clean: Tensor, ld_corr: Tensor) -> tuple[float, float, tuple[float, float] | None, int]:
    """Mean clean and corrupted logit differences, the 95% t interval of the mean per-image denominator
    (None for one image), and the number of images whose denominator is <= 0. Raises when the mean
    denominator is (numerically) zero; warns when its interval contains 0 or it is negative."""
    from scipy import stats

    d = (ld_clean - ld_corr).double()
    mean_clean, mean_corr = float(ld_clean.double().mean()), float(ld_corr.double().mean())
    denom = mean_clean - mean_corr
    if abs(denom) < 1e-6 * max(1.0, abs(mean_clean)):
        raise ValueError(
            f"the clean and corrupted runs have the same mean logit difference ({mean_clean:.6g}); "
            "the normalised metric is undefined. Use inputs or models that differ."
        )
    n = d.numel()
    ci = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * float(d.std()) / math.sqrt(n)
        ci = (denom - half, denom + half)
    flipped = int((d <= 0).sum())
    if denom < 0 or (ci is not None and ci[0] <= 0 <= ci[1]):
        ci_txt = f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "n/a"
        warnings.warn(
            f"patching denominator mean LD_clean - mean LD_corrupted = {denom:.3g} (95% CI {ci_txt}, "
            f"{flipped} of {n} images <= 0): "
            + (
                "negative, so the corrupted run scores higher than the clean one and the scores have the "
                "opposite sense"
                if denom < 0
                else "not distinguishable from 0, so the normalised scores are dominated by noise"
            ),
            RuntimeWarning,
            stacklevel=3,
        )
    return mean_clean, mean_corr, ci, flipped


def _result(plan, component, direction, sum_ld, ld_clean, ld_corr, model, meta) -> PatchingResult:
    """Normalised scores from the patched logit differences of every variant, summed over images ``[V]`` or
    per image ``[V, n]`` (kept for the bootstrap), and the per-image clean and corrupted logit differences
    (the metric of the module docstring)."""
    n = ld_clean.numel()
    mean_clean, mean_corr, ci, flipped = _denominator(ld_clean, ld_corr)
    shape = tuple(len(plan.labels[d]) for d in plan.dims)
    per_image = None
    if sum_ld.ndim == 2:
        per_image = sum_ld.double().cpu().reshape(*shape, n)
        sum_ld = sum_ld.double().sum(1)
    mean_ld = (sum_ld.double().cpu() / n).reshape(shape)
    return PatchingResult(
        values=((mean_ld - mean_corr) / (mean_clean - mean_corr)).float(),
        logit_diff=mean_ld.float(),
        dims=plan.dims,
        labels=plan.labels,
        component=component,
        direction=direction,
        clean_logit_diff=mean_clean,
        corrupted_logit_diff=mean_corr,
        n_images=n,
        grid_size=tuple(model.cfg.grid_size),
        n_prefix_tokens=model.cfg.n_prefix_tokens,
        meta=meta,
        denominator_ci=ci,
        n_sign_flipped=flipped,
        per_image_ld=per_image,
        ld_clean=ld_clean.double().cpu() if per_image is not None else None,
        ld_corrupted=ld_corr.double().cpu() if per_image is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# Uncertainty: bootstrap over images, split-half best position, denominator guard
# ----------------------------------------------------------------------------------------------

# Denominator guard, in logits of the mean denominator D = mean LD_clean - mean LD_corrupted (lower end of its
# 95% CI). Below DENOM_NA_LOGITS (0 included) the runs are not distinguishable enough for a normalised score:
# a quarter logit is ~1/20 of the within-model denominators of the default study (5-7 logits), so a score's
# numerator noise is amplified ~4x or more and its sign is not fixed; the score is reported as n/a. Below
# DENOM_UNSTABLE_LOGITS the score is shown with a warning (its CI is then wide).
DENOM_NA_LOGITS = 0.25
DENOM_UNSTABLE_LOGITS = 1.0


def denominator_status(
    denominator: float,
    ci: tuple[float, float] | None,
    *,
    na_below: float = DENOM_NA_LOGITS,
    unstable_below: float = DENOM_UNSTABLE_LOGITS,
) -> tuple[str, str]:
    """``("ok" | "unstable" | "n/a", reason)`` for a mean denominator and its 95% CI (``None``: one image,
    judged on the mean). ``n/a`` when the CI's lower end (or the mean) is below ``na_below`` logits (0
    included: a CI reaching 0 or a negative denominator); ``unstable`` below ``unstable_below``."""
    lo = float(denominator) if ci is None else float(ci[0])
    txt = f"denominator {denominator:.3g} logits" + (
        "" if ci is None else f", 95% CI [{ci[0]:.3g}, {ci[1]:.3g}]"
    )
    if denominator <= 0:
        return "n/a", f"{txt}: negative, the corrupted run scores higher than the clean one"
    if lo <= 0:
        return "n/a", f"{txt}: the CI includes 0, the two runs are not distinguishable"
    if lo < na_below:
        return "n/a", f"{txt}: the CI's lower end is under {na_below} logits, the score is noise-dominated"
    if lo < unstable_below:
        return (
            "unstable",
            f"{txt}: the CI's lower end is under {unstable_below} logit, the score's CI is wide",
        )
    return "ok", txt


def _weights(n: int, idx: Tensor, n_resamples: int, gen: torch.Generator) -> Tensor:
    """Bootstrap weights ``[R, n]``: each row resamples the images ``idx`` with replacement (mean weights)."""
    return bootstrap_counts(n, n_resamples, gen, among=idx) / len(idx)


def _scores(ld: Tensor, ld_clean: Tensor, ld_corr: Tensor, w: Tensor) -> Tensor:
    """Normalised scores ``[*shape, R]`` under image weights ``w [R, n]`` (ratio of weighted means)."""
    num = ld.double() @ w.T - (w @ ld_corr.double())
    return num / (w @ ld_clean.double() - w @ ld_corr.double())


def _quantiles(reps: Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    a = (1 - confidence) / 2
    q = torch.nanquantile(reps, torch.tensor([a, 1 - a], dtype=reps.dtype), dim=-1)
    return q[0], q[1]


def bootstrap_scores(
    ld: Tensor,
    ld_clean: Tensor,
    ld_corr: Tensor,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap CI over images of normalised patching scores.

    ``ld [*shape, n]``: per-image patched logit differences; ``ld_clean``/``ld_corr [n]``. Each resample
    draws ``n`` images with replacement and recomputes ``(mean ld - mean ld_corr) / (mean ld_clean - mean
    ld_corr)`` (the ratio of means, as the point estimate), all variants at once (one matmul). Returns
    ``(low, high)`` of shape ``shape``."""
    n = ld.shape[-1]
    if n < 2:
        raise ValueError(f"a bootstrap over images needs at least 2 images, got {n}")
    gen = torch.Generator().manual_seed(seed)
    w = _weights(n, torch.arange(n), n_resamples, gen)
    lo, hi = _quantiles(_scores(ld, ld_clean, ld_corr, w), confidence)
    return lo.float(), hi.float()


def best_position_scores(
    ld: Tensor,
    ld_clean: Tensor,
    ld_corr: Tensor,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Best position per layer of a layer x position sweep, scored without and with selection on other images.

    ``ld [L, P, n]``. ``in_sample``: the maximum over positions of the scores on all images (optimistic: a
    maximum over ``P`` noisy scores), with the bootstrap CI of the score at that position. ``split_half``: the
    images are split at random (``seed``) into halves A and B (an odd one out is dropped); the position is
    chosen on A and scored on B (each half normalised by its own denominator), and conversely; the two
    held-out scores are averaged. Its CI resamples the images within each half and repeats the whole
    choose-and-score procedure per resample (percentile). Every value is a list over layers."""
    L, P, n = ld.shape
    if n < 4:
        raise ValueError(f"split-half selection needs at least 4 images, got {n}")
    gen = torch.Generator().manual_seed(seed)
    full = _scores(ld, ld_clean, ld_corr, torch.full((1, n), 1.0 / n, dtype=torch.float64))[..., 0]
    best = full.argmax(1)  # [L]
    at_best = ld[torch.arange(L), best]  # [L, n]
    lo_in, hi_in = bootstrap_scores(
        at_best, ld_clean, ld_corr, n_resamples=n_resamples, seed=seed, confidence=confidence
    )
    perm = torch.randperm(n, generator=gen)
    h = n // 2
    a_idx, b_idx = perm[:h].sort().values, perm[h : 2 * h].sort().values

    def one_half(idx: Tensor, reps: int) -> Tensor:
        if reps == 0:  # the point estimate: every image of the half once
            w = torch.zeros(1, n, dtype=torch.float64)
            w[0, idx] = 1.0 / len(idx)
            return w
        return _weights(n, idx, reps, gen)

    def held_out(wa: Tensor, wb: Tensor) -> Tensor:  # [L, R]
        sa, sb = _scores(ld, ld_clean, ld_corr, wa), _scores(ld, ld_clean, ld_corr, wb)  # [L, P, R]
        b_at_a = sb.gather(1, sa.argmax(1, keepdim=True)).squeeze(1)
        a_at_b = sa.gather(1, sb.argmax(1, keepdim=True)).squeeze(1)
        return 0.5 * (b_at_a + a_at_b)

    est = held_out(one_half(a_idx, 0), one_half(b_idx, 0))[:, 0]
    lo_sh, hi_sh = _quantiles(
        held_out(one_half(a_idx, n_resamples), one_half(b_idx, n_resamples)), confidence
    )
    return {
        "in_sample": {
            "estimate": full.max(1).values.tolist(),
            "low": lo_in.tolist(),
            "high": hi_in.tolist(),
            "position": best.tolist(),
        },
        "split_half": {"estimate": est.tolist(), "low": lo_sh.tolist(), "high": hi_sh.tolist()},
        "n_images": n,
        "n_half": h,
        "n_resamples": n_resamples,
        "confidence": confidence,
        "seed": seed,
    }


METHODS = ("exact", "attribution")


@torch.no_grad()
def activation_patching(
    model,
    clean_images: Tensor,
    corrupted_images: Tensor,
    labels: Tensor,
    *,
    component: str = "resid_pre",
    by: str = "position",
    direction: str = "clean_to_corrupted",
    corrupted_model=None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    features: Sequence[int] | None = None,
    sae=None,
    sae_hook: str | None = None,
    batch_size: int = 64,
    max_rows: int | None = None,
    batched: bool = True,
    progress: bool = True,
    method: str = "exact",
) -> PatchingResult:
    """Patching sweep; see the module docstring for runs, metric and batching.

    ``model`` runs the clean images (the "clean" run), ``corrupted_model`` (default ``model``) the corrupted
    images. ``component``/``by``: resid_pre, resid_mid, resid_post, attn_out, mlp_out by ``position`` or
    ``layer``; ``z`` by ``head``, ``head_position``, ``position`` or ``layer``; ``pattern`` (query rows) by
    ``head``, ``head_position`` or ``layer``; ``sae`` (features of ``sae`` at ``sae_hook``, the receiving
    run's SAE error term kept) by ``feature`` or ``feature_position``. ``batched=False`` runs the naive
    reference loop: one full forward per patched variant. ``method="attribution"`` returns
    ``attribution_patching``'s first-order estimate of the same scores instead (same arguments and result
    layout; ``max_rows`` and ``batched`` do not apply to it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "attribution":
        from mechvit.analysis.attribution import attribution_patching

        kw = dict(layers=layers, positions=positions, heads=heads, features=features, sae=sae)
        return attribution_patching(
            model, clean_images, corrupted_images, labels, component=component, by=by, direction=direction,
            corrupted_model=corrupted_model, sae_hook=sae_hook, batch_size=batch_size, progress=progress, **kw,
        )  # fmt: skip
    corrupted_model = model if corrupted_model is None else corrupted_model
    labels = _check_inputs(
        model, corrupted_model, clean_images, corrupted_images, labels, direction, sae_hook
    )
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    plan = _plan(model, component, by, layers, positions, heads, features, sae, sae_hook)
    if direction == "clean_to_corrupted":
        recv_model, recv_x, src_model, src_x = corrupted_model, corrupted_images, model, clean_images
    else:
        recv_model, recv_x, src_model, src_x = model, clean_images, corrupted_model, corrupted_images
    device = model_device(recv_model)
    if max_rows is None:  # CPUs are compute-bound past ~256 rows; GPUs want big batches
        max_rows = DEFAULT_MAX_ROWS.get(device.type, 4096)
    names = _names(plan, component, sae_hook)
    n_var = len(plan.variants)
    per_image = []  # [n_var, batch] per image batch
    lds_clean, lds_corr = [], []
    start_ok = batched and _supports_start(recv_model)
    for s in batches(clean_images.shape[0], batch_size, progress, "patching (image batches)"):
        y = labels[s : s + batch_size].to(device)
        logit_clean = model(clean_images[s : s + batch_size].to(device))
        logit_corr = corrupted_model(corrupted_images[s : s + batch_size].to(device))
        other = best_other(logit_corr, y)
        lds_clean.append(logit_diff(logit_clean, y, other).double().cpu())
        lds_corr.append(logit_diff(logit_corr, y, other).double().cpu())
        extra = [
            f"blocks.{lay}.hook_resid_pre"
            for lay in {v[0] for v in plan.variants}
            if lay is not None and start_ok
        ]
        if component == "sae" and start_ok and _sae_layer(sae_hook) is not None:
            extra.append(f"blocks.{_sae_layer(sae_hook)}.hook_resid_pre")
        _, recv_cache = _cache(recv_model, recv_x[s : s + batch_size].to(device), sorted(set(names + extra)))
        _, src_cache = _cache(src_model, src_x[s : s + batch_size].to(device), names)
        run = _run_batched if batched else _run_naive
        per_image.append(
            run(
                recv_model,
                recv_x[s : s + batch_size].to(device),
                plan,
                component,
                names,
                recv_cache,
                src_cache,
                y,
                other,
                sae,
                max_rows,
                start_ok,
                progress,
            )
            .double()
            .cpu()
        )
    meta = {"by": by, **({"sae_hook": sae_hook} if sae_hook else {})}
    ld = torch.cat(per_image, 1) if per_image else torch.zeros(n_var, 0, dtype=torch.float64)
    return _result(plan, component, direction, ld, torch.cat(lds_clean), torch.cat(lds_corr), model, meta)


def _sae_patch(sae, a: Tensor, z_recv: Tensor, z_src: Tensor, mask: Tensor) -> Tensor:
    """Receiving activations with the masked SAE codes replaced by the source's, error term kept.

    a [P, B, T, ...] (P copies of the receiving activation), z_recv/z_src [B, T, F], mask [P, T, F].
    """
    z_new = torch.where(mask[:, None], z_src[None], z_recv[None])
    return _sae_splice(sae, a, z_new, z_recv[None])


def _sae_splice(sae, a: Tensor, z_new: Tensor, z_old: Tensor) -> Tensor:
    """``a + decode(z_new) - decode(z_old)``, exactly ``a`` at tokens whose codes did not change."""
    changed = (z_new != z_old).any(-1)
    changed = changed.view(*changed.shape, *([1] * (a.ndim - changed.ndim)))
    return torch.where(changed, a + sae.decode(z_new) - sae.decode(z_old), a)


def _run_batched(
    model, x, plan, component, names, recv_cache, src_cache, y, other, sae, max_rows, start_ok, progress
) -> Tensor:
    B = x.shape[0]
    per_chunk = max(1, max_rows // B)
    last = model.cfg.n_layers - 1
    readout_ok = start_ok and _supports(model, "readout_only")
    out = torch.empty(len(plan.variants), B, dtype=torch.float64, device=x.device)
    if component == "sae":
        name = names[0]
        z_recv, z_src = sae.encode(recv_cache[name]), sae.encode(src_cache[name])
    # group consecutive variants by layer (plans are layer-major), then chunk
    groups = itertools.groupby(range(len(plan.variants)), key=lambda i: plan.variants[i][0])
    chunks = [
        (lay, idx[i : i + per_chunk])
        for lay, g in groups
        for idx in [list(g)]
        for i in range(0, len(idx), per_chunk)
    ]
    for lay, idx in tqdm(
        chunks, desc="patching (batched chunks)", disable=not progress or len(chunks) < 2, leave=False
    ):
        P = len(idx)
        mask = torch.zeros(P, *plan.mask_shape, dtype=torch.bool, device=x.device)
        for p, i in enumerate(idx):
            mask[(p, *plan.variants[i][1])] = True
        if component == "sae":
            name = names[0]
            layer = _sae_layer(name)
        else:
            name = hook_name(component, lay)
            layer = lay
        src = src_cache[name]

        def hook(act, hook, mask=mask, src=src, P=P):
            a = act.view(P, B, *act.shape[1:])
            if component == "sae":
                patched = _sae_patch(sae, a, z_recv, z_src, mask)
                rows = mask.flatten(1).any(1).view(P, *([1] * (a.ndim - 1)))
                return torch.where(rows, patched, a).view_as(act)
            m = mask.view(P, 1, *mask.shape[1:], *([1] * (a.ndim - mask.ndim - 1)))
            return torch.where(m, src[None], a).view_as(act)

        if start_ok and layer is not None:
            # The last block need only compute the rows the readout pools when nothing inside it is patched.
            readout = readout_ok and (layer < last or name == f"blocks.{last}.hook_resid_pre")
            recv = recv_cache[f"blocks.{layer}.hook_resid_pre"]
            if component == "resid_pre":  # build the patched input directly: no hook needed
                inp = torch.where(mask.view(P, 1, -1, 1), src[None], recv[None]).flatten(0, 1)
                logits = model(inp, start_at_layer=layer, readout_only=readout)
            else:
                with model.hooks(fwd_hooks=[(name, hook)]):
                    logits = model(recv.repeat(P, 1, 1), start_at_layer=layer, readout_only=readout)
        else:
            logits = model.run_with_hooks(x.repeat(P, *([1] * (x.ndim - 1))), fwd_hooks=[(name, hook)])
        ld = logit_diff(logits, y.repeat(P), other.repeat(P)).view(P, B).double()
        out[torch.as_tensor(idx, device=x.device)] = ld
    return out


def _run_naive(
    model, x, plan, component, names, recv_cache, src_cache, y, other, sae, max_rows, start_ok, progress
) -> Tensor:
    """Reference loop: one full forward of the receiving batch per variant, patched by plain indexing."""
    out = torch.empty(len(plan.variants), x.shape[0], dtype=torch.float64, device=x.device)
    if component == "sae":
        z_recv, z_src = sae.encode(recv_cache[names[0]]), sae.encode(src_cache[names[0]])
    for i, (lay, index) in enumerate(
        tqdm(plan.variants, desc="patching (naive loop)", disable=not progress, leave=False)
    ):
        name = names[0] if component == "sae" else hook_name(component, lay)
        src = src_cache[name]

        def hook(act, hook, index=index, src=src):
            act = act.clone()
            if component == "sae":
                z_new = z_recv.clone()
                z_new[(_ALL, *index)] = z_src[(_ALL, *index)]
                return _sae_splice(sae, act, z_new, z_recv)
            act[(_ALL, *index)] = src[(_ALL, *index)]
            return act

        logits = model.run_with_hooks(x, fwd_hooks=[(name, hook)])
        out[i] = logit_diff(logits, y, other).double()
    return out


__all__ = [
    "COMPONENTS",
    "DENOM_NA_LOGITS",
    "DENOM_UNSTABLE_LOGITS",
    "DIRECTIONS",
    "GRANULARITY",
    "METHODS",
    "PatchingResult",
    "activation_patching",
    "best_other",
    "best_position_scores",
    "bootstrap_scores",
    "denominator_status",
    "hook_name",
    "logit_diff",
]
