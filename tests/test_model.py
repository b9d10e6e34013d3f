"""HookedViT: exact equivalence with timm across every supported flag, hooks, cache identities, files."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from mechvit import HookedViT

ATOL = 1e-5


def tiny(name: str = "vit_tiny_patch16_224", **kw) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=7)
    args.update(kw)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():  # timm initialises biases and LayerNorms trivially; make every weight matter
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "gamma" in n or "token" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def images(model_or_cfg, batch: int = 3, size: tuple[int, int] | None = None) -> torch.Tensor:
    if isinstance(model_or_cfg, HookedViT):
        c, hw = model_or_cfg.cfg.in_chans, model_or_cfg.cfg.img_size
    else:
        c, hw = model_or_cfg.patch_embed.proj.in_channels, model_or_cfg.patch_embed.img_size
    return torch.rand(batch, c, *(size or hw))


FLAGS = {
    "default": {},
    "no_cls_avg": dict(class_token=False, global_pool="avg"),
    "avg_no_fc_norm": dict(global_pool="avg", fc_norm=False),
    "max": dict(global_pool="max"),
    "avgmax": dict(global_pool="avgmax"),
    "map": dict(global_pool="map"),
    "no_pool": dict(global_pool=""),
    "regs": dict(reg_tokens=3),
    "regs_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "no_embed_class": dict(no_embed_class=True),
    "regs_avg_prefix": dict(reg_tokens=2, global_pool="avg", pool_include_prefix=True),
    "fc_norm_token": dict(fc_norm=True),
    "pre_norm": dict(pre_norm=True),
    "no_final_norm": dict(final_norm=False),
    "no_qkv_bias": dict(qkv_bias=False),
    "no_proj_bias": dict(proj_bias=False),
    "qk_norm": dict(qk_norm=True),
    "layer_scale": dict(init_values=0.3),
    "quick_gelu": dict(act_layer="quick_gelu"),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
    "mlp_ratio": dict(mlp_ratio=2.5),
    "rect_image_patch": dict(img_size=(24, 40), patch_size=(8, 4)),
    "gray_in_chans": dict(in_chans=1, img_size=28, patch_size=7),
    "headless": dict(num_classes=0),
    "pos_embed_none": dict(pos_embed="none"),
    "dynamic": dict(dynamic_img_size=True),
    "dynamic_pad": dict(dynamic_img_size=True, dynamic_img_pad=True),
}


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err} > {atol}"


def center_valid(kw: dict) -> bool:
    fc = kw.get("fc_norm", kw.get("global_pool") in ("avg", "max", "avgmax"))
    final = kw.get("final_norm", True)
    return final and (not fc or kw.get("global_pool", "token") in ("token", "avg"))


@pytest.mark.parametrize("flag", list(FLAGS))
def test_equivalence_with_timm(flag):
    kw = FLAGS[flag]
    ref = tiny(**kw)
    x = images(ref)
    with torch.no_grad():
        want = ref(x)
        hooked = HookedViT.from_timm(ref).eval()
        assert_close(hooked(x), want)
        logits, cache = hooked.run_with_cache(x)  # the explicit (hookable) path
        assert_close(logits, want)
        assert_close(hooked(x, readout_only=True), want)  # last block computes only the pooled rows
        assert_close(hooked.run_with_cache(x, readout_only=True)[0], want)
        assert_close(HookedViT.from_timm(ref, fold_ln=True).eval()(x), want)
        if center_valid(kw):
            both = HookedViT.from_timm(ref, fold_ln=True, center_writing_weights=True).eval()
            assert_close(both(x), want)
            assert_close(HookedViT.from_timm(ref, center_writing_weights=True).eval()(x), want)
        # to_timm_state_dict round-trips exactly into a fresh timm model
        fresh = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            **{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=7), **kw},
        ).eval()
        fresh.load_state_dict(hooked.to_timm_state_dict(), strict=True)
        assert torch.equal(fresh(x), want)


def test_dynamic_img_size_resamples_position_embedding_as_timm():
    ref = tiny(dynamic_img_size=True)
    hooked = HookedViT.from_timm(ref).eval()
    for size in [(40, 24), (48, 48), (16, 32)]:
        x = images(ref, size=size)
        with torch.no_grad():
            assert_close(hooked(x), ref(x))
    pad = tiny(dynamic_img_size=True, dynamic_img_pad=True)
    x = images(pad, size=(30, 37))
    with torch.no_grad():
        assert_close(HookedViT.from_timm(pad).eval()(x), pad(x))


def test_distilled_model_averages_both_heads():
    ref = tiny("deit_tiny_distilled_patch16_224")
    hooked = HookedViT.from_timm(ref).eval()
    x = images(ref)
    with torch.no_grad():
        assert_close(hooked(x), ref(x))
        _, cache = hooked.run_with_cache(x)
    assert hooked.token_labels()[:2] == ["CLS", "DIST"]
    assert cache["hook_pooled"].shape == (3, 2, 32)
    with torch.no_grad():
        assert_close(HookedViT.from_timm(ref, fold_ln=True, center_writing_weights=True).eval()(x), ref(x))
    ref.set_distilled_training(True)
    ref.train()
    hooked = HookedViT.from_timm(ref)
    hooked.distilled_training = True
    out = hooked(x)
    assert isinstance(out, tuple) and len(out) == 2


def test_fold_ln_removes_block_norm_weights():
    hooked = HookedViT.from_timm(tiny(), fold_ln=True)
    assert hooked.cfg.normalization_type == "LNPre"
    assert (
        hooked.blocks[0].ln1.weight is None and hooked.ln_final is not None and hooked.ln_final.weight is None
    )
    centred = HookedViT.from_timm(tiny(), center_writing_weights=True)
    assert centred.W_O.mean(-1).abs().max() < 1e-6
    assert centred.W_out.mean(-1).abs().max() < 1e-6
    assert centred.W_E.mean(-1).abs().max() < 1e-6
    assert centred.W_pos.mean(-1).abs().max() < 1e-6


def test_center_writing_weights_rejected_without_a_reading_norm():
    with pytest.raises(ValueError, match="read through a LayerNorm"):
        HookedViT.from_timm(tiny(final_norm=False), center_writing_weights=True)


REAL = [
    "vit_tiny_patch16_224",
    "vit_base_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224",
    "vit_little_patch16_reg4_gap_256",
    "vit_base_patch16_clip_quickgelu_224",
]


@pytest.mark.parametrize("name", REAL)
def test_real_architectures(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():  # non-trivial norms, biases and tokens
            if n.endswith("bias") or "norm" in n or "token" in n or "gamma" in n:
                p.add_(torch.randn_like(p) * 0.1)
    x = images(ref, batch=2)
    with torch.no_grad():
        want = ref(x)
        hooked = HookedViT.from_timm(ref).eval()
        assert hooked.cfg.timm_name == name
        assert_close(hooked(x), want)
        assert_close(HookedViT.from_timm(ref, fold_ln=True, center_writing_weights=True).eval()(x), want)
        sd = hooked.to_timm_state_dict()
        fresh = timm.create_model(name, pretrained=False).eval()
        fresh.load_state_dict(sd, strict=True)
        assert torch.equal(fresh(x), want)


# ---------------------------------------------------------------------------------------------
# hooks and the ActivationCache
# ---------------------------------------------------------------------------------------------
def block_hooks(layer: int, with_result: bool = False) -> list[str]:
    names = [
        "hook_resid_pre",
        "ln1.hook_scale",
        "ln1.hook_normalized",
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_attn_scores",
        "attn.hook_pattern",
        "attn.hook_z",
        "hook_attn_out",
        "hook_resid_mid",
        "ln2.hook_scale",
        "ln2.hook_normalized",
        "mlp.hook_pre",
        "mlp.hook_post",
        "hook_mlp_out",
        "hook_resid_post",
    ]
    if with_result:
        names.insert(names.index("attn.hook_z") + 1, "attn.hook_result")
    return [f"blocks.{layer}.{n}" for n in names]


def test_cache_keys_in_forward_order():
    hooked = HookedViT.from_timm(tiny(depth=1)).eval()
    _, cache = hooked.run_with_cache(images(hooked))
    want = [
        "hook_embed",
        "hook_pos_embed",
        "hook_full_embed",
        *block_hooks(0),
        "ln_final.hook_scale",
        "ln_final.hook_normalized",
        "hook_pooled",
        "hook_logits",
    ]
    assert list(cache.keys()) == want
    hooked = HookedViT.from_timm(tiny(depth=1, pre_norm=True, qk_norm=True)).eval()
    hooked.set_use_attn_result(True)
    _, cache = hooked.run_with_cache(images(hooked))
    keys = list(cache.keys())
    assert keys[3:5] == ["ln_pre.hook_scale", "ln_pre.hook_normalized"]
    assert "blocks.0.attn.q_norm.hook_scale" in keys and "blocks.0.attn.hook_result" in keys


@pytest.mark.parametrize("flag", ["default", "regs", "map", "pre_norm", "qk_norm", "dynamic"])
def test_every_hook_fires_once_with_documented_shape(flag):
    hooked = HookedViT.from_timm(tiny(**FLAGS[flag])).eval()
    hooked.set_use_attn_result(True)
    cfg = hooked.cfg
    B, T, D, H, Dh, M = 3, cfg.n_tokens, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    counts: dict[str, int] = {}
    shapes: dict[str, tuple] = {}

    def count(x, hook):
        counts[hook.name] = counts.get(hook.name, 0) + 1
        shapes[hook.name] = tuple(x.shape)

    with torch.no_grad():
        hooked.run_with_hooks(images(hooked, B), fwd_hooks=[(lambda n: True, count)])
    assert counts == {n: 1 for n in hooked.hook_dict}
    expect = {
        "hook_embed": (B, T, D),
        "hook_pos_embed": (B, T, D),
        "hook_full_embed": (B, T, D),
        "blocks.0.hook_resid_pre": (B, T, D),
        "blocks.0.ln1.hook_scale": (B, T, 1),
        "blocks.0.attn.hook_q": (B, T, H, Dh),
        "blocks.0.attn.hook_attn_scores": (B, H, T, T),
        "blocks.0.attn.hook_pattern": (B, H, T, T),
        "blocks.0.attn.hook_z": (B, T, H, Dh),
        "blocks.0.attn.hook_result": (B, T, H, D),
        "blocks.1.mlp.hook_post": (B, T, M),
        "blocks.1.hook_resid_post": (B, T, D),
        "hook_logits": (B, cfg.num_classes),
        "hook_pooled": (B, D),
    }
    for name, shape in expect.items():
        assert shapes[name] == shape, name


def test_fast_and_explicit_attention_agree():
    hooked = HookedViT.from_timm(tiny(qk_norm=True, init_values=0.5)).eval()
    x = images(hooked)
    with torch.no_grad():
        fast = hooked(x)
        slow = hooked.run_with_hooks(
            x, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: None)]
        )
    assert_close(fast, slow, 1e-6)


def test_zero_ablating_a_head_equals_removing_its_output_term():
    hooked = HookedViT.from_timm(tiny(init_values=0.4)).eval()
    x = images(hooked)
    layer, head = 1, 2

    def zero_head(z, hook):
        z[:, :, head] = 0
        return z

    _, cache = hooked.run_with_cache(x)
    term = cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ hooked.blocks[layer].attn.W_O[head]

    def subtract(out, hook):
        return out - term

    with torch.no_grad():
        ablated = hooked.run_with_hooks(x, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
        by_hand = hooked.run_with_hooks(x, fwd_hooks=[(f"blocks.{layer}.hook_attn_out", subtract)])
        plain = hooked(x)
    assert_close(ablated, by_hand)
    assert (ablated - plain).abs().max() > 1e-3


def test_weight_properties_act_as_in_transformer_lens():
    hooked = HookedViT.from_timm(tiny(init_values=0.5)).eval()
    cfg = hooked.cfg
    assert hooked.W_Q.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head)
    assert hooked.W_O.shape == (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model)
    assert hooked.W_in.shape == (cfg.n_layers, cfg.d_model, cfg.d_mlp)
    assert hooked.W_out.shape == (cfg.n_layers, cfg.d_mlp, cfg.d_model)
    assert hooked.W_E.shape == (3 * 8 * 8, cfg.d_model) and hooked.W_pos.shape == (cfg.n_tokens, cfg.d_model)
    assert hooked.W_H.shape == (cfg.d_model, cfg.num_classes) and hooked.b_H.shape == (cfg.num_classes,)
    x = images(hooked)
    _, cache = hooked.run_with_cache(x)
    ln1 = hooked.blocks[1].ln1  # hook_normalized is before the affine map, as in TransformerLens
    ln = cache["blocks.1.ln1.hook_normalized"] * ln1.weight + ln1.bias
    for name, W, b in (
        ("q", hooked.W_Q, hooked.b_Q),
        ("k", hooked.W_K, hooked.b_K),
        ("v", hooked.W_V, hooked.b_V),
    ):
        assert_close(torch.einsum("bpd,hde->bphe", ln, W[1]) + b[1], cache[f"blocks.1.attn.hook_{name}"])
    z = cache["blocks.1.attn.hook_z"]
    assert_close(
        torch.einsum("bphe,hed->bpd", z, hooked.W_O[1]) + hooked.b_O[1], cache["blocks.1.hook_attn_out"]
    )
    post = cache["blocks.0.mlp.hook_post"]
    assert_close(post @ hooked.W_out[0] + hooked.b_out[0], cache["blocks.0.hook_mlp_out"])
    assert_close(
        (cache["blocks.0.ln2.hook_normalized"] * hooked.blocks[0].ln2.weight + hooked.blocks[0].ln2.bias)
        @ hooked.W_in[0]
        + hooked.b_in[0],
        cache["blocks.0.mlp.hook_pre"],
    )
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(3, 16, -1)
    assert_close(patches @ hooked.W_E + hooked.b_E, cache["hook_embed"][:, 1:])


@pytest.mark.parametrize("flag", ["default", "layer_scale", "regs_no_embed_class", "avg_no_fc_norm"])
def test_activation_cache_identities(flag):
    hooked = HookedViT.from_timm(tiny(**FLAGS[flag])).eval()
    x = images(hooked)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(x)
    acc = cache.accumulated_resid(apply_ln=True)
    assert acc.shape[0] == hooked.cfg.n_layers + 1
    assert_close(hooked.head_logits(hooked.pool(acc[-1])), logits)
    assert_close(hooked.unembed(cache["blocks.1.hook_resid_post"]), logits)
    dec = cache.decompose_resid()
    assert_close(dec.sum(0), cache["blocks.1.hook_resid_post"])
    heads = cache.stack_head_results(layer=1)
    assert heads.shape[0] == hooked.cfg.n_heads
    assert_close(heads.sum(0) + hooked.blocks[0].attn.b_O, cache["blocks.0.hook_attn_out"])
    normed = cache.apply_ln_to_stack(cache["blocks.1.hook_resid_pre"][None], layer=1)[0]
    assert_close(normed, cache["blocks.1.ln1.hook_normalized"])
    y = torch.tensor([1, 4, 6])
    const = hooked.ln_final.bias @ hooked.W_H[:, y] + hooked.b_H[y]
    if hooked.cfg.global_pool == "token":
        attrs = cache.logit_attrs(dec[:, :, 0], y, pos_slice=0)
    else:  # average pooling: attributions summed over the patch positions
        patches = slice(hooked.cfg.n_prefix_tokens, None)
        attrs = cache.logit_attrs(dec[:, :, patches], y[:, None], pos_slice=patches).sum(-1)
    assert_close(attrs.sum(0), logits[torch.arange(3), y] - const)


def test_logit_directions_reject_nonlinear_readouts():
    hooked = HookedViT.from_timm(tiny(global_pool="max"))
    with pytest.raises(NotImplementedError, match="global_pool='max'"):
        hooked.tokens_to_residual_directions(1)


def test_stop_and_start_at_layer():
    hooked = HookedViT.from_timm(tiny()).eval()
    x = images(hooked)
    _, cache = hooked.run_with_cache(x)
    with torch.no_grad():
        mid = hooked(x, stop_at_layer=1)
        assert_close(mid, cache["blocks.1.hook_resid_pre"])
        assert_close(hooked(mid, start_at_layer=1), hooked(x))


def test_readout_only_computes_the_pooled_rows_of_the_last_block():
    for kw, rows in (({}, 1), (dict(reg_tokens=2), 1), (dict(global_pool="avg"), None)):
        hooked = HookedViT.from_timm(tiny(depth=3, **kw)).eval()
        assert hooked.readout_rows() == (None if rows is None else slice(0, rows))
        x = images(hooked)
        full, cache = hooked.run_with_cache(x)
        part, cache_ro = hooked.run_with_cache(x, readout_only=True)
        assert_close(part, full, 1e-6)
        T = hooked.cfg.n_tokens
        assert cache_ro["blocks.1.hook_resid_post"].shape[1] == T  # earlier blocks untouched
        assert cache_ro["blocks.2.hook_resid_pre"].shape[1] == T
        assert cache_ro["blocks.2.attn.hook_pattern"].shape[-2:] == (rows or T, T)
        assert cache_ro["blocks.2.hook_resid_post"].shape[1] == (rows or T)
        assert_close(
            cache_ro["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_post"][:, : rows or T], 1e-6
        )
        mid = hooked(x, stop_at_layer=2, readout_only=True)  # stop_at_layer: nothing to read out
        assert mid.shape[1] == T


def test_readout_only_with_a_distillation_token():
    model = tiny("deit_tiny_distilled_patch16_224")
    hooked = HookedViT.from_timm(model).eval()
    assert hooked.readout_rows() == slice(0, 2)
    x = images(hooked)
    with torch.no_grad():
        assert_close(hooked(x, readout_only=True), model(x))


def test_token_labels_follow_timm_order():
    hooked = HookedViT.from_timm(tiny(reg_tokens=2))
    labels = hooked.token_labels()
    assert (
        labels[:4] == ["CLS", "reg0", "reg1", "r0c0"]
        and labels[-1] == "r3c3"
        and len(labels) == hooked.cfg.n_tokens
    )


# ---------------------------------------------------------------------------------------------
# files and checkpoints
# ---------------------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    hooked = HookedViT.from_timm(tiny(reg_tokens=1, init_values=0.2), fold_ln=True).eval()
    hooked.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    back = HookedViT.from_pretrained(tmp_path / "m")
    assert back.cfg == hooked.cfg
    x = images(hooked)
    with torch.no_grad():
        assert torch.equal(back(x), hooked(x))


def test_truncated_weights_give_a_clear_error(tmp_path):
    HookedViT.from_timm(tiny()).save_pretrained(tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        HookedViT.from_pretrained(tmp_path)


def test_pickle_in_place_of_safetensors_is_not_unpickled(tmp_path):
    HookedViT.from_timm(tiny()).save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        HookedViT.from_pretrained(tmp_path)


def test_weights_of_another_architecture_give_a_clear_error(tmp_path):
    HookedViT.from_timm(tiny(embed_dim=48)).save_pretrained(tmp_path / "wide")
    HookedViT.from_timm(tiny()).save_pretrained(tmp_path / "narrow")
    (tmp_path / "wide" / "config.json").write_text((tmp_path / "narrow" / "config.json").read_text())
    with pytest.raises(ValueError, match="does not fit this architecture: shape mismatch"):
        HookedViT.from_pretrained(tmp_path / "wide")
    (tmp_path / "narrow" / "config.json").write_text(json.dumps({"format": "resnet", "config": {}}))
    with pytest.raises(ValueError, match="not a HookedViT config"):
        HookedViT.from_pretrained(tmp_path / "narrow")


def test_from_timm_name_with_checkpoint(tmp_path):
    from safetensors.torch import save_file

    kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    ref = tiny(**kw)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    x = images(ref)
    for f in ("w.safetensors", "w.pth"):
        hooked = HookedViT.from_timm("vit_tiny_patch16_224", checkpoint_path=tmp_path / f, **kw).eval()
        with torch.no_grad():
            assert torch.equal(hooked(x), ref(x))
    with pytest.raises(ValueError, match=r"does not fit this architecture: .*shape mismatch"):
        HookedViT.from_timm(
            "vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", **{**kw, "embed_dim": 64}
        )
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        HookedViT.from_timm("vit_tiny_patch16_224", checkpoint_path=tmp_path / "bad.safetensors", **kw)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bad_images_raise_value_errors():
    hooked = HookedViT.from_timm(tiny())
    with pytest.raises(ValueError, match=r"expected 3 channels, got 1"):
        hooked(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of size 32x32, got 28x28"):
        hooked(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"dtype torch.float32 .* got torch.uint8"):
        hooked(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got torch.float64"):
        hooked(torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(4 dims\), got 3 dims"):
        hooked(torch.rand(3, 32, 32))
    dyn = HookedViT.from_timm(tiny(dynamic_img_size=True))
    with pytest.raises(ValueError, match="divisible by the patch size 8x8, got 30x32"):
        dyn(torch.rand(1, 3, 30, 32))


@pytest.mark.parametrize(
    "make, feature",
    [
        (
            lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28),
            "Eva is not supported",
        ),
        (
            lambda: timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=32),
            "VisionTransformerRelPos",
        ),
        (lambda: tiny(mlp_layer=__import__("timm").layers.SwiGLUPacked, mlp_ratio=2), "SwiGLU"),
        (lambda: tiny(block_fn=__import__("timm").models.vision_transformer.ResPostBlock), "ResPostBlock"),
        (lambda: tiny(scale_attn_norm=True), "scale_attn_norm"),
        (lambda: tiny(scale_mlp_norm=True), "scale_mlp_norm"),
        (lambda: tiny(embed_norm_layer="layernorm"), "embed_norm_layer"),
        (lambda: tiny(patch_drop_rate=0.1), "patch dropout"),
        (lambda: tiny(norm_layer="rmsnorm"), "RmsNorm"),
        (lambda: tiny(act_layer="silu"), "SiLU"),
        (lambda: tiny(global_pool="prr"), "prr"),
        (lambda: timm.create_model("vit_small_r26_s32_224", pretrained=False), "HybridEmbed"),
    ],
)
def test_unsupported_architectures_are_named(make, feature):
    with pytest.raises(NotImplementedError, match=feature):
        HookedViT.from_timm(make())


def test_editing_the_layer_norm_scale_is_honoured():
    hooked = HookedViT.from_timm(tiny()).eval()
    x = images(hooked)
    _, cache = hooked.run_with_cache(x)
    resid = cache["blocks.1.hook_resid_pre"]
    centred = resid - resid.mean(-1, keepdim=True)

    def double_in_place(scale, hook):
        scale.mul_(2)

    def double(scale, hook):
        return scale * 2

    seen: dict = {}

    def keep(t, hook):
        seen["n"] = t

    for fn in (double_in_place, double):
        seen.clear()
        hooks = [("blocks.1.ln1.hook_scale", fn), ("blocks.1.ln1.hook_normalized", keep)]
        with torch.no_grad():
            hooked.run_with_hooks(x, fwd_hooks=hooks)
        want = centred / (2 * cache["blocks.1.ln1.hook_scale"])  # hook_normalized: before the affine map
        assert_close(seen["n"], want)


def test_hooks_context_manager_and_names_filter():
    hooked = HookedViT.from_timm(tiny()).eval()
    x = images(hooked)
    seen = []
    with torch.no_grad():
        with hooked.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: seen.append(hook.name))]):
            hooked(x)
        hooked(x)  # the hook is gone after the context
    assert seen == ["blocks.0.hook_resid_post"]
    _, cache = hooked.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    assert list(cache.keys()) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    assert torch.allclose(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(3, 4, 17))


def test_stack_head_results_with_the_attn_result_switch():
    hooked = HookedViT.from_timm(tiny(init_values=0.5)).eval()
    x = images(hooked)
    _, computed = hooked.run_with_cache(x)
    hooked.set_use_attn_result(True)
    _, hooked_cache = hooked.run_with_cache(x)
    assert "blocks.1.attn.hook_result" in hooked_cache and "blocks.1.attn.hook_result" not in computed
    a, labels = hooked_cache.stack_head_results(return_labels=True)
    b = computed.stack_head_results()
    assert labels[:2] == ["L0H0", "L0H1"] and a.shape == (8, 3, 17, 32)
    assert_close(a, b)
    with_rest = hooked_cache.stack_head_results(incl_remainder=True)
    assert_close(with_rest.sum(0), hooked_cache["blocks.1.hook_resid_post"])


def test_logit_attrs_accept_class_names():
    hooked = HookedViT.from_timm(tiny(num_classes=3)).eval()
    hooked.cfg.class_names = ["cat", "dog", "emu"]
    x = images(hooked)
    _, cache = hooked.run_with_cache(x)
    stack = cache.decompose_resid()[:, :, 0]
    by_name = cache.logit_attrs(stack, "dog", incorrect_tokens="emu", pos_slice=0)
    by_index = cache.logit_attrs(stack, 1, incorrect_tokens=2, pos_slice=0)
    assert_close(by_name, by_index)
    with pytest.raises(ValueError, match="unknown class name 'yak'"):
        hooked.to_single_token("yak")
