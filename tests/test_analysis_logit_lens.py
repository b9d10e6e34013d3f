import math

import pytest
import timm
import torch

from mechvit import HookedViT
from mechvit.analysis.logit_lens import first_correct_layer, logit_lens, logit_lens_sweep


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
        depth=3,
        num_heads=2,
        **kw,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return HookedViT.from_timm(m).eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"class_token": False, "global_pool": "avg"},
        {"reg_tokens": 2, "fc_norm": True, "global_pool": "avg"},
    ],
)
def test_last_layer_equals_model_logits(kw):
    model = tiny(**kw)
    x = torch.rand(5, 1, 28, 28)
    y = torch.arange(5)
    res = logit_lens(model, x, y, include_embed=True, progress=False)
    probs = model(x).softmax(-1)
    torch.testing.assert_close(res.correct_prob[:, -1], probs[torch.arange(5), y])
    assert torch.equal(res.top1[:, -1], probs.argmax(-1) == y)
    torch.testing.assert_close(res.kl_to_final[:, -1], torch.zeros(5), atol=1e-6, rtol=0)
    ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(res.entropy[:, -1], ent, atol=1e-5, rtol=1e-5)
    assert res.layers == ["embed", "0", "1", "2"]
    assert torch.all(res.kl_to_final >= 0) and torch.all(res.entropy <= math.log(10) + 1e-5)


def test_intermediate_layer_matches_manual_readout():
    model = tiny()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    res = logit_lens(model, x, y, progress=False, batch_size=3)
    resid = model(x, stop_at_layer=2)  # residual entering block 2 = resid_post of block 1
    logits = model.head_logits(model.ln_final(resid)[:, 0])
    torch.testing.assert_close(res.correct_prob[:, 1], logits.softmax(-1)[torch.arange(4), y])


def test_first_correct_layer_modes():
    top1 = torch.tensor(
        [[0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool
    )
    assert first_correct_layer(top1, "first").tolist() == [1, 2, -1, 0, 0]
    assert first_correct_layer(top1, "stable").tolist() == [3, 2, -1, 0, -1]
    with pytest.raises(ValueError, match="mode"):
        first_correct_layer(top1, "last")


def test_summary_rows_and_sweep(tmp_path):
    base, tuned = tiny(0), tiny(1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    sweep = logit_lens_sweep(
        {"base": base, "tuned": tuned}, {"clean": x, "flip": x.flip(-1)}, y, progress=False
    )
    rows = sweep.rows()
    assert len(rows) == 2 * 2 * 3 and rows[0]["model"] == "base" and rows[0]["condition"] == "clean"
    res = sweep.results[("tuned", "flip")]
    expected = res.top1.double().mean(0)
    assert [
        r["top1_acc"] for r in rows if r["model"] == "tuned" and r["condition"] == "flip"
    ] == pytest.approx(expected.tolist())
    f = res.first_correct
    mean = f[f >= 0].double().mean().item() if (f >= 0).any() else float("nan")
    assert res.to_dict()["mean_first_correct_layer"] == pytest.approx(mean, nan_ok=True)
    sweep.save_csv(tmp_path / "lens.csv")
    assert (tmp_path / "lens.csv").read_text().splitlines()[0].startswith("model,condition,layer")


def test_bad_input():
    model = tiny()
    with pytest.raises(ValueError, match="labels"):
        logit_lens(model, torch.rand(2, 1, 28, 28), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="images"):
        logit_lens(model, torch.rand(1, 28, 28), torch.tensor([0]))


def test_first_correct_block_leaves_the_embed_row_out():
    """With ``include_embed`` the first-correct *layer* counts the embed row; the first-correct *block*
    (the study's, and the figure legend's) is the same rule on the block rows alone: 0 = after block 0."""
    from mechvit.analysis.logit_lens import LogitLensResult

    top1 = torch.tensor(
        [[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool
    )  # rows: embed, block 0, 1, 2
    z = torch.zeros(5, 4)
    res = LogitLensResult(["embed", "0", "1", "2"], z, top1, z, z)
    assert res.first_correct.tolist() == [0, 0, 3, 0, -1]
    assert res.first_correct_block.tolist() == [1, 0, 2, -1, -1]  # image 3: correct only on the embed row
    assert res.mean_first_correct_block == pytest.approx(1.0)
    assert res.to_dict()["mean_first_correct_block"] == pytest.approx(1.0)
    stable = LogitLensResult(["embed", "0", "1", "2"], z, top1, z, z, mode="stable")
    assert stable.first_correct_block.tolist() == [1, 0, 2, -1, -1]
    blocks_only = LogitLensResult(["0", "1", "2"], z[:, 1:], top1[:, 1:], z[:, 1:], z[:, 1:])
    assert torch.equal(blocks_only.first_correct_block, blocks_only.first_correct)
