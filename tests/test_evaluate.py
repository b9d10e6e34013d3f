"""Robustness metrics: known answers, a brute-force reference, corruption errors, outputs."""

import csv
import json
import math

import numpy as np
import pytest
import timm
import torch

from mechvit.training.evaluate import (
    classification_metrics,
    corruption_errors,
    expected_calibration_error,
    markdown_table,
    robustness_matrix,
    seen_unseen_summary,
    summary_markdown,
    write_results,
)


def logits_for_probs(p: torch.Tensor) -> torch.Tensor:
    return p.log()


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
    # confidence 0.8 with 8 of 10 right, 0.5 with 5 of 10, 1.0 with 10 of 10: calibrated in every bin
    conf = torch.tensor([0.8] * 10 + [0.5] * 10 + [1.0] * 10, dtype=torch.float64)
    correct = torch.tensor([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5 + [1] * 10)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)


def test_ece_known_value_and_reference():
    conf = torch.full((10,), 0.9)
    assert expected_calibration_error(conf, torch.ones(10)) == pytest.approx(0.1)
    assert expected_calibration_error(conf, torch.zeros(10)) == pytest.approx(0.9)
    # against a plain numpy loop over 15 equal-width bins (lo, hi]
    rng = np.random.default_rng(0)
    c = rng.uniform(0.1, 1.0, 500)
    ok = rng.uniform(size=500) < c**2
    edges = np.linspace(0, 1, 16)
    ref = sum(
        abs(ok[m].mean() - c[m].mean()) * m.mean()
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        if (m := (c > lo) & (c <= hi)).any()
    )
    assert expected_calibration_error(torch.tensor(c), torch.tensor(ok)) == pytest.approx(ref, abs=1e-9)


def test_nll_top1_top5_confidence_of_known_distributions():
    k = 10
    uniform = torch.zeros(4, k)
    labels = torch.tensor([0, 3, 7, 9])
    m = classification_metrics(uniform, labels)
    assert m["nll"] == pytest.approx(math.log(k))
    assert m["confidence"] == pytest.approx(0.1) and m["correct_prob"] == pytest.approx(0.1)
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    m = classification_metrics(logits_for_probs(p), torch.tensor([0, 1]))
    assert m["top1"] == 0.5 and m["top5"] == 1.0  # top-5 is top-3 with 3 classes
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert m["correct_prob"] == pytest.approx(0.5) and m["confidence"] == pytest.approx(0.65)
    assert m["ece"] == pytest.approx(0.5 * abs(1 - 0.7) + 0.5 * abs(0 - 0.6))
    logits = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 20, (50,), generator=torch.Generator().manual_seed(1))
    top5 = (logits.topk(5, -1).indices == y[:, None]).any(-1).float().mean().item()
    assert classification_metrics(logits, y)["top5"] == pytest.approx(top5)
    assert classification_metrics(logits, y)["nll"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="expected logits"):
        classification_metrics(logits, y[:3])


def rows_from(top1: dict) -> list[dict]:
    return [{"model": m, "corruption": c, "severity": s, "top1": v, "confidence": 0.5, "n": 10}
            for (m, c, s), v in top1.items()]  # fmt: skip


