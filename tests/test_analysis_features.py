"""mechvit.analysis.features against brute-force references on a tiny HookedViT and a random sae-lens SAE."""

import numpy as np
import pytest
import timm
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from mechvit import HookedViT
from mechvit.analysis.features import (
    automatic_label,
    decoder_directions,
    feature_stats,
    location_label,
    nearest_cosine,
)

CLASSES = [f"c{i}" for i in range(10)]


def tiny_model(seed: int = 0, global_pool: str = "token") -> HookedViT:
    torch.manual_seed(seed)
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
        global_pool=global_pool,
    )
    return HookedViT.from_timm(m).eval()


def random_sae(hook: str, d_in: int = 32, d_sae: int = 48, seed: int = 0, bias: float = -0.6) -> StandardSAE:
    """A ReLU SAE with random weights and a negative bias, so latents fire sparsely and some never."""
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.normal_(0, 1 / d_in**0.5)
        sae.b_enc.fill_(bias)
        sae.b_enc[:4] = -50.0  # dead
        sae.b_dec.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = hook
    return sae.eval()


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    hook = "blocks.0.hook_resid_post"
    sae = random_sae(hook)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(30, 1, 28, 28, generator=g)
    labels = torch.arange(30) % 10
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    st = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, k=4, n_assoc=6, n_bins=8, progress=False
    )
    return model, sae, hook, images, labels, corrupted, st


@torch.no_grad()
def brute_codes(model, sae, images, hook):
    _, cache = model.run_with_cache(images, names_filter=hook)
    x = cache[hook][:, 1:]  # patch tokens
    return sae.encode(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)


