"""HookedViT: a timm Vision Transformer as a TransformerLens HookedRootModule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.utilities import Slice

from .activation_cache import ViTActivationCache
from .components import AttentionPool, LayerNorm, PatchEmbed, TransformerBlock, hooked, init_like_timm
from .config import HookedViTConfig

RETURN_TYPES = ("logits", "loss", "both", None)


def _autocast_on(device_type: str) -> bool:
    """Autocast enabled for ``device_type`` (``torch.is_autocast_enabled()`` with no argument reports CUDA's
    only; devices without autocast, such as meta, have none)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


class HookedViT(HookedRootModule):
    """A Vision Transformer with a hook point on every intermediate activation.

    Token order in the residual stream follows timm: ``[cls, (dist), reg..., patches row-major]``.
    Build one with :meth:`from_timm` (exact conversion of a timm ``VisionTransformer``) or
    :meth:`from_pretrained` (a folder written by :meth:`save_pretrained`).
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.dist_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.n_reg_tokens, D)) if cfg.n_reg_tokens else None
        n_pos = cfg.n_patches if cfg.no_embed_class else cfg.n_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D)) if cfg.pos_embed else None
        self.pos_drop = nn.Dropout(cfg.pos_drop)
        self.ln_pre = LayerNorm(D, cfg.eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = LayerNorm(D, cfg.eps, affine=not cfg.final_ln_folded) if cfg.final_norm else None
        self.attn_pool = AttentionPool(cfg) if cfg.global_pool == "map" else None
        self.fc_norm = LayerNorm(D, cfg.eps, affine=not cfg.final_ln_folded) if cfg.fc_norm else None
        self.head_drop = nn.Dropout(cfg.head_drop)
        d_pooled = 2 * D if cfg.global_pool == "token_avg" else D  # token_avg: [CLS, mean of patch tokens]
        # CLIP/SigLIP zero-shot: projection, L2 normalisation, text-embedding classifier
        if cfg.zero_shot_dim:
            from .zero_shot import ZeroShotHead

            self.head = ZeroShotHead(d_pooled, cfg.zero_shot_dim, cfg.num_classes)
        else:
            self.head = nn.Linear(d_pooled, cfg.num_classes) if cfg.num_classes > 0 else None
        self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.dist_token and cfg.num_classes > 0 else None
        self.distilled_training = False  # as timm: return (cls, dist) logits separately while training

        self.hook_embed = HookPoint()  # [batch, pos, d_model]: prefix tokens and patch embeddings
        self.hook_pos_embed = (
            HookPoint()
        )  # [batch, pos, d_model]: position embeddings (0 on prefix if no_embed_class)
        self.hook_full_embed = HookPoint()  # [batch, pos, d_model]: their sum, before ln_pre
        self.hook_pooled = HookPoint()  # [batch, d_model] (distilled: [batch, 2, d_model])
        self.hook_logits = HookPoint()  # [batch, num_classes]
        init_like_timm(self)
        self.setup()
        self._sync_cfg()

    def _sync_cfg(self) -> None:
        """Record the parameters' device and dtype in ``cfg`` (TransformerLens utilities read cfg.device/dtype)."""
        w = self.embed.proj.weight
        self.cfg._device, self.cfg._dtype = w.device, w.dtype  # type: ignore[attr-defined]

    def _apply(self, fn, recurse: bool = True):  # every .to() / .half() / .cuda() goes through here
        out = super()._apply(fn, recurse)
        self._sync_cfg()
        return out

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    check_finite = True  # set False on an instance to skip the NaN/inf check of every forward

    def check_input(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` is a float ``[B, C, H, W]`` batch this model accepts.

        Also rejects NaN and infinite pixels (one ``torch.isfinite(images).all()`` per forward: a pass over the
        input, small next to the model's cost, but on a GPU it waits for the result; skipped inside
        ``torch.compile``, on the meta device and when ``model.check_finite = False``). An empty batch (0 images) is accepted and
        gives empty outputs.
        """
        cfg = self.cfg
        if not isinstance(images, Tensor):
            raise ValueError(
                f"expected a torch.Tensor of images [batch, {cfg.in_chans}, H, W], got {type(images).__name__}"
            )
        if images.ndim != 4:
            raise ValueError(
                f"expected images of shape [batch, {cfg.in_chans}, H, W] (4 dims), got {images.ndim} dims {tuple(images.shape)}"
            )
        if images.shape[1] != cfg.in_chans:
            raise ValueError(
                f"expected {cfg.in_chans} channels, got {images.shape[1]} (shape {tuple(images.shape)})"
            )
        want = self.embed.proj.weight.dtype
        if not images.is_floating_point() or (images.dtype != want and not _autocast_on(images.device.type)):
            raise ValueError(f"expected images of dtype {want} (float, model dtype), got {images.dtype}")
        H, W = images.shape[-2:]
        ph, pw = cfg.patch_size
        if cfg.dynamic_img_size:
            if not cfg.dynamic_img_pad and (H % ph or W % pw):
                raise ValueError(f"expected H, W divisible by the patch size {ph}x{pw}, got {H}x{W}")
        elif (H, W) != cfg.img_size:
            raise ValueError(
                f"expected images of size {cfg.img_size[0]}x{cfg.img_size[1]}, got {H}x{W} "
                "(convert with dynamic_img_size=True to accept other sizes)"
            )
        check = self.check_finite and images.device.type != "meta" and not torch.compiler.is_compiling()
        if check and not torch.isfinite(images).all():
            bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"expected finite pixel values, got NaN or inf in {len(bad)} of {images.shape[0]} images "
                f"(batch indices {bad[:10]}{' ...' if len(bad) > 10 else ''})"
            )

    def _pos(self, grid: tuple[int, int]) -> Tensor | None:
        """Position embeddings for every token ``[1, T, D]`` (zeros on prefix tokens if no_embed_class)."""
        if self.pos_embed is None:
            return None
        pos = self.pos_embed
        cfg = self.cfg
        if cfg.dynamic_img_size and grid != cfg.grid_size:
            from timm.layers import resample_abs_pos_embed

            n_prefix = 0 if cfg.no_embed_class else cfg.n_prefix_tokens
            pos = resample_abs_pos_embed(
                pos, new_size=grid, old_size=cfg.grid_size, num_prefix_tokens=n_prefix
            )
        if cfg.no_embed_class and cfg.n_prefix_tokens:
            pos = torch.cat([pos.new_zeros(1, cfg.n_prefix_tokens, pos.shape[-1]), pos], dim=1)
        return pos

    def embed_images(self, images: Float[Tensor, "batch chan h w"]) -> Float[Tensor, "batch pos d_model"]:
        """Images to the residual stream that enters block 0 (``blocks.0.hook_resid_pre``)."""
        self.check_input(images)
        x, grid = self.embed(images)
        B = x.shape[0]
        prefix = [
            t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None
        ]
        x = self.hook_embed(torch.cat(prefix + [x], dim=1) if prefix else x)
        pos = self._pos(grid)
        if pos is not None and hooked(self.hook_pos_embed):
            # a copy per image: a hook may edit it in place without writing into the parameter
            x = x + self.hook_pos_embed(pos.expand(B, -1, -1).clone())
        elif pos is not None:
            x = x + self.hook_pos_embed(pos.expand(B, -1, -1))
        x = self.pos_drop(self.hook_full_embed(x))
        return self.ln_pre(x) if self.ln_pre is not None else x

    def pool(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """timm's pooling of the final tokens (after ln_final): token, avg, max, avgmax, map or none."""
        cfg = self.cfg
        if cfg.dist_token:
            return x[..., :2, :]
        if cfg.global_pool == "token":
            return x[..., 0, :]
        if cfg.global_pool == "":
            return x
        if cfg.global_pool == "token_avg":  # HF DINOv2's classifier input: [CLS, mean of the patch tokens]
            return torch.cat([x[..., 0, :], x[..., cfg.n_prefix_tokens :, :].mean(dim=-2)], dim=-1)
        if not cfg.pool_include_prefix:
            x = x[..., cfg.n_prefix_tokens :, :]
        if cfg.global_pool == "map":
            lead = x.shape[:-2]
            out = self.attn_pool(x.reshape(-1, *x.shape[-2:]))
            return out.reshape(*lead, *out.shape[1:])
        if cfg.global_pool == "avg":
            return x.mean(dim=-2)
        if cfg.global_pool == "max":
            return x.amax(dim=-2)
        return 0.5 * (x.amax(dim=-2) + x.mean(dim=-2))  # avgmax

    def readout_rows(self) -> slice | None:
        """The token rows that ``pool`` reads when it reads only some (class/distillation token), else None."""
        cfg = self.cfg
        if cfg.dist_token:
            return slice(0, 2)
        return slice(0, 1) if cfg.global_pool == "token" else None

    def head_logits(self, pooled: Tensor) -> Tensor:
        """fc_norm, dropout and the classifier head(s) on pooled features. A distilled model (timm's
        ``VisionTransformerDistilled.forward_head``) drops out and reads the class and distillation tokens one
        after the other and averages the two (features too when it has no head: ``num_classes=0``), or
        returns both while training with ``distilled_training``."""
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        if self.cfg.dist_token:
            cls, dist = self.head_drop(pooled[..., 0, :]), self.head_drop(pooled[..., 1, :])
            if self.head is not None:
                cls, dist = self.head(cls), self.head_dist(dist)
            if self.distilled_training and self.training:
                return cls, dist  # type: ignore[return-value]
            return (cls + dist) / 2
        pooled = self.head_drop(pooled)
        return pooled if self.head is None else self.head(pooled)

    def unembed(self, resid: Float[Tensor, "... pos d_model"]) -> Float[Tensor, "... num_classes"]:
        """The logit lens: final norm, pooling, fc_norm and head applied to any residual stream."""
        if self.ln_final is not None:
            resid = self.ln_final(resid)
        return self.head_logits(self.pool(resid))

    def forward(
        self,
        images: Float[Tensor, "batch chan h w"],
        *,
        labels: Int[Tensor, " batch"] | None = None,
        return_type: str | None = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        readout_only: bool = False,
    ) -> Any:
        """Logits for a batch of images.

        ``return_type`` as in TransformerLens: ``"logits"`` (default), ``"loss"`` (the mean cross-entropy
        of the logits against ``labels``, a scalar: what ``run_with_cache(..., incl_bwd=True)`` calls
        ``backward()`` on), ``"both"`` (``(logits, loss)``) or None.

        ``stop_at_layer=L`` returns the residual stream entering block L (``blocks.L.hook_resid_pre``;
        ``L = n_layers`` gives the last ``resid_post``) without running the rest;
        ``start_at_layer=L`` takes that residual stream as input instead of images.
        ``readout_only=True``: the last block computes only the rows the pooling reads (``readout_rows()``:
        the class token, and the distillation token), which gives the same logits for about a quarter of that
        block's cost; hooks of the last block then see only those rows. No effect when the pooling reads
        every token (avg, max, map).
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if return_type in ("loss", "both") and stop_at_layer is None:
            self._check_labels(labels, images.shape[0])
        x = self.embed_images(images) if start_at_layer is None else images
        stop = self.cfg.n_layers if stop_at_layer is None else stop_at_layer
        blocks = self.blocks[start_at_layer or 0 : stop]
        rows = self.readout_rows() if readout_only and stop_at_layer is None else None
        for i, block in enumerate(blocks):
            x = block(x, rows) if rows is not None and i == len(blocks) - 1 else block(x)
        if stop_at_layer is not None:
            return x
        if self.ln_final is not None:
            x = self.ln_final(x)
        logits = self.head_logits(self.hook_pooled(self.pool(x)))
        logits = self.hook_logits(logits) if isinstance(logits, Tensor) else logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if logits.ndim != 2:
            raise ValueError(f"a loss needs logits [batch, classes]; this model gives {tuple(logits.shape)}")
        loss = F.cross_entropy(logits, labels)
        return loss if return_type == "loss" else (logits, loss)

    def _check_labels(self, labels: Any, n: int) -> None:
        if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
            got = (
                f"{labels.dtype} {tuple(labels.shape)}"
                if isinstance(labels, Tensor)
                else type(labels).__name__
            )
            raise ValueError(f"return_type 'loss'/'both' needs labels: an integer tensor [{n}], got {got}")
        if n == 0:
            raise ValueError("a loss needs at least one image, got an empty batch")
        if self.cfg.num_classes == 0 or self.cfg.dist_token and self.distilled_training and self.training:
            raise ValueError("a loss needs one logit tensor: this model has no head or returns two")

    # ------------------------------------------------------------------------------------------
    # TransformerLens API
    # ------------------------------------------------------------------------------------------
    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: Any = None,
        device: Any = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Any = None,
        return_cache_object: bool = True,
        **model_kwargs: Any,
    ):
        """As TransformerLens: ``(output, ActivationCache)``.

        ``names_filter``: None (every hook), a hook name, a list of names or a predicate on names.
        ``pos_slice`` (an int, a ``(start, stop[, step])`` tuple or slice, a list or tensor of indices, a ``Slice``)
        selects token positions on the position dimension of each activation (dim 1 of ``[batch, pos, ...]``,
        the query position of attention scores and patterns; an int keeps the dimension, as in TL);
        activations without one (pooled features, logits, ``fc_norm`` and MAP-pool hooks) are kept whole. Unlike
        TransformerLens, which slices whatever dimension is second to last, it never touches the batch.
        ``remove_batch_dim=True`` needs a batch of one image. ``incl_bwd=True`` calls ``backward()`` on the
        output and caches every hook's gradient as ``<name>_grad``: the output must be a scalar, so pass
        ``labels=`` and ``return_type="loss"`` (mean cross-entropy; ``"both"`` returns the logits too).
        ``device`` moves the cached tensors there.
        """
        self._sync_cfg()
        if remove_batch_dim and model_args and isinstance(model_args[0], Tensor) and len(model_args[0]) != 1:
            raise ValueError(
                f"remove_batch_dim=True needs a batch of one image, got {len(model_args[0])} "
                f"(input shape {tuple(model_args[0].shape)})"
            )
        if incl_bwd and not torch.is_grad_enabled():
            raise ValueError(
                "incl_bwd=True calls backward(), which needs gradients: call run_with_cache outside "
                "torch.no_grad() / torch.inference_mode()"
            )
        if incl_bwd and model_kwargs.get("return_type", "logits") not in ("loss", "both"):
            raise ValueError(
                "incl_bwd=True calls backward() on the output, which must be a scalar: pass labels=<int tensor "
                "[batch]> and return_type='loss' (mean cross-entropy) or 'both'"
            )
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice
        )
        with self.hooks(
            fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts
        ):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                (out[1] if isinstance(out, tuple) else out).backward()
        if return_cache_object:
            cache = ViTActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
            cache.run_tokens = self._run_tokens(model_args[0] if model_args else model_kwargs.get("images"))
            return out, cache
        return out, cache_dict

    def _run_tokens(self, images: Any) -> int | None:
        """Tokens of a run on ``images`` (prefix included): the grid of their size, padded up with
        ``dynamic_img_pad``; None when ``images`` is not an image batch."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            return None
        cfg = self.cfg
        (ph, pw), (H, W) = cfg.patch_size, images.shape[-2:]
        grid = (-(-H // ph)) * (-(-W // pw)) if cfg.dynamic_img_pad else (H // ph) * (W // pw)
        return cfg.n_prefix_tokens + grid

    def position_dim(self, name: str) -> int | None:
        """The dimension of hook ``name``'s activation (batch first) that indexes token positions, or None."""
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("blocks."):
            return 2 if leaf in ("hook_attn_scores", "hook_pattern") else 1
        if name in ("hook_embed", "hook_pos_embed", "hook_full_embed") or name.startswith(
            ("ln_pre.", "ln_final.")
        ):
            return 1
        after_pool = name in ("hook_pooled", "hook_logits") or name.startswith(("fc_norm.", "head."))
        if after_pool and self.cfg.global_pool == "" and not self.cfg.dist_token:
            return 1  # no pooling: every token is read out
        return None  # pooled features, logits, the MAP pool (latents; its keys are the patches only)

    def get_caching_hooks(
        self,
        names_filter: Any = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: Any = None,
    ) -> tuple[dict, list, list]:
        """TransformerLens's caching hooks, with ``pos_slice`` applied to each hook's position dimension
        (:meth:`position_dim`) and never to the batch (see :meth:`run_with_cache`)."""
        cache = {} if cache is None else cache
        pos_slice = Slice.unwrap(pos_slice)
        if names_filter is None:
            keep = lambda name: True  # noqa: E731
        elif isinstance(names_filter, str):
            keep = lambda name: name == names_filter  # noqa: E731
        elif isinstance(names_filter, (list, tuple, set)):
            wanted = set(names_filter)
            keep = lambda name: name in wanted  # noqa: E731
        elif callable(names_filter):
            keep = names_filter
        else:
            raise ValueError(
                f"names_filter must be None, a hook name, a list of names or a function, got {names_filter!r}"
            )
        self.is_caching = True
        position_dims = {name: self.position_dim(name) for name in self.hook_dict}

        def save(tensor: Tensor, hook: HookPoint, is_backward: bool = False) -> None:
            t = tensor.detach()
            if device is not None:
                t = t.to(device)
            dim = position_dims[hook.name]
            if pos_slice.mode != "identity" and dim is not None and t.ndim > dim:
                t = pos_slice.apply(t, dim=dim)
            if remove_batch_dim:
                t = t[0]
            cache[hook.name + ("_grad" if is_backward else "")] = t

        fwd, bwd = [], []
        for name in self.hook_dict:
            if keep(name):
                fwd.append((name, save))
                if incl_bwd:
                    bwd.append((name, lambda t, hook: save(t, hook, is_backward=True)))
        return cache, fwd, bwd

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute and hook each head's contribution ``blocks.{l}.attn.hook_result`` (costs memory)."""
        self.cfg.use_attn_result = use_attn_result

    def token_labels(self, grid: tuple[int, int] | None = None) -> list[str]:
        """Labels of the residual stream's positions: CLS, DIST, reg{i}, then r{row}c{col}."""
        gh, gw = grid or self.cfg.grid_size
        labels = (["CLS"] if self.cfg.class_token else []) + (["DIST"] if self.cfg.dist_token else [])
        labels += [f"reg{i}" for i in range(self.cfg.n_reg_tokens)]
        return labels + [f"r{r}c{c}" for r in range(gh) for c in range(gw)]

    def to_single_token(self, label: str | int) -> int:
        """A class index from a class name (``cfg.class_names``) or an index."""
        if isinstance(label, int):
            if not 0 <= label < self.cfg.num_classes:
                raise ValueError(f"class index must be in [0, {self.cfg.num_classes}), got {label}")
            return label
        names = self.cfg.class_names or []
        if label not in names:
            raise ValueError(
                f"unknown class name {label!r}; known: {names or 'none (cfg.class_names is unset)'}"
            )
        return names.index(label)

    def tokens_to_residual_directions(
        self, classes: int | str | Int[Tensor, "..."], n_tokens: int | None = None
    ) -> Float[Tensor, "... d_model"]:
        """Residual-stream direction of each class's logit, for ``ActivationCache.logit_attrs``.

        ``logit_attrs`` centres and divides the residual stream by the final LayerNorm scale; the
        direction then carries the final norm's weight, so the attributions (at the CLS position for
        token pooling; summed over patch positions for average pooling) add up to the logit minus the
        constant bias terms. Average pooling divides by the number of tokens pooled: ``n_tokens`` is the
        run's token count, prefix tokens included (default: the configured image size's;
        ``ViTActivationCache.logit_attrs`` passes the cached run's, which differs on a
        ``dynamic_img_size`` model fed another size).
        """
        if isinstance(classes, str):
            classes = self.to_single_token(classes)
        if self.head is None:
            raise ValueError("this model has no classifier head (num_classes=0)")
        cfg = self.cfg
        if (
            cfg.dist_token
            or cfg.zero_shot_dim  # L2 normalisation in the head: not linear
            or cfg.fc_norm
            or cfg.global_pool not in ("token", "avg", "")
            or self.ln_final is None
        ):
            raise NotImplementedError(
                "logit directions need a final token-wise LayerNorm read linearly by one head "
                f"(global_pool token/avg/none); this model has global_pool={cfg.global_pool!r}, "
                f"fc_norm={cfg.fc_norm}, distillation head={cfg.dist_token}. Use model.unembed instead."
            )
        W = self.W_H
        if self.ln_final.weight is not None:
            W = W * self.ln_final.weight[:, None]
        if cfg.global_pool == "avg":
            n = cfg.n_tokens if n_tokens is None else int(n_tokens)
            if n <= cfg.n_prefix_tokens:
                raise ValueError(f"n_tokens must exceed the {cfg.n_prefix_tokens} prefix tokens, got {n}")
            W = W / (n if cfg.pool_include_prefix else n - cfg.n_prefix_tokens)
        idx = torch.as_tensor(classes, device=W.device)
        return W[:, idx].movedim(0, -1)

    # ---- weights in TransformerLens shapes ------------------------------------------------------
    @property
    def W_E(self) -> Float[Tensor, "d_patch d_model"]:
        """Patch embedding as a matrix: flattened (chan, ph, pw) pixels -> d_model."""
        return self.embed.proj.weight.flatten(1).T

    @property
    def b_E(self) -> Float[Tensor, " d_model"]:
        b = self.embed.proj.bias
        return b if b is not None else self.W_E.new_zeros(self.cfg.d_model)

    @property
    def W_pos(self) -> Float[Tensor, "n_pos d_model"]:
        if self.pos_embed is None:
            raise ValueError("this model has no position embedding (pos_embed='none')")
        return self.pos_embed[0]

    def _stack(self, get) -> Tensor:
        return torch.stack([get(b) for b in self.blocks], dim=0)

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q))
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K))
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V))
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O))
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q))
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K))
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V))
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O))
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in))
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out))
    b_in = property(lambda self: self._stack(lambda b: b.mlp.b_in))
    b_out = property(lambda self: self._stack(lambda b: b.mlp.b_out))

    @property
    def W_H(self) -> Float[Tensor, "d_model num_classes"]:
        """Classifier head weight (TransformerLens's W_U for a ViT)."""
        if self.head is None:
            raise ValueError("this model has no classifier head (num_classes=0)")
        return self.head.weight.T

    @property
    def b_H(self) -> Float[Tensor, " num_classes"]:
        if self.head is None:
            raise ValueError("this model has no classifier head (num_classes=0)")
        return self.head.bias

    W_U = W_H
    b_U = b_H

    @property
    def W_E_pos(self) -> Float[Tensor, "d_patch+n_pos d_model"]:
        """``W_E`` and ``W_pos`` stacked, as TransformerLens's ``W_E_pos`` (an overcomplete input basis)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per layer and head ``[n_layers, n_heads, d_model, d_model]``, factored (as TL)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head ``[n_layers, n_heads, d_model, d_model]``, factored (as TL);
        ``W_O`` includes LayerScale."""
        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the output biases (``b_O``, and ``b_out`` unless ``include_mlp_biases=False``) of blocks
        ``0..layer-1``, plus block ``layer``'s ``b_O`` with ``mlp_input`` (TransformerLens's definition)."""
        if not 0 <= layer <= self.cfg.n_layers or (mlp_input and layer == self.cfg.n_layers):
            raise ValueError(
                f"layer must be in [0, {self.cfg.n_layers}{')' if mlp_input else ']'}, got {layer}"
            )
        bias = self.W_E.new_zeros(self.cfg.d_model)
        for block in self.blocks[:layer]:
            bias = bias + block.attn.b_O
            if include_mlp_biases:
                bias = bias + block.mlp.b_out
        if mlp_input:
            bias = bias + self.blocks[layer].attn.b_O
        return bias

    # ------------------------------------------------------------------------------------------
    # conversion and files (implemented in convert.py)
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_timm(
        cls,
        model_or_name: nn.Module | str,
        *,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        device: str | torch.device | None = None,
        **timm_kwargs: Any,
    ) -> HookedViT:
        """Convert a timm ``VisionTransformer`` / ``VisionTransformerDistilled`` (or a timm model name).

        ``pretrained=True`` downloads timm's weights; ``checkpoint_path`` loads a local state dict
        (safetensors, or a torch file read with ``weights_only=True``); ``timm_kwargs`` go to
        ``timm.create_model`` (e.g. ``img_size=28, in_chans=1, num_classes=10``). Unsupported
        architecture features raise ``NotImplementedError`` naming the feature.
        """
        from .convert import from_timm

        return from_timm(
            cls,
            model_or_name,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            device=device,
            **timm_kwargs,
        )

    @classmethod
    def from_hf(
        cls,
        model_or_path: nn.Module | str | os.PathLike,
        *,
        drop_pooler: bool = False,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        device: str | torch.device | None = None,
    ) -> HookedViT:
        """Convert an HF transformers ViT / DeiT / CLIP / DINOv2 / SigLIP vision model, or a local folder.

        ``model_or_path``: a model instance, or a ``save_pretrained`` folder (safetensors; no hub access).
        ``model(images)`` returns the source's logits, projected embedding or pooled output (see
        :mod:`mechvit.model.from_hf`); ``drop_pooler=True`` converts a ViTModel/DeiTModel without its tanh
        pooler. Unsupported features raise ``NotImplementedError`` naming the feature.
        """
        from .from_hf import from_hf

        return from_hf(
            cls,
            model_or_path,
            drop_pooler=drop_pooler,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            device=device,
        )

    @classmethod
    def from_open_clip(
        cls,
        model_or_name: nn.Module | str,
        *,
        checkpoint_path: str | os.PathLike | None = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        device: str | torch.device | None = None,
        **open_clip_kwargs: Any,
    ) -> HookedViT:
        """Convert an open_clip ViT image tower (a CLIP model, its ``.visual``, or a model name).

        With a name, ``open_clip.create_model(name, pretrained=None, **open_clip_kwargs)`` builds it and
        ``checkpoint_path`` loads local weights (safetensors, or torch with ``weights_only=True``);
        ``'local-dir:/folder'`` reads open_clip's own folder format. ``model(images)`` equals
        ``encode_image(images)``. See :mod:`mechvit.model.from_open_clip` for what is supported.
        """
        from .from_open_clip import from_open_clip

        return from_open_clip(
            cls,
            model_or_name,
            checkpoint_path=checkpoint_path,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            device=device,
            **open_clip_kwargs,
        )

    def to_timm_state_dict(self) -> dict[str, Tensor]:
        """The weights under timm's names; loads into ``to_timm_model()`` (exact for unprocessed models)."""
        from .convert import to_timm_state_dict

        return to_timm_state_dict(self)

    def to_timm_model(self) -> nn.Module:
        """A timm model with this model's architecture flags and weights."""
        from .convert import to_timm_model

        return to_timm_model(self)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically)."""
        from .convert import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device | None = None
    ) -> HookedViT:
        """Load a folder written by :meth:`save_pretrained` (safetensors only; nothing is unpickled)."""
        from .convert import load_pretrained

        return load_pretrained(cls, directory, device=device)


__all__ = ["HookedViT", "HookedViTConfig"]
