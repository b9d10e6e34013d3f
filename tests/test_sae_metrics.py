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
