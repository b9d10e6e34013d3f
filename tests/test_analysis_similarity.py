import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.analysis.similarity import layer_cka, linear_cka


def _gram_cka(x, y, debiased):
    """Reference: CKA from Gram matrices (biased HSIC with centring; HSIC_1 of Song et al. 2012)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    K, L = x @ x.T, y @ y.T

    def hsic(K, L):
        if not debiased:
            H = torch.eye(n, dtype=K.dtype) - 1.0 / n
            return torch.trace(K @ H @ L @ H)
        K, L = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
        one = torch.ones(n, dtype=K.dtype)
        return (
            torch.trace(K @ L)
            + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ K @ L @ one
        ) / (n * (n - 3))

    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


@pytest.mark.parametrize("debiased", [False, True])
def test_orthogonal_and_scale_invariance(debiased):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    assert linear_cka(x, x @ q, debiased=debiased) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 7.5 * x, debiased=debiased) == pytest.approx(1.0, abs=1e-9)
    y = torch.randn(40, 5, generator=g) + x[:, :5]
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(
        linear_cka(3 * x, 0.2 * y, debiased=debiased), abs=1e-6
    )
    assert linear_cka(x, y, debiased=debiased) < 0.99


@pytest.mark.parametrize("debiased", [False, True])
def test_matches_gram_reference(debiased):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(25, 8, generator=g), torch.randn(25, 30, generator=g)
    y[:, :8] += 2 * x
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(_gram_cka(x, y, debiased), abs=1e-10)


def test_debiased_removes_small_sample_bias():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(100, 400, generator=g), torch.randn(100, 400, generator=g)  # independent, wider than n
    biased, unbiased = linear_cka(x, y), linear_cka(x, y, debiased=True)
    assert biased > 0.5
    assert abs(unbiased) < 0.06


def test_bad_input():
    with pytest.raises(ValueError, match="same number of examples"):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(torch.randn(3, 3), torch.randn(3, 3), debiased=True)
    with pytest.raises(ValueError, match="shape"):
        linear_cka(torch.randn(5), torch.randn(5))


def tiny(seed):
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
    )
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return HookedViT.from_timm(m).eval()


def test_layer_cka(tmp_path):
    a, b = tiny(0), tiny(1)
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    same = layer_cka(a, x, a, progress=False, batch_size=5)
    torch.testing.assert_close(same.linear, torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(same.debiased, torch.ones(2), atol=1e-6, rtol=0)
    other = layer_cka(a, x, b, token_reduction="cls", progress=False)
    _, ca = a.run_with_cache(x)
    _, cb = b.run_with_cache(x)
    ref = linear_cka(ca["blocks.1.hook_resid_post"][:, 0], cb["blocks.1.hook_resid_post"][:, 0])
    # float32 Gram matrices summed batch by batch vs in one product: equal to float32 rounding (~1e-6 relative)
    assert float(other.linear[1]) == pytest.approx(ref, rel=1e-5)
    inputs = layer_cka(
        a, x, images_b=x.flip(-1), token_reduction="mean_patches", hook="mlp_out", progress=False
    )
    assert torch.all(inputs.linear < 1 - 1e-3)
    inputs.save_csv(tmp_path / "cka.csv")
    assert len(inputs.rows()) == 2 and inputs.to_dict()["hook"] == "mlp_out"
    with pytest.raises(ValueError, match="token_reduction"):
        layer_cka(a, x, token_reduction="max")
    with pytest.raises(ValueError, match="hook"):
        layer_cka(a, x, hook="resid")


def test_activations_once_then_cka_per_pair_equals_layer_cka():
    """The study's path (each run's activations once, every reduction from one pass, then CKA per pair)
    gives layer_cka's result exactly, CI included."""
    from mechvit.analysis.similarity import cka_from_activations, layer_activations

    a, b = tiny(0), tiny(1)
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reds = ("cls", "tokens", "mean_patches", "flatten")
    acts_a = layer_activations(a, x, token_reductions=reds, batch_size=5)
    acts_b = layer_activations(b, x, token_reductions=reds, batch_size=5)
    assert acts_a["tokens"]["blocks.0.hook_resid_post"].shape == (12 * 17, 32)  # 16 patches + the class token
    for red in reds:
        boot = 0 if red == "tokens" else 50
        ref = layer_cka(a, x, b, token_reduction=red, batch_size=5, progress=False, n_resamples=boot, seed=3)
        got = cka_from_activations(acts_a[red], acts_b[red], token_reduction=red, n_resamples=boot, seed=3)
        assert got.to_dict() == ref.to_dict()
    with pytest.raises(ValueError, match="same layers"):
        cka_from_activations(
            acts_a["cls"], {"blocks.0.hook_resid_post": acts_b["cls"]["blocks.0.hook_resid_post"]}
        )
    with pytest.raises(ValueError, match="one example per image"):
        cka_from_activations(acts_a["tokens"], acts_b["tokens"], token_reduction="tokens", n_resamples=10)
    with pytest.raises(ValueError, match="token_reduction"):
        layer_activations(a, x, token_reductions=("cls", "max"))
