"""Known answers for the patching uncertainty: bootstrap CI over images, split-half best position, the
denominator guard (mechvit.analysis.patching)."""

import warnings

import pytest
import torch

from mechvit.analysis.patching import (
    DENOM_NA_LOGITS,
    activation_patching,
    best_position_scores,
    bootstrap_scores,
    denominator_status,
)


def synthetic(n, scores, seed=0, noise=1.0):
    """Per-image LDs with a known population score per variant: LD_clean - LD_corr ~ N(5, 1) and LD_patched =
    LD_corr + score * (LD_clean - LD_corr) + N(0, noise)."""
    g = torch.Generator().manual_seed(seed)
    corr = torch.randn(n, generator=g, dtype=torch.float64)
    d = 5.0 + torch.randn(n, generator=g, dtype=torch.float64)
    s = torch.as_tensor(scores, dtype=torch.float64)
    ld = corr + s[..., None] * d + noise * torch.randn(*s.shape, n, generator=g, dtype=torch.float64)
    return ld, corr + d, corr


def test_bootstrap_ci_exact_when_every_image_has_the_score():
    ld, clean, corr = synthetic(30, [0.25, 0.7], noise=0.0)
    lo, hi = bootstrap_scores(ld, clean, corr, n_resamples=500)
    torch.testing.assert_close(lo, torch.tensor([0.25, 0.7]), atol=1e-6, rtol=0)
    torch.testing.assert_close(hi, torch.tensor([0.25, 0.7]), atol=1e-6, rtol=0)


def test_bootstrap_ci_covers_the_population_score_and_shrinks_with_n():
    covered, widths = 0, {}
    for seed in range(40):
        ld, clean, corr = synthetic(60, [0.6], seed=seed)
        lo, hi = bootstrap_scores(ld, clean, corr, n_resamples=1000, seed=seed)
        covered += int(lo[0] <= 0.6 <= hi[0])
    assert covered >= 34  # nominal 38 of 40
    for n in (40, 640):
        ld, clean, corr = synthetic(n, [0.6], seed=1)
        lo, hi = bootstrap_scores(ld, clean, corr, n_resamples=1000)
        widths[n] = float(hi[0] - lo[0])
    assert widths[640] < widths[40] / 2.5  # ~1/sqrt(16) = 1/4


def test_split_half_finds_the_real_best_position():
    true = torch.full((2, 20), 0.3)
    true[0, 7] = 0.9
    true[1, 3] = 0.8
    ld, clean, corr = synthetic(200, true, seed=3, noise=0.5)
    out = best_position_scores(ld, clean, corr, n_resamples=500)
    assert out["in_sample"]["position"] == [7, 3]
    for layer, want in enumerate([0.9, 0.8]):
        sh = out["split_half"]
        assert sh["low"][layer] <= want <= sh["high"][layer]
        assert sh["estimate"][layer] == pytest.approx(want, abs=0.08)


def test_split_half_removes_the_selection_bias_of_the_in_sample_maximum():
    # every position has the same score 0.5: the in-sample maximum over 30 noisy positions is biased upwards,
    # the held-out score of the chosen position is not
    ins, held = [], []
    for seed in range(20):
        ld, clean, corr = synthetic(16, torch.full((1, 30), 0.5), seed=seed, noise=2.0)
        out = best_position_scores(ld, clean, corr, n_resamples=200, seed=seed)
        ins.append(out["in_sample"]["estimate"][0])
        held.append(out["split_half"]["estimate"][0])
    mean_in, mean_held = sum(ins) / len(ins), sum(held) / len(held)
    assert mean_in > 0.5 + 0.15
    assert abs(mean_held - 0.5) < 0.08