def test_corruption_errors_as_in_imagenet_c():
    top1 = {
        ("base", "clean", 0): 0.9, ("ft", "clean", 0): 0.8,
        ("base", "blur", 1): 0.6, ("base", "blur", 2): 0.4, ("ft", "blur", 1): 0.8, ("ft", "blur", 2): 0.7,
        ("base", "noise", 1): 0.5, ("base", "noise", 2): 0.5, ("ft", "noise", 1): 0.4, ("ft", "noise", 2): 0.4,
    }  # fmt: skip
    ce = corruption_errors(rows_from(top1), base="base")
    assert ce["base"]["blur"] == pytest.approx(1.0) and ce["base"]["mCE"] == pytest.approx(1.0)
    assert ce["ft"]["blur"] == pytest.approx((0.2 + 0.3) / (0.4 + 0.6))
    assert ce["ft"]["noise"] == pytest.approx(1.2 / 1.0)
    assert ce["ft"]["mCE"] == pytest.approx((0.5 + 1.2) / 2)
    # relative CE: clean error subtracted first
    rel_blur = ((0.2 - 0.2) + (0.3 - 0.2)) / ((0.4 - 0.1) + (0.6 - 0.1))
    rel_noise = ((0.6 - 0.2) * 2) / ((0.5 - 0.1) * 2)
    assert ce["ft"]["relative_mCE"] == pytest.approx((rel_blur + rel_noise) / 2)
    # a corruption that leaves the base's error at its clean error has no relative CE; the mean skips it
    flat = {**top1, ("base", "saturate", 1): 0.9, ("ft", "saturate", 1): 0.8}
    ce_flat = corruption_errors(rows_from(flat), base="base")
    assert ce_flat["ft"]["relative_mCE"] == pytest.approx((rel_blur + rel_noise) / 2)
    assert ce_flat["ft"]["saturate"] == pytest.approx(0.2 / 0.1)
    with pytest.raises(ValueError, match="base model 'nope'"):
        corruption_errors(rows_from(top1), base="nope")
    s = seen_unseen_summary(rows_from(top1), {"ft": ["blur"]}, ce)
    ft = next(r for r in s if r["model"] == "ft")
    assert ft["seen_top1"] == pytest.approx(0.75) and ft["unseen_top1"] == pytest.approx(0.4)
    assert ft["clean_top1"] == 0.8 and ft["mCE"] == pytest.approx(0.85)
    base = next(r for r in s if r["model"] == "base")
    assert math.isnan(base["seen_top1"]) and base["unseen_top1"] == pytest.approx(0.5)
    md = summary_markdown(s)
    assert "| ft | blur | 80.0 | 75.0 | 40.0 |" in md
    assert "| base | – | 90.0 | – | 50.0 |" in md


def test_robustness_matrix_gives_every_model_identical_corrupted_images(tmp_path):
    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    m1 = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    m2 = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    args = (x, y, ["gaussian_noise", "gaussian_blur"], [1, 3])
    both = robustness_matrix({"a": m1, "b": m2, "a_again": m1}, *args, batch_size=8, seed=5, progress=False)
    alone = robustness_matrix({"b": m2}, *args, batch_size=8, seed=5, progress=False)
    assert len(both) == 3 * 5 and {r["corruption"] for r in both} == {
        "clean",
        "gaussian_noise",
        "gaussian_blur",
    }
    key = lambda r: (r["corruption"], r["severity"])  # noqa: E731
    for ra, rb in zip(
        [r for r in both if r["model"] == "a"], [r for r in both if r["model"] == "a_again"], strict=True
    ):
        assert ra == {**rb, "model": "a"}
    b_both = {key(r): r for r in both if r["model"] == "b"}
    for r in alone:
        assert r == b_both[key(r)]  # same images whether or not other models are evaluated alongside
    # the clean row is the model's plain accuracy; noise at severity 3 changes the predictions
    with torch.no_grad():
        assert b_both["clean", 0]["top1"] == pytest.approx((m2(x).argmax(-1) == y).float().mean().item())
    assert b_both["gaussian_noise", 3]["nll"] != b_both["clean", 0]["nll"]

    ce = corruption_errors(both, base="a")
    summary = seen_unseen_summary(both, {"b": ["gaussian_noise"]}, ce)
    paths = write_results(tmp_path / "res", both, summary, ce)
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(both) and float(table[0]["top1"]) == pytest.approx(both[0]["top1"])
    saved = json.loads(paths["json"].read_text())
    assert saved["corruption_errors"]["a_again"]["mCE"] == pytest.approx(1.0)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| a |" in markdown_table(both) and (tmp_path / "res" / "summary.md").exists()


