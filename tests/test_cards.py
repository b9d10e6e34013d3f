"""Checkpoint cards' accuracies with their uncertainty (mechvit.training.cards) and the docs tables made from them.

The README's and docs/training.md's checkpoint tables are generated blocks: regenerate them with
``make docs-cards`` (``.venv/bin/python tests/test_cards.py --write-docs``), which puts
:func:`mechvit.training.cards.doc_blocks` between the docs' markers (``mechvit.study.summary``'s block
mechanism); :func:`test_docs_tables_are_the_cards` fails when a doc and the cards disagree.
"""

import json
import math
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # make docs-cards: this checkout's mechvit, not whichever one is installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402 (after the checkout's path)
import pytest  # noqa: E402

from mechvit._io import atomic_write_text  # noqa: E402
from mechvit.analysis.statistics import mcnemar  # noqa: E402
from mechvit.study import summary  # noqa: E402
from mechvit.training import cards as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the generated blocks every doc must hold (a deleted marker pair fails the test rather than going unchecked)
DOCS = {
    "README.md": ["checkpoints", "checkpoint_robustness"],
    "docs/training.md": ["checkpoints", "checkpoint_robustness", "checkpoint_corruptions"],
}


def shipped_folders() -> list[Path]:
    return C.checkpoint_folders(ROOT / "checkpoints")


def write_docs() -> list[str]:
    """Replace every doc's checkpoint blocks with the cards' tables; returns the files changed."""
    blocks = C.doc_blocks(shipped_folders())
    changed = []
    for doc, names in DOCS.items():
        path = ROOT / doc
        text = old = path.read_text()
        for name in names:
            text = summary.replace_block(text, blocks[name], name)
        if text != old:
            atomic_write_text(path, text)
            changed.append(doc)
    return changed


# ---- the Wilson interval ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, low, high",
    [  # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval without correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_known_answers(k, n, low, high):
    rec = C.accuracy_record(k, n)
    assert rec["n"] == n and rec["correct"] == k
    assert rec["ci"] == pytest.approx([low, high], abs=5e-5)


def test_wilson_interval_equals_statsmodels():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for k, n in [(9018, 10000), (1813, 2000), (0, 2000), (2000, 2000), (3, 7), (1, 1)]:
        lo, hi = proportion.proportion_confint(k, n, alpha=0.05, method="wilson")
        assert C.accuracy_record(k, n)["ci"] == pytest.approx([lo, hi], abs=1e-12), (k, n)


# ---- counts from stored accuracies -----------------------------------------------------------------------


def test_count_from_accuracy_is_exact_or_refused():
    assert C.count_from_accuracy(0.9018, 10000) == 9018  # 0.9018 * 10000 = 9017.999999999998 in floats
    assert C.count_from_accuracy(0.8405, 2000) == 1681
    assert C.count_from_accuracy(0.0, 5) == 0 and C.count_from_accuracy(1.0, 5) == 5
    assert C.count_from_accuracy(1 / 3, 3) == 1
    with pytest.raises(
        ValueError, match=r"corruption_top1\.fog\.3: accuracy 0\.1234 x n 3000 = .* is not an integer"
    ):
        C.count_from_accuracy(0.1234, 3000, "corruption_top1.fog.3")  # 370.2: rounded away, not recoverable
    with pytest.raises(ValueError, match="not an integer"):
        C.count_from_accuracy(0.33333, 3)  # 0.99999 is within 1e-5 of 1, not within 1e-9
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        C.count_from_accuracy(0.5, 0)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        C.count_from_accuracy(0.5, 2.5)
    with pytest.raises(ValueError, match=r"expected an accuracy in \[0, 1\], got 1\.2"):
        C.count_from_accuracy(1.2, 10)


def test_a_rounded_accuracy_that_several_counts_share_is_refused():
    """A card stores accuracies to 4 decimals. From 20,000 images on several counts round to one stored value,
    and at n = 50,000 (ImageNet's validation set) every 4-decimal accuracy x n is an integer: 45,123 right
    was stored as 0.9025 and came back as 45,125."""
    k, n = 45123, 50000
    stored = round(k / n, 4)
    assert stored == 0.9025 and stored * n == 45125  # the integer test alone passes, with the wrong count
    with pytest.raises(
        ValueError,
        match=r"clean\.top1: accuracy 0\.9025 is rounded to 4 decimals, and 5 counts of n 50000 images round "
        r"to it \(45123 to 45127\), so the count .* re-evaluate the checkpoint",
    ):
        C.count_from_accuracy(stored, n, "clean.top1")
    for acc in (0.0, 1.0, 0.5):  # 0 and 1 too: 0, 1 and 2 right all round to 0.0
        with pytest.raises(ValueError, match="counts of n 50000 images round to it"):
            C.count_from_accuracy(acc, n)
    card = _card(data={"n_test": n}, clean={"top1": stored, "top5": round(49321 / n, 4)})
    with pytest.raises(ValueError, match=r"clean\.top1: accuracy 0\.9025 is rounded to 4 decimals"):
        C.backfill_accuracy(card)
    # below 20,000 images one count rounds to each stored value: every count is recovered exactly
    for m in range(0, 2001):
        assert C.count_from_accuracy(round(m / 2000, 4), 2000) == m
    for m in range(0, 10001, 7):
        assert C.count_from_accuracy(round(m / 10000, 4), 10000) == m
    # an unrounded k / n (an evaluation's): exact, at any n
    assert C.count_from_accuracy(k / n, n) == k  # 0.90246: more than 4 decimals, so not a rounded value
    assert C.count_from_accuracy(45000 / n, n, decimals=None) == 45000
    row = {"model": "m", "corruption": "fog", "severity": 1, "n": n, "top1": 45000 / n}
    assert C.block_from_rows([row], "m")["corruption_top1"]["fog"]["1"]["correct"] == 45000


def _card(**over) -> dict:
    card = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {}},
        "data": {"n_test": 10000},
        "clean": {"top1": 0.9018, "top5": 0.9963, "nll": 0.35},
        "evaluation": {"n_test": 2000, "corruption_seed": 1234, "clean_top1_same_images": 0.9065},
        "corruption_top1": {"fog": {"1": 0.148, "2": 0.1195}, "snow": {"1": 0.5765, "2": 0.274}},
    }
    card.update(over)
    return card


