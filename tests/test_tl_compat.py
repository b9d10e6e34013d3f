"""HookedViT against TransformerLens's own code: TL components on the same weights give the same value at every
hook, and TL's cache, FactoredMatrix and patching utilities work on a ViT (or are replaced, as documented)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from transformer_lens import HookedTransformerConfig
from transformer_lens.components import LayerNorm as TLLayerNorm
from transformer_lens.components import LayerNormPre as TLLayerNormPre
from transformer_lens.components import TransformerBlock as TLBlock
from transformer_lens.HookedRootModule import HookedRootModule

from mechvit import HookedViT

ATOL = 2e-5


def tiny(**kw) -> nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=7)
    args.update(kw)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    with torch.no_grad():  # timm initialises biases and LayerNorms trivially; make every weight matter
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n or "gamma" in n or "token" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def images(model: HookedViT, batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, model.cfg.in_chans, *model.cfg.img_size)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err} > {atol}"


TL_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


class TLStack(HookedRootModule):
    """TransformerLens's own blocks and final LayerNorm, named as in a HookedTransformer."""

    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(TLBlock(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = (TLLayerNormPre if cfg.normalization_type == "LNPre" else TLLayerNorm)(cfg)
        self.setup()

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            resid = block(resid)
        return self.ln_final(resid)


def tl_twin(model: HookedViT) -> TLStack:
    """A TransformerLens stack with ``model``'s block and final-norm weights (TL's own parametrisation)."""
    c = model.cfg
    tl_cfg = HookedTransformerConfig(
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        d_head=c.d_head,
        d_mlp=c.d_mlp,
        n_ctx=c.n_tokens,
        d_vocab=max(c.num_classes, 1),
        act_fn=TL_ACT[c.act_fn],
        eps=c.eps,
        normalization_type=c.normalization_type,
        attention_dir="bidirectional",
        use_attn_result=c.use_attn_result,
        device="cpu",
    )
    tl = TLStack(tl_cfg)
    sd = {}
    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}."
        for ours, theirs in (("ln1", "ln1"), ("ln2", "ln2")):
            if getattr(b, ours).weight is not None:
                sd[p + theirs + ".w"], sd[p + theirs + ".b"] = getattr(b, ours).weight, getattr(b, ours).bias
        for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[p + "attn." + n] = getattr(b.attn, n)
        for n in ("W_in", "b_in", "W_out", "b_out"):
            sd[p + "mlp." + n] = getattr(b.mlp, n)
    if model.ln_final.weight is not None:
        sd["ln_final.w"], sd["ln_final.b"] = model.ln_final.weight, model.ln_final.bias
    missing, unexpected = tl.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all(k.endswith(("mask", "IGNORE")) for k in missing), missing
    return tl.eval()


@pytest.mark.parametrize(
    "kw, fold_ln, attn_result",
    [
        ({}, False, False),
        ({"init_values": 0.3}, False, True),  # LayerScale: folded into W_O / W_out as they act on the stream
        ({"act_layer": "gelu_tanh", "reg_tokens": 2}, False, False),
        ({}, True, False),  # folded LayerNorms: TransformerLens's LayerNormPre
    ],
)
def test_every_hook_holds_what_transformer_lens_holds(kw, fold_ln, attn_result):
    model = HookedViT.from_timm(tiny(**kw), fold_ln=fold_ln).eval()
    model.set_use_attn_result(attn_result)
    x = images(model)
    with torch.no_grad():
        _, ours = model.run_with_cache(x)
        tl = tl_twin(model)
        _, theirs = tl.run_with_cache(ours["blocks.0.hook_resid_pre"])
    compared = [n for n in ours.keys() if n.startswith(("blocks.", "ln_final."))]
    assert set(compared) <= set(theirs.keys()), set(compared) - set(theirs.keys())
    assert "blocks.1.ln1.hook_normalized" in compared and "ln_final.hook_scale" in compared
    assert ("blocks.0.attn.hook_result" in compared) == attn_result
    for name in compared:
        close(ours[name], theirs[name])


def test_layer_norm_hooks_are_before_the_affine_map_and_edits_flow_through():
    """hook_normalized = (x - mean) / scale, as TL; editing it (in place or not) changes the output as in TL."""
    model = HookedViT.from_timm(tiny()).eval()
    ln = model.blocks[0].ln1
    tl_cfg = HookedTransformerConfig(
        d_model=32, n_layers=1, n_heads=4, d_head=8, n_ctx=17, act_fn="gelu", eps=ln.eps
    )
    tl_ln = TLLayerNorm(tl_cfg)
    tl_ln.load_state_dict({"w": ln.weight.detach(), "b": ln.bias.detach()})
    x = torch.randn(2, 17, 32) * 3 + 1

    def halve(t, hook):
        t.mul_(0.5)

    for mod in (ln, tl_ln):
        mod.hook_normalized.add_hook(halve)
    try:
        with torch.no_grad():
            close(ln(x), tl_ln(x), 1e-6)
            want = 0.5 * torch.nn.functional.layer_norm(x, (32,), None, None, ln.eps) * ln.weight + ln.bias
            close(ln(x), want, 1e-5)
    finally:
        ln.hook_normalized.remove_hooks()
        tl_ln.hook_normalized.remove_hooks()


def test_cfg_carries_the_fields_transformer_lens_utilities_read():
    model = HookedViT.from_timm(tiny())
    c = model.cfg
    assert c.n_key_value_heads is None and c.ungroup_grouped_query_attention is False
    assert c.d_vocab == c.d_vocab_out == 7 and c.positional_embedding_type == "standard"
    assert c.n_ctx == 17 and c.attention_dir == "bidirectional" and c.n_devices == 1
    assert c.device == torch.device("cpu") and c.dtype == torch.float32
    model.to(torch.float64)
    assert c.dtype == torch.float64  # kept current by .to()
    assert "n_key_value_heads" not in c.to_dict()  # fixed answers, not saved config keys


def test_factored_matrices_and_input_basis():
    model = HookedViT.from_timm(tiny(init_values=0.4)).eval()
    model.set_use_attn_result(True)
    cfg = model.cfg
    assert model.OV.shape == model.QK.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    close(model.OV.AB, model.W_V @ model.W_O, 1e-6)
    close(model.QK.AB, model.W_Q @ model.W_K.transpose(-2, -1), 1e-6)
    x = images(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    # a head's result = pattern @ (ln1_out @ OV + b_V W_O): OV carries LayerScale as W_O does
    layer, head = 1, 2
    ln = model.blocks[layer].ln1
    ln_out = cache[f"blocks.{layer}.ln1.hook_normalized"] * ln.weight + ln.bias
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]
    want = pattern @ (ln_out @ model.OV.AB[layer, head] + model.b_V[layer, head] @ model.W_O[layer, head])
    close(cache[f"blocks.{layer}.attn.hook_result"][:, :, head], want)
    # without Q/K biases, the attention scores are ln1_out QK ln1_out^T / sqrt(d_head)
    nob = HookedViT.from_timm(tiny(qkv_bias=False)).eval()
    with torch.no_grad():
        _, c2 = nob.run_with_cache(x)
    ln = nob.blocks[layer].ln1
    ln_out = c2[f"blocks.{layer}.ln1.hook_normalized"] * ln.weight + ln.bias
    want = ln_out @ nob.QK.AB[layer, head] @ ln_out.transpose(1, 2) / cfg.d_head**0.5
    close(c2[f"blocks.{layer}.attn.hook_attn_scores"][:, head], want)
    assert model.W_E_pos.shape == (3 * 8 * 8 + cfg.n_tokens, cfg.d_model)
    close(model.W_E_pos[-cfg.n_tokens :], model.W_pos, 0)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"reg_tokens": 2, "init_values": 0.5},
        {"global_pool": "avg", "fc_norm": False},
        {"pre_norm": True},  # CLIP's ln_pre: the embedding terms are taken through it
        {"pre_norm": True, "pos_embed": "none"},
    ],
)
def test_full_resid_decomposition_sums_to_the_residual_stream(kw):
    model = HookedViT.from_timm(tiny(**kw)).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(images(model))
        embed_before = cache["hook_embed"].clone()
        full, labels = cache.get_full_resid_decomposition(return_labels=True)
        by_mlp = cache.get_full_resid_decomposition(expand_neurons=False)
        mid = cache.get_full_resid_decomposition(layer=1, mlp_input=True)
    L, H, M = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_mlp
    embeds = ["embed", "pos_embed"] if model.pos_embed is not None else ["embed"]
    assert full.shape[0] == L * H + L * M + len(embeds) + 1
    assert labels[-len(embeds) - 1 :] == [*embeds, "bias"]
    close(full.sum(0), cache["blocks.1.hook_resid_post"], 1e-4)
    close(by_mlp.sum(0), cache["blocks.1.hook_resid_post"], 1e-4)
    close(mid.sum(0), cache["blocks.1.hook_resid_mid"], 1e-4)
    close(model.accumulated_bias(2), sum(b.attn.b_O + b.mlp.b_out for b in model.blocks), 1e-6)
    with torch.no_grad():
        dec, dec_labels = cache.decompose_resid(layer=0, return_labels=True)
    assert dec_labels == embeds
    close(dec.sum(0), cache["blocks.0.hook_resid_pre"], 1e-5)  # through ln_pre in a pre-norm model
    close(cache.decompose_resid().sum(0), cache["blocks.1.hook_resid_post"], 1e-4)
    assert torch.equal(cache["hook_embed"], embed_before)  # the cache itself is left as it was
    if model.ln_pre is not None:  # the raw embeddings do not sum to the stream entering block 0
        assert (cache["hook_full_embed"] - cache["blocks.0.hook_resid_pre"]).abs().max() > 0.1
        _, part = model.run_with_cache(images(model), names_filter=lambda n: "ln_pre" not in n)
        with pytest.raises(ValueError, match="needs 'ln_pre.hook_scale' in the cache"):
            part.get_full_resid_decomposition()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_accumulated_resid_apply_ln_without_a_final_norm(pool):
    """fc_norm after pooling and no ln_final: apply_ln uses fc_norm token-wise (exact at the class token)."""
    model = HookedViT.from_timm(tiny(global_pool=pool, fc_norm=True)).eval()
    assert model.ln_final is None and model.fc_norm is not None
    with torch.no_grad():
        logits, cache = model.run_with_cache(images(model))
        acc = cache.accumulated_resid(apply_ln=True)
    assert acc.shape == (3, 3, 17, 32)
    resid = cache["blocks.1.hook_resid_post"]
    close(acc[-1], model.fc_norm(resid), 1e-6)
    if pool == "token":
        close(model.head(acc[-1][:, 0]), logits)
        stack = cache.decompose_resid(apply_ln=True, pos_slice=0)  # cached fc_norm scale at the class token
        assert stack.shape == (6, 3, 32)  # embed, pos_embed, (attn_out, mlp_out) x 2
        close(stack.sum(0), cache["fc_norm.hook_normalized"], 1e-5)
    else:
        with pytest.raises(ValueError, match="normalises after pooling"):
            cache.decompose_resid(apply_ln=True, pos_slice=0)
    plain = HookedViT.from_timm(tiny(global_pool="avg", fc_norm=False, final_norm=False)).eval()
    with torch.no_grad():
        _, cache = plain.run_with_cache(images(plain))
    close(cache.accumulated_resid(apply_ln=True)[-1], cache["blocks.1.hook_resid_post"], 0)