def test_robustness_matrix_reuses_clean_logits_for_unchanged_images():
    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    rows, correct = robustness_matrix(
        {"m": model}, x, y, ["saturate", "gaussian_noise"], [3], batch_size=8, progress=False,
        return_correct=True,
    )  # fmt: skip
    assert calls == [8, 8, 4] * 2  # clean and noise; saturate leaves grayscale images unchanged: no forward
    by = {r["corruption"]: r for r in rows}
    assert {**by["saturate"], "corruption": "clean", "severity": 0} == by["clean"]
    assert torch.equal(correct[("m", "saturate", 3)], correct[("m", "clean", 0)])
    calls.clear()
    robustness_matrix(
        {"m": model}, x, y, ["saturate"], [3], batch_size=8, progress=False, include_clean=False
    )
    assert calls == [8, 8, 4]  # without the clean pass there is nothing to reuse


def test_robustness_matrix_rejects_mismatched_input():
    m = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="expected images"):
        robustness_matrix({"m": m}, torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long), [], progress=False)


def test_cli_train_then_evaluate_checkpoints_updates_cards(tmp_path, capsys):
    from test_training import write_image_folder

    from mechvit.training import read_card
    from mechvit.training.cli import main

    write_image_folder(tmp_path / "imgs", n_per_class=4, size=16)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"out: {tmp_path / 'base'}\n"
        "model: {name: vit_tiny_patch16_224, kwargs: {img_size: 16, patch_size: 8, in_chans: 3, num_classes: 2,"
        " embed_dim: 16, depth: 1, num_heads: 2}}\n"
        f"data: {{dataset: imagefolder, root: {tmp_path / 'imgs'}, test_split: val, img_size: 16}}\n"
        "epochs: 1\nbatch_size: 4\nwarmup_epochs: 0.0\neval: null\n"
    )
    main(["train", "--config", str(cfg), "--quiet"])
    main(["train", "--config", str(cfg), "--quiet", "--set", f"out={tmp_path / 'ft'}",
          "corruption={seen: [gaussian_noise], severities: [3], p: 1.0}"])  # fmt: skip
    capsys.readouterr()
    main(["evaluate", str(tmp_path / "base"), str(tmp_path / "ft"), "--corruptions", "gaussian_noise", "pixelate",
          "--severities", "1", "3", "--out", str(tmp_path / "res"), "--update-cards", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| ft | gaussian_noise |" in printed and "| base | – |" in printed
    saved = json.loads((tmp_path / "res" / "robustness.json").read_text())
    assert len(saved["rows"]) == 2 * (1 + 2 * 2) and saved["corruption_errors"]["base"][
        "mCE"
    ] == pytest.approx(1.0)
    card = read_card(tmp_path / "ft")
    assert set(card["corruption_top1"]) == {"gaussian_noise", "pixelate"}
    assert card["evaluation"]["n_test"] == 8 and "clean_top1_same_images" in card["evaluation"]
    assert card["clean"]["top1"] == card["evaluation"]["clean_top1_same_images"]  # the whole test set here
    row = next(
        r
        for r in saved["rows"]
        if r["model"] == "ft" and r["corruption"] == "pixelate" and r["severity"] == 3
    )
    assert card["corruption_top1"]["pixelate"]["3"] == pytest.approx(row["top1"], abs=1e-4)
    # the counts, Wilson CIs and per-image correctness behind every accuracy (mechvit.training.cards)
    from mechvit.training import cards

    rec = card["accuracy"]["corruption_top1"]["pixelate"]["3"]
    assert rec["n"] == row["n"] == 8 and rec["correct"] == round(row["top1"] * 8)
    assert rec == cards.accuracy_record(rec["correct"], 8, cards.unpack_correct(rec["correct_bits"], 8))
    assert cards.accuracy_problems(card) == []
    assert "derived" not in card["accuracy"]  # every record counted by an evaluation
    base = read_card(tmp_path / "base")
    test = cards.paired_test(base, card, "corruption_top1", "gaussian_noise", 1)
    assert test.n == 8 and 0 <= test.p_value <= 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # status 2, a line on stderr (1 is `cards`'s "blocks to write")
        main(["train", "--config", str(cfg), "--set", "epochz=2"])
    assert e.value.code == 2
    assert "c.yaml: epochz: unknown key; expected one of out, model" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [2, 3])
def test_robustness_matrix_in_forked_workers_equals_one_process(workers):
    """``workers``: the models split into groups scored in forked one-thread processes; the same rows, in the
    same order, and the same per-image results (also with the clean pass off and three groups of 1-2 models);
    a bad worker count or an accelerator is refused."""
    kw = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    models = {n: timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval() for n in "abcde"}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    args = (x, y, ["saturate", "gaussian_noise", "gaussian_blur"], [1, 3])
    for include_clean in (True, False):
        kw2 = dict(batch_size=8, seed=5, progress=False, include_clean=include_clean, return_per_image=True)
        one, per_one = robustness_matrix(models, *args, **kw2)
        many, per_many = robustness_matrix(models, *args, workers=workers, **kw2)
        assert many == one and list(per_many) == list(per_one)
        for key, v in per_one.items():
            assert v.keys() == per_many[key].keys()
            for name in v:
                assert torch.equal(v[name], per_many[key][name]), (key, name)
    rows, correct = robustness_matrix(
        models, *args, batch_size=8, progress=False, return_correct=True, workers=2
    )
    assert list(correct) == [(r["model"], r["corruption"], r["severity"]) for r in rows]
    assert robustness_matrix(models, *args, batch_size=8, progress=False, workers=2) == rows
    with pytest.raises(ValueError, match="workers must be a number of processes >= 1, got 0"):
        robustness_matrix(models, *args, progress=False, workers=0)
    with pytest.raises(ValueError, match="workers > 1 runs forked one-thread CPU processes; got device meta"):
        robustness_matrix(models, *args, progress=False, workers=2, device="meta")


# ------------------------------------------------------------------------- evaluate_checkpoints and the cards


def _checkpoint(folder, seed: int, data: dict, evaluation: dict | None = None):
    """A random-init 16 px RGB checkpoint whose card names ``data`` (and ``evaluation``)."""
    from mechvit.training.checkpoint import save_checkpoint

    kw = dict(img_size=16, patch_size=8, in_chans=3, num_classes=2, embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident logits: an input change moves the metrics clearly
    card = {"model": {"name": "vit_tiny_patch16_224", "kwargs": kw}, "config": {"data": data}}
    if evaluation is not None:
        card["evaluation"] = evaluation
    save_checkpoint(folder, model, card)
    return model


def test_evaluate_checkpoints_normalises_each_model_with_its_own_card(tmp_path):
    """A's card trained it on (x - 0.5) / 0.05, B's on raw images. Every model used to get the first card's
    normalisation, so A's and B's numbers depended on the argument order."""
    from test_training import write_image_folder

    from mechvit.data.loading import Normalized, as_tensors, load_split
    from mechvit.training.config import DataConfig
    from mechvit.training.evaluate import evaluate_checkpoints

    write_image_folder(tmp_path / "imgs", n_per_class=4, size=16)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "test_split": "val", "img_size": 16}
    models = {
        "A": _checkpoint(tmp_path / "A", 0, {**data, "mean": [0.5] * 3, "std": [0.05] * 3}),
        "B": _checkpoint(tmp_path / "B", 1, data),
    }
    x, y = as_tensors(load_split(DataConfig(**data), "test"))
    expected = {
        "A": classification_metrics(Normalized(models["A"], [0.5] * 3, [0.05] * 3)(x), y),
        "B": classification_metrics(models["B"](x), y),
    }
    wrong = classification_metrics(models["A"](x), y)  # A without its normalisation: other numbers
    assert abs(wrong["nll"] - expected["A"]["nll"]) > 0.1
    for order in (["A", "B"], ["B", "A"]):
        res = evaluate_checkpoints([tmp_path / n for n in order], corruptions=[], progress=False)
        for r in res.rows:
            for k in ("top1", "nll", "confidence"):
                assert r[k] == pytest.approx(expected[r["model"]][k], rel=1e-5, abs=1e-6), (
                    order,
                    r["model"],
                    k,
                )


def test_evaluate_checkpoints_refuses_cards_of_different_datasets(tmp_path):
    from mechvit.training.evaluate import evaluate_checkpoints

    _checkpoint(tmp_path / "fm", 0, {"dataset": "fashion_mnist"})
    _checkpoint(tmp_path / "folder", 1, {"dataset": "imagefolder", "root": "x", "img_size": 16})
    _checkpoint(tmp_path / "fm32", 2, {"dataset": "fashion_mnist", "img_size": 32})
    with pytest.raises(
        ValueError,
        match=r"different data: fm's card has data\.dataset='fashion_mnist' but folder's has "
        r"data\.dataset='imagefolder' \(one test set is shared",
    ):
        evaluate_checkpoints([tmp_path / "fm", tmp_path / "folder"], progress=False)
    with pytest.raises(
        ValueError, match=r"fm's card has data\.img_size=None but fm32's has data\.img_size=32"
    ):
        evaluate_checkpoints([tmp_path / "fm", tmp_path / "fm32"], progress=False)
    with pytest.raises(
        ValueError, match=r"n_test must be None \(every test image\) or an integer >= 1, got 0"
    ):
        evaluate_checkpoints([tmp_path / "fm"], n_test=0, progress=False)


def test_update_cards_merges_into_the_evaluation_section(tmp_path):
    """--update-cards used to replace the card's ``evaluation`` whole, dropping the training run's
    ``n_test_clean`` (the size of the test set behind the card's ``clean``, which the update keeps)."""
    from test_training import write_image_folder

    from mechvit.training import read_card
    from mechvit.training.evaluate import evaluate_checkpoints

    write_image_folder(tmp_path / "imgs", n_per_class=4, size=16)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "test_split": "val", "img_size": 16}
    old = {"n_test": 2000, "corruption_seed": 1, "n_test_clean": 10000}
    _checkpoint(tmp_path / "m", 0, data, evaluation=old)
    before = read_card(tmp_path / "m")
    evaluate_checkpoints([tmp_path / "m"], corruptions=["pixelate"], severities=[2], n_test=6, seed=7,
                         update_cards=True, progress=False)  # fmt: skip
    card = read_card(tmp_path / "m")
    ev = card["evaluation"]
    assert ev["n_test_clean"] == 10000  # kept
    assert ev["n_test"] == 6 and ev["corruption_seed"] == 7 and 0 <= ev["clean_top1_same_images"] <= 1
    assert set(card["corruption_top1"]) == {"pixelate"} and set(card["corruption_top1"]["pixelate"]) == {"2"}
    assert {k: v for k, v in card.items() if k not in ("evaluation", "corruption_top1", "accuracy")} == {
        k: v for k, v in before.items() if k != "evaluation"
    }
    # the accuracy block: the evaluation's records (with which images were right), the card's others kept
    acc = card["accuracy"]
    assert set(acc) == {"interval", "confidence", "clean_same_images", "corruption_top1"}
    assert (
        acc["corruption_top1"]["pixelate"]["2"]["n"] == 6
        and "correct_bits" in acc["clean_same_images"]["top1"]
    )
    assert acc["clean_same_images"]["top1"]["correct"] == round(ev["clean_top1_same_images"] * 6)


