"""HookedViT components: one small class per component, hook points named after what they hold.

Every component computes exactly what the matching timm module computes, with the same fused
weights (one ``qkv`` Linear, conv patch embedding) so that an unhooked forward costs what timm's
costs. The explicit, hookable computations (LayerNorm scale, attention scores and pattern) run only
when a hook is attached to them: a hook that is never attached is never observed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .config import HookedViTConfig


def hooked(*points: HookPoint) -> bool:
    """True when any of the hook points has a forward or backward hook attached."""
    return any(p._forward_hooks or p._backward_hooks or p._forward_pre_hooks for p in points)


def activation(name: str, x: Tensor) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def share(module: nn.Module, name: str, other: nn.Module | None) -> None:
    """Give ``module`` a plain reference to ``other`` (owned and registered elsewhere, so it is not a submodule
    here and the state dict keeps one key per weight). A reference, unlike a closure, follows the model
    through ``copy.deepcopy`` and pickling (both keep one copy of an object referenced twice)."""
    object.__setattr__(module, name, other)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample, as timm's DropPath (scale_by_keep=True)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with TransformerLens's hooks and their semantics.

    As TransformerLens's ``LayerNorm`` (``transformer_lens/components/layer_norm.py``): ``hook_scale`` holds
    ``sqrt(var + eps)`` ``[..., 1]`` and ``hook_normalized`` the centred input divided by it, *before* the
    affine map ``* weight + bias``; half-precision inputs are normalised in float32 (hooks see float32) and
    cast back. With ``affine=False`` it is TransformerLens's ``LayerNormPre`` (weights folded into the next
    linear layer). With no hook attached it is one fused ``F.layer_norm``.
    """

    def __init__(self, d: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.d, self.eps, self.affine = d, eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(d))
            self.bias = nn.Parameter(torch.zeros(d))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]: (x - mean) / scale, before the affine map

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if not hooked(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, (self.d,), self.weight, self.bias, self.eps)
        out_dtype = self.weight.dtype if self.weight is not None else x.dtype
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if hooked(self.hook_scale):
            # centre then mean of squares: ~30x faster on CPU than torch.var_mean (Welford), same values to 1e-7
            centred = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale(((centred * centred).mean(-1, keepdim=True) + self.eps).sqrt())
            normalized = centred / scale  # with the scale as the hook left it (edited or not)
        else:  # only the normalised stream is read: the fused kernel without the affine map
            normalized = F.layer_norm(x, (self.d,), None, None, self.eps)
        normalized = self.hook_normalized(normalized).to(out_dtype)
        if self.weight is None:
            return normalized
        return torch.addcmul(self.bias, normalized, self.weight)


