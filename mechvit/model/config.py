"""HookedViTConfig: every architectural flag of a timm ViT that HookedViT honours, in one dataclass."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

ACT_FNS = ("gelu", "gelu_tanh", "quick_gelu")
GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "map", "", "token_avg")


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {v!r}")
    return v  # type: ignore[return-value]


@dataclass
class HookedViTConfig:
    """Architecture of a HookedViT. Built by :func:`mechvit.model.convert.config_from_timm`.

    The TransformerLens names (``d_model``, ``n_layers``, ...) are used so that transformer_lens's
    ``ActivationCache`` and its utilities can read this config.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    in_chans: int = 3
    num_classes: int = 1000
    act_fn: str = "gelu"
    eps: float = 1e-6
    # token layout
    class_token: bool = True
    n_reg_tokens: int = 0
    dist_token: bool = False
    no_embed_class: bool = False
    pos_embed: bool = True
    dynamic_img_size: bool = False
    dynamic_img_pad: bool = False
    # linear-layer biases (folding a LayerNorm can add a bias where the timm model had none)
    patch_bias: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    fc1_bias: bool = True
    fc2_bias: bool = True
    # block options
    qk_norm: bool = False
    layer_scale: bool = False
    # norms around the blocks
    pre_norm: bool = False
    final_norm: bool = True  # timm's `norm` before pooling (our `ln_final`)
    fc_norm: bool = False  # timm's `fc_norm` after pooling
    # head
    global_pool: str = "token"
    pool_include_prefix: bool = False
    map_latent_len: int = 1
    map_pool: str = "token"
    map_q_proj: bool = True
    map_mlp_ratio: float = 4.0
    map_kv_bias: bool = True
    # CLIP/SigLIP zero-shot head (mechvit.model.zero_shot.ZeroShotHead) when > 0: the pooled features are projected
    # to this width, L2-normalised and classified by logit_scale * unit text embeddings (0: a Linear head)
    zero_shot_dim: int = 0
    # dropout / stochastic depth (training only; eval is deterministic)
    pos_drop: float = 0.0
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    head_drop: float = 0.0
    drop_path: list[float] = field(default_factory=list)
    # weight processing applied at conversion
    fold_ln: bool = False
    centered: bool = False
    final_ln_folded: bool = False
    # hooks
    use_attn_result: bool = False
    # provenance
    timm_name: str | None = None
    timm_class: str = "VisionTransformer"
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size)
        self.patch_size = _pair(self.patch_size)
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.global_pool == "token_avg" and (not self.class_token or self.dist_token or self.fc_norm):
            raise ValueError(
                "global_pool='token_avg' ([CLS, mean of patch tokens], HF DINOv2's classifier input) needs a class "
                f"token, no distillation token and no fc_norm; got class_token={self.class_token}, "
                f"dist_token={self.dist_token}, fc_norm={self.fc_norm}"
            )
        if self.dist_token and not self.class_token:
            raise ValueError("a distillation token needs a class token")
        if not self.drop_path:
            self.drop_path = [0.0] * self.n_layers
        if len(self.drop_path) != self.n_layers:
            raise ValueError(f"drop_path needs {self.n_layers} rates, got {len(self.drop_path)}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} names for {self.num_classes} classes")
        if self.zero_shot_dim < 0 or (self.zero_shot_dim and (self.num_classes <= 0 or self.dist_token)):
            raise ValueError(
                "zero_shot_dim > 0 (a zero-shot head) needs num_classes > 0 and no distillation token, got "
                f"zero_shot_dim={self.zero_shot_dim}, num_classes={self.num_classes}, dist_token={self.dist_token}"
            )
        (H, W), (ph, pw) = self.img_size, self.patch_size
        if (H % ph or W % pw) and not self.dynamic_img_pad:
            gh, gw = H // ph, W // pw
            lost = 1 - (gh * ph * gw * pw) / (H * W)
            warnings.warn(
                f"img_size {H}x{W} is not divisible by patch_size {ph}x{pw}: the {gh}x{gw} patch grid covers "
                f"the top-left {gh * ph}x{gw * pw} pixels and {lost:.0%} of each image is ignored (as in timm, "
                "which builds this silently); use a patch size that divides the image, or dynamic_img_pad=True",
                UserWarning,
                stacklevel=3,
            )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.dist_token) + self.n_reg_tokens

    @property
    def n_tokens(self) -> int:
        return self.n_prefix_tokens + self.n_patches

    @property
    def n_ctx(self) -> int:  # TransformerLens name
        return self.n_tokens

    # ---- TransformerLens compatibility (read by ActivationCache) ---------------------------------
    @property
    def normalization_type(self) -> str:
        return "LNPre" if self.fold_ln else "LN"

    @property
    def attn_only(self) -> bool:
        return False

    @property
    def device(self) -> Any:  # TransformerLens utilities read cfg.device; the model keeps it current on .to()
        return getattr(self, "_device", None)

    @property
    def dtype(self) -> torch.dtype:  # the parameters' dtype, kept current by the model
        return getattr(self, "_dtype", torch.float32)

    # fixed answers to the other fields TransformerLens's utilities read (ActivationCache, patching, ...)
    n_key_value_heads = None  # no grouped-query attention: every head has its own keys and values
    ungroup_grouped_query_attention = False
    positional_embedding_type = "standard"  # learned absolute position embeddings, added before block 0
    attention_dir = "bidirectional"
    n_devices = 1
    default_prepend_bos = False
    tokenizer_prepends_bos = False
    use_attn_in = False
    use_split_qkv_input = False
    use_hook_mlp_in = False
    parallel_attn_mlp = False

    @property
    def d_vocab(self) -> int:  # the "vocabulary" a ViT reads out is its classes
        return self.num_classes

    @property
    def d_vocab_out(self) -> int:
        return self.num_classes

    @property
    def original_architecture(self) -> str:
        return self.timm_class

    @property
    def model_name(self) -> str:
        return self.timm_name or self.timm_class

    @property
    def n_params(self) -> int:
        d, L = self.d_model, self.n_layers
        return L * (4 * d * self.n_heads * self.d_head + 2 * d * self.d_mlp)

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> HookedViTConfig:
        """Build from a mapping, checking keys and types (``mechvit._dataclass_yaml.from_dict``): an unknown
        key or a wrong type is one ``ConfigError`` (a ValueError) naming the key, e.g.
        ``config.d_model: expected int, got str '96'``; ``prefix`` goes before the key names."""
        from mechvit._dataclass_yaml import from_dict

        return from_dict(cls, d, prefix)
