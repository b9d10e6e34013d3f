"""HookedViT.from_hf: exact equivalence with HF transformers' own forward on small random models."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

from mechvit import HookedViT

ATOL = 1e-5
KW = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    num_channels=3,
)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises biases, norms and tokens trivially; perturb every weight so that each one matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _outputs(name: str, m, o):
    if name in ("vit_cls", "deit_cls", "deit_teacher", "dinov2_cls", "dinov2_reg_cls"):
        return o.logits
    if name in ("vit_nopool", "deit_nopool"):
        return o.last_hidden_state[:, 0]
    if name == "clip_proj":
        return o.image_embeds
    if name == "siglip_nohead":
        return o.last_hidden_state
    return o.pooler_output


CASES = {
    "vit_cls": lambda: T.ViTForImageClassification(T.ViTConfig(**KW, num_labels=5)),
    "vit_cls_noqkvbias": lambda: T.ViTForImageClassification(T.ViTConfig(**KW, num_labels=5, qkv_bias=False)),
    "vit_nopool": lambda: T.ViTModel(T.ViTConfig(**KW), add_pooling_layer=False),
    "deit_cls": lambda: T.DeiTForImageClassification(T.DeiTConfig(**KW, num_labels=5)),
    "deit_teacher": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**KW, num_labels=5)),
    "deit_nopool": lambda: T.DeiTModel(T.DeiTConfig(**KW), add_pooling_layer=False),
    "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**KW)),
    "clip_proj": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**KW, projection_dim=8)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**KW)),
    "dinov2_reg": lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**KW, num_register_tokens=2)
    ),
    "dinov2_cls": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**KW, num_labels=5)),
    "dinov2_reg_cls": lambda: T.Dinov2WithRegistersForImageClassification(
        T.Dinov2WithRegistersConfig(**KW, num_register_tokens=3, num_labels=5)
    ),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**KW, hidden_act="gelu_pytorch_tanh")),
    "siglip_nohead": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**KW, vision_use_head=False)),
}
# the tanh-free rename of "vit_cls_noqkvbias" reads like vit_cls
_OUT = {"vit_cls_noqkvbias": "vit_cls"}


@pytest.mark.parametrize("name", list(CASES))
def test_equivalence_with_transformers(name):
    hf = randomise(CASES[name]())
    model = HookedViT.from_hf(hf)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        o = hf(x, output_hidden_states=True)
        y, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    ref = _outputs(_OUT.get(name, name), hf, o)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    # intermediate residual streams: HF's hidden_states[i + 1] is the output of layer i
    assert len(o.hidden_states) == model.cfg.n_layers + 1
    for i in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache[f"blocks.{i}.hook_resid_post"], o.hidden_states[i + 1], atol=ATOL, rtol=0
        )
    # and the control: a different input gives a different output (the comparison can fail)
    with torch.no_grad():
        assert (model(torch.randn(3, 3, 16, 16)) - y).abs().max() > 1e-3


def test_architecture_flags_are_read():
    cfg = HookedViT.from_hf(randomise(CASES["clip"]())).cfg
    assert (cfg.eps, cfg.act_fn, cfg.pre_norm, cfg.final_norm, cfg.fc_norm) == (
        1e-5,
        "quick_gelu",
        True,
        False,
        True,
    )
    assert not cfg.patch_bias
    cfg = HookedViT.from_hf(randomise(CASES["vit_cls"]())).cfg
    assert (cfg.eps, cfg.act_fn, cfg.num_classes) == (1e-12, "gelu", 5)
    cfg = HookedViT.from_hf(randomise(CASES["dinov2_reg"]())).cfg
    assert cfg.layer_scale and cfg.n_reg_tokens == 2 and cfg.no_embed_class
    cfg = HookedViT.from_hf(randomise(CASES["siglip"]())).cfg
    assert (cfg.global_pool, cfg.class_token, cfg.act_fn) == ("map", False, "gelu_tanh")


def test_class_names_from_id2label():
    hf = randomise(T.ViTForImageClassification(T.ViTConfig(**KW, id2label={0: "cat", 1: "dog"})))
    model = HookedViT.from_hf(hf)
    assert model.cfg.class_names == ["cat", "dog"]
    assert model.to_single_token("dog") == 1
    # HF's placeholder LABEL_i names are not carried
    assert HookedViT.from_hf(randomise(CASES["vit_cls"]())).cfg.class_names is None


def test_local_save_pretrained_folder(tmp_path):
    hf = randomise(CASES["deit_teacher"]())
    hf.save_pretrained(tmp_path / "ft")
    model = HookedViT.from_hf(tmp_path / "ft")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=0)
    # the HookedViT round trip through its own format keeps the outputs
    model.save_pretrained(tmp_path / "hooked")
    again = HookedViT.from_pretrained(tmp_path / "hooked")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_local_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not download"):
        HookedViT.from_hf(tmp_path / "missing")
    hf = randomise(CASES["vit_cls"]())
    hf.save_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        HookedViT.from_hf(tmp_path / "m")
    with pytest.raises(ValueError, match="expected a transformers model"):
        HookedViT.from_hf(42)


def test_fold_ln_keeps_outputs():
    hf = randomise(CASES["vit_cls"]())
    x = torch.randn(2, 3, 16, 16)
    folded = HookedViT.from_hf(hf, fold_ln=True, center_writing_weights=True)
    assert folded.cfg.fold_ln and folded.cfg.centered
    with torch.no_grad():
        torch.testing.assert_close(folded(x), hf(x).logits, atol=1e-4, rtol=0)


def test_to_timm_round_trip_of_a_converted_model():
    """An HF DINOv2 converted to HookedViT then to timm keeps its outputs (timm is the round-trip target)."""
    hf = randomise(CASES["dinov2"]())
    model = HookedViT.from_hf(hf)
    timm_model = model.to_timm_model().eval()
    back = HookedViT.from_timm(timm_model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = hf(x).pooler_output
        torch.testing.assert_close(timm_model(x), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: T.ViTModel(T.ViTConfig(**KW)), "pooler"),
        (lambda: T.DeiTModel(T.DeiTConfig(**KW)), "pooler"),
        (lambda: T.Dinov2Model(T.Dinov2Config(**KW, use_swiglu_ffn=True)), "use_swiglu_ffn"),
        (lambda: T.ViTForImageClassification(T.ViTConfig(**KW, hidden_act="relu")), "activation 'relu'"),
        (lambda: T.Dinov2Model(T.Dinov2Config(**(KW | dict(image_size=[16, 12])))), "non-square"),
        (lambda: T.BeitModel(T.BeitConfig(**KW)), "BeitModel is not supported"),
    ],
)
def test_unsupported_raise_naming_the_feature(build, match):
    with pytest.raises(NotImplementedError, match=match):
        HookedViT.from_hf(build())


def test_pooler_can_be_dropped_explicitly():
    hf = randomise(T.ViTModel(T.ViTConfig(**KW)))
    model = HookedViT.from_hf(hf, drop_pooler=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).last_hidden_state[:, 0], atol=ATOL, rtol=0)


def test_dinov2_classifier_readout_and_its_limits():
    """[CLS, mean patch] (global_pool='token_avg'): the logit lens reads it too; timm cannot rebuild it."""
    hf = randomise(CASES["dinov2_reg_cls"]())
    model = HookedViT.from_hf(hf)
    assert (model.cfg.global_pool, model.cfg.n_reg_tokens) == ("token_avg", 3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
        torch.testing.assert_close(
            model.unembed(cache["blocks.1.hook_resid_post"]), hf(x).logits, atol=ATOL, rtol=0
        )
    with pytest.raises(NotImplementedError, match="token_avg"):
        model.to_timm_model()
    with pytest.raises(NotImplementedError):
        model.tokens_to_residual_directions(0)
    # without a classifier (num_labels=0) the output is the classifier's input [CLS, mean patch]
    hf0 = randomise(T.Dinov2ForImageClassification(T.Dinov2Config(**KW, num_labels=0)))
    with torch.no_grad():
        torch.testing.assert_close(HookedViT.from_hf(hf0)(x), hf0(x).logits, atol=ATOL, rtol=0)


def test_other_image_sizes_are_refused_clearly():
    model = HookedViT.from_hf(randomise(CASES["dinov2"]()))
    with pytest.raises(ValueError, match="expected images of size 16x16"):
        model(torch.randn(1, 3, 20, 20))


def test_hidden_dropout_warns_and_eval_is_exact():
    hf = randomise(T.ViTForImageClassification(T.ViTConfig(**KW, num_labels=3, hidden_dropout_prob=0.1)))
    with pytest.warns(UserWarning, match="hidden_dropout_prob=0.1 is not carried"):
        model = HookedViT.from_hf(hf)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), warnings.catch_warnings():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=0)


def test_full_clip_and_siglip_models_give_their_image_features():
    text = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=60
    )
    text |= dict(max_position_embeddings=10, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = {k: v for k, v in KW.items() if k != "num_channels"}
    x = torch.randn(2, 3, 16, 16)
    for hf in (
        T.CLIPModel(T.CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)),
        T.SiglipModel(T.SiglipConfig(vision_config=vision, text_config=text)),
    ):
        hf = randomise(hf)
        model = HookedViT.from_hf(hf)
        with torch.no_grad():
            ref = hf.get_image_features(pixel_values=x)
            ref = getattr(ref, "pooler_output", ref)  # transformers 5 returns an output object
            torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)


def test_bfloat16_source_gives_a_bfloat16_model():
    hf = randomise(CASES["vit_cls"]())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref32 = hf(x).logits
        hf = hf.to(torch.bfloat16)
        model = HookedViT.from_hf(hf)
        assert model.embed.proj.weight.dtype == torch.bfloat16
        y, ref = model(x.bfloat16()), hf(x.bfloat16()).logits
    # same bf16 ops as HF (bit-identical on CPU here; bf16 resolution allowed), and near the float32 model
    # (measured 0.0075 on logits of size ~1.5)
    torch.testing.assert_close(y.float(), ref.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(y.float(), ref32, atol=0.05, rtol=0)