def test_density_mean_top_images_and_maps_match_brute_force(setup):
    model, sae, hook, images, labels, corrupted, st = setup
    z = brute_codes(model, sae, images, hook)  # [N, P, F]
    zc = brute_codes(model, sae, corrupted, hook)
    active = (z > 0).double()
    np.testing.assert_allclose(st.density, active.mean((0, 1)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(st.density_corrupted, (zc > 0).double().mean((0, 1)).numpy(), rtol=1e-6)
    # mean over the tokens where the latent fires; NaN (not 0) where it never fires on that set
    n_on, n_on_c = active.sum((0, 1)), (zc > 0).double().sum((0, 1))
    mean_active = torch.where(n_on > 0, z.double().sum((0, 1)) / n_on, torch.nan).numpy()
    mean_active_c = torch.where(n_on_c > 0, zc.double().sum((0, 1)) / n_on_c, torch.nan).numpy()
    np.testing.assert_allclose(st.mean_act, mean_active, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.mean_act_corrupted, mean_active_c, rtol=1e-5, atol=1e-7)
    assert (
        np.isnan(st.mean_act[n_on.numpy() == 0]).all() and (n_on.numpy() == 0).sum() > 4
    )  # not only the dead
    basis = np.where(n_on.numpy() > 0, "clean", np.where(n_on_c.numpy() > 0, "corrupted", "none"))
    np.testing.assert_array_equal(st.effect_basis, basis)
    np.testing.assert_array_equal(st.basis, basis)
    np.testing.assert_allclose(st.max_act, torch.maximum(z.amax((0, 1)), zc.amax((0, 1))).numpy(), rtol=1e-6)
    fires = (z > 0).any(0).any(0) | (zc > 0).any(0).any(0)
    np.testing.assert_array_equal(st.live, torch.nonzero(fires).flatten().numpy())
    assert 0 < len(st.live) < sae.cfg.d_sae and not set(range(4)) & set(st.live.tolist())
    img_max = z.amax(1)  # [N, F]
    for f in st.live[:12]:
        order = torch.argsort(img_max[:, f], descending=True, stable=True)
        for j in range(4):
            i = int(st.top_idx[f, j])
            if i < 0:
                assert (img_max[:, f] > 0).sum() <= j
                continue
            assert img_max[i, f] == pytest.approx(float(img_max[order[j], f]), rel=1e-6)
            assert st.top_val[f, j] == pytest.approx(float(img_max[i, f]), rel=1e-5)
            np.testing.assert_allclose(
                st.top_maps[f, j], z[i, :, f].reshape(4, 4).numpy(), rtol=1e-5, atol=1e-7
            )
        ic = int(st.top_idx_corrupted[f, 0])
        if ic >= 0:
            np.testing.assert_allclose(
                st.top_maps_corrupted[f, 0], zc[ic, :, f].reshape(4, 4).numpy(), rtol=1e-5
            )
    # histogram: every non-zero clean code counted once, in its bin of (0, max_act]
    nz = z.reshape(-1, z.shape[-1])
    np.testing.assert_array_equal(st.hist.sum(1), (nz > 0).sum(0).numpy())
    f = int(st.live[np.argmax(st.density[st.live])])
    v = nz[:, f][nz[:, f] > 0] / st.max_act[f]
    ref = np.bincount(np.clip((v.numpy() * 8).astype(int), 0, 7), minlength=8)
    np.testing.assert_array_equal(st.hist[f], ref)


def test_class_association_counts_the_labels_of_the_top_images(setup):
    *_, labels, _, st = setup
    for f in st.live[:10]:
        top = [i for i in st.top_idx[f] if i >= 0]  # k = 4 <= n_assoc = 6: the first 4 of the 6
        counts = st.class_counts[f]
        assert counts.sum() <= 6
        for i in top:
            assert counts[labels[i]] >= 1
        assert st.label_class[f] == automatic_label(counts, CLASSES)


@torch.no_grad()
def reference_probs(model, sae, images, hook, f, factor):
    """Splice by hand: x -> x + decode(c with c_f * factor) - decode(c) at the patch tokens."""

    def edit(act, hook):
        x = act[:, 1:]
        c = sae.encode(x.reshape(-1, x.shape[-1]))
        c2 = c.clone()
        c2[:, f] *= factor
        out = act.clone()
        out[:, 1:] += (sae.decode(c2) - sae.decode(c)).reshape(x.shape)
        return out

    return model.run_with_hooks(images, fwd_hooks=[(hook, edit)]).softmax(-1)


def assert_spliced(st, model, sae, hook, source, f: int, j: int, i: int) -> None:
    """Latent ``f``'s ablated (x0) and doubled (x2) probabilities at its top-image column ``j`` equal a hand
    splice on image ``i`` of ``source`` (the images they were measured on)."""
    for factor, got in ((0.0, st.probs_ablate), (2.0, st.probs_double)):
        want = reference_probs(model, sae, source[i : i + 1], hook, f, factor)[0]
        np.testing.assert_allclose(got[f, j], want.numpy(), atol=2e-5)


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"]
)
def test_ablate_and_double_match_a_hand_splice(hook):
    # resid hooks take the fast path (forward resumed from the hook); hook_mlp_out runs the whole model
    model = tiny_model()
    sae = random_sae(hook, bias=-0.03 if "mlp" in hook else -0.6)  # mlp_out is ~20x smaller than resid
    images = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    st = feature_stats(model, sae, images, torch.arange(12) % 10, CLASSES, k=3, n_assoc=3, progress=False)
    np.testing.assert_allclose(st.probs, model(images).softmax(-1).detach().numpy(), atol=1e-6)
    checked = 0
    for f in st.live[:6]:
        for j in range(3):
            i = int(st.top_idx[f, j])
            if i < 0:
                continue
            assert_spliced(st, model, sae, hook, images, int(f), j, i)
            checked += 1
    assert checked >= 6
    # the edit changes the prediction somewhere (the test is not vacuous)
    assert np.abs(st.probs_ablate[st.live] - st.probs_double[st.live]).max() > 1e-4  # >> atol


@torch.no_grad()
def corrupted_only_sae(model, hook, images, corrupted, n: int = 6):
    """A random SAE whose ``n`` latents (from 4 on: 0-3 stay dead) with the widest margin between their largest
    pre-activation on the corrupted and on the clean patch tokens get an encoder bias a tenth of the way from the
    clean to the corrupted one: they fire on some corrupted tokens and on no clean one (their decoder rows x 10 at
    hook_mlp_out, whose activations are ~20x smaller than the residual stream's, so they move the prediction)."""
    sae = random_sae(hook, bias=-0.03 if "mlp" in hook else -0.6)

    def pre(x):  # the encoder's pre-activation without its bias, on the patch tokens
        b = sae.b_enc.clone()
        sae.b_enc.fill_(1e3)  # every latent on: ReLU is the identity
        z = brute_codes(model, sae, x, hook) - 1e3
        sae.b_enc.copy_(b)
        return z.amax((0, 1))

    top_clean, top_corr = pre(images), pre(corrupted)
    margin = top_corr - top_clean
    margin[:4] = -1.0
    chosen = torch.argsort(margin, descending=True)[:n]
    assert (margin[chosen] > 0).all()
    sae.b_enc[chosen] = -(top_clean[chosen] + 0.1 * margin[chosen])
    if "mlp" in hook:
        sae.W_dec[chosen] *= 10
    return sae


def corrupted_only_case(hook: str):
    """The tiny model, 30 random images, their noisy copies and a :func:`corrupted_only_sae` on them at ``hook``:
    the case of the tests of latents that fire only on corrupted images."""
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(30, 1, 28, 28, generator=g)
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return model, images, corrupted, corrupted_only_sae(model, hook, images, corrupted)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"])
def test_a_latent_that_fires_only_on_corrupted_images_is_ablated_on_its_top_corrupted_images(hook):
    """Known answer: a latent that never fires on a clean token has its ablate/double effect measured on its top
    corrupted images (the corrupted image through the model, the splice at the hook, as by hand), "before" is the
    model's own prediction on that corrupted image; a latent that fires on a clean token keeps its clean top
    images; one that never fires is not measured ("none", all zeros)."""
    model, images, corrupted, sae = corrupted_only_case(hook)
    labels = torch.arange(30) % 10
    st = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, k=3, n_assoc=3, progress=False
    )
    np.testing.assert_array_equal(st.ablation_set, st.effect_basis)  # every latent's effects computed
    only_c = np.flatnonzero(st.effect_basis == "corrupted")
    assert len(only_c) >= 2, "the case is not covered"
    np.testing.assert_allclose(st.probs_corrupted, model(corrupted).softmax(-1).detach().numpy(), atol=1e-6)
    checked = 0
    for f in only_c[:6]:
        which, idx = st.ablation_images(f)
        assert which == "corrupted" and idx.tolist() == st.top_idx_corrupted[f].tolist() and idx[0] >= 0
        for j, i in enumerate(idx):
            if i < 0:
                assert not st.probs_ablate[f, j].any() and not st.probs_double[f, j].any()
                continue
            assert_spliced(st, model, sae, hook, corrupted, int(f), j, int(i))
            checked += 1
    assert checked >= 3
    moved = np.abs(st.probs_ablate[only_c] - st.probs_double[only_c]).sum(-1)
    assert moved.max() > 1e-4  # the splice changes the prediction (the test is not vacuous)
    # a latent that fires on clean tokens: its clean top images, as before
    f = int(np.flatnonzero(st.effect_basis == "clean")[0])
    which, idx = st.ablation_images(f)
    assert which == "clean" and idx.tolist() == st.top_idx[f].tolist()
    i = int(idx[0])
    want = reference_probs(model, sae, images[i : i + 1], hook, f, 0.0)[0]
    np.testing.assert_allclose(st.probs_ablate[f, 0], want.numpy(), atol=2e-5)
    # a latent that never fires: not measured
    dead = np.flatnonzero(st.effect_basis == "none")
    assert len(dead) >= 4 and (st.ablation_set[dead] == "none").all()
    assert not st.probs_ablate[dead].any() and not st.probs_double[dead].any()
    assert st.ablation_images(int(dead[0])) == ("none", pytest.approx([-1, -1, -1]))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_direct_logit_effect_is_the_readout_of_resid_plus_direction(pool):
    model = tiny_model(global_pool=pool)
    sae = random_sae("blocks.0.hook_resid_post")
    images = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    st = feature_stats(model, sae, images, torch.arange(10) % 10, CLASSES, k=2, n_assoc=2, progress=False)
    d = decoder_directions(sae)
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter="blocks.1.hook_resid_post")
        final = cache["blocks.1.hook_resid_post"]
        for f in st.live[:5]:
            moved = final.clone()
            rows = slice(0, 1) if pool == "token" else slice(1, None)
            moved[:, rows] += float(st.mean_act[f]) * d[f]
            want = (model.unembed(moved) - model.unembed(final)).mean(0)
            np.testing.assert_allclose(st.logit_effect[f], want.numpy(), atol=1e-5)
    assert np.abs(st.logit_effect[st.live]).max() > 1e-3


