"""SAE metrics: known answers with hand-built sae-lens SAEs (exact identity, all-zero), splicing, errors."""

import pytest
import timm
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from mechvit import HookedViT
from mechvit.sae import feature_density_figure, reconstruction_metrics, splice_hook, spliced_metrics

HOOK = "blocks.1.hook_resid_pre"


def identity_sae(d: int) -> StandardSAE:
    """relu(x) - relu(-x) = x exactly: encoder [I, -I], decoder [I; -I], no biases."""
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int) -> StandardSAE:
    sae = identity_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def model() -> HookedViT:
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
    )
    return HookedViT.from_timm(m).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(3)
    return torch.rand(24, 1, 28, 28, generator=g), torch.randint(0, 10, (24,), generator=g)


def test_reconstruction_metrics_known_answers():
    x = torch.rand(500, 8) + 0.1  # all positive: the -x half of the identity SAE never fires
    m = reconstruction_metrics(identity_sae(8), x, batch_size=128)
    assert m.explained_variance == pytest.approx(1.0) and m.mse == 0.0
    assert m.l0 == pytest.approx(8.0) and m.dead_features == 8 and m.dense_features == 8
    assert m.n_rows == 500 and m.d_sae == 16
    assert torch.equal(m.feature_density, torch.tensor([1.0] * 8 + [0.0] * 8))
    z = reconstruction_metrics(zero_sae(8), x)  # reconstruction 0: EV = 1 - E|x|^2 / Var
    expected_ev = 1 - (x.double() ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum()
    assert z.explained_variance == pytest.approx(float(expected_ev), rel=1e-6)
    assert z.mse == pytest.approx(float((x.double() ** 2).mean()), rel=1e-6)
    fig = feature_density_figure(m.feature_density)
    assert "8 dead of 16" in fig.axes[0].get_title()


def test_reconstruction_metrics_per_row_and_cis_over_groups():
    from mechvit.analysis import reconstruction_cis

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)  # both signs: the identity SAE's halves fire on them
    sae = zero_sae(8)
    with torch.no_grad():
        sae.W_dec.mul_(0.0).add_(torch.cat([torch.eye(8), -torch.eye(8)]) * 0.5)  # half the input back
    m = reconstruction_metrics(sae, x, batch_size=128, per_row=True)
    per = m.per_row
    assert torch.equal(per["active"], torch.count_nonzero(x, dim=1).to(torch.int32))  # every |x_i| > 0 fires
    assert torch.allclose(per["sq_err"], (0.5 * x.double()).pow(2).sum(1))
    assert "per_row" not in m.to_dict() and reconstruction_metrics(sae, x).per_row is None
    # the CIs' estimates are the metrics' own numbers; tokens grouped by image
    images = torch.arange(600) // 6
    ci = reconstruction_cis(x.numpy(), per["sq_err"].numpy(), per["active"].numpy(), images.numpy())
    assert ci["explained_variance"].estimate == pytest.approx(m.explained_variance, abs=1e-9)
    assert ci["l0"].estimate == pytest.approx(m.l0, abs=1e-12)
    assert ci["explained_variance"].low < m.explained_variance < ci["explained_variance"].high
    assert ci["l0"].n == 100 and ci["l0"].method == "bootstrap-percentile"


