import copy

import pytest
import timm
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from mechvit import HookedViT
from mechvit.analysis.overlap import (
    OverlapConfig,
    code_similarity,
    collect_activations,
    decoder_cosine,
    encode,
    feature_overlap,
    model_code_similarity,
    sae_fit,
)


def standard_sae(d_in=8, d_sae=24, seed=0):
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1)
        sae.b_enc.normal_(0, 0.1)
    return sae


def permuted(sae, perm):
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_dec.copy_(sae.W_dec[perm])
        out.W_enc.copy_(sae.W_enc[:, perm])
        out.b_enc.copy_(sae.b_enc[perm])
    return out


def test_permuted_copy_is_matched_back_exactly():
    a = standard_sae()
    perm = torch.randperm(24)
    b = permuted(a, perm)  # b's feature j is a's feature perm[j]
    acts = torch.randn(30, 5, 8)
    res = feature_overlap(a, b, acts, acts, OverlapConfig(top_k=4))
    assert torch.equal(perm[res.idx_b], res.idx_a)
    torch.testing.assert_close(res.matched_cos, torch.ones(24))
    assert res.mean_max_cos_a_to_b == pytest.approx(1.0) and res.mean_max_cos_b_to_a == pytest.approx(1.0)
    assert res.counts() == {"persistent": 24, "shifted": 0, "lost": 0, "new": 0, "dead_a": 0, "dead_b": 0}
    live = ~torch.isnan(res.act_corr)
    assert live.sum() > 12
    torch.testing.assert_close(res.act_corr[live], torch.ones(int(live.sum())), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.topk_jaccard, torch.ones(24))
    assert res.cross["a_on_b"] == pytest.approx(res.cross["a_on_a"])
    assert res.cross["b_on_a"] == pytest.approx(res.cross["a_on_a"])


def test_sign_flip_is_not_persistent_and_shift_classes():
    a = standard_sae(d_sae=6)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    with torch.no_grad():
        a.W_dec.copy_(q.T[:6] * (torch.rand(6, 1) + 0.5))  # orthogonal directions, assorted norms
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.W_dec[0] = -a.W_dec[0]  # same line, opposite direction: a different feature for a non-negative code
        b.W_dec[1] = 0.7 * q.T[1] + 0.51**0.5 * q.T[7]  # cosine 0.7 with a's feature 1
    res = feature_overlap(a, b)
    cos = decoder_cosine(a, b)
    assert cos[0, 0] == pytest.approx(-1.0) and cos[1, 1] == pytest.approx(0.7, abs=1e-5)
    assert res.class_a[0] == "lost" and res.class_b[0] == "new"
    assert res.class_a[1] == "shifted" and res.class_b[1] == "shifted"
    assert res.class_a[2:] == ["persistent"] * 4
    loose = feature_overlap(a, b, config=OverlapConfig(persistent_cos=0.6, shifted_cos=0.1))
    assert loose.class_a[:2] == ["lost", "persistent"]


def test_different_sizes_and_activation_gate(tmp_path):
    a, b = standard_sae(d_sae=10), standard_sae(d_sae=6, seed=3)
    acts = torch.randn(20, 8)
    res = feature_overlap(a, b, acts, acts)
    assert len(res.idx_a) == 6 and res.class_a.count("lost") >= 4
    assert len(res.rows()) == 10
    res.save_csv(tmp_path / "ov.csv")
    d = res.to_dict()
    assert d["n_features_a"] == 10 and set(d["counts"]) == {
        "persistent",
        "shifted",
        "lost",
        "new",
        "dead_a",
        "dead_b",
    }
    # an activation-correlation gate demotes a decoder match whose codes do not co-vary
    c = copy.deepcopy(a)
    with torch.no_grad():
        c.W_enc.copy_(-a.W_enc)
    gated = feature_overlap(a, c, acts, acts, OverlapConfig(min_act_corr=0.5))
    assert gated.counts()["persistent"] == 0
    with pytest.raises(ValueError, match="both"):
        feature_overlap(a, b, acts)
    with pytest.raises(ValueError, match="shifted_cos"):
        OverlapConfig(persistent_cos=0.3, shifted_cos=0.5)