@pytest.mark.parametrize("pool", ["map", ""])
def test_run_with_cache_pos_slice_touches_positions_only(pool):
    model = HookedViT.from_timm(tiny(global_pool=pool)).eval()
    x = images(model)
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        for pos_slice in (0, (1, 5), [0, 5, 16], torch.tensor([3, 2])):
            _, part = model.run_with_cache(x, pos_slice=pos_slice)
            assert part.keys() == full.keys()
            for name in full.keys():
                dim = model.position_dim(name)
                want = full[name]
                if dim is not None:
                    idx = (slice(None),) * dim
                    if isinstance(pos_slice, tuple):
                        want = want[idx + (slice(*pos_slice),)]
                    else:  # an int keeps the dimension, as in TransformerLens (Slice.unwrap)
                        want = want[idx + (torch.as_tensor(pos_slice).reshape(-1),)]
                close(part[name], want, 0)
    assert model.position_dim("blocks.0.attn.hook_pattern") == 2
    assert model.position_dim("blocks.0.attn.hook_z") == 1
    if pool == "map":
        assert (
            model.position_dim("hook_logits") is None and model.position_dim("attn_pool.hook_pattern") is None
        )
        assert full["hook_logits"].shape == part["hook_logits"].shape == (3, 7)  # the batch is never sliced
    else:  # no pooling: the head reads every token, so the logits have positions
        assert full["hook_logits"].shape == (3, 17, 7) and part["hook_logits"].shape == (3, 2, 7)