def test_direct_logit_effect_of_a_latent_that_never_fires_on_clean_tokens(setup):
    """A latent that fires only on corrupted tokens: its effect at its mean activation on the corrupted tokens
    where it fires (not at 0, which gave an all-zero row that read as "no effect"), on the clean images' final
    residual stream; a latent that never fires: NaN, basis "none"."""
    model, sae, hook, images, labels, corrupted, st = setup
    only_c = np.flatnonzero(st.effect_basis == "corrupted")
    dead = np.flatnonzero(st.effect_basis == "none")
    assert len(only_c) >= 2 and set(range(4)) <= set(dead.tolist())
    assert (st.density[only_c] == 0).all() and (st.density_corrupted[only_c] > 0).all()
    assert np.isnan(st.mean_act[only_c]).all() and (st.mean_act_corrupted[only_c] > 0).all()
    zc = brute_codes(model, sae, corrupted, hook)
    d = decoder_directions(sae)
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter="blocks.1.hook_resid_post")
        final = cache["blocks.1.hook_resid_post"]
        for f in only_c:
            on = zc[..., f][zc[..., f] > 0]
            a = float(on.double().mean())  # brute force: the mean over the corrupted tokens where it fires
            assert st.mean_act_corrupted[f] == pytest.approx(a, rel=1e-5)
            moved = final.clone()
            moved[:, :1] += a * d[f]  # token pooling: the class token
            want = (model.unembed(moved) - model.unembed(final)).mean(0)
            np.testing.assert_allclose(st.logit_effect[f], want.numpy(), atol=1e-5)
    assert np.abs(st.logit_effect[only_c]).max() > 1e-3  # measured, not the old all-zero rows
    assert np.isnan(st.logit_effect[dead]).all()
    assert np.isfinite(st.logit_effect[st.live]).all()
    # without corrupted images, a latent that never fires on a clean token is not measured
    alone = feature_stats(model, sae, images, labels, CLASSES, k=4, n_assoc=6, progress=False)
    assert alone.mean_act_corrupted is None
    np.testing.assert_array_equal(alone.effect_basis == "none", alone.density == 0)
    assert np.isnan(alone.logit_effect[alone.density == 0]).all()
    np.testing.assert_allclose(
        alone.logit_effect[alone.live], st.logit_effect[alone.live], rtol=1e-5, atol=1e-6
    )


