import math

import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.analysis.attention import (
    attention_entropy,
    attention_rollout,
    attention_stats,
    cls_attention_map,
    compare_attention,
    mean_attention_distance,
    model_attention_rollout,
    model_cls_attention,
    patch_centers,
)


def test_entropy_known_values():
    for n in (1, 5, 17):
        uniform = torch.full((2, 3, 4, n), 1.0 / n)
        torch.testing.assert_close(attention_entropy(uniform), torch.full((2, 3, 4), math.log(n)))
    one_hot = torch.eye(6).expand(1, 2, 6, 6)
    torch.testing.assert_close(attention_entropy(one_hot), torch.zeros(1, 2, 6))


def test_rollout_known_answers():
    eye = torch.eye(7).expand(2, 3, 7, 7)
    for residual in (True, False):
        torch.testing.assert_close(
            attention_rollout([eye, eye, eye], residual=residual), torch.eye(7).expand(2, 7, 7)
        )
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.rand(1, 2, 4, 4, generator=g).softmax(-1), torch.rand(1, 2, 4, 4, generator=g).softmax(-1)
    m1, m2 = 0.5 * a1.mean(1) + 0.5 * torch.eye(4), 0.5 * a2.mean(1) + 0.5 * torch.eye(4)
    torch.testing.assert_close(attention_rollout([a1, a2]), m2 @ m1)
    assert torch.allclose(attention_rollout([a1, a2]).sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least one"):
        attention_rollout([])


def test_mean_attention_distance():
    grid, patch, n_prefix = (3, 4), (5, 7), 1
    centers = patch_centers(grid, patch)
    assert centers[0].tolist() == [2.5, 3.5] and centers[5].tolist() == [7.5, 10.5]
    T = n_prefix + 12
    self_attn = torch.eye(T).expand(1, 1, T, T)
    torch.testing.assert_close(mean_attention_distance(self_attn, grid, patch, n_prefix), torch.zeros(1, 1))
    # every patch query attends half to CLS, half to the patch one row down (or up on the last row):
    # CLS mass is dropped and renormalised, so the distance is exactly one patch height (5 px)
    p = torch.zeros(1, 1, T, T)
    for q in range(12):
        r, c = divmod(q, 4)
        k = (r + 1 if r < 2 else r - 1) * 4 + c
        p[0, 0, n_prefix + q, 0] = 0.5
        p[0, 0, n_prefix + q, n_prefix + k] = 0.5
    torch.testing.assert_close(mean_attention_distance(p, grid, patch, n_prefix), torch.full((1, 1), 5.0))
    with pytest.raises(ValueError, match="expected"):
        mean_attention_distance(p, grid, patch, 0)


def test_cls_attention_map_layout():
    T = 2 + 6  # CLS, DIST, 2x3 patches
    p = torch.zeros(1, 1, T, T)
    p[0, 0, 0, 2 + 4] = 1.0  # CLS attends to patch r1c1
    m = cls_attention_map(p, (2, 3), n_prefix=2)
    assert m.shape == (1, 1, 2, 3) and m[0, 0, 1, 1] == 1.0 and m.sum() == 1.0


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=32,
        depth=2,
        num_heads=2,
        **kw,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return HookedViT.from_timm(m).eval()


def test_model_level_metrics(tmp_path):
    model = tiny(reg_tokens=1)
    x = torch.rand(5, 1, 28, 28)
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    stats = attention_stats(model, x, batch_size=2, progress=False)
    pat1 = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(stats.entropy[1], attention_entropy(pat1).mean((0, 2)))
    torch.testing.assert_close(stats.distance[1], mean_attention_distance(pat1, (4, 4), (7, 7), 2).mean(0))
    assert len(stats.rows()) == 4
    same = compare_attention(model, x, progress=False)
    torch.testing.assert_close(same.mse, torch.zeros(2, 2))
    torch.testing.assert_close(same.cosine, torch.ones(2, 2))
    torch.testing.assert_close(same.entropy_diff, torch.zeros(2, 2))
    diff = compare_attention(
        model, x, images_b=x.flip(-1), labels=("clean", "flip"), batch_size=3, progress=False
    )
    ref = (pat1 - model.run_with_cache(x.flip(-1))[1]["blocks.1.attn.hook_pattern"]).pow(2).mean((0, 2, 3))
    torch.testing.assert_close(diff.mse[1], ref)
    assert torch.all(diff.cosine < 1) and diff.rows()[0]["run_b"] == "flip"
    diff.save_csv(tmp_path / "att.csv")
    other = compare_attention(model, x, tiny(1, reg_tokens=1), progress=False)
    assert set(other.per_layer()) >= {"entropy_diff", "mse", "cosine"}
    roll = model_attention_rollout(model, x, batch_size=2)
    torch.testing.assert_close(
        roll, attention_rollout([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(2)])
    )
    cls_maps = model_cls_attention(model, x, batch_size=2)
    assert cls_maps.shape == (2, 5, 2, 4, 4)
    torch.testing.assert_close(cls_maps[1], pat1[:, :, 0, 2:].reshape(5, 2, 4, 4))
    with pytest.raises(ValueError, match="paired"):
        compare_attention(model, x, images_b=x[:2])


def test_per_image_values_average_to_the_per_layer_ones_and_match_each_image_alone():
    """``per_image`` [N, L] (head mean) of attention_stats and compare_attention: the mean over images is
    ``per_layer()``, and image i's row is what the analysis gives on image i alone (independent of batching)."""
    model, other = tiny(reg_tokens=1), tiny(1, reg_tokens=1)
    x = torch.rand(5, 1, 28, 28)
    xb = x.flip(-1)
    stats = attention_stats(model, x, batch_size=2, progress=False)
    assert set(stats.per_image) == {"entropy", "distance_px"}
    for k, v in stats.per_layer().items():
        assert stats.per_image[k].shape == (5, 2)
        torch.testing.assert_close(stats.per_image[k].mean(0), v, rtol=1e-5, atol=1e-6)
    _, cache = model.run_with_cache(x[3:4], names_filter=lambda n: n.endswith("hook_pattern"))
    pat = cache["blocks.1.attn.hook_pattern"]  # [1, H, T, T]
    torch.testing.assert_close(stats.per_image["entropy"][3, 1], attention_entropy(pat).mean((1, 2))[0])
    torch.testing.assert_close(
        stats.per_image["distance_px"][3, 1], mean_attention_distance(pat, (4, 4), (7, 7), 2).mean(1)[0]
    )
    for kw in ({"images_b": xb}, {"model_b": other}):
        pa = compare_attention(model, x, batch_size=3, progress=False, **kw)
        assert set(pa.per_image) == set(pa.per_layer())
        for k, v in pa.per_layer().items():
            torch.testing.assert_close(pa.per_image[k].mean(0), v, rtol=1e-5, atol=1e-6)
        for i in (0, 4):
            one = compare_attention(
                model,
                x[i : i + 1],
                progress=False,
                **{k: v[i : i + 1] if k == "images_b" else v for k, v in kw.items()},
            )
            for k, v in one.per_layer().items():
                torch.testing.assert_close(pa.per_image[k][i], v, rtol=1e-5, atol=1e-6)
    # the cosine of image 4, layer 0, from the two patterns directly
    pats = [model.run_with_cache(im)[1]["blocks.0.attn.hook_pattern"] for im in (x[4:5], xb[4:5])]
    ref = torch.nn.functional.cosine_similarity(pats[0].flatten(2), pats[1].flatten(2), dim=-1).mean()
    pa = compare_attention(model, x, images_b=xb, progress=False)
    torch.testing.assert_close(pa.per_image["cosine"][4, 0], ref)
