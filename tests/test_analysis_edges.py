"""Edges of mechvit.analysis found by an audit with known answers: top-k Jaccard of rare features, SAEs with
no live feature, permutation tests with a group of one, alive masks of the wrong shape, non-integer labels,
empty inputs, and the bias warning of CKA's bootstrap CI."""

import itertools
import math
import warnings

import numpy as np
import pytest
import timm
import torch
from scipy import stats

from mechvit import HookedViT
from mechvit.analysis import collect_activations, layer_cka, logit_lens
from mechvit.analysis.overlap import SparseCodes, _topk_jaccard, feature_overlap
from mechvit.analysis.similarity import _hsic1, linear_cka, linear_cka_ci
from mechvit.analysis.statistics import _exact_relabelling, pairwise_label_permutation_test, permutation_test
from tests.test_analysis_overlap import standard_sae


def _jaccard_by_sets(img_a, img_b, k):
    out = []
    for m in range(img_a.shape[1]):
        sets = []
        for img in (img_a, img_b):
            top = img[:, m].topk(min(k, img.shape[0])).indices.tolist()
            sets.append({i for i in top if img[i, m] > 0})
        union = sets[0] | sets[1]
        out.append(len(sets[0] & sets[1]) / len(union) if union else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def test_topk_jaccard_counts_only_images_where_the_features_fire():
    img_a, img_b = torch.zeros(100, 3), torch.zeros(100, 3)
    img_a[[0, 1, 2], 0], img_b[[97, 98, 99], 0] = 1.0, 1.0  # rare and disjoint: 0, not the shared zero rows
    img_a[:30, 1], img_b[10:40, 1] = torch.rand(30) + 0.1, torch.rand(30) + 0.1  # common: sets of k = 20
    res = _topk_jaccard(img_a, img_b, 20)  # feature 2 fires nowhere: NaN
    assert res[0] == 0 and 0 < res[1] < 1 and math.isnan(res[2])
    torch.testing.assert_close(res, _jaccard_by_sets(img_a, img_b, 20), equal_nan=True)
    g = torch.Generator().manual_seed(0)
    sparse_a = torch.rand(60, 40, generator=g) * (torch.rand(60, 40, generator=g) < 0.1)
    sparse_b = torch.rand(60, 40, generator=g) * (torch.rand(60, 40, generator=g) < 0.3)
    torch.testing.assert_close(
        _topk_jaccard(sparse_a, sparse_b, 10), _jaccard_by_sets(sparse_a, sparse_b, 10), equal_nan=True
    )


def test_overlap_with_an_sae_that_never_fires_on_both_paths():
    dead, b = standard_sae(seed=2), standard_sae(seed=1)
    with torch.no_grad():
        dead.b_enc.fill_(-100.0)
    acts = torch.randn(10, 5, 8)
    for kw in ({}, {"codes_a": SparseCodes.encode(dead, acts)}):
        res = feature_overlap(dead, b, acts, acts, **kw)
        assert res.counts()["dead_a"] == 24 and res.counts()["persistent"] == 0
        assert math.isnan(res.mean_max_cos_a_to_b)
    res = feature_overlap(standard_sae(), b, acts, acts, alive_a=torch.zeros(24, dtype=torch.bool))
    assert res.counts()["dead_a"] == 24


@pytest.mark.parametrize(
    "alive", [torch.tensor([False]), torch.tensor([True]), torch.ones(5, dtype=torch.bool)]
)
def test_alive_masks_of_the_wrong_shape_are_refused_on_every_path(alive):
    a, b = standard_sae(), standard_sae(seed=1)
    acts = torch.randn(6, 5, 8)
    for kw in (
        {},
        {"acts_a": acts, "acts_b": acts},
        {"acts_a": acts, "acts_b": acts, "codes_a": SparseCodes.encode(a, acts)},
    ):
        with pytest.raises(ValueError, match=r"alive_a must be a bool tensor \[24\]"):
            feature_overlap(a, b, alive_a=alive, **kw)


def _brute_p(a, b, alternative):
    pooled = np.concatenate([a, b])
    obs = np.mean(a) - np.mean(b)
    null = []
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        m = np.zeros(len(pooled), bool)
        m[list(idx)] = True
        null.append(pooled[m].mean() - pooled[~m].mean())
    null = np.array(null)
    less, greater = np.mean(null <= obs + 1e-12), np.mean(null >= obs - 1e-12)
    return {"less": less, "greater": greater, "two-sided": min(1.0, 2 * min(less, greater))}[alternative]


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_test_with_a_group_of_one_is_the_exact_enumeration(alternative):
    for a, b in (([1.0], [2.0, 3.0, 4.0]), ([5.0], [2.0, 3.0, 4.0, 1.0, 0.5]), ([0.3, 0.1, 0.9], [0.2])):
        res = permutation_test(a, b, alternative=alternative)
        assert res.exact and res.n_permutations == len(a) + len(b)
        assert res.p_value == pytest.approx(_brute_p(np.array(a), np.array(b), alternative))
    rng = np.random.default_rng(3)  # the enumeration is scipy's exact test where scipy runs (2 + 3)
    for _ in range(5):
        a, b = rng.normal(size=2), rng.normal(size=3)
        ours = _exact_relabelling(a, b, lambda x, y: np.mean(x) - np.mean(y), alternative)[1]
        ref = stats.permutation_test(
            (a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
            permutation_type="independent", alternative=alternative, n_resamples=10,
        ).pvalue  # fmt: skip
        assert ours == pytest.approx(ref)


def test_pairwise_label_test_with_a_single_unit_group():
    m = np.array([[0, 0.1, 0.2, 0.3], [0.1, 0, 0.9, 0.8], [0.2, 0.9, 0, 0.7], [0.3, 0.8, 0.7, 0]])
    res = pairwise_label_permutation_test(m, ["a", "b", "b", "b"])
    # within pairs (b's three) 0.8 against across pairs 0.2: unit 0 is the odd one out of 4 relabellings
    assert res.statistic == pytest.approx(0.8 - 0.2) and res.p_value == pytest.approx(1 / 4)


def _tiny_model():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, num_classes=5,
    )  # fmt: skip
    return HookedViT.from_timm(vit).eval()


def test_float_labels_and_empty_inputs_get_clear_errors():
    model = _tiny_model()
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(ValueError, match="integer tensor"):
        logit_lens(model, x, torch.tensor([0.0, 2.7, 1.0, 3.0]))
    empty = torch.rand(0, 3, 32, 32)
    with pytest.raises(ValueError, match="expected at least one image, got 0 images"):
        collect_activations(model, empty, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="expected at least one image, got 0 images"):
        layer_cka(model, empty, model, empty, progress=False)
    with pytest.raises(ValueError, match="at least one example"):
        linear_cka(torch.zeros(0, 3), torch.zeros(0, 3))


def test_cka_ci_warns_when_plain_cka_is_biased_and_its_gram_debiasing_is_linear_ckas():
    g = torch.Generator().manual_seed(0)

    def pair(n, d, noise):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        return x, x @ torch.randn(d, d, generator=g, dtype=torch.float64) + noise * torch.randn(
            n, d, generator=g, dtype=torch.float64
        )

    x, y = pair(40, 150, 1.0)  # wide rows, few examples: plain CKA far above the debiased value
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l_ = xc @ xc.T, yc @ yc.T
    deb = _hsic1(k, l_, 40) / math.sqrt(_hsic1(k, k, 40) * _hsic1(l_, l_, 40))
    assert deb == pytest.approx(linear_cka(x, y, debiased=True), rel=1e-10)
    with pytest.warns(RuntimeWarning, match="is biased"):
        linear_cka_ci(x, y, n_resamples=200)
    x, y = pair(400, 4, 0.3)  # many examples of narrow, related rows: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = linear_cka_ci(x, y, n_resamples=200)
    assert low <= linear_cka(x, y) <= high


def test_cka_ci_of_degenerate_inputs_returns_an_interval_without_a_bias_verdict():
    """Inputs whose debiased CKA is undefined (identity rows, one image unlike the rest) still get their
    interval, as before the bias check; the check says nothing where a value is undefined."""
    from mechvit.analysis.similarity import cka_ci_biased

    eye = torch.eye(5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_cka_ci(eye, eye, n_resamples=50)
        one = torch.zeros(6, 3, dtype=torch.float64)
        one[0] = 1.0
        linear_cka_ci(one, one, n_resamples=50)
    assert not cka_ci_biased(0.5, math.nan, 0.4, 0.6)
    assert cka_ci_biased(0.5, 0.5, 0.55, 0.7) and cka_ci_biased(0.9, 0.7, 0.85, 0.95)
    assert not cka_ci_biased(0.9, 0.88, 0.85, 0.95)
