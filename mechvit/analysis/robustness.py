"""Robustness metrics (pure): accuracy, certainty, calibration (ECE), NLL and ImageNet-C corruption errors.

Per cell: top-1, top-5, mean confidence (max softmax), mean correct-class probability, NLL, ECE (15 equal-width
bins). Corruption errors are as in ImageNet-C (Hendrycks & Dietterich 2019): ``CE_c = sum_s E_{s,c} /
sum_s E^base_{s,c}``, mCE the mean over corruptions, relative CE with the clean error subtracted first.
:func:`robustness_matrix` makes every corrupted batch once, with a seed that depends only on (seed,
corruption, severity, batch index), and feeds it to every model, so all models see identical corrupted
images. The ``mechvit evaluate`` command (:mod:`mechvit.training.evaluate`) and the study's robustness step
both call these functions.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

METRICS = ("top1", "top5", "confidence", "correct_prob", "nll", "ece")
# images per forward call in robustness_matrix: the default study's 500-image batches as 2 x 250 run ~15-25%
# faster on CPU (1 thread) than 500 at once (a 96-wide ViT's [500 x 50, 288] activations overflow the cache)
FORWARD_BATCH = 256


def expected_calibration_error(confidence: Float[Tensor, " n"], correct: Tensor, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width confidence bins ``(k/n, (k+1)/n]``: sum_b |B|/N |acc_b - conf_b|."""
    acc = MetricAccumulator(num_classes=1, n_bins=n_bins)
    acc.add_confidence(confidence.detach().double().cpu(), correct.detach().double().cpu())
    return acc.ece()


def classification_metrics(
    logits: Float[Tensor, "n k"], labels: Int[Tensor, " n"], n_bins: int = 15
) -> dict[str, float]:
    """All metrics of one set of logits (see the module docstring); no images raise ``ValueError``."""
    if logits.ndim == 2 and logits.shape[0] == 0:
        raise ValueError("classification_metrics: expected at least one image, got 0 logits rows")
    acc = MetricAccumulator(logits.shape[-1], n_bins)
    acc.add(logits, labels)
    return acc.result()