def test_update_cards_keeps_the_cards_clean_record(tmp_path):
    """A card whose ``accuracy`` block was recovered from its stored accuracies (the shipped ones): an
    evaluation replaces the sections it measures (no longer ``derived``) and keeps ``clean``, whose metrics
    it keeps too."""
    from test_training import write_image_folder

    from mechvit.training import cards, read_card
    from mechvit.training.checkpoint import update_card
    from mechvit.training.evaluate import evaluate_checkpoints

    write_image_folder(tmp_path / "imgs", n_per_class=4, size=16)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "test_split": "val", "img_size": 16}
    _checkpoint(
        tmp_path / "m", 0, data, evaluation={"n_test": 4, "corruption_seed": 1, "n_test_clean": 10000}
    )
    update_card(tmp_path / "m", clean={"top1": 0.9018, "top5": 0.9963}, corruption_top1={"fog": {"1": 0.25}})
    update_card(tmp_path / "m", accuracy=cards.backfill_accuracy(read_card(tmp_path / "m")))
    before = read_card(tmp_path / "m")["accuracy"]
    assert before["derived"] == ["clean", "corruption_top1"]
    evaluate_checkpoints([tmp_path / "m"], corruptions=["pixelate"], severities=[2], n_test=6, seed=7,
                         update_cards=True, progress=False)  # fmt: skip
    card = read_card(tmp_path / "m")
    assert card["accuracy"]["clean"] == before["clean"] and card["accuracy"]["derived"] == ["clean"]
    assert set(card["accuracy"]["corruption_top1"]) == {"pixelate"}
    assert cards.accuracy_problems(card) == []