def test_backfill_recovers_every_accuracy_and_refuses_a_non_integer_count():
    card = _card()
    block = C.backfill_accuracy(card)
    assert block["interval"] == "wilson" and block["confidence"] == 0.95
    assert block["clean"]["top1"]["correct"] == 9018 and block["clean"]["top1"]["n"] == 10000
    assert block["clean"]["top5"]["correct"] == 9963
    assert block["clean_same_images"]["top1"] == C.accuracy_record(1813, 2000)
    assert block["corruption_top1"]["fog"]["2"] == C.accuracy_record(239, 2000)
    assert block["derived"] == ["clean", "clean_same_images", "corruption_top1"]
    assert C.accuracy_problems({**card, "accuracy": block}) == []
    assert C.accuracy_problems(card) == [
        "no accuracy block (python -m mechvit.training cards <folder> --write adds it)"
    ]
    # n of the clean metrics: evaluation.n_test_clean where training wrote it, which must agree with data.n_test
    only_clean = _card(data={}, evaluation={"n_test_clean": 10000}, corruption_top1={})
    assert C.backfill_accuracy(only_clean)["clean"]["top1"]["n"] == 10000
    with pytest.raises(ValueError, match=r"corruption_top1\.fog\.1: n must be an integer >= 1, got None"):
        C.backfill_accuracy(_card(evaluation={}))  # no evaluation.n_test: the cells' n is unknown
    with pytest.raises(ValueError, match=r"n_test_clean \(5000\) and data\.n_test \(10000\) disagree"):
        C.backfill_accuracy(_card(evaluation={"n_test": 2000, "n_test_clean": 5000}))
    # a rounded accuracy whose count cannot be recovered is refused, not rounded
    with pytest.raises(
        ValueError, match=r"corruption_top1\.fog\.1: accuracy 0\.1483 x n 2000 = .* not an integer"
    ):
        C.backfill_accuracy(_card(corruption_top1={"fog": {"1": 0.1483}}))
    with pytest.raises(ValueError, match=r"clean\.top1: accuracy 0\.90183 x n 10000"):
        C.backfill_accuracy(_card(clean={"top1": 0.90183}))


