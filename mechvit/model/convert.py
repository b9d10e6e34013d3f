"""timm <-> HookedViT conversion, weight processing (fold_ln, centring) and safetensors files.

Every timm flag is either carried into :class:`HookedViTConfig` or rejected with
``NotImplementedError`` naming the feature: never a silently different model.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mechvit._dataclass_yaml import ConfigError
from mechvit._io import atomic_save_safetensors, atomic_write_json, sha256_file

from .config import HookedViTConfig

if TYPE_CHECKING:
    from .hooked_vit import HookedViT

FORMAT = "mechvit.HookedViT"
FORMAT_VERSION = 1

# timm module path -> HookedViT module path (parameter suffixes are shared).
_RENAMES = [
    (r"^patch_embed\.proj\.", "embed.proj."),
    (r"^norm_pre\.", "ln_pre."),
    (r"^norm\.", "ln_final."),
    (r"^blocks\.(\d+)\.norm1\.", r"blocks.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.ln2."),
    (r"^attn_pool\.norm\.", "attn_pool.ln."),
    (r"^attn_pool\.mlp\.fc1\.", "attn_pool.fc1."),
    (r"^attn_pool\.mlp\.fc2\.", "attn_pool.fc2."),
]
_INVERSE = [
    (r"^embed\.proj\.", "patch_embed.proj."),
    (r"^ln_pre\.", "norm_pre."),
    (r"^ln_final\.", "norm."),
    (r"^blocks\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^blocks\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^attn_pool\.ln\.", "attn_pool.norm."),
    (r"^attn_pool\.fc1\.", "attn_pool.mlp.fc1."),
    (r"^attn_pool\.fc2\.", "attn_pool.mlp.fc2."),
]


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# ----------------------------------------------------------------------------------------------
# timm model -> config
# ----------------------------------------------------------------------------------------------
def _act_name(act: nn.Module, where: str) -> str:
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if type(act) is GELU:
        return "gelu"
    if type(act) is GELUTanh:
        return "gelu_tanh"
    if type(act) is QuickGELU:
        return "quick_gelu"
    raise NotImplementedError(
        f"{where}: activation {type(act).__name__} is not supported (gelu, gelu_tanh, quick_gelu are)"
    )


def _check_ln(m: nn.Module, where: str, eps: float | None) -> float:
    if not isinstance(m, nn.LayerNorm) or type(m).__name__ not in ("LayerNorm",):
        raise NotImplementedError(f"{where}: norm layer {type(m).__name__} is not supported (LayerNorm is)")
    if not m.elementwise_affine or m.weight is None or m.bias is None:
        raise NotImplementedError(f"{where}: LayerNorm without affine weight and bias is not supported")
    if eps is not None and m.eps != eps:
        raise NotImplementedError(f"{where}: LayerNorm eps {m.eps} differs from the model's {eps}")
    return m.eps


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _biases(b: nn.Module) -> tuple[bool, ...]:
    return tuple(m.bias is not None for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))


def _drop_p(m: nn.Module) -> float:
    return float(m.p) if isinstance(m, nn.Dropout) else 0.0


def config_from_timm(model: nn.Module) -> HookedViTConfig:
    """Read every architectural flag of a timm ViT; raise NotImplementedError for anything else."""
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.layers.attention_pool import AttentionPoolLatent
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    name = type(model).__name__
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise NotImplementedError(
            f"{name} is not supported: HookedViT converts timm VisionTransformer and VisionTransformerDistilled "
            "(Eva/RoPE, relative-position, hybrid-CNN and other families are different models)"
        )
    distilled = type(model) is VisionTransformerDistilled

    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        raise NotImplementedError(
            f"patch embedding {type(pe).__name__} is not supported (hybrid CNN stems are not)"
        )
    if not _is_identity(pe.norm):
        raise NotImplementedError("a norm inside the patch embedding (embed_norm_layer) is not supported")
    conv = pe.proj
    if (
        not isinstance(conv, nn.Conv2d)
        or conv.kernel_size != conv.stride
        or conv.padding != (0, 0)
        or conv.groups != 1
    ):
        raise NotImplementedError("patch embedding must be a Conv2d with kernel == stride and no padding")
    if not isinstance(model.patch_drop, nn.Identity):
        raise NotImplementedError("patch dropout (patch_drop_rate > 0) is not supported")
    if getattr(model, "attn_pool", None) is not None and not isinstance(model.attn_pool, AttentionPoolLatent):
        raise NotImplementedError(
            f"attention pool {type(model.attn_pool).__name__} (global_pool='prr') is not supported"
        )

    blocks = list(model.blocks)
    if not blocks:
        raise NotImplementedError("a ViT with no blocks is not supported")
    for i, b in enumerate(blocks):
        if type(b) is not Block:
            raise NotImplementedError(
                f"blocks.{i}: block type {type(b).__name__} is not supported (timm Block is)"
            )
        if type(b.attn) is not Attention:
            raise NotImplementedError(
                f"blocks.{i}.attn: {type(b.attn).__name__} is not supported (RoPE/relative position/diff attention are not)"
            )
        if type(b.mlp) is not Mlp:
            raise NotImplementedError(
                f"blocks.{i}.mlp: {type(b.mlp).__name__} is not supported (SwiGLU/GLU MLPs are not)"
            )
    b0 = blocks[0]
    eps = _check_ln(b0.norm1, "blocks.0.norm1", None)
    act = _act_name(b0.mlp.act, "blocks.0.mlp.act")
    layer_scale = not isinstance(b0.ls1, nn.Identity)
    drop_path = []
    for i, b in enumerate(blocks):
        w = f"blocks.{i}"
        if not isinstance(b.mlp.fc1, nn.Linear) or not isinstance(b.mlp.fc2, nn.Linear):
            raise NotImplementedError(f"{w}.mlp: convolutional MLP layers are not supported")
        if not _is_identity(b.mlp.norm):
            raise NotImplementedError(
                f"{w}.mlp.norm: an extra norm inside the MLP (scale_mlp_norm) is not supported"
            )
        if not _is_identity(b.attn.norm):
            raise NotImplementedError(
                f"{w}.attn.norm: an extra norm inside attention (scale_attn_norm) is not supported"
            )
        if getattr(b.attn, "gate", None) is not None:
            raise NotImplementedError(f"{w}.attn.gate: gated attention is not supported")
        for ln, nm in ((b.norm1, "norm1"), (b.norm2, "norm2")):
            _check_ln(ln, f"{w}.{nm}", eps)
        if isinstance(b.attn.q_norm, nn.Identity) != isinstance(blocks[0].attn.q_norm, nn.Identity):
            raise NotImplementedError(f"{w}: qk_norm differs between blocks")
        if not isinstance(b.attn.q_norm, nn.Identity):
            _check_ln(b.attn.q_norm, f"{w}.attn.q_norm", eps)
            _check_ln(b.attn.k_norm, f"{w}.attn.k_norm", eps)
        if (not isinstance(b.ls1, nn.Identity)) != layer_scale or (
            not isinstance(b.ls2, nn.Identity)
        ) != layer_scale:
            raise NotImplementedError(f"{w}: LayerScale differs between blocks")
        if _act_name(b.mlp.act, f"{w}.mlp.act") != act:
            raise NotImplementedError(f"{w}: activation differs between blocks")
        if (b.attn.num_heads, b.attn.head_dim) != (b0.attn.num_heads, b0.attn.head_dim):
            raise NotImplementedError(f"{w}: head count or size differs between blocks")
        if b.mlp.fc1.out_features != b0.mlp.fc1.out_features:
            raise NotImplementedError(f"{w}: MLP width differs between blocks")
        if _biases(b) != _biases(b0):
            raise NotImplementedError(f"{w}: bias presence of qkv/proj/fc1/fc2 differs between blocks")
        drop_path.append(float(b.drop_path1.drop_prob) if hasattr(b.drop_path1, "drop_prob") else 0.0)

    pool = model.global_pool
    final_norm = not isinstance(model.norm, nn.Identity)
    fc_norm = not isinstance(model.fc_norm, nn.Identity)
    if final_norm:
        _check_ln(model.norm, "norm", eps)
    if fc_norm:
        _check_ln(model.fc_norm, "fc_norm", eps)
        if distilled:
            raise NotImplementedError("fc_norm on a distilled model (timm's distilled head ignores it)")
    pre_norm = not isinstance(model.norm_pre, nn.Identity)
    if pre_norm:
        _check_ln(model.norm_pre, "norm_pre", eps)
    if distilled and model.reg_token is not None:
        raise NotImplementedError(
            "register tokens on a distilled model (timm's distilled embedding drops them)"
        )
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise NotImplementedError(f"head {type(model.head).__name__} is not supported (Linear is)")

    map_kw: dict[str, Any] = {}
    if pool == "map":
        ap = model.attn_pool
        if ap.pos_embed is not None:
            raise NotImplementedError("MAP attention pool with its own position embedding is not supported")
        if not isinstance(ap.q_norm, nn.Identity):
            raise NotImplementedError("MAP attention pool with qk_norm is not supported")
        if ap.mlp is None or ap.proj is None or isinstance(ap.proj, nn.Identity):
            raise NotImplementedError(
                "MAP attention pool without projection/MLP (out_features=0) is not supported"
            )
        if ap.num_heads != b0.attn.num_heads or ap.latent_dim != model.embed_dim:
            raise NotImplementedError(
                "MAP attention pool with its own head count or latent width is not supported"
            )
        _check_ln(ap.norm, "attn_pool.norm", eps)
        if _act_name(ap.mlp.act, "attn_pool.mlp.act") != act:
            raise NotImplementedError("MAP attention pool with a different activation is not supported")
        map_kw = dict(
            map_latent_len=ap.latent_len,
            map_pool=ap.pool,
            map_q_proj=not isinstance(ap.q, nn.Identity),
            map_mlp_ratio=ap.mlp.fc1.out_features / model.embed_dim,
            map_kv_bias=ap.kv.bias is not None,
        )

    num_classes = model.head.out_features if isinstance(model.head, nn.Linear) else 0
    return HookedViTConfig(
        d_model=model.embed_dim,
        n_layers=len(blocks),
        n_heads=b0.attn.num_heads,
        d_head=b0.attn.head_dim,
        d_mlp=b0.mlp.fc1.out_features,
        img_size=pe.img_size if pe.img_size is not None else (224, 224),
        patch_size=pe.patch_size,
        in_chans=conv.in_channels,
        num_classes=num_classes,
        act_fn=act,
        eps=eps,
        class_token=model.cls_token is not None,
        n_reg_tokens=int(model.reg_token.shape[1]) if model.reg_token is not None else 0,
        dist_token=distilled,
        no_embed_class=bool(model.no_embed_class),
        pos_embed=model.pos_embed is not None,
        dynamic_img_size=bool(model.dynamic_img_size),
        dynamic_img_pad=bool(pe.dynamic_img_pad),
        patch_bias=conv.bias is not None,
        qkv_bias=b0.attn.qkv.bias is not None,
        proj_bias=b0.attn.proj.bias is not None,
        fc1_bias=b0.mlp.fc1.bias is not None,
        fc2_bias=b0.mlp.fc2.bias is not None,
        qk_norm=not isinstance(b0.attn.q_norm, nn.Identity),
        layer_scale=layer_scale,
        pre_norm=pre_norm,
        final_norm=final_norm,
        fc_norm=fc_norm,
        global_pool="token" if distilled else pool,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        pos_drop=_drop_p(model.pos_drop),
        attn_drop=_drop_p(b0.attn.attn_drop),
        proj_drop=_drop_p(b0.attn.proj_drop),
        head_drop=_drop_p(model.head_drop),
        drop_path=drop_path,
        timm_name=(getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        timm_class=type(model).__name__,
        **map_kw,
    )


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def state_dict_from_timm(model: nn.Module) -> dict[str, Tensor]:
    return {_rename(k, _RENAMES): v.detach().clone() for k, v in model.state_dict().items()}


def fold_layer_norm(sd: dict[str, Tensor], cfg: HookedViTConfig) -> dict[str, Tensor]:
    """Fold LayerNorm weights into the linear layers that read them (TransformerLens ``fold_ln``).

    ln1 -> qkv and ln2 -> fc1 in every block; the final norm (ln_final, or fc_norm) -> the head(s)
    when the pooling between them is linear (token, avg, none; not max/avgmax/map) and there is a head.
    ``ln_pre``, qk-norm and the MAP pool's internal norm are not followed by a single linear map and
    stay as they are.
    """
    sd = dict(sd)

    def fold(prefix: str, linear: str) -> None:
        w, b = sd.pop(f"{prefix}.weight"), sd.pop(f"{prefix}.bias")
        W = sd[f"{linear}.weight"]
        bias = sd.get(f"{linear}.bias")
        sd[f"{linear}.bias"] = (bias if bias is not None else W.new_zeros(W.shape[0])) + W @ b
        sd[f"{linear}.weight"] = W * w[None, :]

    for i in range(cfg.n_layers):
        fold(f"blocks.{i}.ln1", f"blocks.{i}.attn.qkv")
        fold(f"blocks.{i}.ln2", f"blocks.{i}.mlp.fc1")
    cfg.fold_ln, cfg.qkv_bias, cfg.fc1_bias = True, True, True
    final = "fc_norm" if cfg.fc_norm else ("ln_final" if cfg.final_norm else None)
    linear_pool = cfg.global_pool in ("token", "avg", "") and not (final == "ln_final" and cfg.fc_norm)
    if final and cfg.num_classes > 0 and linear_pool:
        w, b = sd[f"{final}.weight"], sd[f"{final}.bias"]
        heads = ["head", "head_dist"] if cfg.dist_token else ["head"]
        for h in heads:
            W = sd[f"{h}.weight"]
            sd[f"{h}.bias"] = sd[f"{h}.bias"] + W @ b
            sd[f"{h}.weight"] = W * w[None, :]
        del sd[f"{final}.weight"], sd[f"{final}.bias"]
        cfg.final_ln_folded = True
    return sd


def center_writing_weights_sd(sd: dict[str, Tensor], cfg: HookedViTConfig) -> dict[str, Tensor]:
    """Make every weight that writes to the residual stream have zero mean over d_model.

    Valid because every reader of the residual stream is a LayerNorm (which removes the mean):
    requires a token-wise final norm, or fc_norm after token/avg pooling. LayerScale is folded into
    the projections first (gamma is set to 1) so that the written vectors themselves are centred.
    """
    readable = cfg.final_norm or (cfg.fc_norm and cfg.global_pool in ("token", "avg"))
    if not readable:
        raise ValueError(
            "center_writing_weights needs the residual stream to be read through a LayerNorm; this model has "
            f"final_norm={cfg.final_norm}, fc_norm={cfg.fc_norm}, global_pool={cfg.global_pool!r}"
        )
    sd = dict(sd)

    def c(key: str, dim: int) -> None:
        if key in sd:
            sd[key] = sd[key] - sd[key].mean(dim=dim, keepdim=True)

    c("embed.proj.weight", 0)
    c("embed.proj.bias", 0)
    for k in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        c(k, -1)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        if cfg.layer_scale:
            for ls, lin in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
                g = sd[f"{p}.{ls}.gamma"]
                sd[f"{p}.{lin}.weight"] = sd[f"{p}.{lin}.weight"] * g[:, None]
                if f"{p}.{lin}.bias" in sd:
                    sd[f"{p}.{lin}.bias"] = sd[f"{p}.{lin}.bias"] * g
                sd[f"{p}.{ls}.gamma"] = torch.ones_like(g)
        for lin in ("attn.proj", "mlp.fc2"):
            c(f"{p}.{lin}.weight", 0)
            c(f"{p}.{lin}.bias", 0)
    cfg.centered = True
    return sd


def to_timm_state_dict(model: HookedViT) -> dict[str, Tensor]:
    cfg = model.cfg
    sd = {_rename(k, _INVERSE): v.detach().clone() for k, v in model.state_dict().items()}

    # LayerNorms whose weights were folded away are the identity affine map in timm.
    def ones():
        w = model.embed.proj.weight
        return torch.ones(cfg.d_model, dtype=w.dtype, device=w.device)

    if cfg.fold_ln:
        for i in range(cfg.n_layers):
            for n in ("norm1", "norm2"):
                sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"] = ones(), ones() * 0
    if cfg.final_ln_folded:
        n = "fc_norm" if cfg.fc_norm else "norm"
        sd[f"{n}.weight"], sd[f"{n}.bias"] = ones(), ones() * 0
    return sd


def timm_kwargs(cfg: HookedViTConfig) -> dict[str, Any]:
    """Keyword arguments that rebuild this architecture with timm's VisionTransformer."""
    from timm.layers import get_act_layer

    if cfg.global_pool == "map" and (
        cfg.map_latent_len != 1 or cfg.map_pool != "token" or not cfg.map_q_proj
    ):
        raise NotImplementedError(
            "timm's VisionTransformer cannot rebuild a MAP pool with non-default latent settings"
        )
    if cfg.proj_bias != cfg.fc2_bias or (not cfg.fold_ln and cfg.fc1_bias != cfg.proj_bias):
        raise NotImplementedError("timm's VisionTransformer ties the projection and MLP biases")
    kw: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        global_pool=cfg.global_pool,
        embed_dim=cfg.d_model,
        depth=cfg.n_layers,
        num_heads=cfg.n_heads,
        mlp_ratio=cfg.d_mlp / cfg.d_model,
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
        proj_bias=cfg.proj_bias,
        init_values=1.0 if cfg.layer_scale else None,
        class_token=cfg.class_token,
        pos_embed="learn" if cfg.pos_embed else "none",
        no_embed_class=cfg.no_embed_class,
        reg_tokens=cfg.n_reg_tokens,
        pre_norm=cfg.pre_norm,
        final_norm=cfg.final_norm or cfg.fc_norm,
        fc_norm=cfg.fc_norm,
        pool_include_prefix=cfg.pool_include_prefix,
        dynamic_img_size=cfg.dynamic_img_size,
        dynamic_img_pad=cfg.dynamic_img_pad,
        drop_rate=cfg.head_drop,
        pos_drop_rate=cfg.pos_drop,
        attn_drop_rate=cfg.attn_drop,
        proj_drop_rate=cfg.proj_drop,
        act_layer=get_act_layer(
            {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}[cfg.act_fn]
        ),
        norm_layer=functools.partial(nn.LayerNorm, eps=cfg.eps),  # timm's default eps is 1e-6 (CLIP: 1e-5)
    )
    if cfg.d_head * cfg.n_heads != cfg.d_model:
        raise NotImplementedError("timm's VisionTransformer needs d_head * n_heads == d_model")
    if cfg.global_pool == "token_avg":
        raise NotImplementedError(
            "timm's VisionTransformer has no global_pool='token_avg' ([CLS, mean patch] readout)"
        )
    if cfg.zero_shot_dim:
        raise NotImplementedError(
            "timm's VisionTransformer has no zero-shot head (projection, L2 normalisation, text classifier); "
            "convert the image tower (HookedViT.from_hf / from_open_clip without zero-shot) to timm instead"
        )
    if cfg.dist_token:
        kw.pop("global_pool")
    return kw