def test_run_with_cache_remove_batch_dim_and_names_filter_forms():
    model = HookedViT.from_timm(tiny()).eval()
    x = images(model, 1)
    with torch.no_grad():
        _, full = model.run_with_cache(x)
        _, one = model.run_with_cache(x, remove_batch_dim=True)
        for name in full.keys():
            close(one[name], full[name][0], 0)
        assert not one.has_batch_dim
        with pytest.raises(ValueError, match="batch of one image, got 3"):
            model.run_with_cache(images(model, 3), remove_batch_dim=True)
        _, c = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
        assert list(c.keys()) == ["blocks.1.hook_resid_post"]
        _, c = model.run_with_cache(x, names_filter=["hook_logits", "blocks.0.hook_resid_pre"])
        assert list(c.keys()) == ["blocks.0.hook_resid_pre", "hook_logits"]  # forward order
        _, c = model.run_with_cache(x, names_filter=lambda n: n.endswith("scale"))
        assert len(c.keys()) == 5
        with pytest.raises(ValueError, match="names_filter must be"):
            model.run_with_cache(x, names_filter=3)


def test_incl_bwd_caches_gradients_of_the_mean_cross_entropy():
    model = HookedViT.from_timm(tiny()).eval()
    x, y = images(model), torch.tensor([0, 3, 6])
    loss, cache = model.run_with_cache(x, labels=y, return_type="loss", incl_bwd=True)
    logits = cache["hook_logits"]
    close(loss.detach(), torch.nn.functional.cross_entropy(logits, y), 1e-6)
    want = (logits.softmax(-1) - torch.nn.functional.one_hot(y, 7)) / 3  # d mean CE / d logits
    close(cache["hook_logits_grad"], want, 1e-6)
    # the gradient at a residual stream equals autograd's
    model.zero_grad()
    resid = {}

    def keep(t, hook):
        t.retain_grad()
        resid["r"] = t

    out = model.run_with_hooks(x, labels=y, return_type="loss", fwd_hooks=[("blocks.1.hook_resid_pre", keep)])
    out.backward()
    close(cache["blocks.1.hook_resid_pre_grad"], resid["r"].grad, 1e-6)
    grads = {k.removesuffix("_grad") for k in cache.keys() if k.endswith("_grad")}
    assert grads == {k for k in cache.keys() if not k.endswith("_grad")}  # every hook that ran
    with pytest.raises(ValueError, match="must be a scalar: pass labels"):
        model.run_with_cache(x, incl_bwd=True)
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad(), pytest.raises(ValueError, match="needs gradients: call run_with_cache outside"):
            model.run_with_cache(x, labels=y, return_type="loss", incl_bwd=True)