def test_sae_fit_known_answer():
    d = 5
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d))
    with torch.no_grad():  # relu(x), relu(-x) then x = relu(x) - relu(-x): a perfect autoencoder
        sae.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.randn(50, d)
    fit = sae_fit(sae, x, batch_size=7)
    assert fit["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert fit["l0"] == pytest.approx(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    mean_only = sae_fit(sae, x + 3.0)
    assert mean_only["explained_variance"] < 0


def test_code_similarity():
    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3))
    x = torch.randn(4, 6, 8)
    same = code_similarity(sae, x, x.clone(), bins=10)
    torch.testing.assert_close(same.cosines, torch.ones(24))
    assert int(same.counts.sum()) == 24 and int(same.counts[-1]) == 24 and same.n_undefined == 0
    other = code_similarity(sae, x, torch.randn(4, 6, 8), label="noise")
    assert other.mean < 0.9 and other.to_dict()["label"] == "noise" and len(other.rows()) == 50
    dead = StandardSAE(StandardSAEConfig(d_in=8, d_sae=4))
    with torch.no_grad():
        dead.b_enc.fill_(-1e6)
    assert code_similarity(dead, x, x).n_undefined == 24
    with pytest.raises(ValueError, match="correspond"):
        code_similarity(sae, x, x[:2])


def test_model_code_similarity_and_collection():
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
        reg_tokens=1,
    )
    model = HookedViT.from_timm(m).eval()
    x = torch.rand(3, 1, 28, 28)
    acts = collect_activations(model, x, "blocks.1.hook_resid_post", batch_size=2, progress=False)
    assert acts.shape == (3, 16, 32)
    _, cache = model.run_with_cache(x)
    torch.testing.assert_close(acts, cache["blocks.1.hook_resid_post"][:, 2:])
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4))
    same = model_code_similarity(model, sae, "blocks.1.hook_resid_post", x, x, progress=False)
    torch.testing.assert_close(same.cosines, torch.ones(48))
    with pytest.raises(ValueError, match="unknown hook"):
        collect_activations(model, x, "blocks.9.hook_resid_post")


def test_hook_batches_stop_the_forward_after_the_last_wanted_hook():
    """Without logits, ``run_hook_batches`` stops each forward at its last wanted hook: the activations are
    run_with_cache's bit for bit and the later blocks never run; with logits the whole forward runs."""
    from mechvit.analysis._utils import run_hook_batches

    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1, num_classes=10,
        embed_dim=32, depth=3, num_heads=2,
    )  # fmt: skip
    model = HookedViT.from_timm(m).eval()
    x = torch.rand(5, 1, 28, 28)
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    later: list[int] = []
    runs = [model.run_with_cache(x[i : i + 2], names_filter=names) for i in range(0, 5, 2)]  # as before
    logits = torch.cat(
        [model.run_with_cache(x[i : i + 2], names_filter=names[:1])[0] for i in range(0, 5, 2)]
    )
    cache = {n: torch.cat([r[1][n] for r in runs]) for n in names}
    model.blocks[2].hook_resid_pre.add_hook(lambda act, hook: later.append(1))
    got = run_hook_batches(model, x, names, batch_size=2)
    assert later == [] and list(got) == names
    for n in names:
        assert torch.equal(got[n], cache[n])
    both = run_hook_batches(model, x, names[:1], batch_size=2, with_logits=True)  # logits: the whole forward
    assert len(later) == 3 and torch.equal(both["logits"], logits)
    model.reset_hooks()