def test_basis_of_stats_that_do_not_record_it(setup):
    """FeatureStats made before effect_basis existed: "clean" where the latent fires on a clean token (their
    effect was computed at the clean mean), else "none" (computed at 0: not measured)."""
    import dataclasses

    *_, st = setup
    old = dataclasses.replace(st, effect_basis=None, mean_act_corrupted=None)
    np.testing.assert_array_equal(old.basis, np.where(st.density > 0, "clean", "none"))


def test_decoder_directions_are_the_decoder_rows_in_hook_units():
    sae = random_sae("blocks.0.hook_resid_post")
    np.testing.assert_allclose(decoder_directions(sae).numpy(), sae.W_dec.detach().numpy(), atol=1e-6)


def test_nearest_cosine_finds_a_permutation():
    a = torch.randn(20, 8)
    perm = torch.randperm(20)
    idx, cos = nearest_cosine(a, 3.0 * a[perm])
    np.testing.assert_array_equal(perm[idx].numpy(), np.arange(20))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="same width"):
        nearest_cosine(a, torch.randn(5, 7))


def test_labels_known_answers():
    assert automatic_label(np.array([0, 9, 1, 0]), ["a", "b", "c", "d"]) == "b 90%"
    assert automatic_label(np.array([4, 5, 1, 0]), ["a", "b", "c", "d"]) == "b / a"
    assert automatic_label(np.array([3, 3, 2, 2]), ["a", "b", "c", "d"]) == "mixed"
    assert automatic_label(np.array([0, 1, 2, 0]), ["a", "b", "c", "d"]) == "c (2 of 3)"
    assert automatic_label(np.zeros(4), ["a", "b", "c", "d"]) == "-"
    m = np.zeros((7, 7))
    m[0, 0] = 1.0
    assert location_label(m) == "top-left"
    m = np.zeros((7, 7))
    m[3, 3] = 1.0
    assert location_label(m) == "centre"
    m = np.zeros((7, 7))
    m[6, 3] = 1.0
    assert location_label(m) == "bottom-centre"
    assert location_label(np.ones((7, 7))) == "everywhere"
    assert location_label(np.zeros((7, 7))) == "nowhere"