class MetricAccumulator:
    """Streaming sums, so a large test set never needs all its logits in memory."""

    def __init__(self, num_classes: int, n_bins: int = 15):
        self.k = min(5, num_classes)
        self.n_bins = n_bins
        self.n = 0
        self.sums = dict.fromkeys(("top1", "top5", "confidence", "correct_prob", "nll"), 0.0)
        self.bin_n = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(n_bins, dtype=torch.float64)
        self.bin_acc = torch.zeros(n_bins, dtype=torch.float64)

    def add_confidence(self, conf: Tensor, correct: Tensor) -> None:
        b = (conf * self.n_bins).ceil().long().clamp(1, self.n_bins) - 1  # (k/n, (k+1)/n] -> k
        self.bin_n += torch.bincount(b, minlength=self.n_bins).double()
        self.bin_conf += torch.bincount(b, weights=conf, minlength=self.n_bins)
        self.bin_acc += torch.bincount(b, weights=correct, minlength=self.n_bins)

    def add(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Add a batch; returns its :func:`per_image_metrics`."""
        pi = per_image_metrics(logits, labels, self.k)
        s = self.sums
        for k in s:
            s[k] += pi[k].sum().item()
        self.n += len(labels)
        self.add_confidence(pi["confidence"], pi["top1"])
        return pi

    def ece(self) -> float:
        n = self.bin_n.sum().item()
        if n == 0:
            return float("nan")
        return float((self.bin_acc - self.bin_conf).abs().sum().item() / n)

    def result(self) -> dict[str, float]:
        out = {k: v / self.n if self.n else float("nan") for k, v in self.sums.items()}
        out["ece"] = self.ece()
        out["n"] = self.n
        return out


def per_image_metrics(
    logits: Float[Tensor, "n k"], labels: Int[Tensor, " n"], k: int = 5
) -> dict[str, Tensor]:
    """Per image (float64, CPU): ``top1`` / ``top5`` (1.0 = hit; top-``min(k, classes)``), ``confidence``
    (max softmax), ``correct_prob``, ``nll``. Their means are the cell's metrics; ECE needs ``confidence`` and
    ``top1`` together (:func:`metric_cis`)."""
    logits = logits.detach().double().cpu()
    labels = labels.detach().cpu()
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, K] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    logp = logits.log_softmax(-1)
    conf, pred = logp.exp().max(-1)
    lp = logp.gather(1, labels[:, None])[:, 0]
    topk = logits.topk(min(k, logits.shape[-1]), -1).indices
    return {
        "top1": (pred == labels).double(), "top5": (topk == labels[:, None]).any(-1).double(),
        "confidence": conf, "correct_prob": lp.exp(), "nll": -lp,
    }  # fmt: skip


def corruption_seed(seed: int, name: str, severity: int, batch_index: int) -> int:
    """The seed of one corrupted batch: independent of the order of the corruption list."""
    return zlib.crc32(f"{seed}/{name}/{severity}/{batch_index}".encode()) & 0x7FFFFFFF


@torch.no_grad()
def robustness_matrix(
    models: dict[str, nn.Module],
    images: Float[Tensor, "n c h w"],
    labels: Int[Tensor, " n"],
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    *,
    seed: int = 1234,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    include_clean: bool = True,
    progress: bool = True,
    return_correct: bool = False,
    return_per_image: bool = False,
    forward_batch: int | None = FORWARD_BATCH,
    workers: int = 1,
) -> list[dict] | tuple[list[dict], dict]:
    """One row per (model, corruption, severity) with the metrics of ``METRICS``; the clean images are
    corruption ``"clean"``, severity 0. ``models`` map a name to a module taking [0, 1] images (wrap a
    normalising model in ``mechvit.data.Normalized``). With ``return_correct`` also ``{(model, corruption,
    severity): bool [N]}``, whether each image is classified correctly (for paired tests, CIs over images);
    with ``return_per_image`` instead ``{(model, corruption, severity): per_image_metrics}`` (every metric per
    image, for CIs of top-5, ECE, NLL, ...).

    ``batch_size`` sets the corrupted batches (and their seeds); ``forward_batch`` only how many of a batch's
    images a model sees per call: a batch larger than it is split into equal parts (500 -> 2 x 250), whose
    activations stay in cache. A model in eval mode gives each image the same logits either way to float
    rounding (bit for bit on the study's full ViT forwards, 8 to 1,000 images per call; products of another
    height may round differently elsewhere); None: the whole batch at once. A model whose
    forward takes ``readout_only`` (HookedViT) computes only the pooled rows in its last block: the same
    logits to float rounding (~1e-6) for ~20% less work.

    ``workers`` > 1 (CPU, Linux): the models split into that many groups, each scored in a forked one-thread
    process (:func:`mechvit.runtime.forked_map`; each corrupts the images itself, the same batches by the same
    seeds); the same rows in the same order. Why: on 2 cores two one-thread processes ran the study's ViT
    forwards 1.22x faster than one two-thread process (410-454 ms per 500 images each, side by side, against
    257-270 ms), and a HookedViT's logits are bit for bit the same at 1 and 2 threads."""
    from mechvit.corruptions import corrupt

    if len(labels) == 0:
        raise ValueError("robustness_matrix: expected at least one image, got 0")
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(workers, bool) or int(workers) < 1:
        raise ValueError(f"workers must be a number of processes >= 1, got {workers!r}")
    if workers > 1 and len(models) > 1:
        if device.type != "cpu":
            raise ValueError(f"workers > 1 runs forked one-thread CPU processes; got device {device}")
        return _robustness_in_processes(
            models, images, labels, corruptions, severities, int(workers), progress,
            dict(seed=seed, batch_size=batch_size, device=device, include_clean=include_clean,
                 return_correct=return_correct, return_per_image=return_per_image, forward_batch=forward_batch),
        )  # fmt: skip
    cells = ([("clean", 0)] if include_clean else []) + [(c, s) for c in corruptions for s in severities]
    n_batches = math.ceil(len(labels) / batch_size)
    for m in models.values():
        m.eval().to(device)
    calls = {name: _readout_only(m) for name, m in models.items()}
    rows = []
    correct: dict[tuple[str, str, int], Tensor] = {}
    per_image: dict[tuple[str, str, int], dict[str, Tensor]] = {}
    bar = tqdm(total=len(cells) * n_batches, desc="robustness", disable=not progress, unit="batch")
    # a corrupted batch equal to the clean one (e.g. saturate on grayscale images) reuses the clean logits:
    # the same input gives the same output, and the 8-model default study skips 1/20 of its forwards
    clean_logits: dict[tuple[str, int], Tensor] = {}
    for name, sev in cells:
        accs = {m: None for m in models}
        hits: dict[str, list[dict[str, Tensor]]] = {m: [] for m in models}
        for bi in range(n_batches):
            x0 = x = images[bi * batch_size : (bi + 1) * batch_size].to(device)
            y = labels[bi * batch_size : (bi + 1) * batch_size]
            if name != "clean":
                x = corrupt(x, name, sev, seed=corruption_seed(seed, name, sev, bi))
            reuse = include_clean and name != "clean" and torch.equal(x, x0)
            parts = 1 if not forward_batch else math.ceil(len(x) / forward_batch)
            for mname, m in calls.items():
                if reuse:
                    logits = clean_logits[(mname, bi)]
                elif parts > 1:
                    logits = torch.cat([m(xp) for xp in x.tensor_split(parts)])
                else:
                    logits = m(x)
                if name == "clean":
                    clean_logits[(mname, bi)] = logits
                if accs[mname] is None:
                    accs[mname] = MetricAccumulator(logits.shape[-1])
                pi = accs[mname].add(logits, y)
                if return_correct or return_per_image:
                    hits[mname].append(pi)
            bar.update(1)
            bar.set_postfix_str(f"{name}-{sev}")
        for mname, a in accs.items():
            rows.append({"model": mname, "corruption": name, "severity": sev, **a.result()})
            if return_per_image:
                per_image[(mname, name, sev)] = {
                    k: torch.cat([h[k] for h in hits[mname]]) for k in hits[mname][0]
                }
            elif return_correct:
                correct[(mname, name, sev)] = torch.cat([h["top1"] for h in hits[mname]]).bool()
    bar.close()
    if return_per_image:
        return rows, per_image
    return (rows, correct) if return_correct else rows


def _robustness_in_processes(models, images, labels, corruptions, severities, workers, progress, kwargs):
    """:func:`robustness_matrix` of ``workers`` groups of the models, each in a forked one-thread process;
    the rows merged back into the one-process order (cell by cell, the models in ``models``' order)."""
    from mechvit.runtime import forked_map

    names = list(models)
    groups = [g.tolist() for g in np.array_split(np.arange(len(names)), min(workers, len(names)))]

    def score(group: int):
        sub = {names[i]: models[names[i]] for i in groups[group]}
        # the first group's bar shows the progress (the groups are the same size, give or take one model)
        return robustness_matrix(sub, images, labels, corruptions, severities, progress=progress and group == 0,
                                 **kwargs)  # fmt: skip

    rows, extra = [], {}
    for _, out in forked_map(score, range(len(groups)), len(groups)):
        part, more = out if isinstance(out, tuple) else (out, {})
        rows += part
        extra.update(more)
    cells = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    where = {cell: i for i, cell in enumerate(cells)}
    rows.sort(key=lambda r: (where[(r["corruption"], r["severity"])], names.index(r["model"])))
    if not (kwargs.get("return_per_image") or kwargs.get("return_correct")):
        return rows
    return rows, {key: extra[key] for key in ((r["model"], r["corruption"], r["severity"]) for r in rows)}


def unchanged_corruptions(
    images: Float[Tensor, "n c h w"], corruptions: Sequence[str], severities: Sequence[int], *, seed: int = 0
) -> list[str]:
    """The corruptions that leave ``images`` unchanged at every severity (e.g. ``saturate`` on grayscale
    images: a colour-only change). They measure nothing and belong in neither "unseen" nor mCE."""
    from mechvit.corruptions import corrupt

    out = []
    for name in corruptions:
        if all(torch.equal(corrupt(images, name, sev, seed=seed), images.clamp(0, 1)) for sev in severities):
            out.append(name)
    return out


def _score(
    correct: dict[tuple[str, str, int], Tensor], model: str, cells: Sequence[tuple[str, int]]
) -> Tensor:
    """Per image: the fraction of ``cells`` (corruption, severity) that ``model`` classifies correctly."""
    return torch.stack([correct[(model, c, s)].double() for c, s in cells]).mean(0)


def robustness_estimates(
    correct: dict[tuple[str, str, int], Tensor],
    seen: dict[str, Sequence[str]],
    base: str,
    *,
    exclude: Sequence[str] = (),
    severities: Sequence[int] | None = None,
    trained: dict[str, Sequence[int]] | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, dict[str, Any]]:
    """Accuracy with 95% CIs over images, per model and group of cells, and paired differences.

    Groups (the cells of ``correct`` at ``severities``, all when None; corruptions in ``exclude`` left out):
    ``clean``; ``seen_trained`` (only with ``trained``, ``{model: severities it was fine-tuned at}``: its seen
    corruptions at those severities, whether or not they are among ``severities``); ``seen`` (the
    model's fine-tuning corruptions); ``unseen_same_family`` (the other corruptions of a seen corruption's
    family, :data:`mechvit.corruptions.FAMILY_OF`); ``unseen_other`` (every other corruption). A model's score
    on a group is, per image, the fraction of the group's cells it gets right; ``vs`` holds, for every other
    model, the paired difference (this model minus that one) on THIS model's groups, with its CI (bootstrap
    over images, pairs kept), for the groups whose every cell that model was scored on. Models without seen
    corruptions (the base, a clean fine-tune) have only ``clean`` and ``all_corrupted``.

    ``workers`` > 1 (CPU, Linux): the models' CIs are computed in that many forked one-thread processes
    (:func:`mechvit.runtime.forked_map`, one model per process, the costliest first); every CI gets the same
    arguments and seed as in one process, so the result is the same bit for bit, in the same order. Why: the
    bootstraps are one-thread numpy work; the default study's 252 CIs over 2,000 images took 15.1 s in one
    process and 7.7 s in two on 2 cores (benchmarks/bench_robustness_estimates.py)."""
    if isinstance(workers, bool) or int(workers) < 1:
        raise ValueError(f"workers must be a number of processes >= 1, got {workers!r}")
    models = list(dict.fromkeys(m for m, _, _ in correct))
    if base not in models:
        raise ValueError(f"base model {base!r} not among the evaluated models {models}")
    every = {(c, s) for _, c, s in correct if c != "clean" and c not in exclude}
    cells = sorted(cs for cs in every if severities is None or cs[1] in severities)
    plans = {
        m: _estimate_groups(correct, models, m, set(seen.get(m, ())), every, cells, trained) for m in models
    }

    def one(m: str) -> dict[str, Any]:
        return _estimate_model(correct, m, *plans[m], confidence=confidence, seed=seed)

    if int(workers) == 1 or len(models) == 1:
        return {m: one(m) for m in models}
    from mechvit.runtime import forked_map

    # the costliest models start first (most CIs; fresh processes per model), so the last to finish is short
    order = sorted(models, key=lambda m: -(len(plans[m][1]) + sum(len(g) for g in plans[m][2].values())))
    done = dict(forked_map(one, order, int(workers)))
    return {m: done[m] for m in models}


def _estimate_groups(
    correct: dict[tuple[str, str, int], Tensor],
    models: list[str],
    m: str,
    s: set[str],
    every: set[tuple[str, int]],
    cells: list[tuple[str, int]],
    trained: dict[str, Sequence[int]] | None,
) -> tuple[list[str], dict[str, list[tuple[str, int]]], dict[str, list[str]]]:
    """Model ``m``'s seen corruptions ``s`` (sorted), its groups of cells (from ``every`` cell; ``cells``:
    those at the study's severities; see :func:`robustness_estimates`) and, per other model, the groups
    whose every cell that model was scored on."""
    from mechvit.corruptions import FAMILY_OF

    fams = {FAMILY_OF.get(c) for c in s}
    groups = {"clean": [("clean", 0)]}
    if s and trained and trained.get(m):
        groups["seen_trained"] = sorted(cs for cs in every if cs[0] in s and cs[1] in trained[m])
    if s:
        groups["seen"] = [cs for cs in cells if cs[0] in s]
        groups["unseen_same_family"] = [cs for cs in cells if cs[0] not in s and FAMILY_OF.get(cs[0]) in fams]
        groups["unseen_other"] = [cs for cs in cells if cs[0] not in s and FAMILY_OF.get(cs[0]) not in fams]
    else:
        groups["all_corrupted"] = cells
    groups = {g: c for g, c in groups.items() if c}
    # a cell may be scored for only some models (seen_trained): no difference against the others there
    vs = {o: [g for g, c in groups.items() if all((o, *cs) in correct for cs in c)] for o in models if o != m}
    return sorted(s), groups, vs


def _estimate_model(
    correct: dict[tuple[str, str, int], Tensor],
    m: str,
    seen: list[str],
    groups: dict[str, list[tuple[str, int]]],
    vs: dict[str, list[str]],
    *,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """One model's entry of :func:`robustness_estimates`: its accuracy CIs and paired differences."""
    from mechvit.analysis.statistics import mean_ci, paired_difference_ci

    own = {g: _score(correct, m, c).numpy() for g, c in groups.items()}
    est = {g: mean_ci(own[g], confidence=confidence, seed=seed) for g in groups}
    diffs = {
        o: {
            g: paired_difference_ci(
                own[g],
                _score(correct, o, groups[g]).numpy(),
                confidence=confidence,
                seed=seed,
            )
            for g in gs
        }
        for o, gs in vs.items()
    }
    return {
        "seen": seen, "groups": {g: [f"{c}/{sv}" for c, sv in cs] for g, cs in groups.items()},
        "accuracy": est, "vs": diffs,
    }  # fmt: skip


def metric_cis(
    per_image: dict[str, Tensor],
    *,
    n_bins: int = 15,
    weights: np.ndarray | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of one cell (:func:`per_image_metrics` of its images) with a 95% percentile bootstrap CI
    over images: the means of ``top1``, ``top5``, ``confidence``, ``correct_prob``, ``nll``, and ``ece``
    (``n_bins`` equal-width bins as :func:`expected_calibration_error`; the bins stay those of the full
    sample, each resample re-weights their images). Pass the same ``weights``
    (:func:`mechvit.analysis.statistics.bootstrap_weights`) for cells of the same images to pair them."""
    from mechvit.analysis.statistics import weighted_bootstrap_ci

    x = {k: v.double().numpy() for k, v in per_image.items()}
    n = len(x["top1"])
    kw = dict(weights=weights, confidence=confidence, n_resamples=n_resamples, seed=seed)
    out = {
        k: weighted_bootstrap_ci(lambda w, v=x[k]: w @ v / w.sum(1), n, **kw)
        for k in ("top1", "top5", "confidence", "correct_prob", "nll")
    }
    conf = x["confidence"]
    b = np.clip(np.ceil(conf * n_bins).astype(int), 1, n_bins) - 1
    gap = np.zeros((n, n_bins))
    gap[np.arange(n), b] = x["top1"] - conf  # per image: (correct - confidence) in its bin's column
    out["ece"] = weighted_bootstrap_ci(lambda w: np.abs(w @ gap).sum(1) / w.sum(1), n, **kw)
    return out


def corruption_error_cis(
    correct: dict[tuple[str, str, int], Tensor],
    base: str,
    *,
    severities: Sequence[int] | None = None,
    exclude: Sequence[str] = (),
    weights: np.ndarray | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """mCE and relative mCE of every model (as :func:`corruption_errors`, from per-image correctness at
    ``severities``, corruptions in ``exclude`` left out) with 95% percentile bootstrap CIs over images: each
    resample draws the same images for every model and cell, so the base's errors and the model's move
    together. ``{model: {"mCE": Estimate, "relative_mCE": Estimate}}`` (fractions: 1.0 = as good as the base)."""
    from mechvit.analysis.statistics import bootstrap_weights, weighted_bootstrap_ci

    models = list(dict.fromkeys(m for m, _, _ in correct))
    if base not in models:
        raise ValueError(f"base model {base!r} not among the evaluated models {models}")
    cells = sorted({(c, s) for _, c, s in correct if c != "clean" and c not in exclude
                    and (severities is None or s in severities)})  # fmt: skip
    corrs = list(dict.fromkeys(c for c, _ in cells))
    n = len(next(iter(correct.values())))
    w = bootstrap_weights(n, n_resamples, seed=seed) if weights is None else weights

    keys = [k for k in correct if k[1] == "clean" or (k[1], k[2]) in cells]
    col = {k: i for i, k in enumerate(keys)}
    hits = np.stack([correct[k].double().numpy() for k in keys], 1)  # [n, cells]
    memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def err(m: str, c: str, s: int, w: np.ndarray) -> np.ndarray:
        if id(w) not in memo:  # every error of every cell under these weights: one matrix product
            memo[id(w)] = (w, 1.0 - (w @ hits) / w.sum(1)[:, None])
        return memo[id(w)][1][:, col[(m, c, s)]]

    def stat(m: str, relative: bool):
        def f(w: np.ndarray) -> np.ndarray:
            ces = []
            for c in corrs:
                sevs = [s for cc, s in cells if cc == c]
                sub_m = err(m, "clean", 0, w) if relative else 0.0
                sub_b = err(base, "clean", 0, w) if relative else 0.0
                num = sum(err(m, c, s, w) - sub_m for s in sevs)
                den = sum(err(base, c, s, w) - sub_b for s in sevs)
                ces.append(np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(np.stack(ces), 0)

        return f

    kw = dict(weights=w, confidence=confidence)
    out = {}
    for m in models:
        out[m] = {"mCE": weighted_bootstrap_ci(stat(m, False), n, **kw)}
        if (m, "clean", 0) in correct and (base, "clean", 0) in correct:
            out[m]["relative_mCE"] = weighted_bootstrap_ci(stat(m, True), n, **kw)
    return out


def corruption_errors(rows: list[dict], base: str) -> dict[str, dict[str, float]]:
    """ImageNet-C corruption errors of every model relative to model ``base``: ``{model: {corruption: CE,
    ..., "mCE": mean CE, "relative_mCE": mean relative CE}}`` (unnormalised: 1.0 = as good as the base)."""
    err = {(r["model"], r["corruption"], r["severity"]): 1 - r["top1"] for r in rows}
    models = sorted({r["model"] for r in rows})
    if base not in models:
        raise ValueError(f"base model {base!r} not among the evaluated models {models}")
    corrs = sorted({r["corruption"] for r in rows} - {"clean"})
    out = {}
    for m in models:
        ces, rel = {}, []
        for c in corrs:
            sevs = sorted(s for (mm, cc, s) in err if mm == m and cc == c)
            num = sum(err[m, c, s] for s in sevs)
            den = sum(err[base, c, s] for s in sevs)
            ces[c] = num / den if den > 0 else float("nan")
            if (m, "clean", 0) in err and (base, "clean", 0) in err:
                rnum = sum(err[m, c, s] - err[m, "clean", 0] for s in sevs)
                rden = sum(err[base, c, s] - err[base, "clean", 0] for s in sevs)
                rel.append(rnum / rden if rden > 0 else float("nan"))
        # a corruption that leaves the base's error unchanged (e.g. saturate on grey images) has no relative CE;
        # the means skip such undefined entries
        ces["mCE"] = _nanmean(list(ces.values()))
        ces["relative_mCE"] = _nanmean(rel)
        out[m] = ces
    return out


def _nanmean(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def seen_unseen_summary(
    rows: list[dict], seen: dict[str, Sequence[str]], ce: dict[str, dict[str, float]] | None = None
) -> list[dict]:
    """Per model: clean top-1, mean top-1 (and confidence) over its seen corruptions and over the unseen ones
    (all severities), and mCE when given. ``seen`` maps a model to the corruptions it was fine-tuned on."""
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        s = set(seen.get(m, ()))
        mine = [r for r in rows if r["model"] == m]
        clean = [r for r in mine if r["corruption"] == "clean"]
        seen_r = [r for r in mine if r["corruption"] in s]
        unseen_r = [r for r in mine if r["corruption"] != "clean" and r["corruption"] not in s]
        mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else float("nan")  # noqa: E731
        out.append({
            "model": m,
            "seen": sorted(s),
            "clean_top1": clean[0]["top1"] if clean else float("nan"),
            "seen_top1": mean(seen_r, "top1"),
            "unseen_top1": mean(unseen_r, "top1"),
            "seen_confidence": mean(seen_r, "confidence"),
            "unseen_confidence": mean(unseen_r, "confidence"),
            "mCE": (ce or {}).get(m, {}).get("mCE", float("nan")),
        })  # fmt: skip
    return out


def pivot_top1(
    rows: list[dict], severities: Sequence[int] | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """(models, corruptions, top-1 matrix [model, corruption]) averaged over ``severities`` (all if None)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    corrs = list(dict.fromkeys(r["corruption"] for r in rows))
    mat = np.full((len(models), len(corrs)), np.nan)
    for i, m in enumerate(models):
        for j, c in enumerate(corrs):
            v = [
                r["top1"] for r in rows
                if r["model"] == m and r["corruption"] == c
                and (c == "clean" or severities is None or r["severity"] in severities)
            ]  # fmt: skip
            if v:
                mat[i, j] = np.mean(v)
    return models, corrs, mat


def topk_accuracy(logits: Float[Tensor, "n k"], labels: Int[Tensor, " n"], k: int) -> float:
    """Fraction of images whose label is among the ``min(k, classes)`` largest logits."""
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy: expected at least one image, got 0")
    k = min(k, logits.shape[-1])
    return float((logits.topk(k, -1).indices == labels[:, None]).any(-1).double().mean())


def _readout_only(model):
    """``model`` called with ``readout_only=True`` where its forward takes it (HookedViT: the last block
    computes only the rows the pooling reads), else ``model`` itself."""
    try:
        takes = "readout_only" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return functools.partial(model, readout_only=True) if takes else model


__all__ = [
    "METRICS", "MetricAccumulator", "classification_metrics", "corruption_error_cis", "corruption_errors",
    "corruption_seed", "expected_calibration_error", "metric_cis", "per_image_metrics", "pivot_top1",
    "robustness_estimates", "robustness_matrix", "seen_unseen_summary", "topk_accuracy", "unchanged_corruptions",
]  # fmt: skip