def test_dead_features_are_not_matched_or_counted_as_persistent():
    """Two SAEs from one seed keep their never-firing features at identical directions: those are dead."""
    a = standard_sae()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.W_dec[6:].add_(torch.randn_like(b.W_dec[6:]))  # the live features of b move away
        for sae in (a, b):
            sae.b_enc[:6] = -1e6  # features 0-5 can never fire, in both SAEs, with identical decoders
    acts = torch.randn(40, 5, 8)
    res = feature_overlap(a, b, acts, acts)
    counts = res.counts()
    assert counts["dead_a"] == 6 and counts["dead_b"] == 6
    assert res.class_a[:6] == ["dead"] * 6 and res.class_b[:6] == ["dead"] * 6
    assert not set(res.idx_a.tolist()) & set(range(6)) and not set(res.idx_b.tolist()) & set(range(6))
    assert sum(counts[k] for k in ("persistent", "shifted", "lost")) == 18
    decoder_only = feature_overlap(a, b)  # without activations nothing is known to be dead
    assert decoder_only.counts()["persistent"] >= 6 and decoder_only.counts()["dead_a"] == 0
    masked = feature_overlap(a, b, alive_a=torch.arange(24) >= 6, alive_b=torch.arange(24) >= 6)
    assert masked.counts()["dead_a"] == 6 and masked.class_a[:6] == ["dead"] * 6
    with pytest.raises(ValueError, match=r"alive_a must be a bool tensor \[24\]"):
        feature_overlap(a, b, alive_a=torch.ones(3, dtype=torch.bool))


# ---- controls: ceiling, floor, permutation test over model labels ----------------------------------