def test_bad_input_is_refused(setup):
    model, sae, hook, images, labels, *_ = setup
    with pytest.raises(ValueError, match="10 class names"):
        feature_stats(model, sae, images, labels, CLASSES[:3], progress=False)
    with pytest.raises(ValueError, match="one label each"):
        feature_stats(model, sae, images, labels[:5], CLASSES, progress=False)
    bare = random_sae(hook)
    bare.cfg.metadata.hook_name = None
    with pytest.raises(ValueError, match="hook"):
        feature_stats(model, bare, images, labels, CLASSES, progress=False)
    with pytest.raises(ValueError, match="not a hook of this model"):
        feature_stats(model, sae, images, labels, CLASSES, hook="blocks.9.hook_resid_post", progress=False)
    wide = random_sae(hook, d_in=16)
    with pytest.raises(ValueError, match="d_in=16"):
        feature_stats(model, wide, images, labels, CLASSES, progress=False)


def test_max_effect_latents_computes_the_effects_of_the_most_often_firing_latents_only(setup):
    model, sae, hook, images, labels, corrupted, st = setup
    part = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, k=4, n_assoc=6, n_bins=8, progress=False,
        max_effect_latents=5,
    )  # fmt: skip
    assert st.effect_latents is None and np.array_equal(st.with_effects, st.live)
    # the 5 live latents firing on the most clean + corrupted patch tokens (ties: the lower index)
    tokens = np.round(
        (st.density * st.n_images + st.density_corrupted * st.n_corrupted) * 49
    )  # 7 x 7 patches
    order = sorted(st.live, key=lambda f: (-tokens[f], f))
    assert part.effect_latents.tolist() == sorted(order[:5]) == st.most_active(5).tolist()
    assert np.array_equal(part.with_effects, part.effect_latents)
    sel = part.effect_latents
    rest = np.setdiff1d(np.arange(st.d_sae), sel)
    rest_live = np.setdiff1d(part.live, sel)
    for key in ("logit_effect", "probs_ablate", "probs_double"):
        np.testing.assert_allclose(getattr(part, key)[sel], getattr(st, key)[sel], rtol=1e-5, atol=1e-6)
        assert not getattr(part, key)[rest_live].any(), key  # not computed: 0
    assert (part.ablation_set[rest_live] == "none").all()  # ... and said so
    assert (part.ablation_set[sel] == part.effect_basis[sel]).all()
    # a latent that never fires: its direct logit effect is NaN (not measured) with or without the limit
    dead = np.setdiff1d(rest, part.live)
    assert (
        len(dead) >= 4 and np.isnan(part.logit_effect[dead]).all() and np.isnan(st.logit_effect[dead]).all()
    )
    assert not part.probs_ablate[dead].any()
    # everything else is the full computation's
    for key in ("density", "max_act", "top_idx", "top_maps", "class_counts", "probs"):
        np.testing.assert_array_equal(getattr(part, key), getattr(st, key))
    many = feature_stats(model, sae, images, labels, CLASSES, k=4, progress=False, max_effect_latents=10_000)
    assert np.array_equal(many.effect_latents, many.live)
    with pytest.raises(ValueError, match="max_effect_latents must be >= 1"):
        feature_stats(model, sae, images, labels, CLASSES, progress=False, max_effect_latents=0)


