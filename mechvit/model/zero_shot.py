"""CLIP / SigLIP as a classifier: a zero-shot head built from class text embeddings.

The source libraries compute ``logits_per_image = logit_scale.exp() * normalize(image_embeds) @
normalize(text_embeds).T (+ logit_bias for SigLIP)``. HookedViT represents this as its head
(``cfg.zero_shot_dim > 0``): :class:`ZeroShotHead` = the image projection (``head.proj``, CLIP's
``visual_projection`` / open_clip's ``proj``; the identity for SigLIP, whose pooled output is the embedding),
then L2 normalisation, then a linear classifier whose rows are the normalised class text embeddings times
the logit scale (its bias is SigLIP's logit bias, zero for CLIP). ``model(images)`` then equals the source's
``logits_per_image`` for the same prompts, and everything that reads logits through ``model.unembed`` (logit
lens, patching, robustness evaluation) runs unchanged.

Hooks: ``head.hook_image_embed`` ``[batch, zero_shot_dim]`` (the projected image embedding, before
normalisation: the source's ``image_embeds`` / ``encode_image``) and ``head.hook_normalized`` (after it).
The normalisation is not linear, so ``tokens_to_residual_directions`` (linear logit directions) refuses this
head; use ``model.unembed``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

if TYPE_CHECKING:
    from .hooked_vit import HookedViT


class ZeroShotHead(nn.Module):
    """proj -> L2 normalise -> linear (``weight`` = logit_scale * unit text embeddings, ``bias``)."""

    def __init__(self, d_model: int, embed_dim: int, num_classes: int):
        super().__init__()
        self.in_features, self.out_features = d_model, num_classes
        self.proj = nn.Linear(d_model, embed_dim)  # bias: zero unless a LayerNorm was folded into it
        self.weight = nn.Parameter(torch.zeros(num_classes, embed_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.hook_image_embed = HookPoint()  # [batch, embed_dim]
        self.hook_normalized = HookPoint()  # [batch, embed_dim], unit norm

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... num_classes"]:
        e = self.hook_image_embed(self.proj(x))
        # x / ||x|| as HF CLIP / SigLIP and open_clip (F.normalize) compute it
        e = self.hook_normalized(e / e.norm(p=2, dim=-1, keepdim=True))
        return F.linear(e, self.weight, self.bias)


def _as_tensor(x: Any, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    out = getattr(x, "pooler_output", None)  # transformers 5 get_*_features return an output object
    if isinstance(out, Tensor):
        return out
    raise ValueError(f"expected {what} as a tensor, got {type(x).__name__}")


def zero_shot_classifier(
    model: HookedViT,
    text_embeds: Float[Tensor, "num_classes embed_dim"],
    *,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor | None = None,
    class_names: Sequence[str] | None = None,
) -> HookedViT:
    """A new HookedViT whose logits are the zero-shot logits of ``model``'s image embedding.

    ``model``: a converted image tower whose output is one embedding per image (CLIP with its projection
    as the head; SigLIP's pooled output). ``text_embeds``: one (unnormalised) text embedding per class.
    ``logit_scale``: the multiplier of the cosine similarities, i.e. ``clip.logit_scale.exp()`` (not its log).
    """
    from .convert import load_into
    from .hooked_vit import HookedViT

    cfg = model.cfg
    if cfg.zero_shot_dim:
        raise ValueError("this model already has a zero-shot head; build it from the image tower")
    if cfg.dist_token or cfg.global_pool == "":
        raise ValueError(
            "a zero-shot head needs one image embedding per image (a pooled model without a distillation "
            f"head); this model has global_pool={cfg.global_pool!r}, dist_token={cfg.dist_token}"
        )
    text_embeds = _as_tensor(text_embeds, "text_embeds")
    if text_embeds.ndim != 2 or text_embeds.shape[0] == 0:
        raise ValueError(
            f"expected text_embeds of shape [num_classes, embed_dim], got {tuple(text_embeds.shape)}"
        )
    if not torch.isfinite(text_embeds).all():
        raise ValueError("text_embeds contain NaN or inf")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    ref = model.embed.proj.weight
    if model.head is not None:
        proj_w = model.head.weight.detach()
        proj_b = (
            model.head.bias.detach() if model.head.bias is not None else proj_w.new_zeros(proj_w.shape[0])
        )
    else:  # the pooled output is the embedding (SigLIP): the identity projection (x @ I is exact)
        proj_w = torch.eye(cfg.d_model, dtype=ref.dtype, device=ref.device)
        proj_b = ref.new_zeros(cfg.d_model)
    E = proj_w.shape[0]
    if text_embeds.shape[1] != E:
        raise ValueError(
            f"text embeddings have width {text_embeds.shape[1]}, the image embedding has {E} "
            "(text and image towers of different models?)"
        )
    C = text_embeds.shape[0]
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) != C:
        raise ValueError(f"{len(names)} class_names for {C} text embeddings")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32).reshape(())
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError(
            f"logit_scale must be a positive multiplier (exp of the stored log scale), got {scale}"
        )
    unit = text_embeds.detach().float()
    unit = unit / unit.norm(p=2, dim=-1, keepdim=True)
    sd["head.proj.weight"], sd["head.proj.bias"] = proj_w, proj_b
    sd["head.weight"] = (unit * scale).to(ref.dtype)
    bias = (
        torch.zeros(C) if logit_bias is None else torch.as_tensor(logit_bias, dtype=torch.float32).expand(C)
    )
    sd["head.bias"] = bias.to(ref.dtype)
    new_cfg = dataclasses.replace(cfg, num_classes=C, zero_shot_dim=E, class_names=names)
    out = HookedViT(new_cfg).to(dtype=ref.dtype)
    load_into(out, {k: v.to(ref.device) for k, v in sd.items()}, "zero-shot head")
    return out.to(ref.device).train(model.training)


def zero_shot_from_hf(
    clip_model: nn.Module,
    text_inputs: Mapping[str, Tensor] | Tensor | None = None,
    *,
    text_embeds: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    **from_hf_kwargs: Any,
) -> HookedViT:
    """HF ``CLIPModel`` / ``SiglipModel`` as a zero-shot classifier: logits = ``logits_per_image``.

    ``text_inputs``: the tokenizer's output for one prompt per class (or its ``input_ids``), run through
    ``get_text_features``; or ``text_embeds``: precomputed ``[num_classes, projection_dim]`` embeddings.
    """
    from .hooked_vit import HookedViT

    name = type(clip_model).__name__
    if name not in ("CLIPModel", "SiglipModel"):
        raise NotImplementedError(
            f"zero-shot from transformers {name}: CLIPModel and SiglipModel are supported"
        )
    text_embeds = _text(clip_model, text_inputs, text_embeds)
    tower = HookedViT.from_hf(clip_model, **from_hf_kwargs)
    bias = getattr(clip_model, "logit_bias", None)
    return zero_shot_classifier(
        tower,
        text_embeds,
        logit_scale=clip_model.logit_scale.detach().exp(),
        logit_bias=None if bias is None else bias.detach(),
        class_names=class_names,
    )


def zero_shot_from_open_clip(
    clip_model: nn.Module,
    text_tokens: Tensor | None = None,
    *,
    text_embeds: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    **from_open_clip_kwargs: Any,
) -> HookedViT:
    """open_clip ``CLIP`` as a zero-shot classifier: logits = ``logit_scale.exp() * img @ text.T (+ bias)``.

    ``text_tokens``: the tokenizer's output for one prompt per class, run through ``encode_text``; or
    ``text_embeds``: precomputed ``[num_classes, embed_dim]`` embeddings.
    """
    from .hooked_vit import HookedViT

    if not hasattr(clip_model, "encode_text") or not hasattr(clip_model, "logit_scale"):
        raise ValueError(
            f"expected an open_clip CLIP model (encode_text, logit_scale), got {type(clip_model).__name__}"
        )
    if text_tokens is not None and text_embeds is None:
        with torch.no_grad():
            text_embeds = clip_model.encode_text(text_tokens)
        text_tokens = None
    text_embeds = _text(clip_model, None, text_embeds)
    tower = HookedViT.from_open_clip(clip_model, **from_open_clip_kwargs)
    bias = getattr(clip_model, "logit_bias", None)
    return zero_shot_classifier(
        tower,
        text_embeds,
        logit_scale=clip_model.logit_scale.detach().exp(),
        logit_bias=None if bias is None else bias.detach(),
        class_names=class_names,
    )


def _text(clip_model: nn.Module, text_inputs: Any, text_embeds: Tensor | None) -> Tensor:
    if (text_inputs is None) == (text_embeds is None):
        raise ValueError("pass exactly one of the class prompts' token inputs or text_embeds")
    if text_embeds is not None:
        return _as_tensor(text_embeds, "text_embeds")
    with torch.no_grad():
        if isinstance(text_inputs, Tensor):
            out = clip_model.get_text_features(input_ids=text_inputs)
        elif isinstance(text_inputs, Mapping):
            out = clip_model.get_text_features(**text_inputs)
        else:
            raise ValueError(
                f"expected the tokenizer's output (a mapping) or input_ids, got {type(text_inputs).__name__}"
            )
    return _as_tensor(out, "get_text_features output")
