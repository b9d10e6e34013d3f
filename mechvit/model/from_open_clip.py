"""open_clip ViT image towers -> HookedViT, by an explicit state-dict mapping.

Converts ``open_clip.transformer.VisionTransformer`` (``model.visual`` of ``open_clip.CLIP`` /
``CustomTextCLIP``): class embedding, learnable or sin-cos position embedding, ``ln_pre`` (or
``no_ln_pre``), default residual blocks with ``nn.MultiheadAttention`` (optionally LayerScale), GELU /
QuickGELU, ``pool_type`` ``tok`` / ``avg`` / ``none``, ``final_ln_after_pool`` and the ``proj`` matrix
(``pooled @ proj``, carried as a head with a zero bias). ``model(images)`` then equals
``encode_image(images)`` (unnormalised). Exact in eval mode; checked in ``tests/test_from_open_clip.py``.

Raises ``NotImplementedError`` naming the feature for: timm-backbone towers (``TimmModel``; convert
``visual.trunk`` with ``HookedViT.from_timm`` instead), ModifiedResNet towers, attentional poolers (CoCa),
custom residual blocks (qk_norm, scaled cosine attention, scale_heads / scale_attn / scale_fc), patch
dropout, and ``LayerNormFp32`` below float32 (convert the float32 model, then cast).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import HookedViTConfig

if TYPE_CHECKING:
    from .hooked_vit import HookedViT


def _import_open_clip():
    try:
        import open_clip
    except ImportError as e:  # optional dependency
        raise ImportError(
            "HookedViT.from_open_clip needs open_clip: pip install 'mechvit[open_clip]' (open_clip_torch)"
        ) from e
    return open_clip


def _act(m: nn.Module, where: str) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(m, QuickGELU):
        return "quick_gelu"
    if type(m) is nn.GELU:
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    raise NotImplementedError(
        f"{where}: activation {type(m).__name__} is not supported (GELU, QuickGELU are)"
    )


def _ln(m: nn.Module, where: str, dtype: torch.dtype) -> tuple[float, dict[str, Tensor]]:
    from open_clip.transformer import LayerNorm, LayerNormFp32

    if type(m) not in (nn.LayerNorm, LayerNorm, LayerNormFp32):
        raise NotImplementedError(f"{where}: norm {type(m).__name__} is not supported (LayerNorm is)")
    if type(m) is LayerNormFp32 and dtype != torch.float32:
        raise NotImplementedError(
            f"{where}: LayerNormFp32 in {dtype} is not supported (it normalises in float32); convert the "
            "float32 model and cast the HookedViT"
        )
    if not m.elementwise_affine or m.bias is None:
        raise NotImplementedError(f"{where}: LayerNorm without affine weight and bias is not supported")
    return float(m.eps), {"weight": m.weight, "bias": m.bias}


def visual_tower(model: nn.Module) -> nn.Module:
    """``model.visual`` for a CLIP model, the tower itself for a tower; NotImplementedError for non-ViTs."""
    open_clip = _import_open_clip()
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", model)
    if isinstance(visual, VisionTransformer):
        return visual
    name = type(visual).__name__
    if name == "TimmModel":
        raise NotImplementedError(
            "open_clip TimmModel towers (timm backbones) are not converted here; convert model.visual.trunk "
            "with HookedViT.from_timm (its head/projection is not carried)"
        )
    raise NotImplementedError(
        f"open_clip image tower {name} is not supported (open_clip {open_clip.__version__} "
        "VisionTransformer towers are)"
    )


def config_and_state_dict(model: nn.Module) -> tuple[HookedViTConfig, dict[str, Tensor]]:
    """The HookedViTConfig and state dict (HookedViT names) of an open_clip ViT tower or CLIP model."""
    from open_clip.transformer import ResidualAttentionBlock

    v = visual_tower(model)
    dtype = v.conv1.weight.dtype
    if getattr(v, "attn_pool", None) is not None:
        raise NotImplementedError("open_clip attentional pooler (attentional_pool, CoCa) is not supported")
    if not isinstance(v.patch_dropout, nn.Identity):
        raise NotImplementedError("open_clip patch dropout (patch_dropout > 0) is not supported")
    conv = v.conv1
    if conv.kernel_size != conv.stride or conv.padding != (0, 0) or conv.groups != 1:
        raise NotImplementedError("patch embedding must be a Conv2d with kernel == stride and no padding")
    blocks = list(v.transformer.resblocks)
    sd: dict[str, Tensor] = {"embed.proj.weight": conv.weight}
    if conv.bias is not None:
        sd["embed.proj.bias"] = conv.bias
    D = v.class_embedding.shape[-1]
    sd["cls_token"] = v.class_embedding.reshape(1, 1, D)
    sd["pos_embed"] = v.positional_embedding.reshape(1, -1, D)
    pre_norm = not isinstance(v.ln_pre, nn.Identity)
    eps = None
    if pre_norm:
        eps, p = _ln(v.ln_pre, "ln_pre", dtype)
        sd["ln_pre.weight"], sd["ln_pre.bias"] = p["weight"], p["bias"]
    b0 = blocks[0]
    act = None
    layer_scale = not isinstance(b0.ls_1, nn.Identity)
    for i, b in enumerate(blocks):
        w = f"transformer.resblocks.{i}"
        if type(b) is not ResidualAttentionBlock:
            raise NotImplementedError(
                f"{w}: {type(b).__name__} is not supported (custom blocks: qk_norm, scaled cosine attention, "
                "scale_heads / scale_attn / scale_fc); open_clip's default ResidualAttentionBlock is"
            )
        if hasattr(b, "ln_1_kv"):
            raise NotImplementedError(f"{w}: cross-attention blocks are not supported")
        a = b.attn
        if not a._qkv_same_embed_dim or a.in_proj_bias is None or a.bias_k is not None:
            raise NotImplementedError(f"{w}.attn: only a fused, biased nn.MultiheadAttention is supported")
        p = f"blocks.{i}"
        for ln, nm, ours in ((b.ln_1, "ln_1", "ln1"), (b.ln_2, "ln_2", "ln2")):
            e, t = _ln(ln, f"{w}.{nm}", dtype)
            if eps is not None and e != eps:
                raise NotImplementedError(f"{w}.{nm}: LayerNorm eps {e} differs from the model's {eps}")
            eps = e
            sd[f"{p}.{ours}.weight"], sd[f"{p}.{ours}.bias"] = t["weight"], t["bias"]
        sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"] = a.in_proj_weight, a.in_proj_bias
        sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"] = a.out_proj.weight, a.out_proj.bias
        sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"] = b.mlp.c_fc.weight, b.mlp.c_fc.bias
        sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"] = b.mlp.c_proj.weight, b.mlp.c_proj.bias
        a_i = _act(b.mlp.gelu, f"{w}.mlp.gelu")
        if act is not None and a_i != act:
            raise NotImplementedError(f"{w}: activation differs between blocks")
        act = a_i
        if (not isinstance(b.ls_1, nn.Identity)) != layer_scale:
            raise NotImplementedError(f"{w}: LayerScale differs between blocks")
        if layer_scale:
            if getattr(b.ls_1, "inplace", False):
                raise NotImplementedError(f"{w}: in-place LayerScale is not supported")
            sd[f"{p}.ls1.gamma"], sd[f"{p}.ls2.gamma"] = b.ls_1.gamma, b.ls_2.gamma
        if a.num_heads != b0.attn.num_heads or b.mlp.c_fc.out_features != b0.mlp.c_fc.out_features:
            raise NotImplementedError(f"{w}: head count or MLP width differs between blocks")
    e, t = _ln(v.ln_post, "ln_post", dtype)
    if e != eps:
        raise NotImplementedError(f"ln_post: LayerNorm eps {e} differs from the model's {eps}")
    after_pool = bool(getattr(v, "final_ln_after_pool", False))
    norm_name = "fc_norm" if after_pool else "ln_final"
    sd[f"{norm_name}.weight"], sd[f"{norm_name}.bias"] = t["weight"], t["bias"]
    pool = {"tok": "token", "avg": "avg", "none": ""}[v.pool_type]
    n_out = 0
    if v.proj is not None:
        n_out = v.proj.shape[1]
        sd["head.weight"] = v.proj.T
        sd["head.bias"] = torch.zeros(n_out, dtype=v.proj.dtype, device=v.proj.device)
    H = b0.attn.num_heads
    cfg = HookedViTConfig(
        d_model=D,
        n_layers=len(blocks),
        n_heads=H,
        d_head=D // H,
        d_mlp=b0.mlp.c_fc.out_features,
        img_size=v.image_size,
        patch_size=v.patch_size,
        in_chans=conv.in_channels,
        num_classes=n_out,
        act_fn=act or "gelu",
        eps=float(eps if eps is not None else 1e-5),
        patch_bias=conv.bias is not None,
        layer_scale=layer_scale,
        pre_norm=pre_norm,
        final_norm=not after_pool,
        fc_norm=after_pool,
        global_pool=pool,
        attn_drop=float(b0.attn.dropout),
        timm_class="open_clip.VisionTransformer",
    )
    return cfg, {k: val.detach().clone() for k, val in sd.items()}


def load_open_clip(
    name: str, checkpoint_path: str | os.PathLike | None = None, **create_kw: Any
) -> nn.Module:
    """``open_clip.create_model(name, pretrained=None, **create_kw)`` then a local checkpoint, if given.

    ``name`` is a built-in or registered (``open_clip.add_model_config``) architecture, or
    ``local-dir:/folder`` (its ``open_clip_config.json`` and weights). Weights come from safetensors or a
    torch file read with ``weights_only=True``; nothing is downloaded.
    """
    open_clip = _import_open_clip()
    if name.startswith("hf-hub:"):
        raise ValueError(
            f"{name!r}: HookedViT.from_open_clip does not download; give a model name with a local "
            "checkpoint_path, or 'local-dir:/folder'"
        )
    if "pretrained" in create_kw and create_kw["pretrained"] is not None:
        raise ValueError(
            "pretrained tags download weights; pass checkpoint_path (a local .safetensors / torch file) instead"
        )
    create_kw.pop("pretrained", None)
    model = open_clip.create_model(name, pretrained=None, weights_only=True, **create_kw)
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.suffix in (".npz", ".npy"):
            raise ValueError(f"{path}: numpy (big_vision) checkpoints are not read; use safetensors or torch")
        try:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit open_clip {name}: {e}") from e
    return model.eval()


def from_open_clip(
    cls: type[HookedViT],
    model_or_name: nn.Module | str,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    device: str | torch.device | None = None,
    **create_kw: Any,
) -> HookedViT:
    from .convert import center_writing_weights_sd, fold_layer_norm, load_into

    if isinstance(model_or_name, str):
        oc_model = load_open_clip(model_or_name, checkpoint_path, **create_kw)
    elif isinstance(model_or_name, nn.Module):
        if checkpoint_path is not None or create_kw:
            raise ValueError(
                "checkpoint_path and open_clip keyword arguments apply to a model name, not to a model instance"
            )
        oc_model = model_or_name
    else:
        raise ValueError(
            f"expected an open_clip model, its .visual tower or a model name, got {type(model_or_name).__name__}"
        )
    cfg, sd = config_and_state_dict(oc_model)
    if fold_ln:
        sd = fold_layer_norm(sd, cfg)
    if center_writing_weights:
        sd = center_writing_weights_sd(sd, cfg)
    model = cls(cfg)
    visual = visual_tower(oc_model)
    model.to(dtype=visual.conv1.weight.dtype)
    load_into(model, sd, f"open_clip {type(visual).__name__}")
    model.train(visual.training)
    return model.to(device if device is not None else visual.conv1.weight.device)
