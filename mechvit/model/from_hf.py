"""HF transformers vision models -> HookedViT, by an explicit state-dict mapping per model family.

Supported (exact in eval mode, checked against the transformers forward in ``tests/test_from_hf.py``), with
what HookedViT's ``model(images)`` returns:

- ``ViTForImageClassification``: ``logits``.
- ``ViTModel``, ``DeiTModel``: ``last_hidden_state[:, 0]`` (their dense+tanh pooler needs ``drop_pooler=True``
  or ``add_pooling_layer=False``).
- ``DeiTForImageClassificationWithTeacher``: ``logits`` (mean of the CLS and distillation heads).
- ``DeiTForImageClassification``: ``logits`` (its distillation token, read by no head, is carried as a
  register token right after CLS: exact, labelled ``reg0``).
- ``CLIPVisionModel``: ``pooler_output`` (post_layernorm on the CLS token = HookedViT's ``fc_norm``).
- ``CLIPVisionModelWithProjection``, ``CLIPModel``: ``image_embeds`` (visual_projection as a zero-bias head).
- ``Dinov2Model``, ``Dinov2WithRegistersModel``: ``pooler_output`` (= ``last_hidden_state[:, 0]``).
- ``Dinov2ForImageClassification``, ``Dinov2WithRegistersForImageClassification``: ``logits``
  (``global_pool='token_avg'``: the head reads [CLS, mean of the patch tokens]).
- ``SiglipVisionModel``, ``SiglipModel``: ``pooler_output`` (MAP head); ``last_hidden_state`` without the head.

Anything else raises ``NotImplementedError`` naming the feature: SwiGLU DINOv2 (``use_swiglu_ffn``), non-square DINOv2
image sizes (HF always resamples those position embeddings), activations other than gelu / gelu_pytorch_tanh
/ quick_gelu. ``interpolate_pos_encoding`` is a per-call option of the HF forward; HookedViT runs at the
configured image size only (other sizes are refused with a clear error by ``check_input``).

Dropout: attention-probability dropout and DINOv2's drop path are carried; HF's ``hidden_dropout_prob``
sits where HookedViT has none (and vice versa), so it is not carried (a warning says so when it is > 0):
train-mode outputs then differ, eval outputs are exact.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import HookedViTConfig

if TYPE_CHECKING:
    from .hooked_vit import HookedViT

_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def _act(name: Any) -> str:
    if not isinstance(name, str) or name not in _ACTS:
        raise NotImplementedError(
            f"activation {name!r} is not supported (gelu, gelu_pytorch_tanh and quick_gelu are converted exactly)"
        )
    return _ACTS[name]


def _ln(m: nn.Module, where: str, eps: float) -> dict[str, Tensor]:
    if type(m) is not nn.LayerNorm or not m.elementwise_affine or m.bias is None:
        raise NotImplementedError(f"{where}: {type(m).__name__} is not supported (an affine nn.LayerNorm is)")
    if m.eps != eps:
        raise NotImplementedError(f"{where}: LayerNorm eps {m.eps} differs from the model's {eps}")
    return {"weight": m.weight, "bias": m.bias}


def _lin(m: nn.Module, where: str) -> dict[str, Tensor]:
    if not isinstance(m, nn.Linear):  # also MultiheadAttention's NonDynamicallyQuantizableLinear
        raise NotImplementedError(f"{where}: {type(m).__name__} is not supported (nn.Linear is)")
    return {"weight": m.weight} | ({"bias": m.bias} if m.bias is not None else {})


def _put(sd: dict[str, Tensor], prefix: str, parts: dict[str, Tensor]) -> None:
    for k, v in parts.items():
        sd[f"{prefix}.{k}"] = v


def _block(
    sd: dict[str, Tensor],
    i: int,
    eps: float,
    *,
    ln1: nn.Module,
    q: nn.Module,
    k: nn.Module,
    v: nn.Module,
    o: nn.Module,
    ln2: nn.Module,
    fc1: nn.Module,
    fc2: nn.Module,
    ls1: Tensor | None = None,
    ls2: Tensor | None = None,
) -> None:
    """One pre-norm block: q/k/v fused into one qkv Linear (rows q, k, v) as HookedViT stores it."""
    p = f"blocks.{i}"
    _put(sd, f"{p}.ln1", _ln(ln1, f"layer {i} first LayerNorm", eps))
    _put(sd, f"{p}.ln2", _ln(ln2, f"layer {i} second LayerNorm", eps))
    qkv = [_lin(m, f"layer {i} attention {n}") for m, n in ((q, "query"), (k, "key"), (v, "value"))]
    if len({len(d) for d in qkv}) != 1:
        raise NotImplementedError(f"layer {i}: bias on only some of query/key/value is not supported")
    sd[f"{p}.attn.qkv.weight"] = torch.cat([d["weight"] for d in qkv], 0)
    if "bias" in qkv[0]:
        sd[f"{p}.attn.qkv.bias"] = torch.cat([d["bias"] for d in qkv], 0)
    _put(sd, f"{p}.attn.proj", _lin(o, f"layer {i} attention output"))
    _put(sd, f"{p}.mlp.fc1", _lin(fc1, f"layer {i} mlp fc1"))
    _put(sd, f"{p}.mlp.fc2", _lin(fc2, f"layer {i} mlp fc2"))
    if ls1 is not None:
        sd[f"{p}.ls1.gamma"], sd[f"{p}.ls2.gamma"] = ls1, ls2  # type: ignore[assignment]


def _sizes(config: Any, q: nn.Linear, fc1: nn.Linear) -> dict[str, Any]:
    D, H = config.hidden_size, config.num_attention_heads
    if q.out_features % H:
        raise NotImplementedError(f"query width {q.out_features} is not divisible by {H} heads")
    return dict(
        d_model=D,
        n_layers=config.num_hidden_layers,
        n_heads=H,
        d_head=q.out_features // H,
        d_mlp=fc1.out_features,
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        eps=float(config.layer_norm_eps),
        act_fn=_act(config.hidden_act),
        qkv_bias=q.bias is not None,
    )


def _patch(sd: dict[str, Tensor], conv: nn.Module) -> bool:
    if (
        type(conv) is not nn.Conv2d
        or conv.kernel_size != conv.stride
        or conv.padding not in ((0, 0), "valid")
        or conv.groups != 1
    ):
        raise NotImplementedError("patch embedding must be a Conv2d with kernel == stride and no padding")
    sd["embed.proj.weight"] = conv.weight
    if conv.bias is not None:
        sd["embed.proj.bias"] = conv.bias
    return conv.bias is not None


def _hidden_dropout(config: Any) -> None:
    p = float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0)
    if p > 0:
        warnings.warn(
            f"hidden_dropout_prob={p} is not carried into HookedViT (its dropout sites differ from HF's); "
            "eval outputs are exact, train-mode outputs are not",
            stacklevel=4,
        )


# ----------------------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------------------
def _vit_like(
    backbone: nn.Module, heads: list[nn.Module], drop_pooler: bool, deit: bool
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """ViT / DeiT backbones (``embeddings``, ``layers``, ``layernorm``, optional tanh ``pooler``)."""
    config = backbone.config
    name = "DeiT" if deit else "ViT"
    if getattr(backbone, "pooler", None) is not None and not heads and not drop_pooler:
        raise NotImplementedError(
            f"{name}Model's pooler (dense + tanh on the CLS token) is not supported; pass drop_pooler=True to "
            "convert the backbone (HookedViT then returns last_hidden_state[:, 0]), or build the model with "
            "add_pooling_layer=False"
        )
    _hidden_dropout(config)
    emb = backbone.embeddings
    layers = list(backbone.layers)
    sd: dict[str, Tensor] = {}
    patch_bias = _patch(sd, emb.patch_embeddings.projection)
    sd["cls_token"] = emb.cls_token
    sd["pos_embed"] = emb.position_embeddings
    eps = float(config.layer_norm_eps)
    for i, layer in enumerate(layers):
        a = layer.attention
        _block(
            sd,
            i,
            eps,
            ln1=layer.layernorm_before,
            q=a.q_proj,
            k=a.k_proj,
            v=a.v_proj,
            o=a.o_proj,
            ln2=layer.layernorm_after,
            fc1=layer.mlp.fc1,
            fc2=layer.mlp.fc2,
        )
    _put(sd, "ln_final", _ln(backbone.layernorm, "layernorm", eps))
    kw = _sizes(config, layers[0].attention.q_proj, layers[0].mlp.fc1)
    kw.update(patch_bias=patch_bias, attn_drop=float(config.attention_probs_dropout_prob))
    dist = getattr(emb, "distillation_token", None)
    if len(heads) == 2:  # DeiT with teacher: (cls head + distillation head) / 2, as timm's distilled model
        kw.update(dist_token=True)
        sd["dist_token"] = dist
        _put(sd, "head", _lin(heads[0], "cls_classifier"))
        _put(sd, "head_dist", _lin(heads[1], "distillation_classifier"))
    elif dist is not None:
        # Only the CLS token is read: the distillation token (with its position embedding) is exactly a register
        # token placed right after CLS, which is where HookedViT puts registers.
        kw.update(n_reg_tokens=1)
        sd["reg_token"] = dist
    if len(heads) == 1 and not isinstance(heads[0], nn.Identity):
        _put(sd, "head", _lin(heads[0], "classifier"))
    n_out = heads[0].out_features if heads and not isinstance(heads[0], nn.Identity) else 0
    kw.update(num_classes=n_out)
    if n_out:
        sd.setdefault("head.bias", torch.zeros(n_out))
    return kw, sd


def _clip(vision: nn.Module, proj: nn.Module | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """CLIP vision transformer: class_embedding, pre_layrnorm, post_layernorm on the pooled CLS token."""
    config = vision.config
    emb = vision.embeddings
    layers = list(vision.encoder.layers)
    eps = float(config.layer_norm_eps)
    sd: dict[str, Tensor] = {}
    patch_bias = _patch(sd, emb.patch_embedding)
    sd["cls_token"] = emb.class_embedding.reshape(1, 1, -1)
    sd["pos_embed"] = emb.position_embedding.weight.unsqueeze(0)
    _put(sd, "ln_pre", _ln(vision.pre_layrnorm, "pre_layrnorm", eps))
    for i, layer in enumerate(layers):
        a = layer.self_attn
        _block(
            sd,
            i,
            eps,
            ln1=layer.layer_norm1,
            q=a.q_proj,
            k=a.k_proj,
            v=a.v_proj,
            o=a.out_proj,
            ln2=layer.layer_norm2,
            fc1=layer.mlp.fc1,
            fc2=layer.mlp.fc2,
        )
    _put(sd, "fc_norm", _ln(vision.post_layernorm, "post_layernorm", eps))
    kw = _sizes(config, layers[0].self_attn.q_proj, layers[0].mlp.fc1)
    kw.update(
        patch_bias=patch_bias,
        pre_norm=True,
        final_norm=False,
        fc_norm=True,
        attn_drop=float(getattr(config, "attention_dropout", 0.0)),
        num_classes=0,
    )
    if proj is not None:  # visual_projection (no bias) as the head, with a zero bias, as timm does for CLIP
        w = _lin(proj, "visual_projection")
        sd["head.weight"] = w["weight"]
        sd["head.bias"] = w.get("bias", torch.zeros(proj.out_features, dtype=w["weight"].dtype))
        kw["num_classes"] = proj.out_features
    return kw, sd


def _dinov2(
    model: nn.Module, registers: bool, classifier: nn.Module | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config = model.config
    if getattr(config, "use_swiglu_ffn", False):
        raise NotImplementedError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True) is not supported")
    img = config.image_size
    if not isinstance(img, int) and img[0] != img[1]:
        raise NotImplementedError(
            f"DINOv2 with a non-square image_size {img}: HF resamples its position embeddings even at that size"
        )
    _hidden_dropout(config)
    emb = model.embeddings
    layers = list(model.encoder.layer)
    eps = float(config.layer_norm_eps)
    sd: dict[str, Tensor] = {}
    patch_bias = _patch(sd, emb.patch_embeddings.projection)
    pos = emb.position_embeddings
    kw: dict[str, Any] = {}
    if registers:
        # HF adds position embeddings to [CLS, patches], then inserts the registers (no position) after CLS.
        # Exact in HookedViT: no_embed_class (positions on patches only) with CLS's position folded into
        # the CLS token (the same single addition, done once here).
        n_reg = int(config.num_register_tokens)
        sd["cls_token"] = emb.cls_token + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
        if n_reg:
            sd["reg_token"] = emb.register_tokens
        kw.update(no_embed_class=True, n_reg_tokens=n_reg)
    else:
        sd["cls_token"] = emb.cls_token
        sd["pos_embed"] = pos
    for i, layer in enumerate(layers):
        a = layer.attention
        _block(
            sd,
            i,
            eps,
            ln1=layer.norm1,
            q=a.q_proj,
            k=a.k_proj,
            v=a.v_proj,
            o=a.o_proj,
            ln2=layer.norm2,
            fc1=layer.mlp.fc1,
            fc2=layer.mlp.fc2,
            ls1=layer.layer_scale1.lambda1,
            ls2=layer.layer_scale2.lambda1,
        )
    _put(sd, "ln_final", _ln(model.layernorm, "layernorm", eps))
    kw.update(_sizes(config, layers[0].attention.q_proj, layers[0].mlp.fc1))
    rate = float(getattr(config, "drop_path_rate", 0.0) or 0.0)
    kw.update(
        patch_bias=patch_bias,
        layer_scale=True,
        num_classes=0,
        attn_drop=float(config.attention_probs_dropout_prob),
        drop_path=[rate] * len(layers),  # HF DINOv2 uses one rate in every layer
    )
    if classifier is not None:  # Dinov2(WithRegisters)ForImageClassification: Linear([CLS, mean patch token])
        kw["global_pool"] = "token_avg"
        if not isinstance(classifier, nn.Identity):
            _put(sd, "head", _lin(classifier, "classifier"))
            kw["num_classes"] = classifier.out_features
    return kw, sd


def _siglip(vision: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config = vision.config
    emb = vision.embeddings
    layers = list(vision.encoder.layers)
    eps = float(config.layer_norm_eps)
    sd: dict[str, Tensor] = {}
    patch_bias = _patch(sd, emb.patch_embedding)
    sd["pos_embed"] = emb.position_embedding.weight.unsqueeze(0)
    for i, layer in enumerate(layers):
        a = layer.self_attn
        _block(
            sd,
            i,
            eps,
            ln1=layer.layer_norm1,
            q=a.q_proj,
            k=a.k_proj,
            v=a.v_proj,
            o=a.out_proj,
            ln2=layer.layer_norm2,
            fc1=layer.mlp.fc1,
            fc2=layer.mlp.fc2,
        )
    _put(sd, "ln_final", _ln(vision.post_layernorm, "post_layernorm", eps))
    kw = _sizes(config, layers[0].self_attn.q_proj, layers[0].mlp.fc1)
    kw.update(
        patch_bias=patch_bias,
        class_token=False,
        num_classes=0,
        global_pool="",
        attn_drop=float(getattr(config, "attention_dropout", 0.0)),
    )
    head = getattr(vision, "head", None)
    if getattr(vision, "use_head", True) and head is not None:
        mha = head.attention
        if type(mha) is not nn.MultiheadAttention or not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
            raise NotImplementedError(f"SigLIP head attention {type(mha).__name__} is not supported")
        if mha.num_heads != config.num_attention_heads:
            raise NotImplementedError(
                "a SigLIP head with a head count other than the blocks' is not supported"
            )
        D = config.hidden_size
        W, b = mha.in_proj_weight, mha.in_proj_bias
        sd["attn_pool.latent"] = head.probe
        sd["attn_pool.q.weight"], sd["attn_pool.q.bias"] = W[:D], b[:D]
        sd["attn_pool.kv.weight"], sd["attn_pool.kv.bias"] = W[D:], b[D:]
        _put(sd, "attn_pool.proj", _lin(mha.out_proj, "head.attention.out_proj"))
        _put(sd, "attn_pool.ln", _ln(head.layernorm, "head.layernorm", eps))
        _put(sd, "attn_pool.fc1", _lin(head.mlp.fc1, "head.mlp.fc1"))
        _put(sd, "attn_pool.fc2", _lin(head.mlp.fc2, "head.mlp.fc2"))
        hidden = head.mlp.fc1.out_features
        if int(D * (hidden / D)) != hidden:
            raise NotImplementedError(f"SigLIP head MLP width {hidden} is not expressible as a ratio of {D}")
        kw.update(global_pool="map", map_mlp_ratio=hidden / D, map_kv_bias=True, map_q_proj=True)
    return kw, sd


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
SUPPORTED = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "Dinov2Model",
    "Dinov2WithRegistersModel",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersForImageClassification",
    "SiglipVisionModel",
    "SiglipModel",
)


def config_and_state_dict(
    model: nn.Module, *, drop_pooler: bool = False
) -> tuple[HookedViTConfig, dict[str, Tensor]]:
    """The HookedViTConfig and the state dict (HookedViT names) of a supported transformers model."""
    name = type(model).__name__
    if name not in SUPPORTED:
        raise NotImplementedError(
            f"transformers {name} is not supported; HookedViT.from_hf converts {', '.join(SUPPORTED)}"
        )
    if name in ("ViTModel", "DeiTModel"):
        kw, sd = _vit_like(model, [], drop_pooler, deit=name == "DeiTModel")
    elif name == "ViTForImageClassification":
        kw, sd = _vit_like(model.vit, [model.classifier], drop_pooler, deit=False)
    elif name == "DeiTForImageClassification":
        kw, sd = _vit_like(model.deit, [model.classifier], drop_pooler, deit=True)
    elif name == "DeiTForImageClassificationWithTeacher":
        kw, sd = _vit_like(
            model.deit, [model.cls_classifier, model.distillation_classifier], drop_pooler, deit=True
        )
    elif name == "CLIPVisionModel":
        kw, sd = _clip(model, None)
    elif name in ("CLIPVisionModelWithProjection", "CLIPModel"):
        kw, sd = _clip(model.vision_model, model.visual_projection)
    elif name in ("Dinov2Model", "Dinov2WithRegistersModel"):
        kw, sd = _dinov2(model, registers=name == "Dinov2WithRegistersModel")
    elif name == "Dinov2ForImageClassification":
        kw, sd = _dinov2(model.dinov2, registers=False, classifier=model.classifier)
    elif name == "Dinov2WithRegistersForImageClassification":
        kw, sd = _dinov2(model.dinov2_with_registers, registers=True, classifier=model.classifier)
    else:  # SigLIP
        kw, sd = _siglip(model.vision_model if name == "SiglipModel" else model)
    kw["timm_class"] = f"transformers.{name}"
    labels = getattr(model.config, "id2label", None)
    if kw["num_classes"] and labels and len(labels) == kw["num_classes"]:
        names = [str(labels[i]) for i in range(kw["num_classes"])]
        if names != [f"LABEL_{i}" for i in range(kw["num_classes"])]:  # HF's placeholder names
            kw["class_names"] = names
    sd = {k: v.detach().clone() for k, v in sd.items()}
    return HookedViTConfig(**kw), sd


def load_hf_folder(path: str | os.PathLike) -> nn.Module:
    """A transformers model from a local ``save_pretrained`` folder (safetensors only, no hub access)."""
    import transformers

    d = Path(path)
    if not d.is_dir() or not (d / "config.json").is_file():
        raise FileNotFoundError(
            f"{d} is not a folder with a config.json (expected a transformers save_pretrained folder; "
            "HookedViT.from_hf reads local folders only, it does not download)"
        )
    config = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise ValueError(f"{d / 'config.json'} names no architecture ('architectures' is empty)")
    arch = archs[0]
    if arch not in SUPPORTED:
        raise NotImplementedError(
            f"{d}: transformers {arch} is not supported; HookedViT.from_hf converts {', '.join(SUPPORTED)}"
        )
    model_cls = getattr(transformers, arch)
    if not any(d.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{d} has no .safetensors weights (mechvit loads only safetensors: save with safe_serialization)"
        )
    return model_cls.from_pretrained(d, local_files_only=True, use_safetensors=True)


def from_hf(
    cls: type[HookedViT],
    model_or_path: nn.Module | str | os.PathLike,
    *,
    drop_pooler: bool = False,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    device: str | torch.device | None = None,
) -> HookedViT:
    from .convert import center_writing_weights_sd, fold_layer_norm, load_into

    if isinstance(model_or_path, (str, os.PathLike)):
        hf_model = load_hf_folder(model_or_path)
    elif isinstance(model_or_path, nn.Module):
        hf_model = model_or_path
    else:
        raise ValueError(
            "expected a transformers model or the path of a local save_pretrained folder, "
            f"got {type(model_or_path).__name__}"
        )
    cfg, sd = config_and_state_dict(hf_model, drop_pooler=drop_pooler)
    if fold_ln:
        sd = fold_layer_norm(sd, cfg)
    if center_writing_weights:
        sd = center_writing_weights_sd(sd, cfg)
    model = cls(cfg)
    param = next(hf_model.parameters())
    model.to(dtype=param.dtype)
    load_into(model, sd, f"transformers {type(hf_model).__name__}")
    model.train(hf_model.training)
    return model.to(device if device is not None else param.device)
