"""HookedViT.from_open_clip: exact equivalence with open_clip's encode_image on small random models."""

from __future__ import annotations

import json

import pytest
import torch

from mechvit import HookedViT

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP  # noqa: E402

ATOL = 1e-5
TEXT = dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)


def tiny_clip(quick_gelu: bool = False, embed_dim: int = 12, **vision) -> CLIP:
    vis = dict(image_size=16, patch_size=4, width=32, layers=2, head_width=8, mlp_ratio=2.0)
    vis.update(vision)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vis, text_cfg=TEXT, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # open_clip initialises norms and biases trivially; make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


VARIANTS = {
    "default": dict(),
    "quick_gelu": dict(quick_gelu=True),
    "avg_pool": dict(pool_type="avg"),
    "final_ln_after_pool": dict(final_ln_after_pool=True),
    "avg_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True),
    "layer_scale_no_ln_pre": dict(ls_init_value=0.5, no_ln_pre=True, quick_gelu=True),
    "no_pool": dict(pool_type="none"),
    "sincos_pos": dict(pos_embed_type="sin_cos_2d"),
    "rect_patches": dict(image_size=(16, 12), patch_size=(4, 3)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_equivalence_with_encode_image(name):
    oc = tiny_clip(**VARIANTS[name])
    model = HookedViT.from_open_clip(oc)
    x = torch.randn(3, 3, *model.cfg.img_size)
    with torch.no_grad():
        ref = oc.encode_image(x)
        y, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
        # open_clip's own blocks, run one at a time, give each residual stream
        h = oc.visual._embeds(x)
        resid = []
        for blk in oc.visual.transformer.resblocks:
            h = blk(h)
            resid.append(h)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    for i, r in enumerate(resid):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], r, atol=ATOL, rtol=0)
    with torch.no_grad():  # control: the comparison can fail
        assert (model(torch.randn_like(x)) - y).abs().max() > 1e-3


def test_visual_tower_alone_and_flags():
    oc = tiny_clip(quick_gelu=True)
    model = HookedViT.from_open_clip(oc.visual)
    cfg = model.cfg
    assert (cfg.eps, cfg.act_fn, cfg.pre_norm, cfg.final_norm, cfg.num_classes) == (
        1e-5,
        "quick_gelu",
        True,
        True,
        12,
    )
    assert not cfg.patch_bias
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oc.visual(x), atol=ATOL, rtol=0)


def test_registered_config_and_local_checkpoint(tmp_path):
    """A user's architecture registered with open_clip, weights from a local safetensors / torch file."""
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 12,
        "vision_cfg": dict(image_size=16, patch_size=4, width=32, layers=2, head_width=8, mlp_ratio=2.0),
        "text_cfg": TEXT,
    }
    (tmp_path / "mechvit-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mechvit-tiny-test.json")
    src = open_clip.create_model("mechvit-tiny-test", pretrained=None).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = src.encode_image(x)
        for f in ("w.safetensors", "w.pt"):
            model = HookedViT.from_open_clip("mechvit-tiny-test", checkpoint_path=tmp_path / f)
            torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
    # open_clip's own local folder format: open_clip_config.json + weights
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    model = HookedViT.from_open_clip(f"local-dir:{folder}")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)


def test_name_errors(tmp_path):
    with pytest.raises(ValueError, match="does not download"):
        HookedViT.from_open_clip("hf-hub:someone/some-clip")
    with pytest.raises(ValueError, match="pass checkpoint_path"):
        HookedViT.from_open_clip("ViT-B-32", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedViT.from_open_clip("ViT-B-32", checkpoint_path=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="apply to a model name"):
        HookedViT.from_open_clip(tiny_clip(), checkpoint_path=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="expected an open_clip model"):
        HookedViT.from_open_clip(3.0)


@pytest.mark.parametrize(
    "vision, match",
    [
        (dict(qk_norm=True), "CustomResidualAttentionBlock"),
        (dict(attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=2), "attentional pooler"),
        (dict(patch_dropout=0.5), "patch dropout"),
    ],
)
def test_unsupported_raise_naming_the_feature(vision, match):
    with pytest.raises(NotImplementedError, match=match):
        HookedViT.from_open_clip(tiny_clip(**vision))


def test_resnet_tower_is_refused():
    rn = CLIP(embed_dim=12, vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8), text_cfg=TEXT)
    with pytest.raises(NotImplementedError, match="ModifiedResNet is not supported"):
        HookedViT.from_open_clip(rn)
