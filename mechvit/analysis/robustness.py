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

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

METRICS = ("top1", "top5", "confidence", "correct_prob", "nll", "ece")


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

    def add(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.detach().double().cpu()
        labels = labels.detach().cpu()
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits [N, K] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        logp = logits.log_softmax(-1)
        p = logp.exp()
        conf, pred = p.max(-1)
        correct = (pred == labels).double()
        topk = logits.topk(self.k, -1).indices
        s = self.sums
        s["top1"] += correct.sum().item()
        s["top5"] += (topk == labels[:, None]).any(-1).double().sum().item()
        s["confidence"] += conf.sum().item()
        lp = logp.gather(1, labels[:, None])[:, 0]
        s["correct_prob"] += lp.exp().sum().item()
        s["nll"] += -lp.sum().item()
        self.n += len(labels)
        self.add_confidence(conf, correct)

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
) -> list[dict] | tuple[list[dict], dict[tuple[str, str, int], Tensor]]:
    """One row per (model, corruption, severity) with the metrics of ``METRICS``; the clean images are
    corruption ``"clean"``, severity 0. ``models`` map a name to a module taking [0, 1] images (wrap a
    normalising model in ``mechvit.data.Normalized``). With ``return_correct`` also ``{(model, corruption,
    severity): bool [N]}``, whether each image is classified correctly (for paired tests, CIs over images)."""
    from mechvit.corruptions import corrupt

    if len(labels) == 0:
        raise ValueError("robustness_matrix: expected at least one image, got 0")
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"expected images [N, C, H, W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cells = ([("clean", 0)] if include_clean else []) + [(c, s) for c in corruptions for s in severities]
    n_batches = math.ceil(len(labels) / batch_size)
    for m in models.values():
        m.eval().to(device)
    rows = []
    correct: dict[tuple[str, str, int], Tensor] = {}
    bar = tqdm(total=len(cells) * n_batches, desc="robustness", disable=not progress, unit="batch")
    # a corrupted batch equal to the clean one (e.g. saturate on grayscale images) reuses the clean logits:
    # the same input gives the same output, and the 8-model default study skips 1/20 of its forwards
    clean_logits: dict[tuple[str, int], Tensor] = {}
    for name, sev in cells:
        accs = {m: None for m in models}
        hits: dict[str, list[Tensor]] = {m: [] for m in models}
        for bi in range(n_batches):
            x0 = x = images[bi * batch_size : (bi + 1) * batch_size].to(device)
            y = labels[bi * batch_size : (bi + 1) * batch_size]
            if name != "clean":
                x = corrupt(x, name, sev, seed=corruption_seed(seed, name, sev, bi))
            reuse = include_clean and name != "clean" and torch.equal(x, x0)
            for mname, m in models.items():
                logits = clean_logits[(mname, bi)] if reuse else m(x)
                if name == "clean":
                    clean_logits[(mname, bi)] = logits
                if accs[mname] is None:
                    accs[mname] = MetricAccumulator(logits.shape[-1])
                accs[mname].add(logits, y)
                if return_correct:
                    hits[mname].append(logits.argmax(-1).cpu() == y.cpu())
            bar.update(1)
            bar.set_postfix_str(f"{name}-{sev}")
        for mname, a in accs.items():
            rows.append({"model": mname, "corruption": name, "severity": sev, **a.result()})
            if return_correct:
                correct[(mname, name, sev)] = torch.cat(hits[mname])
    bar.close()
    return (rows, correct) if return_correct else rows


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
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Accuracy with 95% CIs over images, per model and group of cells, and paired differences.

    Groups (all severities in ``correct``; corruptions in ``exclude`` left out): ``clean``; ``seen`` (the
    model's fine-tuning corruptions); ``unseen_same_family`` (the other corruptions of a seen corruption's
    family, :data:`mechvit.corruptions.FAMILY_OF`); ``unseen_other`` (every other corruption). A model's score
    on a group is, per image, the fraction of the group's cells it gets right; ``vs`` holds, for every other
    model, the paired difference (this model minus that one) on THIS model's groups, with its CI (bootstrap
    over images, pairs kept). Models without seen corruptions (the base, a clean fine-tune) have only
    ``clean`` and ``all_corrupted``."""
    from mechvit.analysis.statistics import mean_ci, paired_difference_ci
    from mechvit.corruptions import FAMILY_OF

    models = list(dict.fromkeys(m for m, _, _ in correct))
    if base not in models:
        raise ValueError(f"base model {base!r} not among the evaluated models {models}")
    cells = sorted({(c, s) for _, c, s in correct if c != "clean" and c not in exclude})
    out: dict[str, dict[str, Any]] = {}
    for m in models:
        s = set(seen.get(m, ()))
        fams = {FAMILY_OF.get(c) for c in s}
        groups = {"clean": [("clean", 0)]}
        if s:
            groups["seen"] = [cs for cs in cells if cs[0] in s]
            groups["unseen_same_family"] = [
                cs for cs in cells if cs[0] not in s and FAMILY_OF.get(cs[0]) in fams
            ]
            groups["unseen_other"] = [
                cs for cs in cells if cs[0] not in s and FAMILY_OF.get(cs[0]) not in fams
            ]
        else:
            groups["all_corrupted"] = cells
        groups = {g: c for g, c in groups.items() if c}
        est = {
            g: mean_ci(_score(correct, m, c).numpy(), confidence=confidence, seed=seed)
            for g, c in groups.items()
        }
        vs = {
            o: {
                g: paired_difference_ci(
                    _score(correct, m, c).numpy(),
                    _score(correct, o, c).numpy(),
                    confidence=confidence,
                    seed=seed,
                )
                for g, c in groups.items()
            }
            for o in models
            if o != m
        }
        out[m] = {
            "seen": sorted(s), "groups": {g: [f"{c}/{sv}" for c, sv in cs] for g, cs in groups.items()},
            "accuracy": est, "vs": vs,
        }  # fmt: skip
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


__all__ = [
    "METRICS", "MetricAccumulator", "classification_metrics", "corruption_errors", "corruption_seed",
    "expected_calibration_error", "pivot_top1", "robustness_matrix", "seen_unseen_summary", "topk_accuracy",
]  # fmt: skip