def test_backfill_keeps_matching_records_and_refuses_a_stale_block():
    card = _card()
    bits = np.zeros(2000, dtype=bool)
    bits[:1813] = True
    measured = {"top1": C.accuracy_record(1813, 2000, bits)}  # as an evaluation writes it, with its bits
    card["accuracy"] = C.new_block(clean_same_images=measured)
    block = C.backfill_accuracy(card)
    assert block["clean_same_images"] == measured  # kept, bits and all, and not marked derived
    assert block["derived"] == ["clean", "corruption_top1"]
    assert C.backfill_accuracy({**card, "accuracy": block}) == block  # idempotent
    stale = dict(card, accuracy=C.new_block(clean_same_images={"top1": C.accuracy_record(1800, 2000)}))
    with pytest.raises(
        ValueError,
        match=r"block does not match its stored accuracies \(a stale block: evaluation\.clean_top1_same_images: the card says 0\.9065, its record 1800/2000",
    ):
        C.backfill_accuracy(stale)


def test_accuracy_problems_catch_a_wrong_record_ci_or_bits():
    card = _card()
    card["accuracy"] = C.backfill_accuracy(card)
    card["accuracy"]["corruption_top1"]["fog"]["1"]["correct"] = 297
    card["accuracy"]["corruption_top1"]["snow"]["1"]["ci"] = [0.55, 0.6]
    del card["accuracy"]["corruption_top1"]["snow"]["2"]
    card["accuracy"]["clean_same_images"]["top1"]["correct_bits"] = C.pack_correct(np.ones(2000, dtype=bool))
    problems = C.accuracy_problems(card)
    assert problems == [
        "evaluation.clean_top1_same_images: correct_bits hold 2000 right, the record 1813",
        "corruption_top1.fog.1: the card says 0.148, its record 297/2000",
        f"corruption_top1.fog.1: ci {C.accuracy_record(296, 2000)['ci']} is not the Wilson 95% interval "
        f"{C.accuracy_record(297, 2000)['ci']}",
        "corruption_top1.snow.1: ci [0.55, 0.6] is not the Wilson 95% interval "
        f"{C.accuracy_record(1153, 2000)['ci']}",
        "corruption_top1.snow.2: no record",
    ]
    card["accuracy"]["confidence"] = 0.9
    assert C.accuracy_problems(card)[0] == "interval 'wilson' at 0.9, expected wilson at 0.95"


# ---- per-image correctness and the round trip through a checkpoint folder --------------------------------


def test_packed_correctness_round_trip_and_size():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 2000, 10000):
        hits = rng.random(n) < 0.7
        bits = C.pack_correct(hits)
        assert np.array_equal(C.unpack_correct(bits, n), hits)
        assert len(bits) == 4 * math.ceil(math.ceil(n / 8) / 3)  # base64 of ceil(n / 8) bytes
    assert len(C.pack_correct(np.ones(10000, dtype=bool))) == 1668  # ~1.6 KB per 10,000 images
    with pytest.raises(ValueError, match="correct_bits hold 250 bytes, 2001 images need 251"):
        C.unpack_correct(C.pack_correct(np.ones(2000, dtype=bool)), 2001)
    with pytest.raises(
        ValueError,
        match=r"must be booleans \(or 0/1\), got 2 at index 2 \(1 of 3 values are neither 0 nor 1\)",
    ):
        C.pack_correct([0, 1, 2])
    with pytest.raises(ValueError, match=r"got 0\.5 at index 1 \(2 of 4"):
        C.pack_correct(np.array([1.0, 0.5, 0.0, -1.0]))
    with pytest.raises(ValueError, match=r"must be a 1-D sequence of booleans, got shape \(2, 2\)"):
        C.pack_correct(np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match=r"shape \(3,\) with 2 right does not match 3 right of 3"):
        C.accuracy_record(3, 3, [True, True, False])


