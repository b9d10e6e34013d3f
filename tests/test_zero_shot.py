"""CLIP / SigLIP as classifiers: HookedViT zero-shot logits equal the source library's logits_per_image."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

from mechvit import HookedViT
from mechvit.model.zero_shot import zero_shot_classifier, zero_shot_from_hf, zero_shot_from_open_clip

ATOL = 1e-5
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
)
TEXT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=60)


def randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "logit" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_clip():
    cfg = T.CLIPConfig(
        vision_config=VISION,
        text_config=TEXT | dict(max_position_embeddings=10, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        projection_dim=8,
    )
    return randomise(T.CLIPModel(cfg))


def hf_siglip():
    text = TEXT | dict(
        hidden_size=32, intermediate_size=64, max_position_embeddings=10
    )  # width = the image side
    cfg = T.SiglipConfig(vision_config=VISION, text_config=text)
    m = randomise(T.SiglipModel(cfg))
    with torch.no_grad():
        m.logit_scale.fill_(2.3)
        m.logit_bias.fill_(-1.5)
    return m


PROMPTS = torch.tensor([[0, 5, 9, 17, 2, 1], [0, 6, 33, 2, 1, 1], [0, 44, 12, 8, 21, 2], [0, 7, 2, 1, 1, 1]])
MASK = (PROMPTS != 1).long()


@pytest.mark.parametrize("build", [hf_clip, hf_siglip], ids=["clip", "siglip"])
def test_hf_zero_shot_equals_logits_per_image(build):
    src = build()
    inputs = (
        dict(input_ids=PROMPTS, attention_mask=MASK)
        if isinstance(src, T.CLIPModel)
        else dict(input_ids=PROMPTS)
    )
    model = zero_shot_from_hf(src, inputs, class_names=["a", "b", "c", "d"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = src(pixel_values=x, **inputs).logits_per_image
        y, cache = model.run_with_cache(x)
    assert y.shape == ref.shape == (3, 4)
    torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
    # the hook holds the source's own (unnormalised) image embedding
    with torch.no_grad():
        emb = src.get_image_features(pixel_values=x)
    emb = getattr(emb, "pooler_output", emb)
    torch.testing.assert_close(cache["head.hook_image_embed"], emb, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["head.hook_normalized"].norm(dim=-1), torch.ones(3), atol=1e-6, rtol=0)
    assert model.to_single_token("c") == 2
    with torch.no_grad():  # control: other images give other logits
        assert (model(torch.randn(3, 3, 16, 16)) - y).abs().max() > 1e-3


def test_from_tensor_of_text_embeddings_and_save_round_trip(tmp_path):
    src = hf_clip()
    with torch.no_grad():
        text = src.get_text_features(input_ids=PROMPTS, attention_mask=MASK)
    text = getattr(text, "pooler_output", text)
    model = zero_shot_from_hf(src, text_embeds=text)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = src(pixel_values=x, input_ids=PROMPTS, attention_mask=MASK).logits_per_image
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "zs")
    again = HookedViT.from_pretrained(tmp_path / "zs")
    assert again.cfg.zero_shot_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_fold_ln_zero_shot_still_exact():
    src = hf_clip()
    model = zero_shot_from_hf(src, dict(input_ids=PROMPTS, attention_mask=MASK), fold_ln=True)
    assert model.cfg.fold_ln
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = src(pixel_values=x, input_ids=PROMPTS, attention_mask=MASK).logits_per_image
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=0)


def test_open_clip_zero_shot_equals_its_logits():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    vis = dict(image_size=16, patch_size=4, width=32, layers=2, head_width=8, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)
    src = CLIP(embed_dim=12, vision_cfg=vis, text_cfg=text).eval()
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "logit" not in n:
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(1, 49, (5, 8))
    model = zero_shot_from_open_clip(src, tokens)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref, _ = src.get_logits(x, tokens)  # open_clip's own zero-shot logits
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
    assert open_clip.__version__


def test_logit_lens_and_patching_run_unchanged():
    from mechvit.analysis.logit_lens import logit_lens
    from mechvit.analysis.patching import activation_patching

    model = zero_shot_from_hf(hf_clip(), dict(input_ids=PROMPTS, attention_mask=MASK))
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    res = logit_lens(model, x, labels, progress=False)
    # the last layer's logit lens is the model's own prediction
    assert res.top1[:, -1].all()
    clean, corrupted = x[:4], torch.randn(4, 3, 16, 16)
    with (
        warnings.catch_warnings()
    ):  # 4 random images: the denominator warning is expected and irrelevant here
        warnings.simplefilter("ignore", RuntimeWarning)
        out = activation_patching(
            model, clean, corrupted, labels[:4], component="resid_pre", by="layer", progress=False
        )
    # known answer: patching the whole residual stream entering a layer reproduces the other run (score 1)
    assert out.clean_logit_diff != out.corrupted_logit_diff
    torch.testing.assert_close(out.values, torch.ones_like(out.values), atol=1e-4, rtol=0)


def test_linear_directions_are_refused_and_errors():
    model = zero_shot_from_hf(hf_clip(), dict(input_ids=PROMPTS, attention_mask=MASK))
    with pytest.raises(NotImplementedError, match="unembed"):
        model.tokens_to_residual_directions(0)
    tower = HookedViT.from_hf(hf_clip())
    with pytest.raises(ValueError, match="width 5, the image embedding has 8"):
        zero_shot_classifier(tower, torch.randn(3, 5), logit_scale=10.0)
    with pytest.raises(ValueError, match="positive multiplier"):
        zero_shot_classifier(tower, torch.randn(3, 8), logit_scale=-1.0)
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_from_hf(hf_clip())
    with pytest.raises(ValueError, match="already has a zero-shot head"):
        zero_shot_classifier(model, torch.randn(3, 8), logit_scale=10.0)
    with pytest.raises(NotImplementedError, match="CLIPModel and SiglipModel"):
        zero_shot_from_hf(T.ViTModel(T.ViTConfig(**VISION)), text_embeds=torch.randn(2, 8))
    with pytest.raises(NotImplementedError, match="no zero-shot head"):
        model.to_timm_model()


def test_readme_model_sources_section_runs():
    """The README's HF / open_clip quickstart blocks run offline as written (small random models)."""
    pytest.importorskip("open_clip")
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"## HF transformers and open_clip models\n(.*?)\n## ", text, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        scope: dict = {}
        exec(compile(block, f"README model sources block {i}", "exec"), scope)
    # the second block's zero-shot model names its classes and its logit lens ends at the model's prediction
    assert scope["model"].cfg.class_names == ["T-shirt", "trouser", "sneaker"]
    assert scope["lens"].top1[:, -1].all()


def test_cache_options_leave_the_head_hooks_whole():
    """pos_slice selects token positions only: the zero-shot head's [batch, dim] hooks are kept whole."""
    model = zero_shot_from_hf(hf_clip(), dict(input_ids=PROMPTS, attention_mask=MASK))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        _, sliced = model.run_with_cache(x, pos_slice=0)
        _, one = model.run_with_cache(x[:1], remove_batch_dim=True)
    for name in ("head.hook_image_embed", "head.hook_normalized", "hook_logits"):
        torch.testing.assert_close(sliced[name], full[name], atol=0, rtol=0)
        torch.testing.assert_close(one[name], full[name][0], atol=1e-6, rtol=0)
    # while block activations keep only the CLS position of every image
    cls = sliced["blocks.0.hook_resid_post"]
    assert cls.numel() == 3 * 32
    torch.testing.assert_close(cls.reshape(3, 32), full["blocks.0.hook_resid_post"][:, 0], atol=0, rtol=0)
