import numpy as np
import pytest
import timm
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from mechvit import HookedViT
from mechvit.analysis import (
    activation_patching,
    attention_stats,
    code_similarity,
    compare_attention,
    feature_overlap,
    layer_cka,
    logit_lens_sweep,
    model_cls_attention,
)
from mechvit.viz.figures import (
    plot_attention_overlay,
    plot_attention_stats,
    plot_cka,
    plot_code_similarity,
    plot_feature_overlap,
    plot_logit_lens,
    plot_paired_attention,
    plot_patching,
    save_figure,
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
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
        reg_tokens=1,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    model = HookedViT.from_timm(m).eval()
    x = torch.rand(4, 1, 28, 28)
    return model, x, x.flip(-1), torch.tensor([0, 1, 2, 3])


def _written(stem):
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]


def test_patching_figures_draw_the_grid(setup, tmp_path):
    model, x, xc, y = setup
    res = activation_patching(model, x, xc, y, progress=False)
    fig = plot_patching(res, tmp_path / "pos")
    _written(tmp_path / "pos")
    # the small multiples show each layer's patch-token scores at their grid cells
    _, grid = res.on_grid()
    drawn = [im.get_array() for ax in fig.axes for im in ax.get_images() if im.get_array().shape == (4, 4)]
    assert len(drawn) == 2
    np.testing.assert_allclose(np.asarray(drawn[1]), grid[1].numpy(), rtol=1e-6)
    assert fig.axes[0].get_xlabel() == "position" and fig.axes[0].get_ylabel() == "layer"
    assert any(ax.get_ylabel().startswith("normalised") for ax in fig.axes)  # a labelled colour bar
    heads = activation_patching(model, x, xc, y, component="z", by="head", progress=False)
    fig = plot_patching(heads, tmp_path / "heads.png")
    _written(tmp_path / "heads")
    assert fig.axes[0].get_xlabel() == "head"
    plot_patching(activation_patching(model, x, xc, y, by="layer", progress=False), tmp_path / "layer")
    hp = activation_patching(model, x, xc, y, component="pattern", by="head_position", progress=False)
    plot_patching(hp, tmp_path / "hp")
    _written(tmp_path / "hp")


def test_other_figures(setup, tmp_path):
    model, x, xc, y = setup
    sweep = logit_lens_sweep({"base": model}, {"clean": x, "flip": xc}, y, progress=False)
    fig = plot_logit_lens(sweep, tmp_path / "lens")
    assert fig.axes[0].get_ylabel() == "top-1 accuracy" and len(fig.axes[0].get_lines()) == 2
    plot_attention_stats(attention_stats(model, x, progress=False), tmp_path / "att")
    pa = compare_attention(model, x, images_b=xc, labels=("clean", "flip"), progress=False)
    plot_paired_attention({"flip": pa}, tmp_path / "paired")
    maps = model_cls_attention(model, x)[:, 0, 0]  # [L, gh, gw] for image 0, head 0
    fig = plot_attention_overlay(x[0], maps, tmp_path / "overlay", titles=["layer 0", "layer 1"])
    assert fig.axes[0].get_title() == "layer 0"
    plot_cka({"flip": layer_cka(model, x, images_b=xc, progress=False)}, tmp_path / "cka")
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    acts = torch.randn(6, 5, 32)
    plot_feature_overlap(feature_overlap(sae, sae, acts, acts), tmp_path / "overlap")
    plot_code_similarity(
        [code_similarity(sae, acts, acts + 0.1 * torch.randn_like(acts), label="base")], tmp_path / "codes"
    )
    for stem in ("lens", "att", "paired", "overlay", "cka", "overlap", "codes"):
        _written(tmp_path / stem)
    with pytest.raises(ValueError, match="image"):
        plot_attention_overlay(torch.rand(28, 28), maps)


def test_save_figure_formats(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    paths = save_figure(fig, tmp_path / "sub" / "f.svg", formats=("png",))
    assert [p.name for p in paths] == ["f.png"] and not list((tmp_path / "sub").glob("*.tmp"))


def test_heatmap_writes_values_and_outlines_marked_cells():
    from matplotlib.figure import Figure

    from mechvit.viz.figures import DIVERGING, heatmap

    fig = Figure()
    ax = fig.add_subplot()
    mat = np.array([[1.0, -2.0], [0.5, np.nan]])
    im = heatmap(
        ax, mat, ["a", "b"], ["r0", "r1"], cbar_label="v", cmap=DIVERGING, fmt="{:.1f}", marks=mat > 0.7
    )
    assert im.get_clim() == (-2.0, 2.0)  # centred on 0
    assert sorted(t.get_text() for t in ax.texts) == ["-2.0", "0.5", "1.0"]  # NaN cells stay empty
    assert len(ax.patches) == 1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert fig.axes[-1].get_ylabel() == "v"  # the colour bar


def test_every_model_of_a_twelve_model_study_gets_its_own_colour():
    from mechvit.viz.figures import PALETTE, color

    cols = [color(i) for i in range(12)]
    assert len(set(cols)) == 12 and PALETTE[6] not in cols  # never the neutral grey of reference lines
    assert cols[:6] == list(PALETTE[:6])  # the first six as before


def test_robustness_group_bars_legend_names_every_group_beside_the_bars():
    from mechvit.viz.figures import robustness_group_bars

    e = {"estimate": 0.5, "low": 0.4, "high": 0.6}
    est = {
        "base": {"accuracy": {"clean": e, "all_corrupted": e}},  # the first model has no seen groups
        "ft": {"accuracy": {"clean": e, "seen": e, "unseen_same_family": e, "unseen_other": e}},
        "ft2": {"accuracy": {"clean": e, "seen": e, "unseen_other": e}},
    }
    groups = {"clean": "clean", "seen": "seen", "unseen_same_family": "unseen, same family",
              "unseen_other": "unseen, other families", "all_corrupted": "all corruptions"}  # fmt: skip
    fig = robustness_group_bars(est, list(est), groups)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(groups.values())  # each group once
    assert not fig.axes[0].get_legend()
    r = fig._get_renderer()
    fig.draw(r)  # lays out the constrained-layout figure
    assert not legend.get_window_extent(r).overlaps(fig.axes[0].get_window_extent(r))