def test_card_round_trip_through_a_checkpoint_folder(tmp_path):
    import timm

    from mechvit.training.checkpoint import read_card, save_checkpoint, update_card

    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    card = _card(model={"name": "vit_tiny_patch16_224", "kwargs": kw})
    save_checkpoint(tmp_path / "m", model, card)
    (pending,) = C.backfill_cards([tmp_path / "m"])
    assert (pending.state, pending.records, pending.new) == ("to write", 7, 7)
    assert str(pending) == "m: 7 accuracy records (7 new) to write (--write)"
    assert "accuracy" not in read_card(tmp_path / "m")
    (written,) = C.backfill_cards([tmp_path / "m"], write=True)
    assert written.state == "written" and str(written) == "m: 7 accuracy records (7 new) written"
    back = read_card(tmp_path / "m")
    assert back["accuracy"] == json.loads(
        json.dumps(C.backfill_accuracy(card))
    )  # floats survive JSON exactly
    assert {k: v for k, v in back.items() if k not in ("accuracy", "format", "weights")} == card
    assert C.accuracy_problems(back) == []
    assert [str(b) for b in C.backfill_cards([tmp_path / "m"])] == ["m: 7 accuracy records, up to date"]
    assert C.backfill_cards([tmp_path / "m"])[0].state == "up to date"
    update_card(tmp_path / "m", corruption_top1={"fog": {"1": 0.5}})  # a stale block after a hand edit
    with pytest.raises(
        ValueError,
        match=r"does not match its stored accuracies \(a stale block: corruption_top1\.fog\.1: the card says 0\.5",
    ):
        C.backfill_cards([tmp_path / "m"])
    update_card(tmp_path / "m", corruption_top1={})  # the card stops storing its corruption accuracies
    (shrunk,) = C.backfill_cards([tmp_path / "m"])
    assert (shrunk.state, shrunk.records, shrunk.new, shrunk.dropped) == ("to write", 3, 0, 4)
    assert str(shrunk) == "m: 3 accuracy records (0 new, 4 dropped) to write (--write)"
    C.backfill_cards([tmp_path / "m"], write=True)


def test_training_writes_the_counts_and_cis(tmp_path):
    """A card written by training: every accuracy has its counted record (no ``derived``) and every top-1
    which images were right (the bits count the record's hits; a paired test of the card with itself finds no
    discordant image)."""
    from test_training import tiny_cfg, toy_data

    from mechvit.training import train
    from mechvit.training.config import EvalConfig

    cfg = tiny_cfg(
        tmp_path, epochs=1, eval=EvalConfig(corruptions=["gaussian_noise"], severities=[1, 5], n_test=32)
    )
    card = json.loads(
        (train(cfg, data=(toy_data(64), toy_data(48, seed=1)), progress=False) / "card.json").read_text()
    )
    acc = card["accuracy"]
    assert C.accuracy_problems(card) == [] and "derived" not in acc
    assert acc["clean"]["top1"]["n"] == 48 and acc["corruption_top1"]["gaussian_noise"]["5"]["n"] == 32
    assert acc["clean"]["top1"]["correct"] / 48 == pytest.approx(card["clean"]["top1"], abs=5e-5)
    top1 = [(where, rec) for where, rec in C.records(acc) if where[-1] != "top5"]
    assert len(top1) == 3
    for where, rec in top1:
        assert "correct_bits" in rec, where
        assert int(C.unpack_correct(rec["correct_bits"], rec["n"]).sum()) == rec["correct"], where
    res = C.paired_test(card, card, "corruption_top1", "gaussian_noise", 5)
    assert res.a_only == res.b_only == 0
    assert C.backfill_accuracy(card) == acc  # nothing to recover


