"""Checkpoint cards' accuracies with their uncertainty, and the docs tables rendered from the cards.

Every accuracy a card states has a record in the card's ``accuracy`` block: the number of images ``n``, the
count ``correct`` and its 95% Wilson interval ``ci`` (:func:`mechvit.analysis.statistics.proportion_ci`,
scipy's ``binomtest(...).proportion_ci``)::

    "accuracy": {
      "interval": "wilson", "confidence": 0.95,
      "clean": {"top1": {"n": 10000, "correct": 9018, "ci": [0.89581..., 0.90747...]}, "top5": {...}},
      "clean_same_images": {"top1": {"n": 2000, "correct": 1813, "ci": [...]}},
      "corruption_top1": {"gaussian_noise": {"1": {"n": 2000, "correct": 1779, "ci": [...]}, ...}, ...},
      "derived": ["clean", "clean_same_images", "corruption_top1"]
    }

``clean`` backs the card's ``clean.top1``/``top5`` (the whole test set), ``clean_same_images`` its
``evaluation.clean_top1_same_images`` and ``corruption_top1`` its ``corruption_top1`` (the evaluation's
``n_test`` images). The older keys stay as they were (other code reads them). ``derived`` names the sections
whose counts were recovered from the stored accuracy and ``n`` (:func:`backfill_accuracy`; exact, since the
accuracy x n must be an integer to 1e-9 and, the accuracy being rounded to 4 decimals, the only count that
rounds to it, else it is refused: in practice on n >= 20,000 images, where several counts round to each
accuracy) rather than counted by an evaluation.

An evaluation that kept which images it got right (training's, ``mechvit evaluate --update-cards``) also stores
them per top-1 record as ``correct_bits``: ``base64(numpy.packbits(correct, bitorder="little"))``, 336 characters per 2,000
images, so two checkpoints scored on the same images can be compared with a paired McNemar test without
re-evaluating (:func:`paired_test`). Records derived from a stored accuracy have no ``correct_bits``.

:func:`doc_blocks` renders the README's and docs/training.md's checkpoint tables from the cards (every
accuracy with its CI); ``make docs-cards`` writes them between the docs' block markers and
``tests/test_cards.py`` fails when a doc and the cards disagree.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechvit._numbers import fmt_fixed, fmt_sig
from mechvit.analysis.statistics import McNemarResult, mcnemar, proportion_ci
from mechvit.training.checkpoint import read_card, update_card

ACCURACY = "accuracy"  # the card's key of the block
INTERVAL, CONFIDENCE = "wilson", 0.95
SECTIONS = ("clean", "clean_same_images", "corruption_top1")
INTEGER_TOLERANCE = 1e-9  # |accuracy x n - round(accuracy x n)| allowed when recovering a count
CARD_DECIMALS = 4  # a card's accuracies are rounded to 4 decimals
CI_TOLERANCE = 1e-9  # how far a stored interval bound may be from scipy's on another machine


# ---- records ---------------------------------------------------------------------------------------------


def count_from_accuracy(
    accuracy: float, n: int, what: str = "accuracy", decimals: int | None = CARD_DECIMALS
) -> int:
    """The number of correct images behind ``accuracy`` on ``n`` images: ``accuracy x n`` when that is an
    integer to :data:`INTEGER_TOLERANCE` and, for an accuracy a card stored rounded to ``decimals`` (one with
    at most that many decimals), the only count ``m`` in ``0..n`` with ``round(m / n, decimals) == accuracy``;
    a ``ValueError`` otherwise (a rounded accuracy whose count cannot be recovered: re-evaluate rather than
    guess). From ``n = 20,000`` images on, several counts round to one 4-decimal accuracy, and where its
    accuracy x n is an integer (always, for n a multiple of 10,000) the first test alone would return one of
    them. ``decimals=None``: ``accuracy`` is an unrounded ``k / n`` (an evaluation's, :func:`block_from_rows`),
    whose count the first test recovers exactly."""
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer)) or int(n) != n or n < 1:
        raise ValueError(f"{what}: n must be an integer >= 1, got {n!r}")
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise ValueError(f"{what}: expected an accuracy in [0, 1], got {accuracy!r}")
    n = int(n)
    x = float(accuracy) * n
    k = round(x)
    if abs(x - k) > INTEGER_TOLERANCE:
        raise ValueError(
            f"{what}: accuracy {accuracy!r} x n {n} = {x!r} is not an integer (to {INTEGER_TOLERANCE:g}), so the "
            "count of correct images cannot be recovered from the card; re-evaluate the checkpoint "
            "(mechvit evaluate --update-cards) instead of rounding"
        )
    if decimals is not None and round(accuracy, decimals) == accuracy:
        half = 0.5 * 10.0**-decimals  # the counts within half a unit of the last decimal, and one either side
        lo, hi = max(0, math.floor((accuracy - half) * n) - 1), min(n, math.ceil((accuracy + half) * n) + 1)
        counts = [m for m in range(lo, hi + 1) if round(m / n, decimals) == accuracy]
        if len(counts) > 1:
            raise ValueError(
                f"{what}: accuracy {accuracy!r} is rounded to {decimals} decimals, and {len(counts)} counts of "
                f"n {n} images round to it ({counts[0]} to {counts[-1]}), so the count of correct images cannot "
                "be recovered from the card; re-evaluate the checkpoint (mechvit evaluate --update-cards) "
                "instead of guessing"
            )
    return int(k)


def _array(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def pack_correct(correct: Any) -> str:
    """Per-image correctness (booleans, 1 = right) as base64 of its bits, packed little-endian."""
    arr = _array(correct)
    if arr.ndim != 1:
        raise ValueError(f"per-image correctness must be a 1-D sequence of booleans, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isin(arr, (0, 1)))
    if len(bad):
        raise ValueError(
            f"per-image correctness must be booleans (or 0/1), got {arr[bad[0]].item()!r} at index {bad[0]} "
            f"({len(bad)} of {len(arr)} values are neither 0 nor 1)"
        )
    return base64.b64encode(np.packbits(arr.astype(bool), bitorder="little").tobytes()).decode("ascii")


def unpack_correct(bits: str, n: int) -> np.ndarray:
    """The ``n`` booleans :func:`pack_correct` packed into ``bits``."""
    raw = np.frombuffer(base64.b64decode(bits, validate=True), dtype=np.uint8)
    if len(raw) != math.ceil(n / 8):
        raise ValueError(f"correct_bits hold {len(raw)} bytes, {n} images need {math.ceil(n / 8)}")
    return np.unpackbits(raw, count=n, bitorder="little").astype(bool)


def accuracy_record(correct: int, n: int, per_image: Any = None) -> dict[str, Any]:
    """``{"n", "correct", "ci"}`` (Wilson 95%) of ``correct`` right out of ``n``; with ``per_image`` (which
    images were right, ``n`` booleans summing to ``correct``) also ``correct_bits``."""
    est = proportion_ci(correct, n, confidence=CONFIDENCE, method=INTERVAL)
    rec: dict[str, Any] = {
        "n": int(n),
        "correct": int(correct),
        "ci": [est.low, est.high],  # unrounded: a docs table rounds them once, to 0.1 pp
    }
    if per_image is not None:
        arr = _array(per_image)
        if arr.shape != (n,) or int(arr.astype(bool).sum()) != correct:
            raise ValueError(
                f"per-image correctness of shape {arr.shape} with {int(arr.astype(bool).sum())} right does not "
                f"match {correct} right of {n}"
            )
        rec["correct_bits"] = pack_correct(arr)
    return rec


def record_from_accuracy(
    accuracy: float,
    n: int,
    what: str = "accuracy",
    per_image: Any = None,
    decimals: int | None = CARD_DECIMALS,
) -> dict:
    """:func:`accuracy_record` of an accuracy on ``n`` images (its count by :func:`count_from_accuracy`: a
    card's accuracy rounded to ``decimals``, or ``decimals=None`` for an evaluation's unrounded one)."""
    return accuracy_record(count_from_accuracy(accuracy, n, what, decimals), n, per_image)


def record_accuracy(rec: Mapping[str, Any]) -> float:
    return rec["correct"] / rec["n"]


# ---- the block: written by an evaluation, or recovered from the stored accuracies -------------------------


def new_block(**sections: Any) -> dict[str, Any]:
    return {"interval": INTERVAL, "confidence": CONFIDENCE, **sections}


def block_from_rows(rows: Sequence[Mapping], model: str, correct: Mapping | None = None) -> dict[str, Any]:
    """The ``accuracy`` block of one model's robustness rows (``mechvit.analysis.robustness``: ``n`` and the
    unrounded ``top1``/``top5`` per cell): ``clean`` (top-1 and top-5) when the rows hold the clean images,
    ``corruption_top1`` for the others. ``correct`` (``robustness_matrix(..., return_correct=True)``'s
    ``{(model, corruption, severity): bool [n]}``) adds each cell's ``correct_bits``."""
    correct = correct or {}
    block: dict[str, Any] = {}
    for r in rows:
        if r["model"] != model:
            continue
        c, s = r["corruption"], r["severity"]
        hits = correct.get((model, c, s))
        rec = record_from_accuracy(r["top1"], r["n"], f"{model} {c}-{s} top1", hits, decimals=None)
        if c == "clean":
            top5 = record_from_accuracy(r["top5"], r["n"], f"{model} clean top5", decimals=None)
            block["clean"] = {"top1": rec, "top5": top5}
        else:
            block.setdefault("corruption_top1", {}).setdefault(c, {})[str(s)] = rec
    return new_block(**block)