def test_update_cards_completes_the_block_of_a_card_written_before_blocks(tmp_path):
    """A card with ``clean`` metrics and no ``accuracy`` block (any card written before blocks): the
    evaluation's records used to be all the block held, so ``clean`` had no record and the docs tables
    refused the card. Its ``clean`` records are recovered from the stored accuracies and named ``derived``."""
    from test_training import write_image_folder

    from mechvit.training import cards, read_card
    from mechvit.training.checkpoint import update_card
    from mechvit.training.evaluate import evaluate_checkpoints

    write_image_folder(tmp_path / "imgs", n_per_class=4, size=16)
    data = {"dataset": "imagefolder", "root": str(tmp_path / "imgs"), "test_split": "val", "img_size": 16}
    _checkpoint(tmp_path / "m", 0, data, evaluation={"n_test": 4, "corruption_seed": 1, "n_test_clean": 8})
    update_card(tmp_path / "m", clean={"top1": 0.5, "top5": 1.0})
    assert "accuracy" not in read_card(tmp_path / "m")
    evaluate_checkpoints([tmp_path / "m"], corruptions=["pixelate"], severities=[2], n_test=6, seed=7,
                         update_cards=True, progress=False)  # fmt: skip
    card = read_card(tmp_path / "m")
    acc = card["accuracy"]
    assert cards.accuracy_problems(card) == []
    assert acc["clean"] == {"top1": cards.accuracy_record(4, 8), "top5": cards.accuracy_record(8, 8)}
    assert acc["derived"] == ["clean"]  # recovered, not counted; the evaluation's sections are counted
    assert "correct_bits" in acc["corruption_top1"]["pixelate"]["2"]
    assert cards.backfill_accuracy(card) == acc  # what `mechvit cards` would write: nothing more
    # a clean accuracy whose count cannot be recovered: the evaluation's records are written, with a warning
    update_card(tmp_path / "m", clean={"top1": 0.123, "top5": 1.0}, accuracy=None)
    with pytest.warns(
        UserWarning,
        match=r"m: the card's accuracy block holds this evaluation's records but not "
        r"every stored accuracy's \(clean\.top1: accuracy 0\.123 x n 8 = .* not an integer",
    ):
        evaluate_checkpoints([tmp_path / "m"], corruptions=["pixelate"], severities=[2], n_test=6, seed=7,
                             update_cards=True, progress=False)  # fmt: skip
    card = read_card(tmp_path / "m")
    assert set(card["accuracy"]) == {"interval", "confidence", "clean_same_images", "corruption_top1"}
    assert cards.accuracy_problems(card) == ["clean.top1: no record", "clean.top5: no record"]