def test_paired_test_from_cards_equals_mcnemar_on_the_images():
    rng = np.random.default_rng(1)
    a, b = rng.random(2000) < 0.8, rng.random(2000) < 0.75
    card_a, card_b = _card(), _card()
    for card, hits in ((card_a, a), (card_b, b)):
        rec = C.accuracy_record(int(hits.sum()), 2000, hits)
        card["accuracy"] = C.new_block(corruption_top1={"fog": {"1": rec}})
    res = C.paired_test(card_a, card_b, "corruption_top1", "fog", 1)
    ref = mcnemar(a, b)
    assert (res.a_only, res.b_only, res.p_value) == (ref.a_only, ref.b_only, ref.p_value)
    with pytest.raises(ValueError, match=r"card a has no accuracy record at corruption_top1\.fog\.2"):
        C.paired_test(card_a, card_b, "corruption_top1", "fog", 2)
    card_c = _card(evaluation={"n_test": 2000, "corruption_seed": 7})
    card_c["accuracy"] = card_b["accuracy"]
    with pytest.raises(ValueError, match="evaluations differ"):
        C.paired_test(card_a, card_c, "corruption_top1", "fog", 1)
    derived = _card()
    derived["accuracy"] = C.backfill_accuracy(derived)
    with pytest.raises(
        ValueError, match="card b's record at corruption_top1.fog.1 has no per-image correctness"
    ):
        C.paired_test(card_a, derived, "corruption_top1", "fog", 1)


# ---- the docs' tables --------------------------------------------------------------------------------------


def test_tables_round_half_up_and_show_every_ci():
    assert (
        C._pct(C.Fraction(1681, 2000)) == "84.1"
    )  # 84.05 exactly: half up (the float 100 * 0.8405 says 84.0)
    assert C._pct(C.Fraction(1803, 2000)) == "90.2" and C._pct(0.0) == "0.0" and C._pct(1.0) == "100.0"
    base = _card(config={"epochs": 20, "lr": 0.001, "corruption": None}, seed=0, wall_time_s=3350.552)
    ft = _card(
        config={"epochs": 1, "lr": 0.0003, "corruption": {"seen": ["fog"], "severities": [2], "p": 1.0}},
        init_from={"path": "checkpoints/m_base", "sha256": "x"},
        seed=1,
        clean={"top1": 0.8405, "top5": 0.99},
        evaluation={"n_test": 2000, "corruption_seed": 1234, "clean_top1_same_images": 0.8405},
        corruption_top1={"fog": {"1": 0.2, "2": 0.3}, "snow": {"1": 0.6, "2": 0.4}},
    )
    cards = {"m_ft": ft, "m_base": base}
    for c in cards.values():
        c["accuracy"] = C.backfill_accuracy(c)
    assert C.order(cards) == ["m_base", "m_ft"]
    table = C.checkpoints_table(cards)
    assert table.splitlines() == [
        "| checkpoint | recipe (the card's `config`) | clean top-1, 10,000 test images [Wilson 95% CI] "
        "| wall time (card) |",
        "|---|---|---|---|",
        "| `m_base` | 20 epochs from scratch; lr 0.001, seed 0 | 90.2% [89.6, 90.7] | 3,351 s |",
        "| `m_ft` | 1 epoch from `m_base` on fog severity 2 (p = 1); lr 0.0003, seed 1 | 84.1% [83.3, 84.8] | – |",
    ]
    rob = C.robustness_table(cards).splitlines()
    mce = 100 * (1.5 / (0.852 + 0.8805) + 1.0 / (0.4235 + 0.726)) / 2  # fog's and snow's CE, against the base
    assert rob[3:] == [
        "|---|---|---|---|---|---|",
        "| m_base | – | 90.7 [89.3, 91.8] | – | 28.0 [26.2, 29.8] | 100.0 |",
        f"| m_ft | fog | 84.1 [82.4, 85.6] | 25.0 [23.2, 26.9] | 50.0 [47.9, 52.1] | {mce:.1f} |",
    ]
    corr = C.corruption_table(cards).splitlines()
    assert corr[2:5] == [
        "| corruption | base | ft |",
        "|---|---|---|",
        "| clean | 90.7 [89.3, 91.8] | 84.1 [82.4, 85.6] |",
    ]
    ft.pop("accuracy")
    with pytest.raises(ValueError, match="m_ft's card: no accuracy block"):
        C.checkpoints_table(cards)