def _copies(sae, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [permuted(sae, torch.randperm(sae.cfg.d_sae, generator=g)) for _ in range(n)]


def _acts(d_in, seed=0, n_images=40, n_tokens=6):
    return torch.randn(n_images, n_tokens, d_in, generator=torch.Generator().manual_seed(seed))


def test_sae_against_a_permuted_copy_of_itself_is_the_ceiling():
    from mechvit.analysis.controls import pair_metrics

    a = standard_sae(d_in=16, d_sae=32)
    (b,) = _copies(a, 1, seed=1)
    acts = _acts(16)
    metrics, matched, n_a, n_b = pair_metrics(a, b, acts, acts)
    assert n_a == n_b == 32
    torch.testing.assert_close(matched, torch.ones(32), atol=1e-5, rtol=0)
    assert metrics["matched_cos"] == pytest.approx(1, abs=1e-5)
    assert metrics["act_corr"] == pytest.approx(1, abs=1e-6)
    assert metrics["topk_jaccard"] == pytest.approx(1)
    assert metrics["cross_ev"] == pytest.approx(sae_fit(a, acts)["explained_variance"], abs=1e-6)


def test_controls_with_identical_models_sit_at_the_ceiling():
    from mechvit.analysis.controls import ControlsConfig, overlap_controls

    a = standard_sae(d_in=16, d_sae=32)
    acts = _acts(16)
    res = overlap_controls(
        {"base": _copies(a, 3, 1), "ft": _copies(a, 3, 2)},
        {"base": acts, "ft": acts},
        ControlsConfig(floor_draws=3, n_resamples=999),
    )
    s = res.summary["base vs ft"]
    for metric in ("matched_cos", "act_corr", "topk_jaccard", "persistent_fraction"):
        assert s[metric]["between"].estimate == pytest.approx(1, abs=1e-5), metric
        assert s[metric]["within_reference"].estimate == pytest.approx(1, abs=1e-5), metric
        assert s[metric]["ratio"].estimate == pytest.approx(1, abs=1e-5), metric
    assert s["persistent_fraction"]["floor"].estimate == pytest.approx(0)
    assert s["matched_cos"]["floor"].high < 0.95
    assert s["matched_cos"]["test"].p_value == pytest.approx(1.0)  # nothing tells the labels apart
    assert res.live == {"base": [32] * 3, "ft": [32] * 3}
    assert {r["kind"] for r in res.pairs} == {"within", "between", "floor"}
    assert len(res.summary_rows()) == 6


def test_controls_tell_known_different_models_apart_and_independent_dictionaries_sit_at_the_floor():
    from mechvit.analysis.controls import ControlsConfig, floor_matched_cosines, overlap_controls

    a, b = standard_sae(d_in=16, d_sae=32, seed=0), standard_sae(d_in=16, d_sae=32, seed=1)
    acts = _acts(16)
    res = overlap_controls(
        {"base": _copies(a, 4, 1), "ft": _copies(b, 4, 2)},
        {"base": acts, "ft": acts},
        ControlsConfig(floor="directions", floor_draws=4, n_resamples=999),
    )
    s = res.summary["base vs ft"]["matched_cos"]
    assert s["within_reference"].estimate == pytest.approx(1, abs=1e-5)
    assert s["test"].exact and s["test"].p_value == pytest.approx(2 / 70)  # the smallest possible with 4 + 4
    assert s["ratio"].high < 0.9
    # two independent random dictionaries match no better than random directions do
    assert abs(s["between"].estimate - s["floor"].estimate) < 0.1
    assert res.summary["base vs ft"]["persistent_fraction"]["between"].estimate < 0.1
    assert res.threshold["persistent_cos"] == pytest.approx(1, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    rows = floor_matched_cosines(a, acts, torch.ones(32, dtype=torch.bool), kind="rows", generator=g)
    assert rows.shape == (32,) and float(rows.max()) <= 1 + 1e-6


def test_controls_errors():
    from mechvit.analysis.controls import ControlsConfig, overlap_controls

    a = standard_sae(d_in=16, d_sae=32)
    acts = _acts(16)
    with pytest.raises(ValueError, match="at least 2 replicate"):
        overlap_controls({"base": [a], "ft": [a]}, {"base": acts, "ft": acts})
    with pytest.raises(ValueError, match="no activations"):
        overlap_controls({"base": _copies(a, 2, 1), "ft": [a]}, {"base": acts})
    with pytest.raises(ValueError, match="floor must be"):
        ControlsConfig(floor="noise")


def test_code_cosine_controls_known_answers():
    from mechvit.analysis.controls import code_cosine_controls

    a = standard_sae(d_in=16, d_sae=32)
    clean = _acts(16, seed=3)
    same = code_cosine_controls(_copies(a, 3, 1), clean, clean.clone(), seed=0)
    assert torch.allclose(same.code, torch.ones_like(same.code), atol=1e-6)
    assert torch.allclose(same.raw, torch.ones_like(same.raw), atol=1e-6)
    est = same.estimates()
    assert est["code"]["over_images"].estimate == pytest.approx(1, abs=1e-6)
    assert est["mismatched"]["over_images"].high < 0.9  # another image's patches are not the same patch
    assert est["raw"]["over_seeds"] is None and est["code"]["over_seeds"].n == 3
    noisy = code_cosine_controls([a], clean, clean + 0.5 * _acts(16, seed=4))
    assert noisy.to_dict()["code"]["over_images"]["estimate"] < 1
    with pytest.raises(ValueError, match="paired"):
        code_cosine_controls([a], clean, clean[:-1])


def test_precomputed_codes_and_fits_give_the_same_overlap():
    a, b = standard_sae(d_in=8, d_sae=24, seed=0), standard_sae(d_in=8, d_sae=24, seed=1)
    g = torch.Generator().manual_seed(3)
    acts_a, acts_b = torch.randn(12, 5, 8, generator=g), torch.randn(12, 5, 8, generator=g)
    cfg = OverlapConfig(top_k=4, batch_size=16)  # several chunks
    plain = feature_overlap(a, b, acts_a, acts_b, cfg)
    cross = {
        "a_on_a": sae_fit(a, acts_a, 16), "a_on_b": sae_fit(a, acts_b, 16),
        "b_on_b": sae_fit(b, acts_b, 16), "b_on_a": sae_fit(b, acts_a, 16),
    }  # fmt: skip
    reused = feature_overlap(
        a, b, acts_a, acts_b, cfg, codes_a=encode(a, acts_a), codes_b=encode(b, acts_b), cross=cross
    )
    assert torch.equal(plain.idx_a, reused.idx_a) and torch.equal(plain.idx_b, reused.idx_b)
    assert torch.allclose(plain.act_corr, reused.act_corr, equal_nan=True)
    assert torch.equal(plain.topk_jaccard, reused.topk_jaccard)
    assert plain.class_a == reused.class_a and plain.cross == reused.cross
    with pytest.raises(ValueError, match="codes_a must be the codes of the activations"):
        feature_overlap(a, b, acts_a, acts_b, cfg, codes_a=encode(a, acts_a[:3]))
    with pytest.raises(ValueError, match="cross needs the keys"):
        feature_overlap(a, b, acts_a, acts_b, cfg, cross={"a_on_a": cross["a_on_a"]})


@pytest.mark.parametrize("path", ["dense cache", "sparse codes", "sparse codes given"])
def test_overlap_controls_with_and_without_the_code_cache_agree(monkeypatch, path):
    import mechvit.analysis.controls as controls
    from mechvit.analysis.overlap import SparseCodes

    g = torch.Generator().manual_seed(5)
    saes = {
        m: [standard_sae(d_in=8, d_sae=24, seed=10 * i + r) for r in range(3)] for i, m in enumerate("xyz")
    }
    acts = {m: torch.randn(10, 4, 8, generator=g) for m in saes}
    cfg = controls.ControlsConfig(reference="x", floor="directions", floor_draws=2, n_resamples=99)
    monkeypatch.setattr(controls, "_SPARSE_CODES", path != "dense cache")
    given = {(m, r): SparseCodes.encode(sae, acts[m]) for m in saes for r, sae in enumerate(saes[m])}
    cached = controls.overlap_controls(saes, acts, cfg, codes=given if path == "sparse codes given" else None)
    # the reference: dense codes encoded per pair
    monkeypatch.setattr(controls, "_SPARSE_CODES", False)
    monkeypatch.setattr(controls, "_CODES_CACHE_BYTES", 0)
    plain = controls.overlap_controls(saes, acts, cfg)
    assert len(cached.pairs) == len(plain.pairs) == 3 * 3 + 2 * 9 + 3 * 2
    for p, q in zip(cached.pairs, plain.pairs, strict=True):
        assert p.keys() == q.keys()
        for k in p:
            if isinstance(p[k], float):
                assert p[k] == pytest.approx(q[k], nan_ok=True, rel=1e-12), k
            elif not isinstance(p[k], torch.Tensor):
                assert p[k] == q[k], k
    assert cached.live == plain.live and cached.threshold == plain.threshold


def _codes_of(sae, acts):
    from mechvit.analysis.overlap import SparseCodes

    return SparseCodes.encode(sae, acts, batch_size=16)


def test_sparse_codes_hold_the_dense_codes():
    from mechvit.analysis.overlap import SparseCodes, _to_sparse

    sae = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3))
    acts = torch.randn(7, 5, 8)
    sp = SparseCodes.encode(sae, acts, batch_size=6)  # several chunks, one cut mid-image
    dense = encode(sae, acts)
    assert torch.equal(sp.to_dense(), dense) and len(sp.vals) == int((dense != 0).sum())
    assert torch.equal(sp.fired(), (dense > 0).flatten(0, 1).any(0))
    assert torch.equal(sp.image_max(), dense.amax(1))
    idx = torch.tensor([3, 0, 6, 3])
    assert torch.equal(sp.take_images(idx).to_dense(), dense[idx])
    assert torch.equal(sp.dense(4, 13), dense.reshape(-1, 16)[4:13])
    # codes of any sign (not an SAE's): the image maximum counts the zero codes too
    z = torch.randn(4, 3, 5) * (torch.rand(4, 3, 5) < 0.5)
    z[0, :, 0] = -1.0  # every token negative: the maximum is negative
    assert torch.equal(_to_sparse(z).image_max(), z.amax(1))
    flat = SparseCodes.encode(sae, acts[:, 0])  # [n_images, d_in] activations
    assert torch.equal(flat.image_max(), encode(sae, acts[:, 0]))


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_sparse_codes_give_the_dense_overlap(kind):
    def make(seed):
        if kind == "standard":
            return standard_sae(d_in=8, d_sae=24, seed=seed)
        torch.manual_seed(seed)
        return TopKSAE(TopKSAEConfig(d_in=8, d_sae=24, k=3))

    a, b = make(0), make(1)
    g = torch.Generator().manual_seed(3)
    acts_a, acts_b = torch.randn(40, 5, 8, generator=g), torch.randn(40, 5, 8, generator=g)
    cfg = OverlapConfig(top_k=4, batch_size=16)
    dense = feature_overlap(a, b, acts_a, acts_b, cfg)
    for codes in (
        {"codes_a": _codes_of(a, acts_a)},
        {"codes_a": _codes_of(a, acts_a), "codes_b": _codes_of(b, acts_b)},
    ):
        fast = feature_overlap(a, b, acts_a, acts_b, cfg, **codes)
        assert torch.equal(dense.idx_a, fast.idx_a) and torch.equal(dense.idx_b, fast.idx_b)
        assert torch.equal(dense.matched_cos, fast.matched_cos)
        assert dense.class_a == fast.class_a and dense.class_b == fast.class_b
        assert torch.equal(dense.topk_jaccard, fast.topk_jaccard)
        torch.testing.assert_close(fast.act_corr, dense.act_corr, rtol=1e-6, atol=1e-7, equal_nan=True)
        assert dense.cross == fast.cross  # the own-model fits reuse the codes: the same numbers
    with pytest.raises(ValueError, match="codes_a must be the codes of the activations"):
        feature_overlap(a, b, acts_a, acts_b, cfg, codes_a=_codes_of(a, acts_a[:3]))


