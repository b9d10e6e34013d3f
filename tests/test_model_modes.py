"""HookedViT in every torch mode: inference_mode, no_grad, grad, half precision, torch.compile, train() with
dropout (against timm under the same seed), deepcopy, pickle, .to(); the fused fast paths stay when unhooked."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mechvit import HookedViT
from tests.test_tl_compat import close, images, tiny


def model_and_x(**kw) -> tuple[HookedViT, torch.Tensor]:
    m = HookedViT.from_timm(tiny(**kw)).eval()
    return m, images(m)


def test_inference_mode_and_no_grad_give_the_grad_mode_cache():
    model, x = model_and_x(qk_norm=True, init_values=0.3)
    logits, cache = model.run_with_cache(x)
    for ctx in (torch.inference_mode, torch.no_grad):
        with ctx():
            l2, c2 = model.run_with_cache(x)
            hooked = model.run_with_hooks(x, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda t, hook: t * 2)])
        close(l2, logits, 0)
        assert c2.keys() == cache.keys()
        for k in cache.keys():
            close(c2[k], cache[k], 0)
        assert (hooked - logits).abs().max() > 1e-3  # the edited scale was used
    assert logits.requires_grad and not l2.requires_grad


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_matches_float32(dtype, atol):
    """Logits within a dtype-appropriate tolerance of float32; LayerNorm hooks are float32 as in TL."""
    model, x = model_and_x(init_values=0.5)
    with torch.no_grad():
        ref, ref_cache = model.run_with_cache(x)
        half = copy.deepcopy(model).to(dtype)
        assert half.cfg.dtype == dtype and model.cfg.dtype == torch.float32
        out = half(x.to(dtype))
        out_c, cache = half.run_with_cache(x.to(dtype))
    assert out.dtype == dtype
    close(out.float(), ref, atol)
    close(out_c.float(), ref, atol)
    assert cache["blocks.1.ln1.hook_normalized"].dtype == torch.float32  # TL normalises half in float32
    assert cache["blocks.1.hook_resid_post"].dtype == dtype
    close(cache["blocks.1.ln1.hook_normalized"], ref_cache["blocks.1.ln1.hook_normalized"], 20 * atol)


def test_fast_paths_are_taken_when_nothing_is_hooked(monkeypatch):
    model, x = model_and_x()
    calls = {"sdpa": 0, "layer_norm_affine": 0}
    sdpa, ln = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.layer_norm

    def count_sdpa(*a, **k):
        calls["sdpa"] += 1
        return sdpa(*a, **k)

    def count_ln(x, shape, weight=None, bias=None, eps=1e-5):
        calls["layer_norm_affine"] += weight is not None
        return ln(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", count_sdpa)
    monkeypatch.setattr(torch.nn.functional, "layer_norm", count_ln)
    with torch.no_grad():
        model(x)
    assert calls == {"sdpa": 2, "layer_norm_affine": 5}  # 2 blocks x (ln1, ln2) + ln_final, all fused
    calls.update(sdpa=0, layer_norm_affine=0)
    with torch.no_grad():
        model.run_with_cache(x)
    assert calls == {"sdpa": 0, "layer_norm_affine": 0}  # everything hooked: the explicit computations


def test_torch_compile_traces_the_unhooked_forward_in_one_graph():
    """fullgraph=True: no graph break (the finite-input check is skipped while compiling)."""
    model, x = model_and_x(reg_tokens=1, init_values=0.2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        close(compiled(x), model(x), 1e-6)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():  # ~60-120 s of C++ compilation on a loaded 2-core CPU
    model, x = model_and_x()
    compiled = torch.compile(model)
    with torch.no_grad():
        close(compiled(x), model(x), 1e-5)


def test_train_mode_dropout_and_drop_path_match_timm_under_the_same_seed():
    kw = dict(drop_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.15, drop_path_rate=0.3, pos_drop_rate=0.1)
    ref = tiny(**kw).train()
    model = HookedViT.from_timm(ref)
    assert model.training
    x = images(model)
    torch.manual_seed(123)
    want = ref(x)
    torch.manual_seed(123)
    got = model(x)
    close(got, want, 1e-5)
    torch.manual_seed(124)
    assert (model(x) - want).abs().max() > 1e-3  # the masks are random: another seed, another output
    model.eval()
    ref.eval()
    close(model(x), ref(x), 1e-5)


def test_train_mode_with_hooks_is_still_stochastic_and_backpropagates():
    model = HookedViT.from_timm(tiny(attn_drop_rate=0.5)).train()
    x = images(model)
    loss, cache = model.run_with_cache(x, labels=torch.tensor([0, 1, 2]), return_type="loss", incl_bwd=True)
    assert torch.isfinite(loss) and "blocks.0.attn.hook_pattern_grad" in cache
    p = cache["blocks.0.attn.hook_pattern"]
    close(p.sum(-1), torch.ones_like(p.sum(-1)), 1e-5)  # the hook sees the pattern before attention dropout


def test_deepcopy_is_independent_and_reads_its_own_layer_scale():
    model, x = model_and_x(init_values=0.5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[1].ls1.gamma.mul_(3)
        twin.blocks[0].ls2.gamma.zero_()
    close(twin.blocks[1].attn.W_O, model.blocks[1].attn.W_O * 3, 1e-6)
    assert torch.equal(twin.W_out[0], torch.zeros_like(twin.W_out[0]))
    assert not torch.equal(model.W_out[0], torch.zeros_like(model.W_out[0]))
    _, cache = twin.run_with_cache(x)  # W_O of the copy acts on the copy's residual stream
    z = cache["blocks.1.attn.hook_z"]
    close(torch.einsum("bphe,hed->bpd", z, twin.W_O[1]) + twin.b_O[1], cache["blocks.1.hook_attn_out"])


def test_pickle_round_trip():
    model, x = model_and_x(init_values=0.5, qk_norm=True)
    back = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        close(back(x), model(x), 0)
        back.blocks[0].ls1.gamma.mul_(2)
    close(back.blocks[0].attn.W_O, model.blocks[0].attn.W_O * 2, 1e-6)
    _, cache = back.run_with_cache(x)
    assert "blocks.1.attn.q_norm.hook_normalized" in cache


def test_to_device_and_dtype_moves_weights_and_cfg():
    model, x = model_and_x(init_values=0.5)
    double = copy.deepcopy(model).to(torch.float64)
    assert double.cfg.dtype == torch.float64 and double.W_O.dtype == torch.float64
    with torch.no_grad():
        close(double(x.double()).float(), model(x), 1e-5)
    meta = copy.deepcopy(model).to("meta")
    assert meta.cfg.device == torch.device("meta") and meta.W_O.device.type == "meta"
    out = meta(torch.empty(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, 7) and out.device.type == "meta"
    if torch.cuda.is_available():
        cuda = copy.deepcopy(model).to("cuda")
        with torch.no_grad():
            close(cuda(x.cuda()).cpu(), model(x), 1e-4)
        _, cache = cuda.run_with_cache(x.cuda())
        assert cache.get_full_resid_decomposition().device.type == "cuda"