def test_tables_say_which_cards_differ_and_how():
    """Cards evaluated on other images, or on other cells, cannot share a table: the error shows each card's
    values, and the cells that differ (a few of them, and how many)."""
    a, b = _card(), _card(evaluation={"n_test": 1000, "corruption_seed": 1234, "clean_top1_same_images": 0.9})
    with pytest.raises(
        ValueError,
        match=r"b and a were evaluated on different images \(b: \{'n_test': 1000, 'corruption_seed': 1234\}, "
        r"a: \{'n_test': 2000, 'corruption_seed': 1234\}\)",
    ):
        C._evaluated({"a": a, "b": b})
    b = _card(
        corruption_top1={"fog": {"1": 0.1, "3": 0.1}, "snow": {"1": 0.5}, "frost": {"1": 0.5, "2": 0.5}}
    )
    with pytest.raises(
        ValueError,
        match=r"b and a hold different corruption cells: 5 differ, e\.g\. fog-2 \(only in a\), fog-3 \(only "
        r"in b\), frost-1 \(only in b\), frost-2 \(only in b\)$",
    ):
        C._evaluated({"a": a, "b": b})
    b = _card(corruption_top1={"fog": {"1": 0.1, "2": 0.1}, "snow": {"1": 0.5}})
    with pytest.raises(ValueError, match=r"cells: 1 differ, snow-2 \(only in a\)$"):
        C._evaluated({"a": a, "b": b})


def test_recipe_and_caption_say_what_the_card_holds():
    adv = {"config": {"epochs": 1, "adversarial": {"eps": 0.03125, "steps": 10, "p": 0.5}}}
    assert C.recipe(adv) == "1 epoch from scratch, PGD eps 0.03125, 10 steps (p = 0.5)"
    assert (
        C.recipe({"config": {"epochs": 1, "adversarial": {"steps": 3}}})
        == "1 epoch from scratch, PGD 3 steps (p = 1)"
    )
    assert (
        C.recipe({"config": {"epochs": 2, "adversarial": {"p": 1}}}) == "2 epochs from scratch, PGD (p = 1)"
    )
    blur = {"config": {"epochs": 1, "corruption": {"seen": ["gaussian_blur"], "severities": [4]}}}
    assert C.recipe(blur) == "1 epoch from scratch on gaussian_blur severity 4 (p = 1)"
    blur["config"]["corruption"]["p"] = 0.125
    assert C.recipe(blur) == "1 epoch from scratch on gaussian_blur severity 4 (p = 0.125)"
    blur["config"]["corruption"]["p"] = None  # an explicit null names no probability: left out, no error
    assert C.recipe(blur) == "1 epoch from scratch on gaussian_blur severity 4"
    # the images an evaluation scored: Fashion-MNIST's first n, an ImageFolder's seeded stratified subset
    fmnist = _card(config={"data": {"dataset": "fashion_mnist"}})
    assert C._evaluation_caption(fmnist, "T.").startswith("T. On the first 2,000 test images, 2 corruptions")
    folder = _card(config={"data": {"dataset": "imagefolder", "root": "x"}}, data={"n_test": 50000})
    assert C._evaluation_caption(folder, "T.").startswith(
        "T. On a seeded stratified subset of 2,000 test images (`mechvit.data.loading.stratified_order`), 2 "
    )
    whole = _card(data={"n_test": 2000})
    assert C._evaluation_caption(whole, "T.").startswith("T. On all 2,000 test images, ")
    limited = _card(config={"data": {"dataset": "imagefolder", "limit_test": 2000}}, data={"n_test": 2000})
    assert C.evaluated_images(limited).startswith("a seeded stratified subset of 2,000 test images")


def test_shipped_cards_carry_a_sound_accuracy_block():
    folders = shipped_folders()
    assert len(folders) == 14
    for f in folders:
        card = json.loads((f / "card.json").read_text())
        assert C.accuracy_problems(card) == [], f.name
        assert C.backfill_accuracy(card) == card["accuracy"], (
            f"{f.name}: run python -m mechvit.training cards"
        )


def test_docs_tables_are_the_cards():
    blocks = C.doc_blocks(shipped_folders())
    for doc, names in DOCS.items():
        text = (ROOT / doc).read_text()
        for name in names:
            assert summary.read_block(text, name) == blocks[name], (
                f"{doc}'s {name} table differs from the cards: regenerate it with `make docs-cards`"
            )