def test_sparse_pearson_known_cases():
    from mechvit.analysis.overlap import _pearson, _sparse_pearson, _to_sparse

    g = torch.Generator().manual_seed(0)
    za = torch.rand(200, 6, generator=g) * (torch.rand(200, 6, generator=g) < 0.3)
    zb = torch.rand(200, 6, generator=g) * (torch.rand(200, 6, generator=g) < 0.3)
    zb[:, 1] = 2 * za[:, 4]  # perfectly correlated pair
    za[:, 2] = 0  # never fires: nan
    zb[:, 5] = 0.7  # fires everywhere with one value: nan
    ia, ib = torch.tensor([0, 4, 2, 3]), torch.tensor([0, 1, 3, 5])
    ref = _pearson(za[:, ia], zb[:, ib])
    fast = _sparse_pearson(_to_sparse(za), ia, _to_sparse(zb), ib)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert fast[1] == pytest.approx(1.0) and fast[2].isnan() and fast[3].isnan()


def test_sparse_code_cosine_controls_match_the_dense_ones(monkeypatch):
    import mechvit.analysis.controls as controls
    from mechvit.analysis.overlap import SparseCodes

    saes = [TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4)) for _ in range(2)]
    clean, noisy = _acts(16, seed=3), _acts(16, seed=3) + 0.3 * _acts(16, seed=4)
    fast = controls.code_cosine_controls(saes, clean, noisy, seed=1)
    given = controls.code_cosine_controls(
        saes, clean, noisy, seed=1, clean_codes=[SparseCodes.encode(s, clean) for s in saes]
    )
    monkeypatch.setattr(controls, "_SPARSE_CODES", False)
    ref = controls.code_cosine_controls(saes, clean, noisy, seed=1)
    for res in (fast, given):
        for name in ("code", "raw", "mismatched"):
            torch.testing.assert_close(
                getattr(res, name), getattr(ref, name), rtol=1e-6, atol=0, equal_nan=True
            )
    with pytest.raises(ValueError, match="clean_codes"):
        controls.code_cosine_controls(saes, clean, noisy, clean_codes=[SparseCodes.encode(saes[0], clean)])