class PatchEmbed(nn.Module):
    """Conv patch embedding (timm PatchEmbed): ``[B, C, H, W] -> [B, gh*gw, D]`` and the grid size."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)

    def forward(
        self, x: Float[Tensor, "batch chan h w"]
    ) -> tuple[Float[Tensor, "batch patch d_model"], tuple[int, int]]:
        ph, pw = self.cfg.patch_size
        if self.cfg.dynamic_img_pad:
            x = F.pad(x, (0, (pw - x.shape[-1] % pw) % pw, 0, (ph - x.shape[-2] % ph) % ph))
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with TransformerLens hooks.

    Fast path: ``F.scaled_dot_product_attention`` when nothing hooks ``hook_attn_scores`` or
    ``hook_pattern``; otherwise the explicit softmax(q k^T / sqrt(d_head)) v.
    """

    def __init__(self, cfg: HookedViTConfig, layer_scale: LayerScale | None = None):
        super().__init__()
        self.cfg = cfg
        H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
        self.scale = Dh**-0.5
        self.qkv = nn.Linear(D, 3 * H * Dh, bias=cfg.qkv_bias)
        self.q_norm = LayerNorm(Dh, cfg.eps) if cfg.qk_norm else None
        self.k_norm = LayerNorm(Dh, cfg.eps) if cfg.qk_norm else None
        self.proj = nn.Linear(H * Dh, D, bias=cfg.proj_bias)
        self.attn_drop = nn.Dropout(cfg.attn_drop)
        self.proj_drop = nn.Dropout(cfg.proj_drop)
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head_index, d_model] (cfg.use_attn_result)
        # the block's LayerScale (``ls1``), so that W_O / b_O are the weights as they act on the residual stream
        share(self, "layer_scale", layer_scale)

    # ---- weights in TransformerLens shapes (views; LayerScale folded into W_O / b_O) -------------
    def _split(self, i: int) -> Tensor:
        H, Dh, D = self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
        return self.qkv.weight[i * H * Dh : (i + 1) * H * Dh].view(H, Dh, D).transpose(1, 2)

    def _split_bias(self, i: int) -> Tensor:
        H, Dh = self.cfg.n_heads, self.cfg.d_head
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(H, Dh)
        return self.qkv.bias[i * H * Dh : (i + 1) * H * Dh].view(H, Dh)

    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._split(0)

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._split(1)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._split(2)

    @property
    def b_Q(self) -> Float[Tensor, "n_heads d_head"]:
        return self._split_bias(0)

    @property
    def b_K(self) -> Float[Tensor, "n_heads d_head"]:
        return self._split_bias(1)

    @property
    def b_V(self) -> Float[Tensor, "n_heads d_head"]:
        return self._split_bias(2)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        H, Dh, D = self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
        w = self.proj.weight.T.reshape(H, Dh, D)
        return w * self.layer_scale.gamma if self.layer_scale is not None else w

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        b = self.proj.bias if self.proj.bias is not None else self.proj.weight.new_zeros(self.cfg.d_model)
        return b * self.layer_scale.gamma if self.layer_scale is not None else b

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], query_rows: slice | None = None
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """Returns the attention output before LayerScale (or after it, with use_attn_result).

        ``query_rows`` computes only those query positions (keys and values still span every token): what a
        readout that pools a few tokens needs from the last block. Hooks then see only those rows.
        """
        B, T, _ = x.shape
        H, Dh = self.cfg.n_heads, self.cfg.d_head
        # q, k, v are views of one fused projection, taken with select rather than unbind: autograd forbids
        # in-place edits of unbind's outputs, and TransformerLens lets a hook edit hook_q/k/v in place
        if query_rows is None:
            qkv = self.qkv(x).view(B, T, 3, H, Dh)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            w, b, n = self.qkv.weight, self.qkv.bias, H * Dh
            q = F.linear(x[:, query_rows], w[:n], None if b is None else b[:n]).unflatten(-1, (H, Dh))
            kv = F.linear(x, w[n:], None if b is None else b[n:]).view(B, T, 2, H, Dh)
            k, v = kv[:, :, 0], kv[:, :, 1]
        Tq = q.shape[1]
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if hooked(self.hook_attn_scores, self.hook_pattern):
            # baddbmm folds the 1/sqrt(d_head) scale into the matmul (measured ~15% faster than q * scale @ k^T)
            qb, kb = q.reshape(B * H, Tq, Dh), k.reshape(B * H, T, Dh)
            scores = torch.baddbmm(
                qb.new_empty(B * H, Tq, T), qb, kb.transpose(1, 2), beta=0.0, alpha=self.scale
            )
            scores = self.hook_attn_scores(scores.view(B, H, Tq, T))
            pattern = scores.softmax(dim=-1)
            if pattern.requires_grad and hooked(self.hook_pattern):
                pattern = (
                    pattern.clone()
                )  # softmax saves its output for backward; a hook may edit it in place
            z = self.attn_drop(self.hook_pattern(pattern)) @ v
        else:
            p = self.attn_drop.p if self.training else 0.0
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            if z.requires_grad and hooked(self.hook_z):
                z = (
                    z.clone()
                )  # SDPA saves its output for backward; a hook may edit hook_z in place (as in TL)
        z = self.hook_z(z.transpose(1, 2))
        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))
            return self.proj_drop(result.sum(dim=2) + self.b_O)
        return self.proj_drop(self.proj(z.reshape(B, Tq, H * Dh)))


