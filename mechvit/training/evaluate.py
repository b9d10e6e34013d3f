"""The ``mechvit evaluate`` command: the robustness matrix of checkpoint folders, written as CSV, JSON,
Markdown and a heatmap, optionally into the checkpoints' cards.

The metrics themselves (accuracy, ECE, NLL, corruption errors, the seeded robustness matrix) are pure
functions in :mod:`mechvit.analysis.robustness`; they are re-exported here for existing callers.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mechvit._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from mechvit._numbers import fmt_fixed
from mechvit.analysis.robustness import (  # noqa: F401  (re-exported: the evaluate command's API)
    METRICS,
    MetricAccumulator,
    classification_metrics,
    corruption_errors,
    corruption_seed,
    expected_calibration_error,
    pivot_top1,
    robustness_matrix,
    seen_unseen_summary,
)
from mechvit.training.cards import (
    ACCURACY,
    backfill_accuracy,
    block_from_rows,
    merge_block,
    record_from_accuracy,
)


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None, severities=None) -> str:
    """A markdown table of top-1 (%) per model x corruption (mean over ``severities``)."""
    models, corrs, mat = pivot_top1(rows, severities)
    if columns is not None:
        keep = [corrs.index(c) for c in columns if c in corrs]
        corrs, mat = [corrs[j] for j in keep], mat[:, keep]
    lines = ["| model | " + " | ".join(corrs) + " |", "|---" * (len(corrs) + 1) + "|"]
    for m, row in zip(models, mat, strict=True):
        lines.append(f"| {m} | " + " | ".join(_pct(float(v)) for v in row) + " |")
    return "\n".join(lines)


def _pct(v: float) -> str:
    """``v`` in % to 0.1, half up on its decimal value, as the cards' tables (:mod:`mechvit._numbers`)."""
    return "–" if v != v else fmt_fixed(v, 1, 100)


def summary_markdown(summary: list[dict]) -> str:
    """The seen/unseen summary as a markdown table (percentages; mCE 100 = as good as the base)."""
    lines = [
        "| model | seen | clean top-1 | seen top-1 | unseen top-1 | seen conf. | unseen conf. | mCE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [
            s["clean_top1"],
            s["seen_top1"],
            s["unseen_top1"],
            s["seen_confidence"],
            s["unseen_confidence"],
        ]
        cells = " | ".join(_pct(v) for v in [*cells, s["mCE"]])
        lines.append(f"| {s['model']} | {', '.join(s['seen']) or '–'} | {cells} |")
    return "\n".join(lines)


def heatmap(rows: list[dict], path: str | Path, title: str = "top-1 accuracy (mean over severities)") -> None:
    """A PNG heatmap of top-1 per model x corruption, annotated in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, corrs, mat = pivot_top1(rows)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(corrs), 1.2 + 0.45 * len(models)))
    im = ax.imshow(100 * mat, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(corrs)), corrs, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    for i in range(len(models)):
        for j in range(len(corrs)):
            v = 100 * mat[i, j]
            text = fmt_fixed(float(mat[i, j]), 0, 100)  # half up on the decimal value (mechvit._numbers)
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="w" if v < 60 else "k")
    fig.colorbar(im, ax=ax, label="top-1 %")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_results(out_dir: str | Path, rows: list[dict], summary: list[dict], ce: dict | None = None) -> dict:
    """Write ``robustness.csv``, ``robustness.json``, ``summary.md`` and ``robustness.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = ["model", "corruption", "severity", "n", *METRICS]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "robustness.csv", buf.getvalue())
    atomic_write_json(
        out_dir / "robustness.json", {"rows": rows, "corruption_errors": ce, "summary": summary}
    )
    md = summary_markdown(summary) + "\n\n" + markdown_table(rows) + "\n"
    atomic_write_text(out_dir / "summary.md", md)
    heatmap(rows, out_dir / "robustness.png")
    return {
        "csv": out_dir / "robustness.csv",
        "json": out_dir / "robustness.json",
        "png": out_dir / "robustness.png",
    }