def to_timm_model(model: HookedViT) -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    cfg = model.cfg
    kw = timm_kwargs(cfg)
    cls = VisionTransformerDistilled if cfg.dist_token else VisionTransformer
    timm_model = cls(**kw)
    from timm.layers import DropPath

    # timm's constructor spaces the blocks' drop-path rates linearly from one rate: set each block's own
    for blk, rate in zip(timm_model.blocks, cfg.drop_path, strict=True):
        blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
    proj = (
        timm_model.patch_embed.proj
    )  # timm gives the patch embedding a bias exactly when there is no ln_pre
    if not cfg.patch_bias:
        proj.bias = None
    elif proj.bias is None:
        proj.bias = nn.Parameter(torch.zeros(proj.out_channels))
    if cfg.dist_token:
        timm_model.set_distilled_training(model.distilled_training)
    sd = to_timm_state_dict(model)
    if cfg.fold_ln:  # folding gave qkv / fc1 biases the original may not have had
        for i in range(cfg.n_layers):
            for lin in (timm_model.blocks[i].attn.qkv, timm_model.blocks[i].mlp.fc1):
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features))
    timm_model.load_state_dict(sd, strict=True)
    dev = model.embed.proj.weight.device
    return timm_model.to(dev).train(model.training)


# ----------------------------------------------------------------------------------------------
# loading timm models and checkpoints
# ----------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / torch raise several types for damaged files
        raise ValueError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e} (truncated or not a weights file?)"
        ) from e
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(module: nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        parts = [
            f"missing {few(missing)}" if missing else "",
            f"unexpected {few(unexpected)}" if unexpected else "",
            f"shape mismatch {few(shapes)}" if shapes else "",
        ]
        raise ValueError(f"{source} does not fit this architecture: " + "; ".join(p for p in parts if p))
    module.load_state_dict(sd, strict=True)


def from_timm(
    cls: type[HookedViT],
    model_or_name: nn.Module | str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    device: str | torch.device | None = None,
    **timm_kw: Any,
) -> HookedViT:
    import timm

    if isinstance(model_or_name, str):
        timm_model = timm.create_model(model_or_name, pretrained=pretrained, **timm_kw)
    elif isinstance(model_or_name, nn.Module):
        if pretrained or timm_kw:
            raise ValueError(
                "pretrained and timm keyword arguments apply to a model name, not to a model instance"
            )
        timm_model = model_or_name
    else:
        raise ValueError(f"expected a timm model or a timm model name, got {type(model_or_name).__name__}")
    if checkpoint_path is not None:
        load_into(timm_model, read_state_dict(checkpoint_path), f"checkpoint {checkpoint_path}")
    cfg = config_from_timm(timm_model)
    if isinstance(model_or_name, str):
        cfg.timm_name = model_or_name
    sd = state_dict_from_timm(timm_model)
    if fold_ln:
        sd = fold_layer_norm(sd, cfg)
    if center_writing_weights:
        sd = center_writing_weights_sd(sd, cfg)
    model = cls(cfg)
    param = next(timm_model.parameters())
    model.to(dtype=param.dtype)
    load_into(model, sd, f"timm {type(timm_model).__name__}")
    model.train(timm_model.training)
    model.distilled_training = bool(getattr(timm_model, "distilled_training", False))
    return model.to(device if device is not None else param.device)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def save_pretrained(model: HookedViT, directory: str | os.PathLike) -> Path:
    d = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # weights first, then the config that records their hash: a crash in between leaves a pair that
    # from_pretrained rejects instead of a silent mix
    w = atomic_save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights_sha256": sha256_file(w),
        "config": model.cfg.to_dict(),
    }
    atomic_write_json(d / "config.json", meta)
    return d


