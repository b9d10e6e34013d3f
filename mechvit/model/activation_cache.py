"""TransformerLens's ActivationCache, with the final norm of a ViT read where a ViT has it.

TransformerLens assumes one token-wise ``ln_final`` before the unembedding. A ViT may instead normalise after
pooling (timm's ``fc_norm``, e.g. ``global_pool="avg"``) or have no final norm at all. At the final layer:

- ``apply_ln_to_stack(..., recompute_ln=True)`` (what ``accumulated_resid(apply_ln=True)`` uses) applies the
  model's final norm to each component with its own statistics: ``ln_final`` when there is one, else
  ``fc_norm`` token-wise (at the class token of a token-pooled model this is exactly what the head reads; for
  average pooling it normalises each token rather than their mean: ``model.unembed`` is the exact logit lens),
  else nothing.
- the cached-scale path (``decompose_resid(apply_ln=True)``, ``logit_attrs``, ...) reads ``ln_final.hook_scale``;
  a model with ``fc_norm`` and no ``ln_final`` has the scale of the pooled vector only (``fc_norm.hook_scale``,
  ``[batch, 1]``), which applies to the class token of a token-pooled model: pass ``pos_slice=0``; anything
  else raises a ValueError saying so. With no final norm at all the stack is returned unchanged.

A pre-norm model (CLIP: ``ln_pre`` between the embeddings and block 0) has no TransformerLens counterpart:
there ``decompose_resid`` and ``get_full_resid_decomposition`` give the ``embed`` and ``pos_embed`` terms as
they enter block 0, i.e. through ``ln_pre`` with its cached scale (``(e - mean(e)) / scale * w`` for each,
``ln_pre``'s bias added to ``embed``), so that the terms still sum to the residual stream. This needs
``ln_pre.hook_scale`` in the cache.

``logit_attrs`` divides an average-pooled model's logit directions by the cached run's token count (a
``dynamic_img_size`` model run at another size than its configured one pools over other tokens).

Every other method is TransformerLens's own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import Slice


class ViTActivationCache(ActivationCache):
    _embeds_through_ln_pre = False
    run_tokens: int | None = None  # the run's token count (prefix included), from its images' size

    @contextlib.contextmanager
    def _embeddings_through_ln_pre(self) -> Iterator[None]:
        """In a pre-norm model, swap the cached embeddings for their contributions to
        ``blocks.0.hook_resid_pre`` (through ``ln_pre`` with its cached scale) during a decomposition."""
        ln = self.model.ln_pre
        if ln is None or self._embeds_through_ln_pre or "hook_embed" not in self.cache_dict:
            yield
            return
        if "ln_pre.hook_scale" not in self.cache_dict:
            raise ValueError(
                "this model normalises the embeddings (ln_pre) before block 0: decomposing the residual "
                "stream needs 'ln_pre.hook_scale' in the cache (a run_with_cache names_filter that keeps it)"
            )
        scale = self.cache_dict["ln_pre.hook_scale"].float()
        saved = {k: self.cache_dict[k] for k in ("hook_embed", "hook_pos_embed") if k in self.cache_dict}
        through = {}
        for k, t in saved.items():
            x = t.float()
            x = (x - x.mean(-1, keepdim=True)) / scale
            if ln.weight is not None:
                x = x * ln.weight.to(x.device).float()
            if k == "hook_embed" and ln.bias is not None:
                x = x + ln.bias.to(x.device).float()
            through[k] = x.to(t.dtype)
        self.cache_dict.update(through)
        self._embeds_through_ln_pre = True
        try:
            yield
        finally:
            self.cache_dict.update(saved)
            self._embeds_through_ln_pre = False

    def decompose_resid(self, *args: Any, **kwargs: Any) -> Any:
        """As TransformerLens; a pre-norm model's embedding terms go through ``ln_pre`` (module doc)."""
        with self._embeddings_through_ln_pre():
            return super().decompose_resid(*args, **kwargs)

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        """As TransformerLens; a pre-norm model's embedding terms go through ``ln_pre`` (module doc)."""
        with self._embeddings_through_ln_pre():
            return super().get_full_resid_decomposition(*args, **kwargs)

    def logit_attrs(self, residual_stack: Tensor, tokens: Any, *args: Any, **kwargs: Any) -> Tensor:
        """As TransformerLens; an average-pooled model's logit directions divide by the token count of the
        cached run (a ``dynamic_img_size`` model run at another size pools over other tokens than its
        configured size has), so the attributions still add up to the logit minus its constant terms."""
        model, n = self.model, getattr(self, "run_tokens", None)  # set by HookedViT.run_with_cache
        if model.cfg.global_pool != "avg" or n is None or n == model.cfg.n_tokens:
            return super().logit_attrs(residual_stack, tokens, *args, **kwargs)
        model.tokens_to_residual_directions = functools.partial(
            type(model).tokens_to_residual_directions, model, n_tokens=n
        )  # TransformerLens's logit_attrs calls it with the classes alone
        try:
            return super().logit_attrs(residual_stack, tokens, *args, **kwargs)
        finally:
            del model.tokens_to_residual_directions

    def _final(self, layer: int | None) -> bool:
        return layer is None or layer == -1 or layer == self.model.cfg.n_layers

    def apply_ln_to_stack(
        self,
        residual_stack: Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> Tensor:
        model = self.model
        final_token_norm = not self._final(layer) or model.ln_final is not None
        if final_token_norm or (model.fc_norm is not None and not recompute_ln):
            return super().apply_ln_to_stack(
                residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
            )
        if has_batch_dim:
            batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        return residual_stack if model.fc_norm is None else model.fc_norm(residual_stack)

    def _get_cached_ln_scale(
        self, layer: int | None, mlp_input: bool, pos_slice: Slice, batch_slice: Slice | None = None
    ) -> Tensor:
        model = self.model
        if not self._final(layer) or model.ln_final is not None or model.fc_norm is None:
            return super()._get_cached_ln_scale(layer, mlp_input, pos_slice, batch_slice)
        if model.cfg.global_pool != "token" or not (
            isinstance(pos_slice.slice, int) and pos_slice.slice == 0
        ):
            raise ValueError(
                "this model normalises after pooling (fc_norm, no ln_final): the cached final scale "
                "(fc_norm.hook_scale) is that of the pooled vector, which is the class token only for "
                f"global_pool='token' (this model: {model.cfg.global_pool!r}); pass pos_slice=0 on a "
                "token-pooled model, or use recompute_ln / model.unembed"
            )
        scale = self["fc_norm.hook_scale"]
        if batch_slice is not None and self.has_batch_dim:
            scale = batch_slice.apply(scale)
        return scale