def test_reused_codes_give_the_twice_encoded_stats(setup, monkeypatch):
    import dataclasses

    import mechvit.analysis.features as features

    model, sae, _, images, labels, corrupted, st = setup
    kw = dict(corrupted=corrupted, k=4, n_assoc=6, n_bins=8, batch_size=7, progress=False)  # several chunks
    fast = feature_stats(model, sae, images, labels, CLASSES, **kw)
    monkeypatch.setattr(features, "_REUSE_CODES", False)
    ref = feature_stats(model, sae, images, labels, CLASSES, **kw)
    for f in dataclasses.fields(ref):
        a, b = getattr(fast, f.name), getattr(ref, f.name)
        if isinstance(b, np.ndarray):
            nan = b.dtype.kind == "f"  # NaN = never fires (mean_act, logit_effect)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=nan), f.name
        else:
            assert a == b, f.name


def test_a_latent_that_fires_only_on_corrupted_images_is_labelled_from_them():
    """Known answer: a latent that never fires on a clean token but does on corrupted ones gets its class association
    and location from its top n_assoc corrupted images where it fires, with the corrupted images' labels (here every
    corrupted image it fires on is labelled c7: "c7 ..."), label_set "corrupted"; a latent that fires on clean tokens
    keeps the label of its clean images, bit for bit the one computed without corrupted images; one that never fires
    is "none" and "-"."""
    hook = "blocks.0.hook_resid_post"
    model, images, corrupted, sae = corrupted_only_case(hook)
    labels = torch.arange(30) % 10
    n_assoc = 8
    zc = brute_codes(model, sae, corrupted, hook)  # [M, P, F]
    z = brute_codes(model, sae, images, hook)
    only_c = np.flatnonzero(((z > 0).sum((0, 1)) == 0).numpy() & ((zc > 0).sum((0, 1)) > 0).numpy())
    assert len(only_c) >= 2, "the case is not covered"
    f = int(only_c[np.argmax((zc[..., only_c] > 0).any(1).sum(0).numpy())])  # on the most corrupted images
    fires_c = (zc[..., f] > 0).any(1).numpy()  # [M] the corrupted images it fires on
    corrupted_labels = np.where(fires_c, 7, np.arange(30) % 7)  # c7 exactly where f fires
    st = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, corrupted_labels=corrupted_labels, k=3,
        n_assoc=n_assoc, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(st.label_set, st.effect_basis)
    assert st.label_set[f] == "corrupted" and set(only_c) == set(np.flatnonzero(st.label_set == "corrupted"))
    # brute force: its top n_assoc corrupted images by their strongest patch, their labels and mean normalised map
    img_max = zc[..., f].amax(1)
    top = [int(i) for i in torch.argsort(img_max, descending=True, stable=True)[:n_assoc] if img_max[i] > 0]
    n = len(top)
    assert n == min(n_assoc, int(fires_c.sum())) and n >= 1
    want_counts = np.bincount(corrupted_labels[top], minlength=10)
    assert want_counts[7] == n
    np.testing.assert_array_equal(st.class_counts[f], want_counts)
    maps = np.stack([(zc[i, :, f] / img_max[i]).reshape(4, 4).numpy() for i in top])
    np.testing.assert_allclose(st.location[f], maps.mean(0), rtol=1e-5, atol=1e-7)
    want_class = f"c7 ({n} of {n})" if n < 5 else "c7 100%"
    where = location_label(maps.mean(0))
    assert st.label_class[f] == want_class and st.label_where[f] == where
    assert st.label[f] == f"{want_class} · {where}"
    assert st.shown_label(f) == f"{want_class} · {where} (corrupted images)"
    # a latent that fires on clean tokens: its clean label, bit for bit the one computed without corrupted images
    alone = feature_stats(model, sae, images, labels, CLASSES, k=3, n_assoc=n_assoc, progress=False)
    clean = np.flatnonzero(st.label_set == "clean")
    assert len(clean) > 5 and (alone.label_set[clean] == "clean").all()
    np.testing.assert_array_equal(st.class_counts[clean], alone.class_counts[clean])
    np.testing.assert_array_equal(st.location[clean], alone.location[clean])
    for key in ("label", "label_class", "label_where"):
        assert [getattr(st, key)[c] for c in clean] == [getattr(alone, key)[c] for c in clean], key
    assert all(st.shown_label(c) == st.label[c] for c in clean)
    # without corrupted images the corrupted-only latent is unlabelled ("none", "-", as before)
    assert alone.label_set[f] == "none" and alone.label[f] == "-" and not alone.class_counts[f].any()
    # a latent that never fires: "none", "-"
    dead = np.flatnonzero(st.label_set == "none")
    assert set(range(4)) <= set(dead.tolist())
    assert all(st.label[d] == "-" == st.shown_label(d) for d in dead) and not st.class_counts[dead].any()
    # stats made before label_set: every label from the clean images ("clean" where it has one, else "none")
    import dataclasses

    old = dataclasses.replace(alone, label_set=None)
    np.testing.assert_array_equal(old.labelled_on, alone.label_set)
    assert old.shown_label(f) == "-"