def clean_n(card: Mapping[str, Any]) -> int | None:
    """The number of test images behind the card's ``clean`` metrics: ``evaluation.n_test_clean`` (written
    by training since it records it) or else ``data.n_test`` (the size of the test split it was scored on)."""
    ev, data = card.get("evaluation") or {}, card.get("data") or {}
    a, b = ev.get("n_test_clean"), data.get("n_test")
    if a is not None and b is not None and a != b:
        raise ValueError(f"the card's evaluation.n_test_clean ({a}) and data.n_test ({b}) disagree")
    return a if a is not None else b


def stored_sections(card: Mapping[str, Any]) -> list[str]:
    """The sections of the ``accuracy`` block the card has accuracies for (in :data:`SECTIONS`' order)."""
    ev = card.get("evaluation") or {}
    has = {
        "clean": "top1" in (card.get("clean") or {}),
        "clean_same_images": ev.get("clean_top1_same_images") is not None,
        "corruption_top1": bool(card.get("corruption_top1")),
    }
    return [s for s in SECTIONS if has[s]]


def derived_block(card: Mapping[str, Any], sections: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``accuracy`` sections (default: every one the card has accuracies for) recovered from the card's
    stored accuracies and image counts, exact counts only (:func:`count_from_accuracy`)."""
    ev = card.get("evaluation") or {}
    out: dict[str, Any] = {}
    for name in stored_sections(card) if sections is None else sections:
        if name == "clean":
            n, clean = clean_n(card), card["clean"]
            if n is None:
                raise ValueError(
                    "the card's clean metrics name no image count (evaluation.n_test_clean, data.n_test)"
                )
            out[name] = {
                k: record_from_accuracy(clean[k], n, f"clean.{k}") for k in ("top1", "top5") if k in clean
            }
        elif name == "clean_same_images":
            what = "evaluation.clean_top1_same_images"
            out[name] = {"top1": record_from_accuracy(ev["clean_top1_same_images"], ev.get("n_test"), what)}
        else:
            out[name] = {
                c: {
                    s: record_from_accuracy(v, ev.get("n_test"), f"corruption_top1.{c}.{s}")
                    for s, v in sevs.items()
                }
                for c, sevs in card["corruption_top1"].items()
            }
    return out


def backfill_accuracy(card: Mapping[str, Any]) -> dict[str, Any]:
    """The card's ``accuracy`` block with a record for every stored accuracy: the sections already there are
    kept (their ``correct_bits`` too), the missing ones recovered from the stored accuracies
    (:func:`derived_block`, named in ``derived``). A ``ValueError`` when a kept section disagrees with the
    card's accuracies (a stale block: :func:`accuracy_problems`) or a count cannot be recovered exactly."""
    old = dict(card.get(ACCURACY) or {})
    present = stored_sections(card)
    missing = [s for s in present if s not in old]
    block = new_block(**{s: old[s] for s in present if s in old}, **derived_block(card, missing))
    problems = accuracy_problems({**card, ACCURACY: block})
    if problems:
        raise ValueError(
            f"the card's {ACCURACY} block does not match its stored accuracies (a stale block: "
            + "; ".join(problems[:3])
            + "); re-evaluate, or remove the section to recover it from the accuracies"
        )
    derived = (set(old.get("derived") or []) & set(present)) | set(missing)
    if derived:
        block["derived"] = [s for s in SECTIONS if s in derived]
    return block


def merge_block(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``old`` with the sections of ``new`` (an evaluation's) replacing its own; those are no longer
    ``derived``."""
    out = {**(old or {}), **new}
    derived = [s for s in (old or {}).get("derived") or [] if s not in new]
    out.pop("derived", None)
    if derived:
        out["derived"] = derived
    return out


def accuracy_problems(card: Mapping[str, Any]) -> list[str]:
    """What is wrong with a card's ``accuracy`` block: a stored accuracy without its record, a record whose
    accuracy (rounded as the card rounds, 4 decimals) differs from the stored one, a CI that is not the
    Wilson interval of its counts, ``correct_bits`` that do not add up. Empty when the block is sound."""
    out: list[str] = []
    block = card.get(ACCURACY)
    if not block:
        return [f"no {ACCURACY} block (python -m mechvit.training cards <folder> --write adds it)"]
    if (block.get("interval"), block.get("confidence")) != (INTERVAL, CONFIDENCE):
        out.append(
            f"interval {block.get('interval')!r} at {block.get('confidence')!r}, expected wilson at 0.95"
        )
    ev = card.get("evaluation") or {}
    stored: list[tuple[str, float, dict | None]] = []
    for k in ("top1", "top5"):
        if k in (card.get("clean") or {}):
            stored.append((f"clean.{k}", card["clean"][k], (block.get("clean") or {}).get(k)))
    if ev.get("clean_top1_same_images") is not None:
        rec = (block.get("clean_same_images") or {}).get("top1")
        stored.append(("evaluation.clean_top1_same_images", ev["clean_top1_same_images"], rec))
    for c, sevs in (card.get("corruption_top1") or {}).items():
        for s, v in sevs.items():
            stored.append(
                (f"corruption_top1.{c}.{s}", v, ((block.get("corruption_top1") or {}).get(c) or {}).get(s))
            )
    for what, value, rec in stored:
        if rec is None:
            out.append(f"{what}: no record")
            continue
        if round(record_accuracy(rec), CARD_DECIMALS) != round(value, CARD_DECIMALS):
            out.append(f"{what}: the card says {value}, its record {rec['correct']}/{rec['n']}")
        expected = accuracy_record(rec["correct"], rec["n"])["ci"]
        ci = rec.get("ci")
        if not (
            isinstance(ci, list) and len(ci) == 2 and np.allclose(ci, expected, rtol=0, atol=CI_TOLERANCE)
        ):
            out.append(f"{what}: ci {rec.get('ci')} is not the Wilson 95% interval {expected}")
        if "correct_bits" in rec:
            try:
                hits = unpack_correct(rec["correct_bits"], rec["n"])
            except ValueError as e:
                out.append(f"{what}: {e}")
            else:
                if int(hits.sum()) != rec["correct"]:
                    out.append(
                        f"{what}: correct_bits hold {int(hits.sum())} right, the record {rec['correct']}"
                    )
    return out


def records(block: Mapping[str, Any]) -> Iterable[tuple[tuple[str, ...], dict]]:
    """Every ``(path, record)`` in an ``accuracy`` block, e.g. ``(("corruption_top1", "fog", "3"), {...})``."""

    def walk(path: tuple[str, ...], node: Any):
        if isinstance(node, dict) and "correct" in node and "n" in node:
            yield path, node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield from walk((*path, k), v)

    for name in SECTIONS:
        if name in block:
            yield from walk((name,), block[name])


# ---- paired comparisons ----------------------------------------------------------------------------------


def paired_test(card_a: Mapping, card_b: Mapping, *path: str | int) -> McNemarResult:
    """Exact McNemar test (:func:`mechvit.analysis.statistics.mcnemar`) of two checkpoints on the images of
    one record, from their cards' ``correct_bits``: ``path`` is e.g. ``("corruption_top1", "gaussian_blur", 4)``
    or ``("clean_same_images", "top1")``. The records must cover the same images: same ``n`` and, but for
    ``clean``, the same evaluation (``n_test``, ``corruption_seed``). A ``ValueError`` says what is missing."""
    recs = []
    for label, card in (("a", card_a), ("b", card_b)):
        node: Any = card.get(ACCURACY) or {}
        for p in path:
            node = (node or {}).get(str(p)) if isinstance(node, dict) else None
        if not isinstance(node, dict) or "correct" not in node:
            raise ValueError(f"card {label} has no accuracy record at {'.'.join(map(str, path))}")
        if "correct_bits" not in node:
            raise ValueError(
                f"card {label}'s record at {'.'.join(map(str, path))} has no per-image correctness (counts recovered "
                "from a stored accuracy, or a top-5 record); re-evaluate with mechvit evaluate --update-cards"
            )
        recs.append(node)
    if recs[0]["n"] != recs[1]["n"]:
        raise ValueError(f"the records cover {recs[0]['n']} and {recs[1]['n']} images: not the same images")
    if path[0] != "clean":
        keys = ("n_test", "corruption_seed")
        ea, eb = ({k: (c.get("evaluation") or {}).get(k) for k in keys} for c in (card_a, card_b))
        if ea != eb:
            raise ValueError(f"the cards' evaluations differ ({ea} vs {eb}): not the same images")
    a, b = (unpack_correct(r["correct_bits"], r["n"]) for r in recs)
    return mcnemar(a, b)


# ---- the docs' tables --------------------------------------------------------------------------------------


def read_cards(folders: Iterable[str | Path]) -> dict[str, dict]:
    """``{folder name: card}`` of checkpoint folders (``card.json`` each)."""
    return {Path(f).name: read_card(f) for f in folders}


def checkpoint_folders(root: str | Path = "checkpoints") -> list[Path]:
    """The checkpoint folders under ``root`` (those with a ``card.json``), by name."""
    return sorted(p.parent for p in Path(root).glob("*/card.json"))


def _parent(card: Mapping) -> str | None:
    init = card.get("init_from")
    if isinstance(init, dict):
        return init.get("path")
    return init or (card.get("config") or {}).get("init_from")


def _training(card: Mapping) -> tuple[list[str], list[int], dict | None]:
    cfg = card.get("config") or {}
    c = cfg.get("corruption") or {}
    seen = [] if c.get("p") == 0 else list(c.get("seen") or [])
    return seen, list(c.get("severities") or []) if seen else [], cfg.get("adversarial")


def order(cards: Mapping[str, Mapping]) -> list[str]:
    """Card names in the docs' order: trained from scratch first, then fine-tunes by what they were trained on
    (corruption, severities, adversarial; clean controls last), each recipe's seeds together."""

    def key(name: str):
        card = cards[name]
        seen, sevs, adv = _training(card)
        control = _parent(card) is not None and not seen and not adv
        seed = card.get("seed", (card.get("config") or {}).get("seed"))
        return (
            _parent(card) is not None,
            control,
            seen,
            sevs,
            json.dumps(adv),
            seed if seed is not None else -1,
            name,
        )

    return sorted(cards, key=key)


def recipe(card: Mapping) -> str:
    """How a checkpoint was made, in words, from its card's config (e.g. ``1 epoch from fmnist_vit_base on
    gaussian_blur severity 4 (p = 1); lr 0.0003, seed 0``)."""
    cfg = card.get("config") or {}
    epochs = cfg.get("epochs", card.get("epochs"))
    parent = _parent(card)
    text = f"{epochs} epoch{'' if epochs == 1 else 's'} " + (
        f"from `{Path(parent).name}`" if parent else "from scratch"
    )
    seen, sevs, adv = _training(card)
    c = cfg.get("corruption") or {}
    if seen:
        prob = c.get("p", 1)  # an explicit null names no probability: left out, as for PGD below
        text += f" on {' / '.join(seen)} severity {', '.join(map(str, sevs))}" + (
            f" (p = {fmt_sig(prob, 6)})" if prob is not None else ""
        )
    if adv:  # what the card's config names (an older or hand-written card may leave some out)
        eps, steps, prob = adv.get("eps"), adv.get("steps"), adv.get("p", 1)
        named = [
            f"eps {fmt_sig(eps, 6)}" if eps is not None else "",
            f"{steps} steps" if steps is not None else "",
        ]
        named_text = ", ".join(x for x in named if x)
        text += (
            ", PGD"
            + (f" {named_text}" if named_text else "")
            + (f" (p = {fmt_sig(prob, 6)})" if prob is not None else "")
        )
    if parent and not seen and not adv:
        text += ", clean images (the control)"
    details = []
    if cfg.get("lr") is not None:
        details.append(f"lr {fmt_sig(cfg['lr'], 6)}")
    seed = card.get("seed", cfg.get("seed"))
    if seed is not None:
        details.append(f"seed {seed}")
    return text + (f"; {', '.join(details)}" if details else "")


def _pct(x: float | Fraction) -> str:
    """``x`` in % to 0.1, rounded half up on its decimal value, the study's rule (:mod:`mechvit._numbers`):
    1681/2000 -> 84.1 (``f"{100 * 0.8405:.1f}"`` reads 84.0), for the Fraction or the float 0.8405 alike."""
    return fmt_fixed(x, 1, 100)


def _fmt_ci(accuracy: float | Fraction, ci: Sequence[float], percent_sign: bool = False) -> str:
    return f"{_pct(accuracy)}{'%' if percent_sign else ''} [{_pct(ci[0])}, {_pct(ci[1])}]"


def fmt(rec: Mapping, percent_sign: bool = False) -> str:
    """``90.2% [89.6, 90.7]`` (or without the ``%``) of a record."""
    return _fmt_ci(Fraction(rec["correct"], rec["n"]), rec["ci"], percent_sign)


def mean_of(recs: Sequence[Mapping]) -> dict[str, Any]:
    """The mean accuracy of several records (``accuracy``, an exact Fraction) with the mean of their Wilson
    bounds as its interval (``ci``): for cells scored on the same images that is conservative to the normal
    approximation (the SD of a mean is at most the mean of the SDs, for any correlation between the cells,
    and close to it when the cells err on nearly the same images); the exact interval needs per-image
    correctness, which not every card holds."""
    if not recs:
        raise ValueError("mean_of needs at least one record")
    return {
        "accuracy": sum((Fraction(r["correct"], r["n"]) for r in recs), Fraction(0)) / len(recs),
        "ci": [float(np.mean([r["ci"][0] for r in recs])), float(np.mean([r["ci"][1] for r in recs]))],
    }


def _fmt_mean(m: Mapping) -> str:
    return _fmt_ci(m["accuracy"], m["ci"])


def _block(card: Mapping, name: str) -> dict:
    problems = accuracy_problems(card)
    if problems:
        raise ValueError(f"{name}'s card: " + "; ".join(problems[:5]))
    return card[ACCURACY]


def checkpoints_table(cards: Mapping[str, Mapping]) -> str:
    """Every checkpoint: its recipe (from the card's config), clean top-1 on the whole test set with its
    Wilson 95% CI, and the card's wall time."""
    names = order(cards)
    recs = {n: _block(cards[n], n)["clean"]["top1"] for n in names}
    ns = {r["n"] for r in recs.values()}
    one_n = ns.pop() if len(ns) == 1 else None
    head = (
        f"clean top-1, {one_n:,} test images [Wilson 95% CI]" if one_n else "clean top-1 [Wilson 95% CI] (n)"
    )
    lines = [
        f"| checkpoint | recipe (the card's `config`) | {head} | wall time (card) |",
        "|---|---|---|---|",
    ]
    for n in names:
        cell = fmt(recs[n], percent_sign=True) + ("" if one_n else f" (n = {recs[n]['n']:,})")
        wall = cards[n].get("wall_time_s")
        wall = "–" if wall is None else f"{fmt_fixed(wall, 0, grouping=True)} s"
        lines.append(f"| `{n}` | {recipe(cards[n])} | {cell} | {wall} |")
    return "\n".join(lines) + "\n"


def _evaluated(cards: Mapping[str, Mapping]) -> list[str]:
    """The cards evaluated together by ``mechvit evaluate --update-cards`` (their ``evaluation`` holds
    ``clean_top1_same_images``), in :func:`order`; they must share the images and the corruption cells."""
    names = [
        n
        for n in order(cards)
        if (cards[n].get("evaluation") or {}).get("clean_top1_same_images") is not None
    ]
    if not names:
        raise ValueError("no card holds an evaluation of its own (evaluation.clean_top1_same_images)")
    first = cards[names[0]]
    keys = ("n_test", "corruption_seed")
    cells = lambda c: {(k, s) for k, sevs in (c.get("corruption_top1") or {}).items() for s in sevs}  # noqa: E731
    for n in names[1:]:
        c = cards[n]
        mine, theirs = ({k: x["evaluation"].get(k) for k in keys} for x in (c, first))
        if mine != theirs:
            raise ValueError(
                f"{n} and {names[0]} were evaluated on different images ({n}: {mine}, {names[0]}: {theirs})"
            )
        if cells(c) != cells(first):
            differ = sorted(
                [(k, s, n) for k, s in cells(c) - cells(first)]
                + [(k, s, names[0]) for k, s in cells(first) - cells(c)]
            )
            shown = ", ".join(f"{k}-{s} (only in {who})" for k, s, who in differ[:4])
            raise ValueError(
                f"{n} and {names[0]} hold different corruption cells: {len(differ)} differ, "
                + ("" if len(differ) <= 4 else "e.g. ")
                + shown
            )
    return names


def _common_prefix(names: Sequence[str]) -> str:
    """The common prefix of several names up to its last ``_`` ("" for one name)."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(list(names))
    return prefix[: prefix.rfind("_") + 1]


def evaluated_images(card: Mapping) -> str:
    """Which test images a card's evaluation (``evaluation.n_test``) scored, in words: every image of the test
    split (when the card's ``data.n_test`` is that many and its ``config.data`` set no ``limit_test``), else
    the first ``n_test`` (Fashion-MNIST, whose test files are in mixed class order) or, for an ImageFolder (in
    class order), the seeded stratified subset of ``n_test`` images that ``mechvit evaluate --n-test`` and
    ``data.limit_test`` take (:func:`mechvit.data.loading.stratified_order`)."""
    n = card["evaluation"]["n_test"]
    data, cfg_data = card.get("data") or {}, (card.get("config") or {}).get("data") or {}
    if data.get("n_test") == n and cfg_data.get("limit_test") is None:
        return f"all {n:,} test images"
    if (cfg_data.get("dataset") or data.get("dataset")) == "imagefolder":
        return f"a seeded stratified subset of {n:,} test images (`mechvit.data.loading.stratified_order`)"
    return f"the first {n:,} test images"


def _evaluation_caption(card: Mapping, what: str) -> str:
    ev = card["evaluation"]
    per = card["corruption_top1"]
    sevs = sorted({int(s) for v in per.values() for s in v})
    sev = f"{sevs[0]}-{sevs[-1]}" if sevs == list(range(sevs[0], sevs[-1] + 1)) else ", ".join(map(str, sevs))
    return (
        f"{what} On {evaluated_images(card)}, {len(per)} corruptions x severities {sev}, corruption "
        f"seed {ev['corruption_seed']} (the cards' `evaluation`); top-1 in %. A single cell's interval is its "
        "Wilson 95% CI; a mean over cells shows the mean of the cells' Wilson bounds, conservative for cells "
        "scored on the same images (`mechvit.training.cards.mean_of`). Percentages round half up on the decimal "
        "value, here and in the study's tables (1813 of 2,000 = 90.65% reads 90.7 in both; `mechvit._numbers`); "
        "the study's tables give bootstrap CIs over the images, not Wilson intervals."
    )


def robustness_table(cards: Mapping[str, Mapping]) -> str:
    """Seen vs unseen corruptions of the evaluated checkpoints: clean top-1 on the evaluation's images, the
    mean top-1 over the corruptions each was fine-tuned on and over the others (all severities), and mCE
    (ImageNet-C corruption errors relative to the first, in % of its errors; a ratio, with no CI here)."""
    from mechvit.analysis.robustness import corruption_errors

    names = _evaluated(cards)
    rows = []
    for n in names:
        c = cards[n]
        rows.append(
            {
                "model": n,
                "corruption": "clean",
                "severity": 0,
                "top1": c["evaluation"]["clean_top1_same_images"],
            }
        )
        rows += [
            {"model": n, "corruption": k, "severity": int(s), "top1": v}
            for k, sevs in c["corruption_top1"].items()
            for s, v in sevs.items()
        ]
    ce = corruption_errors(rows, names[0])
    lines = [
        _evaluation_caption(
            cards[names[0]],
            f"Seen vs unseen corruptions (mCE: % of `{names[0]}`'s corruption errors, no CI).",
        ),
        "",
        "| model | seen | clean top-1 | seen top-1 | unseen top-1 | mCE |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        block = _block(cards[n], n)
        seen = set(_training(cards[n])[0])
        per = block["corruption_top1"]
        seen_r = [r for k in per if k in seen for r in per[k].values()]
        unseen_r = [r for k in per if k not in seen for r in per[k].values()]
        cells = [
            fmt(block["clean_same_images"]["top1"]),
            _fmt_mean(mean_of(seen_r)) if seen_r else "–",
            _fmt_mean(mean_of(unseen_r)) if unseen_r else "–",
            fmt_fixed(ce[n]["mCE"], 1, 100),
        ]
        lines.append(f"| {n} | {', '.join(sorted(seen)) or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def corruption_table(cards: Mapping[str, Mapping]) -> str:
    """Top-1 per corruption (mean over severities) of the evaluated checkpoints, a column per checkpoint."""
    names = _evaluated(cards)
    prefix = _common_prefix(names)
    blocks = {n: _block(cards[n], n) for n in names}
    corrs = list(cards[names[0]]["corruption_top1"])
    short = [n[len(prefix) :] for n in names]
    lines = [
        _evaluation_caption(
            cards[names[0]],
            "Top-1 per corruption, the mean over severities"
            + (f" (checkpoints without their `{prefix}` prefix)." if prefix else "."),
        ),
        "",
        "| corruption | " + " | ".join(short) + " |",
        "|---" * (len(names) + 1) + "|",
        "| clean | " + " | ".join(fmt(blocks[n]["clean_same_images"]["top1"]) for n in names) + " |",
    ]
    for k in corrs:
        cells = [_fmt_mean(mean_of(list(blocks[n]["corruption_top1"][k].values()))) for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BLOCKS = {
    "checkpoints": checkpoints_table,
    "checkpoint_robustness": robustness_table,
    "checkpoint_corruptions": corruption_table,
}


def doc_blocks(folders: Iterable[str | Path] | None = None) -> dict[str, str]:
    """``{block name: Markdown}`` of the docs' checkpoint tables, from the cards of ``folders`` (default: every
    folder under ``checkpoints/``)."""
    cards = read_cards(checkpoint_folders() if folders is None else folders)
    return {name: render(cards) for name, render in BLOCKS.items()}


@dataclass(frozen=True)
class Backfill:
    """What :func:`backfill_cards` did to one checkpoint's card: its completed ``accuracy`` block holds
    ``records`` records, ``new`` of them not in the card's block before and ``dropped`` records the card's block
    held for accuracies the card no longer stores; ``state`` is ``"up to date"``, ``"to write"`` (the block is
    missing, incomplete or stale and ``write`` was not asked) or ``"written"``. ``str()`` is its line."""

    name: str
    records: int
    new: int
    state: Literal["up to date", "to write", "written"]
    dropped: int = 0

    def __str__(self) -> str:
        if self.state == "up to date":
            return f"{self.name}: {self.records} accuracy records, up to date"
        verb = "written" if self.state == "written" else "to write (--write)"
        gone = f", {self.dropped} dropped" if self.dropped else ""
        return f"{self.name}: {self.records} accuracy records ({self.new} new{gone}) {verb}"


def backfill_cards(folders: Iterable[str | Path], write: bool = False) -> list[Backfill]:
    """For each checkpoint folder, its card's ``accuracy`` block completed by :func:`backfill_accuracy`
    (written into the card with ``write``); returns a :class:`Backfill` per folder (``str()``: a line saying
    what changed)."""
    out = []
    for f in folders:
        card = read_card(f)
        try:
            block = backfill_accuracy(card)
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from e
        paths = {p for p, _ in records(block)}
        if block == card.get(ACCURACY):
            out.append(Backfill(Path(f).name, len(paths), 0, "up to date"))
            continue
        before = {p for p, _ in records(card.get(ACCURACY) or {})}
        state = "written" if write else "to write"
        out.append(Backfill(Path(f).name, len(paths), len(paths - before), state, len(before - paths)))
        if write:
            update_card(f, **{ACCURACY: copy.deepcopy(block)})
    return out