@dataclass
class CheckpointEval:
    rows: list[dict]
    corruption_errors: dict | None
    summary: list[dict]


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    n_test: int | None = None,
    batch_size: int = 500,
    seed: int = 1234,
    base: str | None = None,
    device: str | None = None,
    update_cards: bool = False,
    progress: bool = True,
) -> CheckpointEval:
    """Evaluate checkpoint folders on their test set (from the first card's data config; every card must name
    the same dataset and image size, else a ``ValueError`` names both); the model names are the folder names,
    ``base`` (default: the first) is the mCE reference, seen corruptions come from each card. Each model sees
    its images normalised with its own card's ``data.mean``/``std`` (``card_normalisation``).
    ``update_cards`` writes each model's per-corruption top-1 into its card and merges the evaluation's
    settings into the card's ``evaluation`` (keys it does not set, e.g. ``n_test_clean``, are kept), and the
    counts behind them, their Wilson 95% CIs and which images were right into the card's ``accuracy`` block
    (:mod:`mechvit.training.cards`; its ``clean`` record, like the card's ``clean``, is kept, and a section
    the block lacks, e.g. the ``clean`` of a card written before cards had blocks, is recovered from the
    card's stored accuracies and named in ``derived``: :func:`complete_block`)."""
    from mechvit.corruptions import CORRUPTIONS
    from mechvit.training.checkpoint import card_normalisation, load_checkpoint, read_card, update_card
    from mechvit.training.config import DataConfig, from_dict
    from mechvit.training.data import Normalized, load_split

    if not checkpoints:
        raise ValueError("give at least one checkpoint folder")
    if n_test is not None and (isinstance(n_test, bool) or not n_test >= 1):
        raise ValueError(f"n_test must be None (every test image) or an integer >= 1, got {n_test!r}")
    cards = {Path(c).name: read_card(c) for c in checkpoints}
    if len(cards) != len(checkpoints):
        raise ValueError(f"checkpoint folder names must be distinct, got {[str(c) for c in checkpoints]}")
    data_cfgs = {
        name: from_dict(DataConfig, card.get("config", {}).get("data", {}) or {})
        for name, card in cards.items()
    }
    check_same_test_set(data_cfgs)
    data_cfg = dataclasses.replace(next(iter(data_cfgs.values())), limit_test=n_test)
    models = {
        name: Normalized(load_checkpoint(c), *card_normalisation(c))
        for name, c in zip(cards, checkpoints, strict=True)
    }
    test = load_split(data_cfg, "test", next(iter(models.values())).model)
    if not isinstance(test, tuple):
        xs, ys = zip(*[(x, y) for x, y in test], strict=True)
        test = (torch.stack(xs), torch.tensor(ys))
    corruptions = list(corruptions) if corruptions is not None else list(CORRUPTIONS)
    # with update_cards also which images each model gets right: the cards keep them (packed bits) for paired tests
    rows = robustness_matrix(
        models, *test, corruptions, severities, seed=seed, batch_size=batch_size, device=device,
        progress=progress, return_correct=update_cards,
    )  # fmt: skip
    rows, correct = rows if update_cards else (rows, None)
    base = base or next(iter(cards))
    ce = corruption_errors(rows, base) if corruptions else None
    seen = {n: (c.get("config", {}).get("corruption") or {}).get("seen", []) for n, c in cards.items()}
    summary = seen_unseen_summary(rows, seen, ce)
    if out is not None:
        write_results(out, rows, summary, ce)
    if update_cards:  # per-corruption top-1 on these images; the card's ``clean`` (whole test set) is kept
        corrupted = [r for r in rows if r["corruption"] != "clean"]
        for name, c in zip(cards, checkpoints, strict=True):
            fields = card_accuracy(corrupted, name, len(test[1]), seed, correct=correct)
            clean = next(r for r in rows if r["model"] == name and r["corruption"] == "clean")
            fields["evaluation"]["clean_top1_same_images"] = round(clean["top1"], 4)
            fields["accuracy"]["clean_same_images"] = {
                "top1": record_from_accuracy(
                    clean["top1"],
                    clean["n"],
                    f"{name} clean top1",
                    correct[(name, "clean", 0)],
                    decimals=None,
                )
            }
            # merged, not replaced: the training run's keys (n_test_clean, the size of ``clean``'s test set)
            # still describe the card's ``clean`` metrics, which this update keeps, and so does its record
            fields["evaluation"] = {**(cards[name].get("evaluation") or {}), **fields["evaluation"]}
            fields["accuracy"] = complete_block(
                {**cards[name], **fields}, merge_block(cards[name].get("accuracy"), fields["accuracy"]), name
            )
            update_card(c, **fields)
    return CheckpointEval(rows, ce, summary)


def complete_block(card: dict, block: dict, name: str) -> dict:
    """``block`` (an evaluation's records merged into the card's ``accuracy`` block) with the sections it still
    lacks, e.g. the ``clean`` of a card written before cards had blocks, recovered from the card's own stored
    accuracies and named in ``derived`` (:func:`mechvit.training.cards.backfill_accuracy`). Where that fails
    (a count that cannot be recovered exactly, a stale kept section) ``block`` is returned as it is, with a
    warning naming the card, the problem and what to run."""
    import warnings

    try:
        return backfill_accuracy({**card, ACCURACY: block})
    except ValueError as e:
        warnings.warn(
            f"{name}: the card's {ACCURACY} block holds this evaluation's records but not every stored "
            f"accuracy's ({e}); the docs tables refuse it until `mechvit cards` reports it complete "
            "(re-evaluate the checkpoint where a count cannot be recovered)",
            stacklevel=3,
        )
        return block


def check_same_test_set(data_cfgs: dict) -> None:
    """All checkpoints must have been trained on one dataset at one image size (their cards' ``config.data``):
    they are scored on one shared test set. A ``ValueError`` names the first two that differ."""
    items = list(data_cfgs.items())
    first, d0 = items[0]
    for name, d in items[1:]:
        for key in ("dataset", "img_size"):
            if getattr(d, key) != getattr(d0, key):
                raise ValueError(
                    f"cannot compare checkpoints trained on different data: {first}'s card has data.{key}="
                    f"{getattr(d0, key)!r} but {name}'s has data.{key}={getattr(d, key)!r} (one test set is "
                    "shared by every model; evaluate them separately)"
                )


def card_accuracy(rows: list[dict], model: str, n_test: int, seed: int, correct: dict | None = None) -> dict:
    """The card fields of one model's evaluation: ``clean`` metrics (when the rows hold the clean images),
    ``corruption_top1`` ({corruption: {severity: top-1}}), ``evaluation`` (images, seed, severities) and
    ``accuracy``: every top-1 (and the clean top-5) as its count of ``n`` images with its Wilson 95% CI, plus
    which images were right where ``correct`` (``robustness_matrix(..., return_correct=True)``) says
    (:func:`mechvit.training.cards.block_from_rows`)."""
    mine = [r for r in rows if r["model"] == model]
    clean = next((r for r in mine if r["corruption"] == "clean"), None)
    per = {}
    for r in mine:
        if r["corruption"] != "clean":
            per.setdefault(r["corruption"], {})[str(r["severity"])] = round(r["top1"], 4)
    out = {"corruption_top1": per, "evaluation": {"n_test": n_test, "corruption_seed": seed}}
    if clean is not None:
        out["clean"] = {k: round(clean[k], 4) for k in METRICS}
    out["accuracy"] = block_from_rows(mine, model, correct)
    return out