def test_the_top_corrupted_images_shown_are_those_of_a_ranking_of_k(setup):
    """The label of a latent that fires only on corrupted images needs its top n_assoc corrupted images: the top k
    shown (indices, values, maps) and the ablations on them are the first k of that larger ranking, exactly those of
    a ranking of k alone (n_assoc <= k: the ranking of k)."""
    model, sae, hook, images, labels, corrupted, st = setup  # k = 4, n_assoc = 6
    assert (st.label_set == "corrupted").sum() >= 2  # the larger ranking is used
    wide = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, k=4, n_assoc=16, n_bins=8, progress=False
    )
    narrow = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, k=4, n_assoc=4, n_bins=8, progress=False
    )
    for other in (st, wide):
        for key in ("top_idx_corrupted", "top_val_corrupted", "top_maps_corrupted", "top_idx", "top_maps"):
            np.testing.assert_array_equal(getattr(other, key), getattr(narrow, key), err_msg=key)
        for key in ("probs_ablate", "probs_double"):
            np.testing.assert_array_equal(getattr(other, key), getattr(narrow, key), err_msg=key)
    # ... and they are the brute-force ranking of the corrupted images by their strongest patch
    zc = brute_codes(model, sae, corrupted, hook)
    img_max = zc.amax(1)
    for f in np.flatnonzero(st.label_set == "corrupted"):
        order = [int(i) for i in torch.argsort(img_max[:, f], descending=True, stable=True)[:4]]
        got = [int(i) for i in wide.top_idx_corrupted[f]]
        assert got == [i if img_max[i, f] > 0 else -1 for i in order]
    # a wider ranking labels from more images: as many as the latent fires on, up to n_assoc
    fired = (img_max > 0).sum(0).numpy()
    only_c = np.flatnonzero(st.label_set == "corrupted")
    np.testing.assert_array_equal(wide.class_counts[only_c].sum(1), np.minimum(fired[only_c], 16))
    np.testing.assert_array_equal(st.class_counts[only_c].sum(1), np.minimum(fired[only_c], 6))


def test_corrupted_labels_are_checked(setup):
    model, sae, hook, images, labels, corrupted, st = setup
    both = torch.cat([corrupted, corrupted])
    with pytest.raises(ValueError, match="give corrupted_labels: 60 corrupted images but 30 labels"):
        feature_stats(model, sae, images, labels, CLASSES, corrupted=both, progress=False)
    with pytest.raises(ValueError, match="60 corrupted images but 30 corrupted labels"):
        feature_stats(
            model, sae, images, labels, CLASSES, corrupted=both, corrupted_labels=labels, progress=False
        )
    with pytest.raises(ValueError, match="corrupted_labels must index the 10 classes"):
        feature_stats(
            model,
            sae,
            images,
            labels,
            CLASSES,
            corrupted=corrupted,
            corrupted_labels=labels + 1,
            progress=False,
        )
    with pytest.raises(ValueError, match="without corrupted images"):
        feature_stats(model, sae, images, labels, CLASSES, corrupted_labels=labels, progress=False)
    # given as the default would give them: the same stats
    same = feature_stats(
        model, sae, images, labels, CLASSES, corrupted=corrupted, corrupted_labels=labels.tolist(), k=4,
        n_assoc=6, n_bins=8, progress=False,
    )  # fmt: skip
    assert same.label == st.label and np.array_equal(same.class_counts, st.class_counts)