def test_split_half_needs_four_images():
    ld, clean, corr = synthetic(3, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least 4 images"):
        best_position_scores(ld, clean, corr)


@pytest.mark.parametrize(
    ("den", "ci", "status"),
    [
        (-5.0, (-5.1, -4.9), "n/a"),  # sign-flipped: the corrupted run scores higher
        (0.22, (-0.014, 0.45), "n/a"),  # CI includes 0 (the default study's clean -> base row)
        (0.23, (0.033, 0.43), "n/a"),  # lower end under the threshold
        (0.6, (0.3, 0.9), "unstable"),
        (6.4, (5.32, 7.43), "ok"),  # one image of 32 flipped, yet a denominator far from 0
        (2.0, None, "ok"),
        (0.1, None, "n/a"),
    ],
)
def test_denominator_guard(den, ci, status):
    got, reason = denominator_status(den, ci)
    assert got == status
    assert f"{den:.3g}" in reason


def test_guard_on_a_constructed_sign_flipped_patching_result():
    import copy

    from test_analysis_patching import tiny

    model = tiny()
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.head.bias[0] += 5.0
    clean = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(6, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = activation_patching(model, clean, clean, y, corrupted_model=biased, progress=False)
    status, reason = res.denominator_status()
    assert status == "n/a" and "negative" in reason
    assert DENOM_NA_LOGITS > 0


def test_exact_sweep_keeps_per_image_lds_and_its_ci_brackets_the_scores():
    from test_analysis_patching import one_patch_corruption, tiny

    model = tiny()
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(8, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    corrupted = one_patch_corruption(clean, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = activation_patching(model, clean, corrupted, y, progress=False)
        attr = activation_patching(model, clean, corrupted, y, progress=False, method="attribution")
    assert res.per_image_ld.shape == (*res.values.shape, 8)
    mean = res.per_image_ld.mean(-1)
    torch.testing.assert_close(mean.float(), res.logit_diff, atol=1e-4, rtol=1e-4)
    lo, hi = res.score_ci(n_resamples=300)
    assert lo.shape == res.values.shape
    assert bool((lo <= res.values + 1e-5).all() and (res.values <= hi + 1e-5).all())
    best = res.best_position(n_resamples=100)
    assert len(best["split_half"]["estimate"]) == 2
    torch.testing.assert_close(
        torch.tensor(best["in_sample"]["estimate"]).float(), res.values.max(1).values, atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="per-image"):
        attr.score_ci()


def test_study_step_rows_ci_guard_and_sanity_note():
    import copy

    from test_analysis_patching import tiny

    from mechvit.study.result import StepResult
    from mechvit.study.steps.patching import HEADLINE, IN_SAMPLE, uncertainty

    model = tiny()
    with (
        torch.no_grad()
    ):  # 30x logits (scores are invariant to it): a denominator of ~3.7 logits, CI ~[2.3, 5]
        model.head.weight.mul_(30)
        model.head.bias.mul_(30)
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.head.bias[0] += 5.0
    clean = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    corrupted = torch.zeros_like(clean)
    with torch.no_grad():  # labels the clean run gets right
        y = model(clean).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        by_pos = {"c": activation_patching(model, clean, corrupted, y, progress=False)}
        by_layer = {"c": activation_patching(model, clean, corrupted, y, by="layer", progress=False)}
        y0 = torch.zeros(8, dtype=torch.long)  # every denominator is -5: sign-flipped, shown as n/a
        across = {
            "flip": activation_patching(model, clean, clean, y0, corrupted_model=biased, progress=False)
        }
    res = StepResult()
    res.metrics = {
        "within_by_position": {k: v.to_dict() for k, v in by_pos.items()},
        "within_by_layer": {k: v.to_dict() for k, v in by_layer.items()},
        "within_by_head": {},
        "across_models": {k: v.to_dict() for k, v in across.items()},
    }
    rows = uncertainty(res, by_pos, by_layer, {}, across)
    assert [r[:2] for r in rows] == [[HEADLINE, "c"], [HEADLINE, "flip"], [IN_SAMPLE, "c"]]
    assert rows[1][2:] == ["n/a", "n/a"]
    assert all("[" in cell for cell in rows[0][2:])  # every headline score carries its CI
    m = res.metrics
    assert m["across_models"]["flip"]["denominator_status"] == "n/a"
    assert "values_ci95" not in m["across_models"]["flip"]
    assert len(m["within_by_position"]["c"]["values_ci95"]["low"]) == 2
    assert (
        m["best_position_heldout"]["c"]["estimate"]
        == m["within_by_position"]["c"]["best_position"]["split_half"]["estimate"]
    )
    notes = " ".join(res.notes)
    assert "patching flip: scores shown as n/a" in notes and "negative" in notes
    assert "sanity check (not a finding)" in notes
    assert "whole-layer" not in " ".join(r[0] for r in rows)
