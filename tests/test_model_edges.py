"""HookedViT at the edges of timm's ViT family: distilled models without a head or in distilled training,
the route back to timm (dropout rates, patch-embedding bias), logit attributions at another input size,
in-place edits of the MAP pool's pattern, and images under CPU autocast. Each against timm (or open_clip)
on the same weights."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from mechvit import HookedViT

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)


def test_distilled_model_without_head_returns_timms_averaged_features():
    torch.manual_seed(0)
    m = VisionTransformerDistilled(**SMALL, num_classes=0).eval()
    h = HookedViT.from_timm(m).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = m(x), h(x)
    assert out.shape == ref.shape == (3, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_distilled_training_flag_goes_both_ways_and_returns_timms_pair():
    torch.manual_seed(0)
    m = VisionTransformerDistilled(**SMALL, num_classes=5)
    m.set_distilled_training(True)
    m.train()
    h = HookedViT.from_timm(m)
    assert h.distilled_training and h.training
    x = torch.randn(2, 3, 32, 32)
    ref, out = m(x), h(x)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert h.to_timm_model().distilled_training
    h.distilled_training = False
    assert not h.to_timm_model().distilled_training


@pytest.mark.parametrize("cls", [VisionTransformer, VisionTransformerDistilled])
def test_train_mode_head_dropout_draws_as_timm(cls):
    """Under one seed a training forward draws the same dropout masks as timm's, a distilled head's two
    tokens one after the other as timm's forward_head does."""
    torch.manual_seed(0)
    m = cls(**SMALL, num_classes=7, drop_rate=0.5).train()
    h = HookedViT.from_timm(m).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = h(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_to_timm_model_keeps_every_dropout_and_drop_path_rate():
    torch.manual_seed(0)
    kw = dict(pos_drop_rate=0.1, drop_rate=0.2, attn_drop_rate=0.3, proj_drop_rate=0.4, drop_path_rate=0.5)
    m = VisionTransformer(**SMALL, num_classes=7, **kw)
    h = HookedViT.from_timm(m)
    t = h.to_timm_model()
    assert (t.pos_drop.p, t.head_drop.p) == (0.1, 0.2)
    assert (t.blocks[1].attn.attn_drop.p, t.blocks[1].attn.proj_drop.p) == (0.3, 0.4)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in t.blocks]
    assert rates == [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks] == h.cfg.drop_path
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for model in (m, t):
        model.train()
        torch.manual_seed(1)
        outs.append(model(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_to_timm_model_without_patch_bias_and_without_ln_pre():
    """open_clip's ``no_ln_pre`` tower: a bias-free patch embedding with no pre-norm, which timm's
    constructor never builds (it ties the bias to ``not pre_norm``): rebuilt exactly."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    oc = open_clip.model.CLIP(
        embed_dim=12,
        vision_cfg=dict(
            image_size=16, patch_size=4, width=32, layers=2, head_width=8, mlp_ratio=2.0, no_ln_pre=True
        ),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1),
    ).eval()
    h = HookedViT.from_open_clip(oc).eval()
    assert not h.cfg.patch_bias and not h.cfg.pre_norm
    t = h.to_timm_model().eval()
    assert t.patch_embed.proj.bias is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(t(x), h(x), rtol=1e-5, atol=1e-5)


def test_to_timm_model_with_patch_bias_and_ln_pre():
    """The other untied case: a pre-norm model whose patch embedding has a bias."""
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL, num_classes=7, pre_norm=True).eval()
    with torch.no_grad():
        m.patch_embed.proj.bias = torch.nn.Parameter(torch.randn(32) * 0.1)
    h = HookedViT.from_timm(m).eval()
    assert h.cfg.patch_bias and h.cfg.pre_norm
    t = h.to_timm_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [32, 48, 16])
def test_logit_attrs_add_up_at_every_input_size_of_a_dynamic_avg_pooled_model(size):
    """Average pooling divides by the tokens pooled: at another input size than the configured one the
    attributions of the cached run still sum to the logit minus its constant terms."""
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL, num_classes=5, global_pool="avg", fc_norm=False, dynamic_img_size=True)
    h = HookedViT.from_timm(m.eval()).eval()
    cls = 3
    const = (h.W_H[:, cls] @ h.ln_final.bias + h.b_H[cls]).item()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, cache = h.run_with_cache(x)
        attrs = cache.logit_attrs(cache.decompose_resid(apply_ln=False), tokens=cls)
    total = attrs[:, :, h.cfg.n_prefix_tokens :].sum((0, 2)) + const
    torch.testing.assert_close(total, logits[:, cls], rtol=1e-4, atol=1e-5)
    assert "tokens_to_residual_directions" not in vars(h)  # the run's count was only borrowed
    with pytest.raises(ValueError, match="prefix tokens"):
        h.tokens_to_residual_directions(cls, n_tokens=1)


def test_map_pool_pattern_edited_in_place_still_backpropagates():
    torch.manual_seed(0)
    h = HookedViT.from_timm(VisionTransformer(**SMALL, num_classes=7, global_pool="map")).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])

    def zero_key0(p, hook):
        p[..., 0] = 0.0
        return p

    for name in ("blocks.1.attn.hook_pattern", "attn_pool.hook_pattern"):
        h.zero_grad()
        F.cross_entropy(h.run_with_hooks(x, fwd_hooks=[(name, zero_key0)]), y).backward()
        assert h.attn_pool.latent.grad is not None and torch.isfinite(h.attn_pool.latent.grad).all()


def test_bf16_images_under_cpu_autocast_run_as_timm():
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL, num_classes=7).eval()
    h = HookedViT.from_timm(m).eval()
    x = torch.randn(2, 3, 32, 32).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = m(x), h(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="dtype"):  # outside autocast the model's dtype is still required
        h(x)


def test_logit_attrs_with_a_pos_sliced_cache_keep_the_full_runs_pooling():
    """A cache sliced to some positions still comes from a run pooling over every token: its attributions
    are those of the full cache at those positions (the token count is the run's, not the slice's)."""
    torch.manual_seed(0)
    m = VisionTransformer(**SMALL, num_classes=5, global_pool="avg", fc_norm=False)
    h = HookedViT.from_timm(m.eval()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, full = h.run_with_cache(x)
        _, part = h.run_with_cache(x, pos_slice=(0, 5))
        a = full.logit_attrs(full.decompose_resid(apply_ln=False), tokens=3)[:, :, :5]
        b = part.logit_attrs(part.decompose_resid(apply_ln=False), tokens=3)
    assert part.run_tokens == full.run_tokens == h.cfg.n_tokens
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