def load_pretrained(cls: type[HookedViT], directory: str | os.PathLike, *, device: Any = None) -> HookedViT:
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_path, w_path = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} does not exist (expected a folder written by HookedViT.save_pretrained)"
            )
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); truncated?") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{cfg_path} is not a HookedViT config (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})"
        )
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{cfg_path}: format_version: expected int, got {type(version).__name__} {version!r}"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} has format_version {meta['format_version']}; this mechvit reads <= {FORMAT_VERSION}"
        )
    if "config" not in meta:
        raise ValueError(f"{cfg_path}: missing key 'config'")
    try:
        cfg = HookedViTConfig.from_dict(meta["config"], prefix="config.")
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    except (TypeError, ValueError) as e:  # raised by the config's own checks (__post_init__)
        raise ValueError(f"{cfg_path}: config: {e}") from None
    try:
        sd = load_file(str(w_path))
    except Exception as e:
        raise ValueError(f"cannot read {w_path}: {type(e).__name__}: {e} (truncated or damaged file?)") from e
    model = cls(cfg)  # load_into checks every tensor's name and shape against the model the config builds
    dtype = next(iter(sd.values())).dtype if sd else torch.float32
    model.to(dtype=dtype)
    load_into(model, sd, str(w_path))
    want = meta.get("weights_sha256")  # absent in folders written before mechvit recorded it
    if want is not None and sha256_file(w_path) != want:
        raise ValueError(
            f"{w_path} does not match the sha256 recorded in {cfg_path.name} at save time "
            f"({want[:12]}...): the file was changed, truncated or damaged after saving"
        )
    model.eval()
    return model.to(device) if device is not None else model