class MLP(nn.Module):
    """fc1 -> activation -> fc2, as timm's Mlp."""

    def __init__(self, cfg: HookedViTConfig, layer_scale: LayerScale | None = None):
        super().__init__()
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.fc1_bias)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.fc2_bias)
        self.drop1 = nn.Dropout(cfg.proj_drop)
        self.drop2 = nn.Dropout(cfg.proj_drop)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        share(self, "layer_scale", layer_scale)  # the block's ``ls2`` (for W_out / b_out)

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc1.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return self.fc1.bias if self.fc1.bias is not None else self.fc1.weight.new_zeros(self.cfg.d_mlp)

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        w = self.fc2.weight.T
        return w * self.layer_scale.gamma if self.layer_scale is not None else w

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        b = self.fc2.bias if self.fc2.bias is not None else self.fc2.weight.new_zeros(self.cfg.d_model)
        return b * self.layer_scale.gamma if self.layer_scale is not None else b

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.fc1(x))
        post = self.hook_post(activation(self.cfg.act_fn, pre))
        return self.drop2(self.fc2(self.drop1(post)))


class LayerScale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class TransformerBlock(nn.Module):
    """Pre-norm block: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(.))."""

    def __init__(self, cfg: HookedViTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # attention and MLP read LayerScale so that W_O / W_out are the weights as they act on the residual
        # stream; the block owns it (timm's state-dict layout: blocks.{l}.ls1.gamma)
        ls1, ls2 = (LayerScale(cfg.d_model), LayerScale(cfg.d_model)) if cfg.layer_scale else (None, None)
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps, affine=not cfg.fold_ln)
        self.attn = Attention(cfg, ls1)
        self.ls1 = ls1
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps, affine=not cfg.fold_ln)
        self.mlp = MLP(cfg, ls2)
        self.ls2 = ls2
        self.drop_path = cfg.drop_path[layer]
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], query_rows: slice | None = None
    ) -> Float[Tensor, "batch query_pos d_model"]:
        """``query_rows`` returns only those positions (see ``Attention.forward``)."""
        x = self.hook_resid_pre(x)
        a = self.attn(self.ln1(x), query_rows)
        if query_rows is not None:
            x = x[:, query_rows]
        if self.ls1 is not None and not self.cfg.use_attn_result:
            a = self.ls1(a)
        x = self.hook_resid_mid(x + drop_path(self.hook_attn_out(a), self.drop_path, self.training))
        m = self.mlp(self.ln2(x))
        if self.ls2 is not None:
            m = self.ls2(m)
        return self.hook_resid_post(x + drop_path(self.hook_mlp_out(m), self.drop_path, self.training))


class AttentionPool(nn.Module):
    """Multihead attention pooling with a learned latent query (timm AttentionPoolLatent, 'map')."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.d_model, cfg.n_heads
        if D % H:
            raise NotImplementedError(f"MAP pooling needs d_model divisible by n_heads ({D}, {H})")
        self.n_heads, self.d_head = H, D // H
        self.latent = nn.Parameter(torch.zeros(1, cfg.map_latent_len, D))
        self.q = nn.Linear(D, D, bias=cfg.map_kv_bias) if cfg.map_q_proj else None
        self.kv = nn.Linear(D, 2 * D, bias=cfg.map_kv_bias)
        self.proj = nn.Linear(D, D)
        self.ln = LayerNorm(D, cfg.eps)
        self.fc1 = nn.Linear(D, int(D * cfg.map_mlp_ratio))
        self.fc2 = nn.Linear(int(D * cfg.map_mlp_ratio), D)
        self.hook_pattern = HookPoint()  # [batch, head_index, latent, key_pos]
        self.hook_out = HookPoint()  # [batch, latent, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        B, N, D = x.shape
        L, H, Dh = self.cfg.map_latent_len, self.n_heads, self.d_head
        q = self.latent.expand(B, -1, -1)
        q = (self.q(q) if self.q is not None else q).reshape(B, L, H, Dh).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        if hooked(self.hook_pattern):
            pattern = ((q * (Dh**-0.5)) @ k.transpose(-2, -1)).softmax(-1)
            if pattern.requires_grad:  # softmax saves its output for backward; a hook may edit it in place
                pattern = pattern.clone()
            z = self.hook_pattern(pattern) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(z.transpose(1, 2).reshape(B, L, D))
        out = out + self.fc2(activation(self.cfg.act_fn, self.fc1(self.ln(out))))
        out = self.hook_out(out)
        if self.cfg.map_pool == "token":
            return out[:, 0]
        if self.cfg.map_pool == "avg":
            return out.mean(1)
        return out


def init_like_timm(module: nn.Module) -> None:
    """Plain initialisation for a HookedViT built from a config alone (weights usually come from timm)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