def test_cards_cli(tmp_path, capsys):
    from mechvit.training.cli import main

    main(["cards", *map(str, shipped_folders()[:2])])
    assert capsys.readouterr().out.splitlines() == [
        "fmnist_vit_base: 98 accuracy records, up to date",
        "fmnist_vit_clean_ft: 12 accuracy records, up to date",
    ]
    blocks = C.doc_blocks(shipped_folders())
    for name in C.BLOCKS:  # every table the docs hold, printed by the CLI as make docs-cards writes it
        main(["cards", *map(str, shipped_folders()), "--table", name])
        assert capsys.readouterr().out == blocks[name]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "card.json").write_text(json.dumps(_card(clean={"top1": 0.12345})))
    with pytest.raises(SystemExit) as e:
        main(["cards", str(tmp_path / "x"), "--write"])
    assert e.value.code == 2
    assert re.fullmatch(r"error: .*x: clean\.top1: accuracy 0\.12345 x n 10000 .*\n", capsys.readouterr().err)


def test_cards_cli_is_a_check_without_write(tmp_path, capsys):
    """Without --write, ``cards`` exits with status 1 when a card's block is missing or incomplete (as
    ``mechvit compare`` does when runs differ), so it can be a check; --write and --table exclude each other."""
    import subprocess

    from mechvit.training.cli import main

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "card.json").write_text(json.dumps(_card()))
    with pytest.raises(SystemExit) as e:
        main(["cards", str(tmp_path / "x")])
    assert e.value.code == 1
    assert capsys.readouterr().out.splitlines() == [
        "x: 7 accuracy records (7 new) to write (--write)",
        "cards to write: 1 of 1; rerun with --write to complete their accuracy blocks",
    ]
    main(["cards", str(tmp_path / "x"), "--write"])  # status 0
    assert capsys.readouterr().out == "x: 7 accuracy records (7 new) written\n"
    main(["cards", str(tmp_path / "x")])
    assert capsys.readouterr().out == "x: 7 accuracy records, up to date\n"
    with pytest.raises(SystemExit) as e:
        main(["cards", str(tmp_path / "x"), "--table", "checkpoints", "--write"])
    assert e.value.code == 2
    assert "argument --write: not allowed with argument --table" in capsys.readouterr().err
    # the module's own entry point, as a make target or CI would run it
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "card.json").write_text(json.dumps(_card()))
    cmd = [sys.executable, "-m", "mechvit.training", "cards"]
    done = subprocess.run(
        [*cmd, str(tmp_path / "x"), str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 1, done.stderr
    assert (
        done.stdout.splitlines()[-1]
        == "cards to write: 1 of 2; rerun with --write to complete their accuracy blocks"
    )
    done = subprocess.run([*cmd, str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT)
    assert (done.returncode, done.stderr) == (
        2,
        f"error: no card.json in {tmp_path / 'none'} (expected a mechvit checkpoint folder)\n",
    )


def test_write_docs_uses_this_checkouts_mechvit(tmp_path):
    """``make docs-cards`` (``python tests/test_cards.py --write-docs``) renders with the mechvit of the
    checkout it runs in, not an installed one (an editable install of another worktree): a copy of the
    checkout whose ``cards.py`` renders differently rewrites its own docs."""
    import shutil
    import subprocess

    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "mechvit", tree / "mechvit", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_cards.py", tree / "tests")
    for doc in DOCS:
        (tree / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tree / doc)
    for f in shipped_folders():
        (tree / "checkpoints" / f.name).mkdir(parents=True)
        shutil.copy(f / "card.json", tree / "checkpoints" / f.name)
    cards_py = tree / "mechvit" / "training" / "cards.py"
    text = cards_py.read_text()
    assert text.count("| checkpoint | recipe") == 1
    cards_py.write_text(text.replace("| checkpoint | recipe", "| checkpoint (copy) | recipe"))
    done = subprocess.run(
        [sys.executable, "tests/test_cards.py", "--write-docs"], cwd=tree, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "rewrote: README.md, docs/training.md\n"
    assert "| checkpoint (copy) | recipe" in (tree / "README.md").read_text()
    assert (ROOT / "README.md").read_text() != (tree / "README.md").read_text()


if __name__ == "__main__" and "--write-docs" in sys.argv:
    print("rewrote: " + (", ".join(write_docs()) or "nothing (the docs already hold the cards' tables)"))