def test_tied_top_images_are_ranked_by_value_then_image_index(monkeypatch):
    """Known answer with exact ties: the codes rounded up to quarters (the same latents fire on the same tokens;
    many images share their strongest patch's code, across the k-th place too). The top k images shown, clean and
    corrupted (indices, values, maps), are ranked by value descending, then image index ascending, for n_assoc = k,
    2k and 4k alike: those of a ranking of exactly k. The class association is over the first n_assoc images of
    that order (clean ones; corrupted ones, with their labels, for a latent that fires only on corrupted images)."""
    import mechvit.analysis.features as features
    from mechvit.sae.metrics import encode

    hook = "blocks.0.hook_resid_post"
    model, images, corrupted, sae = corrupted_only_case(hook)
    labels = torch.arange(30) % 10
    corrupted_labels = (torch.arange(30) * 3) % 10
    seen: list[torch.Tensor] = []

    def tied(sae, x):
        z = torch.ceil(encode(sae, x) * 4) / 4
        seen.append(z)
        return z

    monkeypatch.setattr(features, "sae_encode", tied)

    def ranking(v: list[float], n: int) -> list[int]:
        """The first n images by (value descending, index ascending), -1 where the latent does not fire."""
        order = sorted(range(len(v)), key=lambda i: (-v[i], i))[:n]
        return [i if v[i] > 0 else -1 for i in order]

    k, runs = 4, {}
    for n_assoc in (k, 2 * k, 4 * k):
        seen.clear()
        st = feature_stats(
            model, sae, images, labels, CLASSES, corrupted=corrupted, corrupted_labels=corrupted_labels, k=k,
            n_assoc=n_assoc, batch_size=64, progress=False,
        )  # fmt: skip
        assert len(seen) == 2  # one chunk each: the clean codes, then the corrupted ones
        runs[n_assoc] = st
        only_c = np.flatnonzero(st.label_set == "corrupted")
        assert len(only_c) >= 2, "the case is not covered"
        for z, top_idx, top_val, top_maps, classes in (
            (seen[0], st.top_idx, st.top_val, st.top_maps, labels),
            (seen[1], st.top_idx_corrupted, st.top_val_corrupted, st.top_maps_corrupted, corrupted_labels),
        ):
            z = z.reshape(30, 16, -1)
            img_max = z.amax(1)  # [N, F]
            s = img_max.sort(0, descending=True).values
            assert ((s[k - 1] == s[k]) & (s[k] > 0)).sum() >= 5, "no ties across the k-th place"
            for f in range(sae.cfg.d_sae):
                v = img_max[:, f].tolist()
                want = ranking(v, k)
                assert top_idx[f].tolist() == want, f
                np.testing.assert_array_equal(top_val[f], [v[i] if i >= 0 else 0.0 for i in want])
                for j, i in enumerate(want):
                    want_map = z[i, :, f].reshape(4, 4).numpy() if i >= 0 else np.zeros((4, 4))
                    np.testing.assert_array_equal(top_maps[f, j], want_map)
                # the class association: over the first n_assoc of the same order, of the set label_set names
                if st.label_set[f] == ("clean" if classes is labels else "corrupted"):
                    top = [i for i in ranking(v, n_assoc) if i >= 0]
                    np.testing.assert_array_equal(st.class_counts[f], np.bincount(classes[top], minlength=10))
    for st in (runs[2 * k], runs[4 * k]):  # the first k of a longer ranking: those of the ranking of k
        for key in (
            "top_idx",
            "top_val",
            "top_maps",
            "top_idx_corrupted",
            "top_val_corrupted",
            "top_maps_corrupted",
        ):
            np.testing.assert_array_equal(getattr(st, key), getattr(runs[k], key), err_msg=key)
        for key in ("probs_ablate", "probs_double"):
            np.testing.assert_array_equal(getattr(st, key), getattr(runs[k], key), err_msg=key)