def test_in_place_hook_edits_then_backward_as_transformer_lens_allows():
    """hook_z (the README's head ablation) and hook_pattern edited in place, then backward: the gradients
    equal those of the same edit made out of place."""
    model = HookedViT.from_timm(tiny(init_values=0.5)).eval()
    x, y = images(model), torch.tensor([1, 2, 3])

    def grads(hook_name, fn):
        model.zero_grad()
        loss = model.run_with_hooks(x, labels=y, return_type="loss", fwd_hooks=[(hook_name, fn)])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def z_in_place(z, hook):
        z[:, :, 2] = 0.0
        return z

    def z_copy(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    def pattern_in_place(p, hook):
        p[:, 1] = 1.0 / p.shape[-1]

    def pattern_copy(p, hook):
        p = p.clone()
        p[:, 1] = 1.0 / p.shape[-1]
        return p

    for name, a, b in (
        ("blocks.1.attn.hook_z", z_in_place, z_copy),
        ("blocks.0.attn.hook_pattern", pattern_in_place, pattern_copy),
        ("blocks.0.attn.hook_q", z_in_place, z_copy),
    ):
        la, ga = grads(name, a)
        lb, gb = grads(name, b)
        close(la, lb, 0)
        for u, v in zip(ga, gb, strict=True):
            close(u, v, 1e-6)
    # the position embedding handed to a hook is a copy: an in-place edit never reaches the parameter
    before = model.pos_embed.detach().clone()
    with torch.no_grad():
        model.run_with_hooks(images(model, 1), fwd_hooks=[("hook_pos_embed", lambda t, hook: t.zero_())])
    assert torch.equal(model.pos_embed, before)


def test_transformer_lens_patching_helpers():
    """TL's head-by-layer helpers work as they are; TL's by-position helpers take the number of positions from
    the input's last dimension (the image width), so they need ``index_df`` over the token positions, which
    then gives what mechvit.analysis.activation_patching gives."""
    import itertools

    import pandas as pd
    from transformer_lens import patching

    from mechvit.analysis.patching import activation_patching

    torch.manual_seed(0)
    model = HookedViT.from_timm(tiny(depth=2, img_size=16, patch_size=4)).eval()  # 17 tokens, width 16
    clean, corrupted = images(model, 4), images(model, 4)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    other = corrupted_logits.scatter(1, y[:, None], float("-inf")).argmax(1)

    def mean_ld(logits):
        return (logits.gather(1, y[:, None]) - logits.gather(1, other[:, None])).mean()

    with torch.no_grad():
        # heads over all positions: no position count needed
        k = patching.get_act_patch_attn_head_k_all_pos(model, corrupted, clean_cache, mean_ld)
        assert k.shape == (2, 4)

        def patch_k(t, hook):
            t[:, :, 3] = clean_cache[hook.name][:, :, 3]
            return t

        close(
            k[1, 3],
            mean_ld(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_k", patch_k)])),
            1e-5,
        )

        wrong = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, mean_ld)
        assert wrong.shape == (2, 16)  # positions read from the image width, not the 17 tokens
        T = model.cfg.n_tokens
        index_df = pd.DataFrame(list(itertools.product(range(2), range(T))), columns=["layer", "pos"])
        flat = patching.get_act_patch_resid_pre(
            model, corrupted, clean_cache, mean_ld, index_axis_names=None, index_df=index_df
        )
    ours = activation_patching(
        model, clean, corrupted, y, component="resid_pre", by="position", progress=False
    )
    assert ours.values.shape == (2, T)
    close(flat.reshape(2, T), ours.logit_diff, 1e-4)
