"""Known answers for the bootstrap CI of linear CKA over images (mechvit.analysis.similarity.linear_cka_ci)."""

import pytest
import torch

from mechvit.analysis.similarity import linear_cka, linear_cka_ci


def pair(n, d=4, s=1.0, seed=0):
    """X ~ N(0, I_d), Y = X + s E: population linear CKA = 1 / (1 + s^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x + s * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_vectorised_bootstrap_equals_the_loop_over_resampled_rows():
    x, y = pair(40, d=6)
    x = x + 3.0  # a shift changes nothing
    lo, hi = linear_cka_ci(x, y, n_resamples=200, seed=5)
    g = torch.Generator().manual_seed(5)
    draws = torch.randint(40, (200, 40), generator=g)
    reps = torch.tensor([linear_cka(x[d], y[d]) for d in draws], dtype=torch.float64)
    q = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert lo == pytest.approx(float(q[0]), abs=1e-9) and hi == pytest.approx(float(q[1]), abs=1e-9)


def test_ci_covers_the_population_value_and_shrinks_with_n():
    covered = sum(
        lo <= 0.5 <= hi
        for lo, hi in (linear_cka_ci(*pair(400, seed=s), n_resamples=500, seed=s) for s in range(30))
    )
    assert covered >= 25  # nominal 28.5 of 30
    w_small = (lambda ci: ci[1] - ci[0])(linear_cka_ci(*pair(100, seed=1), n_resamples=500))
    w_large = (lambda ci: ci[1] - ci[0])(linear_cka_ci(*pair(1600, seed=1), n_resamples=500))
    assert w_large < w_small / 2.5  # ~1/4 for 16x the images


def test_identical_representations_have_a_degenerate_ci_at_one():
    x, _ = pair(50)
    lo, hi = linear_cka_ci(
        x, x @ torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] * 3, n_resamples=100
    )
    assert lo == pytest.approx(1.0, abs=1e-9) and hi == pytest.approx(1.0, abs=1e-9)


def test_bad_input():
    x, y = pair(10)
    with pytest.raises(ValueError, match="same number"):
        linear_cka_ci(x, y[:9])
    with pytest.raises(ValueError, match="at least 3"):
        linear_cka_ci(x[:2], y[:2])


def test_layer_cka_attaches_a_ci_per_layer():
    from test_analysis_similarity import tiny

    from mechvit.analysis.similarity import layer_cka

    a, b = tiny(0), tiny(1)
    x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    r = layer_cka(a, x, b, token_reduction="cls", progress=False, n_resamples=300)
    lo, hi = r.linear_ci
    assert lo.shape == hi.shape == r.linear.shape
    assert bool((lo <= hi).all()) and bool((hi - lo > 0).all())
    ci = r.to_dict()["cka_linear_ci95"]
    assert ci["low"] == lo.tolist() and ci["n_resamples"] == 300
    assert "cka_linear_ci95" not in layer_cka(a, x, b, token_reduction="cls", progress=False).to_dict()
    with pytest.raises(ValueError, match="one example per image"):
        layer_cka(a, x, b, token_reduction="tokens", progress=False, n_resamples=10)


def test_study_table_cells_show_the_ci_only_where_there_is_one():
    from mechvit.analysis.similarity import CKAResult
    from mechvit.study.steps.cka import cells

    kw = dict(layers=["0", "1"], hook="resid_post", token_reduction="cls", n_examples=300)
    lin, deb = torch.tensor([0.9, 0.5]), torch.tensor([0.89, 0.49])
    with_ci = CKAResult(linear=lin, debiased=deb, linear_ci=(lin - 0.01, lin + 0.02), n_resamples=10, **kw)
    assert cells(with_ci) == ["0.900 [0.890, 0.920] / 0.890", "0.500 [0.490, 0.520] / 0.490"]
    assert cells(CKAResult(linear=lin, debiased=deb, **kw)) == ["0.900 / 0.890", "0.500 / 0.490"]


def test_study_cka_bias_check_counts_the_warning_condition():
    """The CKA step's count of intervals that fail linear_cka_ci's bias check: outside the interval, or more
    than half its width from the debiased value; results without a CI are not counted."""
    from mechvit.study.steps.cka import _bias_check

    results = [
        {"cka_linear": [0.5, 0.9], "cka_debiased": [0.5, 0.7], "cka_linear_ci95": {"low": [0.4, 0.85], "high": [0.6, 0.95]}},
        {"cka_linear": [0.5], "cka_debiased": [0.5], "cka_linear_ci95": {"low": [0.55], "high": [0.7]}},
        {"cka_linear": [0.3], "cka_debiased": [0.3]},
    ]  # fmt: skip
    assert _bias_check(results) == (3, 2)  # layer 2 of the first (0.2 > 0.05), the second (outside)
