"""Attribution patching against the exact sweep: exact where the metric is linear in the patched activation,
first-order close for small perturbations, the same layout, and on the shipped model the measured agreement
per component and layer (printed; docs/analysis.md reports it)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.analysis import activation_patching, attribution_patching

ROOT = Path(__file__).resolve().parents[1]
# random tiny models on flipped images: the denominator warning is expected and not what is tested here
pytestmark = pytest.mark.filterwarnings("ignore:patching denominator:RuntimeWarning")


def tiny(seed=0, dtype=torch.float32, **kw):
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
        **kw,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return HookedViT.from_timm(m).to(dtype).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(6, 1, 28, 28, generator=g)
    return clean, clean.flip(-1), torch.randint(0, 10, (6,), generator=g)


def _sae(d_in, d_sae):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.W_dec.normal_(0, 0.5)
        sae.b_enc.zero_()
    return sae


@pytest.mark.parametrize("direction", ["clean_to_corrupted", "corrupted_to_clean"])
def test_exact_where_the_metric_is_linear(data, direction):
    # No final norm: the last block's resid_post and mlp_out reach the logits through pooling and the head
    # only, so LD is linear in them and the first-order estimate is the exact patching effect.
    model = tiny(final_norm=False)
    clean, corrupted, y = data
    last = model.cfg.n_layers - 1
    for component in ("resid_post", "mlp_out"):
        for by in ("position", "layer"):
            kw = dict(component=component, by=by, layers=[last], direction=direction, progress=False)
            exact = activation_patching(model, clean, corrupted, y, **kw)
            attr = attribution_patching(model, clean, corrupted, y, **kw)
            if by == "position":
                assert float(exact.values.abs().max()) > 1e-2  # a real effect to estimate
            torch.testing.assert_close(attr.logit_diff, exact.logit_diff, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(attr.values, exact.values, atol=1e-4, rtol=1e-4)


def test_exact_for_sae_features_where_linear(data):
    # sae-lens decodes linearly and LD is linear in the last resid_post here: exact again, error term kept
    model = tiny(final_norm=False)
    clean, corrupted, y = data
    sae = _sae(32, 12)
    for by in ("feature", "feature_position"):
        kw = dict(component="sae", by=by, sae=sae, sae_hook="blocks.1.hook_resid_post", progress=False)
        if by == "feature_position":
            kw["positions"] = [0, 3, 7]
        exact = activation_patching(model, clean, corrupted, y, **kw)
        attr = attribution_patching(model, clean, corrupted, y, **kw)
        assert attr.dims == exact.dims and attr.labels == exact.labels
        torch.testing.assert_close(attr.logit_diff, exact.logit_diff, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("component", "by"),
    [
        ("resid_pre", "position"),
        ("resid_mid", "position"),
        ("attn_out", "position"),
        ("mlp_out", "layer"),
        ("z", "head"),
        ("z", "head_position"),
        ("pattern", "head"),
    ],
)
def test_first_order_for_small_perturbations(data, component, by):
    # corrupted = clean + eps * noise: exact and estimated changes of LD agree up to O(eps^2); with the
    # default final norm, so every nonlinearity of the model is in the path
    model = tiny(dtype=torch.float64)
    clean, _, y = data
    clean = clean.double()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(clean.shape, generator=g, dtype=torch.float64)
    errors = []
    # smaller eps reach the float32 rounding of PatchingResult.logit_diff (pattern's effects are ~100x smaller)
    for eps in (3e-1, 1e-1) if component == "pattern" else (1e-1, 1e-2):
        corrupted = clean + eps * noise
        kw = dict(component=component, by=by, positions=[0, 2, 9], progress=False)
        if by in ("head", "layer"):
            kw.pop("positions")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # tiny denominators are the point here
            exact = activation_patching(model, clean, corrupted, y, **kw)
            attr = attribution_patching(model, clean, corrupted, y, **kw)
        d_exact = exact.logit_diff - exact.corrupted_logit_diff
        d_attr = attr.logit_diff - attr.corrupted_logit_diff
        assert float(d_exact.abs().max()) > 0
        errors.append(float((d_attr - d_exact).abs().max() / d_exact.abs().max()))
    # the relative error shrinks with eps (first order: in proportion) and is small
    assert errors[1] < 0.6 * errors[0] and errors[1] < 0.02, errors


def test_same_layout_and_runs_as_the_exact_sweep(data):
    model = tiny(reg_tokens=1)
    clean, corrupted, y = data
    comps = ["resid_pre", ("resid_pre", "layer"), ("z", "head"), "attn_out"]
    many = attribution_patching(model, clean, corrupted, y, components=comps, batch_size=4, progress=False)
    assert list(many) == comps
    for item in comps:
        c, b = (item, "position") if isinstance(item, str) else item
        exact = activation_patching(model, clean, corrupted, y, component=c, by=b, progress=False)
        one = attribution_patching(model, clean, corrupted, y, component=c, by=b, progress=False)
        switched = activation_patching(
            model, clean, corrupted, y, component=c, by=b, progress=False, method="attribution"
        )
        for res in (many[item], one, switched):
            assert res.dims == exact.dims and res.labels == exact.labels
            assert res.values.shape == exact.values.shape and res.values.dtype == exact.values.dtype
            assert res.clean_logit_diff == pytest.approx(exact.clean_logit_diff, rel=1e-5)
            assert res.corrupted_logit_diff == pytest.approx(exact.corrupted_logit_diff, rel=1e-5)
            assert res.meta["method"] == "attribution" and res.meta["by"] == b
            assert res.n_sign_flipped == exact.n_sign_flipped
        # image batches of 4 (the components call) and of 6 (the single calls) give the same estimate
        torch.testing.assert_close(many[item].values, one.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(switched.values, one.values)
        assert "method" not in exact.meta


def test_frozen_weights_and_other_model(data):
    # weights without requires_grad still give gradients (the input carries the graph); across models
    model = tiny()
    other = tiny(seed=3)
    clean, _, y = data
    ref = attribution_patching(model, clean, clean, y, corrupted_model=other, progress=False)
    for p in list(model.parameters()) + list(other.parameters()):
        p.requires_grad_(False)
    frozen = attribution_patching(model, clean, clean, y, corrupted_model=other, progress=False)
    torch.testing.assert_close(frozen.values, ref.values)
    assert all(p.grad is None for p in model.parameters())


def test_bad_input(data):
    model = tiny()
    clean, corrupted, y = data
    with pytest.raises(ValueError, match="at least one"):
        attribution_patching(model, clean[:0], corrupted[:0], y[:0])
    with pytest.raises(ValueError, match="at least one component"):
        attribution_patching(model, clean, corrupted, y, components=[])
    with pytest.raises(ValueError, match="component must be one of"):
        attribution_patching(model, clean, corrupted, y, components=["q"])
    with pytest.raises(ValueError, match="pair"):
        attribution_patching(model, clean, corrupted, y, components=[("z", "head", 1)])
    with pytest.raises(ValueError, match="not available"):
        attribution_patching(model, clean, corrupted, y, component="resid_pre", by="head")
    with pytest.raises(ValueError, match="method"):
        activation_patching(model, clean, corrupted, y, method="fast")


# ---------------------------------------------------------------- the shipped model


def correlations(model, clean, corrupted, y, comps) -> dict:
    """Pearson r between attribution and exact scores per component (all layers) and per layer."""
    attr = attribution_patching(model, clean, corrupted, y, components=comps, progress=False)
    out = {}
    for item in comps:
        c, b = (item, "position") if isinstance(item, str) else item
        exact = activation_patching(model, clean, corrupted, y, component=c, by=b, progress=False)
        a, e = attr[item].values.double(), exact.values.double()
        r_all = float(torch.corrcoef(torch.stack([a.flatten(), e.flatten()]))[0, 1])
        per = [float(torch.corrcoef(torch.stack([a[i], e[i]]))[0, 1]) for i in range(a.shape[0])]
        out[item] = {"all": r_all, "per_layer": per, "max_abs": float((a - e).abs().max())}
    return out


@pytest.mark.slow
def test_agreement_on_the_shipped_model():
    ckpt = ROOT / "checkpoints" / "fmnist_vit_base"
    if not (ckpt / "card.json").is_file():
        pytest.skip("checkpoints/fmnist_vit_base not present")
    from mechvit.corruptions import corrupt
    from mechvit.data import load_fashion_mnist
    from mechvit.training.checkpoint import load_checkpoint

    try:
        x, y = load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist not installed")
    model = HookedViT.from_timm(load_checkpoint(ckpt)).eval()
    x, y = x[:32], y[:32]
    xc = corrupt(x, "gaussian_noise", 4, seed=0)
    comps = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", ("z", "head")]
    res = correlations(model, x, xc, y, comps)
    print("\nattribution vs exact patching, fmnist_vit_base, 32 test images, gaussian_noise 4 (Pearson r)")
    for item, r in res.items():
        layers = " ".join(f"{v:.2f}" for v in r["per_layer"])
        print(f"{str(item):16s} all {r['all']:.3f}  per layer {layers}  max |diff| {r['max_abs']:.3f}")
    assert res["resid_pre"]["all"] >= 0.8
    for item in comps:
        assert res[item]["all"] >= 0.8, (item, res[item])
        # per layer (50 positions or 4 heads each): the first-order estimate ranks the patches of every layer
        assert min(res[item]["per_layer"]) >= 0.7, (item, res[item]["per_layer"])
    # where the linear approximation is weakest (docs/analysis.md): the residual stream and MLP output of the
    # first blocks, where the noise-4 corruption moves activations farthest through LayerNorm and GELU; from
    # layer 2 on the estimate is near exact
    for item in ("resid_pre", "resid_mid", "resid_post", "mlp_out"):
        per = res[item]["per_layer"]
        assert min(range(len(per)), key=per.__getitem__) in (0, 1), (item, per)
        assert min(per[2:]) >= 0.95, (item, per)


def test_study_patching_method_switch(monkeypatch):
    # the study's patching section: exact by default, attribution on request, anything else refused; the step
    # calls the function the switch names
    from mechvit._dataclass_yaml import ConfigError
    from mechvit.study.config import load_study_config
    from mechvit.study.steps import patching as step

    assert load_study_config().patching.method == "exact"
    cfg = load_study_config(overrides={"patching.method": "attribution"})
    assert cfg.patching.method == "attribution"
    with pytest.raises(ConfigError, match="attribution"):
        load_study_config(overrides={"patching.method": "fast"})

    called = []

    class Stop(Exception):
        pass

    def fake(name):
        def f(*args, **kw):
            called.append(name)
            raise Stop

        return f

    monkeypatch.setattr(step, "attribution_patching", fake("attribution"))
    monkeypatch.setattr(step, "activation_patching", fake("exact"))

    class Ctx:  # just enough of StudyContext for the step to reach its first patching call
        def __init__(self, c):
            self.cfg, self.base_name, self.finetuned_names = c, "base", []

        def test_images(self, n):
            return torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)

        def model(self, name):
            return None

        def corrupted(self, cond, n):
            return torch.zeros(2, 1, 28, 28)

        def prep(self, x):
            return x

        def bar(self, n, desc):
            import contextlib

            return contextlib.nullcontext(type("B", (), {"update": lambda self, k: None})())

    for method in ("exact", "attribution"):
        c = load_study_config(overrides={"patching.method": method, "patching.across_models": False})
        with pytest.raises(Stop):
            step.run(Ctx(c), None, {})
        assert called[-1] == method