def test_reconstruction_cis_resample_groups_not_rows():
    """Known answers: rows repeated within their group carry no more information than one row each, so the
    CIs equal those of the distinct rows grouped one by one (the same draws); iid rows grouped one by one
    give the normal-theory CI of a mean."""
    import numpy as np

    from mechvit.analysis import reconstruction_cis

    rng = np.random.default_rng(0)
    n, d = 400, 6
    x = rng.normal(size=(n, d)) + 1.0
    err = rng.random(n) * 2.0
    act = rng.integers(0, 25, n).astype(float)
    one = reconstruction_cis(x, err, act, np.arange(n), seed=3)
    rep = reconstruction_cis(
        np.repeat(x, 7, 0), np.repeat(err, 7), np.repeat(act, 7), np.repeat(np.arange(n), 7), seed=3
    )
    for key in ("explained_variance", "l0"):
        assert rep[key].estimate == pytest.approx(one[key].estimate, rel=1e-12)
        assert (rep[key].low, rep[key].high) == pytest.approx((one[key].low, one[key].high), rel=1e-12)
    # the same repeated rows taken as independent (one group per row) give a CI ~sqrt(7) too narrow
    naive = reconstruction_cis(
        np.repeat(x, 7, 0), np.repeat(err, 7), np.repeat(act, 7), np.arange(7 * n), seed=3
    )
    ratio = (one["l0"].high - one["l0"].low) / (naive["l0"].high - naive["l0"].low)
    assert ratio == pytest.approx(np.sqrt(7), rel=0.15)
    half = 1.96 * act.std(ddof=1) / np.sqrt(n)
    assert (one["l0"].high - one["l0"].low) / 2 == pytest.approx(half, rel=0.1)
    # several SAEs on the same rows at once: the numbers of one call each
    from mechvit.analysis import reconstruction_cis_many

    err2, act2 = err * 0.5, act + 1.0
    many = reconstruction_cis_many(x, [(err, act), (err2, act2)], np.arange(n) // 4, seed=5)
    assert many == [
        reconstruction_cis(x, err, act, np.arange(n) // 4, seed=5),
        reconstruction_cis(x, err2, act2, np.arange(n) // 4, seed=5),
    ]
    with pytest.raises(ValueError, match="one sq_err, active count and group each"):
        reconstruction_cis(x, err[:-1], act, np.arange(n))
    with pytest.raises(ValueError, match="at least two groups"):
        reconstruction_cis(x, err, act, np.zeros(n))


@pytest.mark.parametrize("tokens", ["all", "patches", "cls", "prefix"])
def test_identity_splice_gives_unmodified_logits(model, data, tokens):
    images, labels = data
    clean = model(images)
    spliced = model.run_with_hooks(
        images, fwd_hooks=[(HOOK, splice_hook(identity_sae(32), model.cfg, tokens, HOOK))]
    )
    assert torch.equal(spliced, clean)
    m = spliced_metrics(model, identity_sae(32), images, labels, HOOK, tokens=tokens, batch_size=10)
    assert m.kl_sae == pytest.approx(0.0, abs=1e-7) and m.loss_sae == pytest.approx(m.loss_clean, abs=1e-6)
    assert m.accuracy_sae == m.accuracy_clean and m.loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert m.n_images == 24


def test_spliced_per_image_values_add_up_to_the_means(model, data):
    """The per-image vectors (for CIs over images) are the ones the means are taken of, across batches; they
    stay out of to_dict (the manifest)."""
    images, labels = data
    m = spliced_metrics(model, zero_sae(32), images, labels, HOOK, tokens="patches", batch_size=10)
    per = m.per_image
    assert {k: v.shape for k, v in per.items()} == {
        k: (24,) for k in ("correct_clean", "correct_sae", "kl_sae")
    }
    assert per["correct_clean"].double().mean().item() == pytest.approx(m.accuracy_clean)
    assert per["correct_sae"].double().mean().item() == pytest.approx(m.accuracy_sae)
    assert per["kl_sae"].double().mean().item() == pytest.approx(m.kl_sae, rel=1e-6)
    assert per["kl_sae"].min() >= -1e-6 and "per_image" not in m.to_dict()
    from mechvit.study.steps.sae import fidelity

    f = fidelity(m, seed=0)
    assert f["accuracy_drop"]["estimate"] == pytest.approx(m.accuracy_clean - m.accuracy_sae)
    assert f["accuracy_drop"]["low"] <= f["accuracy_drop"]["estimate"] <= f["accuracy_drop"]["high"]
    assert f["kl_sae_ci"]["low"] <= m.kl_sae <= f["kl_sae_ci"]["high"] and f["kl_sae_ci"]["n"] == 24


def test_zero_reconstruction_recovers_nothing_and_touches_only_selected_tokens(model, data):
    images, labels = data
    m = spliced_metrics(model, zero_sae(32), images, labels, HOOK, tokens="patches")
    assert m.loss_sae == pytest.approx(m.loss_zero) and m.kl_sae == pytest.approx(m.kl_zero)
    assert m.loss_recovered == pytest.approx(0.0, abs=1e-6) and m.kl_zero > 0
    seen = {}
    hooks = [
        (HOOK, splice_hook(zero_sae(32), model.cfg, "patches", HOOK)),
        (HOOK, lambda act, hook: seen.setdefault("act", act.clone())),
    ]
    _, cache = model.run_with_cache(images[:2], names_filter=HOOK)
    model.run_with_hooks(images[:2], fwd_hooks=hooks)
    assert torch.all(seen["act"][:, 1:] == 0)  # patches replaced by the (zero) reconstruction
    assert torch.equal(seen["act"][:, :1], cache[HOOK][:, :1])  # the CLS token untouched


def test_clear_errors(model, data):
    images, labels = data
    with pytest.raises(ValueError, match="d_in=16 but hook"):
        spliced_metrics(model, identity_sae(16), images, labels, HOOK)
    with pytest.raises(ValueError, match="not a hook of this model"):
        spliced_metrics(model, identity_sae(32), images, labels, "blocks.5.hook_resid_post")
    with pytest.raises(ValueError, match="as many labels"):
        spliced_metrics(model, identity_sae(32), images, labels[:3], HOOK)
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        reconstruction_metrics(identity_sae(16), torch.rand(10, 32))


# ---- ablation gap, PCA baseline, per-image spliced KL -------------------------------------------------


def test_mean_ablation_gap_equals_a_hand_made_ablation(model, data):
    from mechvit.sae import ablation_gap

    images, labels = data
    hook = "blocks.0.hook_resid_post"
    _, cache = model.run_with_cache(images, names_filter=[hook])
    mean = cache[hook][:, 1:].reshape(-1, 32).double().mean(0).float()  # patch tokens (cls first)

    def hand(act, hook):
        act = act.clone()
        act[:, 1:] = mean
        return act

    ablated = model.run_with_hooks(images, fwd_hooks=[(hook, hand)]).log_softmax(-1)
    clean = model(images).log_softmax(-1)
    kl = (clean.exp() * (clean - ablated)).sum(-1)
    gap = ablation_gap(model, images, labels, hook, batch_size=10)
    torch.testing.assert_close(gap.kl_per_image, kl.clamp_min(0), atol=1e-5, rtol=1e-4)
    assert gap.kl == pytest.approx(float(kl.detach().mean()), abs=1e-5) and gap.kl > 0
    ce = torch.nn.functional.cross_entropy
    assert gap.loss_delta == pytest.approx(float(ce(ablated, labels) - ce(clean, labels)), abs=1e-4)
    zero = ablation_gap(model, images, labels, hook, mode="zero")
    assert zero.mode == "zero" and zero.kl != pytest.approx(gap.kl)


def test_ablation_gap_guard_last_layer_patches_do_not_matter_and_choose_hook(model, data):
    from mechvit.sae import ablation_gap_sweep, choose_hook

    images, labels = data
    gaps = ablation_gap_sweep(model, images, labels)  # blocks.0 and blocks.1 resid_post
    assert [g.hook for g in gaps] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    # class-token readout: the last block's patch tokens never reach the logits
    assert gaps[1].kl == pytest.approx(0.0, abs=1e-6)
    assert choose_hook(gaps, min_gap=gaps[0].kl / 2) == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="no hook has an ablation gap"):
        choose_hook(gaps, min_gap=gaps[0].kl * 2)
    with pytest.raises(ValueError, match="mode must be"):
        ablation_gap_sweep(model, images, labels, mode="resample")


# the library's chunk (one chunk here), and ragged chunks of 7 rows
@pytest.mark.parametrize("chunk", [None, 7])
def test_pca_baseline_equals_torch_pca(chunk, monkeypatch):
    from mechvit.sae import metrics, pca_baseline, pca_components

    if chunk is not None:
        monkeypatch.setattr(metrics, "_PCA_CHUNK", chunk)

    g = torch.Generator().manual_seed(0)
    # a clear gap after the 4th component, so the top-4 subspace is well defined for pca_lowrank
    scales = torch.tensor([5.0, 4.0, 3.0, 2.0] + [0.1] * 8)
    mix = torch.linalg.qr(torch.randn(12, 12, generator=g))[0] * scales[:, None]
    train, held = (
        torch.randn(3000, 12, generator=g) @ mix + 3.0,
        torch.randn(500, 12, generator=g) @ mix + 3.0,
    )
    k = 4
    mean, comps = pca_components(train, k)
    _, _, v = torch.pca_lowrank(train.double(), q=k, center=True, niter=30)
    torch.testing.assert_close(comps.T @ comps, v @ v.T, atol=1e-6, rtol=0)  # same subspace
    _, _, vh = torch.linalg.svd(train.double() - train.double().mean(0), full_matrices=False)
    torch.testing.assert_close(comps.T @ comps, vh[:k].T @ vh[:k], atol=1e-9, rtol=0)  # exact SVD
    torch.testing.assert_close(mean, train.double().mean(0))
    res = pca_baseline(train, held, k)
    x = held.double()
    recon = mean + (x - mean) @ v @ v.T
    expected = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert res.explained_variance == pytest.approx(float(expected), abs=1e-9)
    assert pca_baseline(train, held, 12).explained_variance == pytest.approx(1.0, abs=1e-9)
    assert pca_baseline(train, held, 1).explained_variance < res.explained_variance
    with pytest.raises(ValueError, match="k must be in"):
        pca_baseline(train, held, 13)
    with pytest.raises(ValueError, match="heldout rows"):
        pca_baseline(train, held[:, :5], 2)


def test_spliced_kl_per_image_known_answers(model, data):
    from mechvit.sae import spliced_kl_per_image

    images, labels = data
    kl_id = spliced_kl_per_image(model, identity_sae(32), images, HOOK, batch_size=10)
    assert kl_id.shape == (24,) and float(kl_id.abs().max()) < 1e-6
    kl_zero = spliced_kl_per_image(model, zero_sae(32), images, HOOK)
    ref = spliced_metrics(model, zero_sae(32), images, labels, HOOK)
    assert float(kl_zero.mean()) == pytest.approx(ref.kl_sae, rel=1e-5) and ref.kl_sae > 0


def _same_logits(got: list[torch.Tensor], want: list[torch.Tensor], exact: bool) -> None:
    """Bitwise (the full hooked forward) or to float rounding with the same top-1 (a resumed forward whose last
    block computes only the class-token row: readout_only)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.1.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.0.hook_attn_out",
    ],
)
def test_splicer_logits_equal_the_full_hooked_forward(model, data, hook):
    """sae.metrics.Splicer (clean logits and the stream at the hook computed once, only the blocks after the
    hook rerun per splice, the last of them on the class-token row only; run_with_hooks for other hooks) gives
    the logits of the full forward with splice_hook: to 1e-5 with the same top-1 on the resumed path, bitwise on
    the run_with_hooks one; and spliced_kl_per_image / overlap_controls' KL are its KL."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from mechvit.sae import Splicer, spliced_kl_per_image

    images, _ = data
    splicer = Splicer(model, images, hook, batch_size=10)
    assert splicer.layer == {"blocks.1.hook_resid_pre": 1, "blocks.0.hook_resid_post": 1}.get(hook)
    resumed = splicer.layer is not None
    full = [model(images[i : i + 10]).float() for i in range(0, len(images), 10)]
    lp_c = torch.cat(full).log_softmax(-1)
    margin = lp_c.topk(2, -1).values.diff(dim=-1).abs().min()
    assert margin > 1e-3  # no near-ties in the fixture: equal top-1 is a fair check
    _same_logits(splicer.clean(), full, exact=not resumed)
    for seed in [None, 0, 1]:  # None: zero-ablation
        sae = None
        if seed is not None:
            torch.manual_seed(seed)
            sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
            with torch.no_grad():
                sae.b_enc.normal_()
            sae.cfg.metadata.hook_name = hook
        fn = splice_hook(sae, model.cfg, "patches", hook)
        ref = [
            model.run_with_hooks(images[i : i + 10], fwd_hooks=[(hook, fn)]).float()
            for i in range(0, len(images), 10)
        ]
        _same_logits(splicer.spliced(sae), ref, exact=not resumed)
        lp_s = torch.cat(ref).log_softmax(-1)
        kl = (lp_c.exp() * (lp_c - lp_s)).sum(-1).clamp_min(0)
        torch.testing.assert_close(splicer.kl_per_image(sae), kl, rtol=1e-5, atol=1e-6)
        if sae is not None:
            one = spliced_kl_per_image(model, sae, images, hook, batch_size=7)
            torch.testing.assert_close(one, kl, rtol=1e-4, atol=1e-6)
            # after the last block the patch tokens no longer reach the class-token readout: KL 0 there
            assert (
                float(one.mean()) == 0.0 if hook == "blocks.1.hook_resid_post" else float(one.mean()) > 1e-4
            )


def test_splicer_resumes_with_readout_only_where_the_forward_takes_it(model, data, monkeypatch):
    """The resumed forwards (clean second half, splices, zero-ablation) ask for readout_only; a model whose
    forward does not take it is called without it, and then gives the full hooked forward bitwise; a hook the
    forward cannot resume at runs the full hooked forward, without it."""
    from mechvit.sae import Splicer

    images, _ = data
    calls: list[dict] = []
    forward = model.forward

    def spy(images, *, start_at_layer=None, stop_at_layer=None, readout_only=False, **kwargs):
        calls.append(
            dict(start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, readout_only=readout_only)
        )
        return forward(
            images,
            start_at_layer=start_at_layer,
            stop_at_layer=stop_at_layer,
            readout_only=readout_only,
            **kwargs,
        )

    monkeypatch.setattr(model, "forward", spy)
    splicer = Splicer(model, images, HOOK, batch_size=10)
    splicer.clean(), splicer.spliced(zero_sae(32)), splicer.spliced(None)
    resumed = [c for c in calls if c["start_at_layer"] is not None]
    assert len(resumed) == 9 and all(c["readout_only"] for c in resumed)  # 3 batches x (clean, SAE, zero)
    assert all(not c["readout_only"] for c in calls if c["start_at_layer"] is None)

    calls.clear()
    splicer = Splicer(model, images, "blocks.0.hook_attn_out", batch_size=10)
    splicer.clean(), splicer.spliced(None)
    assert splicer.layer is None and calls and not any(c["readout_only"] for c in calls)

    def no_readout(images, *, start_at_layer=None, stop_at_layer=None, **kwargs):
        assert "readout_only" not in kwargs
        return forward(images, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, **kwargs)

    monkeypatch.setattr(model, "forward", no_readout)
    splicer = Splicer(model, images, HOOK, batch_size=10)
    assert splicer.layer == 1
    monkeypatch.undo()
    full = [model(images[i : i + 10]).float() for i in range(0, len(images), 10)]
    fn = splice_hook(None, model.cfg, "patches", HOOK)
    ref = [
        model.run_with_hooks(images[i : i + 10], fwd_hooks=[(HOOK, fn)]).float()
        for i in range(0, len(images), 10)
    ]
    monkeypatch.setattr(model, "forward", no_readout)
    _same_logits(splicer.clean(), full, exact=True)
    _same_logits(splicer.spliced(None), ref, exact=True)


def test_spliced_metrics_many_equals_one_call_per_sae(model, data):
    """spliced_metrics_many shares the clean and zero-ablated forwards between SAEs: every number equals
    spliced_metrics of each SAE alone, which equals the full hooked forwards (known answers above)."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from mechvit.sae import spliced_metrics_many

    images, labels = data
    saes = []
    for seed in range(3):
        torch.manual_seed(seed)
        sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
        with torch.no_grad():
            sae.b_enc.normal_()
        saes.append(sae)
    many = spliced_metrics_many(model, saes, images, labels, HOOK, batch_size=10)
    for sae, m in zip(saes, many, strict=True):
        one = spliced_metrics(model, sae, images, labels, HOOK, batch_size=10)
        assert m.to_dict() == one.to_dict()
        assert all(torch.equal(m.per_image[k], one.per_image[k]) for k in one.per_image)
    assert len({m.kl_sae for m in many}) == 3  # three different SAEs, three different splices
    with pytest.raises(ValueError, match="no SAEs given"):
        spliced_metrics_many(model, [], images, labels, HOOK)
    with pytest.raises(ValueError, match="d_in=16"):
        spliced_metrics_many(model, [saes[0], identity_sae(16)], images, labels, HOOK)


def _random_sae(kind: str, d_in: int = 24, d_sae: int = 96, apply_b_dec: bool = True, seed: int = 0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    g = torch.Generator().manual_seed(seed)
    if kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if kind == "jumprelu":  # thresholds below 0, at 0 and above: the ReLU and the jump both matter
            sae.threshold.copy_(torch.linspace(-0.5, 1.0, d_sae))
            sae.threshold[::7] = 0.0
    return sae


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(a), torch.signbit(b))  # +0.0 where sae-lens has +0.0


@pytest.mark.parametrize("kind", ["jumprelu", "standard"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_fast_encode_is_bitwise_sae_lens_encode(kind, apply_b_dec):
    from mechvit.sae import encode
    from mechvit.sae.metrics import _plain_relu_sae

    sae = _random_sae(kind, apply_b_dec=apply_b_dec)
    assert _plain_relu_sae(sae) == kind  # the fast path runs
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(1))
    x[3, 5], x[4, :] = float("nan"), float("inf")
    with torch.no_grad():
        fast, ref = encode(sae, x), sae.encode(x)
    _same(fast, ref)
    assert (fast[:3] > 0).any() and (fast[:3] == 0).any()  # some latents fire, some do not
    with torch.inference_mode():
        _same(encode(sae, x), ref)
    # and the reconstruction the SAE step and splices use
    _same(sae.decode(encode(sae, x[5:])), sae.decode(sae.encode(x[5:])).detach())


def test_fast_encode_falls_back_where_it_must():
    from sae_lens import TopKSAE, TopKSAEConfig

    from mechvit.sae import encode
    from mechvit.sae.metrics import _plain_relu_sae

    x = torch.randn(50, 24)
    sae = _random_sae("jumprelu")
    with torch.no_grad():
        plain = sae.encode(x)
        # a hook on the SAE's hook points is honoured: sae.encode runs
        handle = sae.hook_sae_acts_post.register_forward_hook(lambda m, i, o: o * 2)
        assert _plain_relu_sae(sae) is None
        _same(encode(sae, x), plain * 2)
        handle.remove()
        assert _plain_relu_sae(sae) == "jumprelu"
        # 3-d input: sae.encode
        _same(encode(sae, x.view(5, 10, 24)), sae.encode(x.view(5, 10, 24)))
        topk = TopKSAE(TopKSAEConfig(d_in=24, d_sae=96, k=4))
        assert _plain_relu_sae(topk) is None
        _same(encode(topk, x), topk.encode(x))


def test_reconstruction_metrics_counts_equal_count_nonzero():
    sae = _random_sae("jumprelu")
    x = torch.randn(1000, 24, generator=torch.Generator().manual_seed(2))
    m = reconstruction_metrics(sae, x, batch_size=128, per_row=True)
    with torch.no_grad():
        codes = sae.encode(x)
    assert torch.equal(m.per_row["active"], torch.count_nonzero(codes, dim=1).to(torch.int32))
    assert torch.equal(m.feature_density, (torch.count_nonzero(codes, dim=0).double() / 1000).float())
    assert m.l0 == pytest.approx(float(torch.count_nonzero(codes)) / 1000, rel=1e-12)
