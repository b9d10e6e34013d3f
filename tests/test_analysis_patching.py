import copy
import warnings

import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.analysis.patching import GRANULARITY, activation_patching

LAYOUTS = {
    "cls": {},
    "none": {"class_token": False, "global_pool": "avg"},
    "cls_reg": {"reg_tokens": 2, "no_embed_class": True},
    "dist": {"model": "deit_tiny_distilled_patch16_224"},
}


def tiny(seed=0, **kw):
    name = kw.pop("model", "vit_tiny_patch16_224")
    torch.manual_seed(seed)
    m = timm.create_model(
        name,
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **kw,
    )
    with torch.no_grad():  # larger random weights than timm's init, so inputs give clearly different logits
        for p in m.parameters():
            p.normal_(0, 0.3)
    return HookedViT.from_timm(m).eval()


def one_patch_corruption(x, row, col, patch=7):
    y = x.clone()
    y[:, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = torch.rand_like(
        y[:, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
    )
    return y


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(6, 1, 28, 28, generator=g)
    return clean, torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_positions_follow_the_token_layout(layout, data):
    # Only patch (1, 2) differs: at layer 0, patching that token restores everything (1) and any other
    # token patches nothing (0); the reverse direction mirrors it. Holds for every prefix-token layout.
    model = tiny(**LAYOUTS[layout])
    clean, y = data
    corrupted = one_patch_corruption(clean, 1, 2)
    res = activation_patching(model, clean, corrupted, y, layers=[0], progress=False)
    target = model.token_labels().index("r1c2")
    expected = torch.zeros(model.cfg.n_tokens)
    expected[target] = 1.0
    torch.testing.assert_close(res.values[0], expected, atol=1e-4, rtol=0)
    assert res.labels["position"] == model.token_labels()
    prefix, grid = res.on_grid()
    assert grid.shape == (1, 4, 4) and float(grid[0, 1, 2]) == pytest.approx(1.0, abs=1e-4)
    assert len(prefix) == model.cfg.n_prefix_tokens
    back = activation_patching(
        model, clean, corrupted, y, layers=[0], direction="corrupted_to_clean", progress=False
    )
    torch.testing.assert_close(back.values[0], 1.0 - expected, atol=1e-4, rtol=0)


def test_whole_resid_pre_restores_clean_logits(data):
    model = tiny()
    clean, y = data
    corrupted = clean.flip(-1)
    res = activation_patching(model, clean, corrupted, y, by="layer", progress=False)
    torch.testing.assert_close(res.values, torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.logit_diff, torch.full((2,), res.clean_logit_diff), atol=1e-5, rtol=1e-5)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer in range(2):
        hook = (
            f"blocks.{layer}.hook_resid_pre",
            lambda act, hook, la=layer: cache[f"blocks.{la}.hook_resid_pre"],
        )
        torch.testing.assert_close(model.run_with_hooks(corrupted, fwd_hooks=[hook]), model(clean))


CASES = [(c, b) for c, bys in GRANULARITY.items() if c != "sae" for b in bys]


@pytest.mark.parametrize(("component", "by"), CASES)
def test_batched_equals_naive_loop(component, by, data):
    model = tiny(reg_tokens=1)
    clean, y = data
    corrupted = clean.flip(-2)
    kw = dict(component=component, by=by, positions=[0, 1, 5, 17], progress=False, batch_size=4, max_rows=9)
    fast = activation_patching(model, clean, corrupted, y, **kw)
    slow = activation_patching(model, clean, corrupted, y, batched=False, **kw)
    assert fast.dims == slow.dims and fast.values.shape == slow.values.shape
    torch.testing.assert_close(fast.values, slow.values, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(fast.values, torch.zeros_like(fast.values))


def test_batched_equals_naive_in_the_other_direction_and_across_models(data):
    base = tiny(seed=0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.blocks[1].parameters():
            p.add_(0.3 * torch.randn_like(p))
    clean, y = data
    for direction in ("clean_to_corrupted", "corrupted_to_clean"):
        kw = dict(corrupted_model=base, direction=direction, progress=False, max_rows=12)
        fast = activation_patching(tuned, clean, clean, y, **kw)
        slow = activation_patching(tuned, clean, clean, y, batched=False, **kw)
        torch.testing.assert_close(fast.values, slow.values, atol=2e-5, rtol=1e-4)
        # identical embeddings in both models: patching layer 0 changes nothing
        expected = 0.0 if direction == "clean_to_corrupted" else 1.0
        torch.testing.assert_close(
            fast.values[0], torch.full_like(fast.values[0], expected), atol=1e-4, rtol=0
        )
    # both models share the head: the whole last residual stream carries the source's answer
    res = activation_patching(
        tuned,
        clean,
        clean,
        y,
        corrupted_model=base,
        component="resid_post",
        by="layer",
        layers=[1],
        progress=False,
    )
    assert float(res.values[0]) == pytest.approx(1.0, abs=1e-4)


def _sae(d_in, d_sae, dead=()):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.W_dec.normal_(0, 0.5)
        sae.b_enc.zero_()
        for f in dead:
            sae.b_enc[f] = -1e6
    return sae


def test_sae_feature_patching(data):
    model = tiny()
    clean, y = data
    corrupted = clean.flip(-1)
    sae = _sae(32, 16, dead=(3,))
    for by in ("feature", "feature_position"):
        kw = dict(
            component="sae",
            by=by,
            sae=sae,
            sae_hook="blocks.0.hook_resid_post",
            features=[0, 3, 7],
            positions=[0, 4],
            progress=False,
            max_rows=10,
        )
        if by == "feature":
            kw.pop("positions")
        fast = activation_patching(model, clean, corrupted, y, **kw)
        slow = activation_patching(model, clean, corrupted, y, batched=False, **kw)
        # compare raw logit differences: the normalised score divides float32 rounding by (LD_clean - LD_corr),
        # which is only ~4e-3 for these random weights
        torch.testing.assert_close(fast.logit_diff, slow.logit_diff, atol=1e-5, rtol=1e-5)
        scale = abs(fast.clean_logit_diff - fast.corrupted_logit_diff)
        torch.testing.assert_close(fast.values, slow.values, atol=1e-6 / scale, rtol=1e-4)
        # a dead feature has the same (zero) code in both runs: patching it leaves the corrupted run as it is
        assert (fast.logit_diff[1] - fast.corrupted_logit_diff).abs().max() < 1e-5
        assert fast.labels["feature"] == ["0", "3", "7"]


def test_result_tables(data, tmp_path):
    model = tiny()
    clean, y = data
    res = activation_patching(model, clean, clean.flip(-1), y, component="z", by="head", progress=False)
    rows = res.rows()
    assert len(rows) == 4 and {"layer", "head", "score", "logit_diff"} <= set(rows[0])
    res.save_csv(tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().count("\n") == 5
    assert res.to_dict()["dims"] == ["layer", "head"]
    with pytest.raises(ValueError, match="position"):
        res.on_grid()


def test_bad_input(data):
    model = tiny()
    clean, y = data
    with pytest.raises(ValueError, match="component"):
        activation_patching(model, clean, clean.flip(-1), y, component="q")
    with pytest.raises(ValueError, match="not available"):
        activation_patching(model, clean, clean.flip(-1), y, component="resid_pre", by="head")
    with pytest.raises(ValueError, match="paired"):
        activation_patching(model, clean, clean[:3], y)
    with pytest.raises(ValueError, match="undefined"):
        activation_patching(model, clean, clean.clone(), y, progress=False)
    with pytest.raises(ValueError, match="positions"):
        activation_patching(model, clean, clean.flip(-1), y, positions=[99])
    with pytest.raises(ValueError, match="labels"):
        activation_patching(model, clean, clean.flip(-1), y[:2])
    with pytest.raises(ValueError, match="sae"):
        activation_patching(model, clean, clean.flip(-1), y, component="sae", by="feature")


def test_batched_without_start_at_layer(data, monkeypatch):
    # models without ``start_at_layer`` run the full forward for every chunk; results must not change
    import mechvit.analysis.patching as patching

    model = tiny()
    clean, y = data
    kw = dict(component="resid_mid", positions=[0, 3, 9], progress=False, max_rows=10)
    with_start = activation_patching(model, clean, clean.flip(-1), y, **kw)
    monkeypatch.setattr(patching, "_supports_start", lambda m: False)
    without = activation_patching(model, clean, clean.flip(-1), y, **kw)
    torch.testing.assert_close(with_start.values, without.values, atol=2e-5, rtol=1e-4)


def test_empty_input_is_a_clear_error(data):
    model = tiny()
    clean, y = data
    with pytest.raises(ValueError, match="clean_images: expected at least one image, got 0 images"):
        activation_patching(model, clean[:0], clean[:0].flip(-1), y[:0], progress=False)


def test_denominator_interval_and_sign_flips(data):
    from scipy import stats

    from mechvit.analysis.patching import best_other, logit_diff

    model = tiny()
    clean, y = data
    corrupted = clean.flip(-1)
    with torch.no_grad():
        lc, lr = model(clean), model(corrupted)
    other = best_other(lr, y)
    d = (logit_diff(lc, y, other) - logit_diff(lr, y, other)).double()
    half = stats.t.ppf(0.975, len(d) - 1) * float(d.std()) / len(d) ** 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = activation_patching(model, clean, corrupted, y, layers=[0], progress=False)
    assert res.n_sign_flipped == int((d <= 0).sum())
    lo, hi = res.denominator_ci
    assert lo == pytest.approx(float(d.mean()) - half, rel=1e-5)
    assert hi == pytest.approx(float(d.mean()) + half, rel=1e-5)
    assert res.to_dict()["denominator_ci"] == [lo, hi]
    # the warning fires exactly when the interval contains 0 or the mean is negative
    expect_warning = float(d.mean()) < 0 or lo <= 0 <= hi
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        activation_patching(model, clean, corrupted, y, layers=[0], progress=False)
    assert any("patching denominator" in str(w.message) for w in caught) == expect_warning


def test_sign_flipped_denominator_warns_and_keeps_the_definition(data):
    # Known answer: the "corrupted" model is the same model with +5 on class 0's head bias, the images are the
    # same and every label is 0, so each image's LD_corrupted = LD_clean + 5 (the other class is unchanged):
    # every denominator is -5, which warns; the scores keep their definition (0 = corrupted, 1 = clean run).
    model = tiny()
    biased = copy.deepcopy(model)
    with torch.no_grad():
        biased.head.bias[0] += 5.0
    clean, _ = data
    y = torch.zeros(len(clean), dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="negative"):
        res = activation_patching(model, clean, clean, y, corrupted_model=biased, by="layer", progress=False)
    assert res.clean_logit_diff - res.corrupted_logit_diff == pytest.approx(-5.0, abs=1e-4)
    assert res.n_sign_flipped == len(clean)
    lo, hi = res.denominator_ci
    assert lo == pytest.approx(-5.0, abs=1e-3) and hi == pytest.approx(-5.0, abs=1e-3)
    # the residual stream is the same in both models: patching any layer leaves the corrupted run's answer
    torch.testing.assert_close(res.values, torch.zeros_like(res.values), atol=1e-4, rtol=0)
