"""Feature cards: PNG at print resolution and SVG with the card's text, from one call; bad input refused."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from mechvit._numbers import fmt_fixed, fmt_sig
from mechvit.analysis.features import feature_stats
from mechvit.viz import feature_card
from tests.test_analysis_features import CLASSES, random_sae, tiny_model


@pytest.fixture(scope="module")
def stats():
    model = tiny_model()
    sae = random_sae("blocks.0.hook_resid_post")
    g = torch.Generator().manual_seed(4)
    images = torch.rand(24, 1, 28, 28, generator=g)
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    st = feature_stats(
        model,
        sae,
        images,
        torch.arange(24) % 10,
        CLASSES,
        corrupted=corrupted,
        k=4,
        n_assoc=8,
        progress=False,
    )
    return st, images, corrupted


def test_card_png_and_svg(stats, tmp_path):
    st, images, corrupted = stats
    f = int(st.live[np.argmax(st.density[st.live])])
    fig = feature_card(
        st, f, images, CLASSES, path=tmp_path / "card.png", dpi=200, title="base · test", corrupted=corrupted
    )
    png, svg = tmp_path / "card.png", tmp_path / "card.svg"
    assert png.is_file() and svg.is_file()
    w_in, h_in = fig.get_size_inches()
    with Image.open(png) as im:
        assert im.size == (round(w_in * 200), round(h_in * 200))
        px = np.asarray(im.convert("L"), dtype=float)
    assert px.std() > 10  # not blank
    text = svg.read_text()
    assert "base · test" in text and st.label[f] in text  # text stays text in the SVG
    # the density in %, half up on its decimal value (mechvit._numbers): a tie like 9/16 = 56.25% reads 56.3
    assert f"density {fmt_sig(float(st.density[f]), 3, 100)}%" in text
    n_images = len(re.findall(r"<image ", text))
    top = int((st.top_idx[f] >= 0).sum()) + int((st.top_idx_corrupted[f] >= 0).sum())
    assert n_images >= top  # matplotlib composites each axes' picture + heatmap into one SVG image


def test_card_default_is_print_resolution(stats, tmp_path):
    """One call from mechvit.viz with the defaults: 300 dpi PNG (recorded in the file) and an SVG beside it."""
    st, images, _ = stats
    f = int(st.live[0])
    fig = feature_card(st, f, images, CLASSES, path=tmp_path / "sub" / "latent.png")
    with Image.open(tmp_path / "sub" / "latent.png") as im:
        assert im.size == tuple(round(v * 300) for v in fig.get_size_inches())
        assert im.size[0] >= 2000 and round(im.info["dpi"][0]) == 300
    assert (tmp_path / "sub" / "latent.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_card_refuses_bad_input(stats):
    st, images, _ = stats
    with pytest.raises(ValueError, match="feature must be in"):
        feature_card(st, st.d_sae, images, CLASSES)
    with pytest.raises(ValueError, match="the 24 images"):
        feature_card(st, 0, images[:5], CLASSES)


def test_many_classes_show_the_leading_ones(stats, tmp_path):
    """ImageNet's 1,000 classes: each bar chart draws its 12 leading classes, not 1,000 labels (unreadable, and
    minutes per card to lay out)."""
    import dataclasses
    import time

    st, images, _ = stats
    f = int(st.live[0])
    rng = np.random.default_rng(0)
    counts = np.zeros((st.d_sae, 1000), dtype=np.int64)
    counts[f, [7, 500, 999]] = [1, 5, 2]
    effect = rng.normal(0, 0.1, (st.d_sae, 1000)).astype(np.float32)
    effect[f, 123], effect[f, 321] = 9.0, -8.0
    many = dataclasses.replace(st, class_counts=counts, logit_effect=effect)
    names = [f"class_{i:04d}" for i in range(1000)]
    t = time.perf_counter()
    feature_card(many, f, images, names, path=tmp_path / "card.png", dpi=100)
    assert time.perf_counter() - t < 30
    text = (tmp_path / "card.svg").read_text()
    shown = set(re.findall(r"class_\d{4}", text))
    assert {"class_0500", "class_0999", "class_0007", "class_0123", "class_0321"} <= shown
    assert len(shown) <= 24 and "leading 12 of 1000 classes" in text and "largest 12 of 1000" in text
    with pytest.raises(ValueError, match="max_classes"):
        feature_card(st, f, images, CLASSES, max_classes=0)


def test_card_says_which_activation_the_logit_effect_is_at(stats, tmp_path):
    """A latent that never fires on a clean token: its mean activation reads "–" (not 0), the logit panel says
    the effect is at the corrupted-image mean (and draws the measured bars); a latent that never fires: "not
    measured", no bars."""
    st, images, corrupted = stats
    only_c = np.flatnonzero(st.effect_basis == "corrupted")
    assert len(only_c) and np.isnan(st.mean_act[only_c]).all()
    f = int(only_c[np.argmax(st.density_corrupted[only_c])])
    feature_card(st, f, images, CLASSES, path=tmp_path / "c.png", dpi=72, corrupted=corrupted)
    text = (tmp_path / "c.svg").read_text()
    assert "mean act – (corrupted " + f"{fmt_sig(float(st.mean_act_corrupted[f]), 3)})" in text
    assert "direct logit effect (corrupted-image mean act × decoder dir.)" in text
    assert "nan" not in text and "not measured" not in text
    # its label and classes: from its top corrupted images, and marked so
    n_c = int(st.class_counts[f].sum())
    assert st.label_set[f] == "corrupted" and st.label[f] != "-" and n_c > 0
    assert f"classes of top {n_c} corrupted images" in text
    assert f"— {st.label[f]} (corrupted images)</text>" in text
    clean = int(st.live[np.argmax(st.density[st.live])])
    feature_card(st, clean, images, CLASSES, path=tmp_path / "k.png", dpi=72)
    text = (tmp_path / "k.svg").read_text()
    assert "direct logit effect (mean act × decoder dir.)" in text and "corrupted-image" not in text
    n_top = int(st.class_counts[clean].sum())
    assert f"classes of top {n_top} images" in text and 0 < n_top <= st.n_assoc
    assert f"— {st.label[clean]}</text>" in text
    assert "(corrupted images)" not in text
    dead = 0  # random_sae kills latents 0-3
    assert st.effect_basis[dead] == "none" and np.isnan(st.logit_effect[dead]).all()
    feature_card(st, dead, images, CLASSES, path=tmp_path / "d.png", dpi=72)
    text = (tmp_path / "d.svg").read_text()
    assert "not measured" in text and "(never fires on clean images)" in text and "nan" not in text
    assert "classes of top images: none (never on clean)" in text and st.label_set[dead] == "none"


def test_a_latent_that_fires_only_on_corrupted_images_shows_them_with_their_condition(stats, tmp_path):
    """A latent that never fires on a clean token: the clean row says so, the corrupted row shows its top
    corrupted images, each titled with the condition it came from (corrupted_groups) and its max activation."""
    st, images, corrupted = stats
    noisy = (
        corrupted + 0.2 * torch.randn(corrupted.shape, generator=torch.Generator().manual_seed(9))
    ).clamp(0, 1)
    st2 = feature_stats(
        tiny_model(), random_sae("blocks.0.hook_resid_post"), images, torch.arange(24) % 10, CLASSES,
        corrupted=torch.cat([corrupted, noisy]), corrupted_labels=torch.arange(48) % 24 % 10, k=4, n_assoc=8,
        progress=False,
    )  # fmt: skip
    only_c = np.flatnonzero(st2.effect_basis == "corrupted")
    f = int(only_c[np.argmax((st2.top_idx_corrupted[only_c] >= 0).sum(1))])
    groups = [("blur 1", 24), ("noise 3", 24)]
    feature_card(
        st2, f, images, CLASSES, path=tmp_path / "c.png", dpi=72, corrupted=torch.cat([corrupted, noisy]),
        corrupted_groups=groups,
    )  # fmt: skip
    text = (tmp_path / "c.svg").read_text()
    assert "never active on the clean images" in text
    top = [int(t) for t in st2.top_idx_corrupted[f] if t >= 0]
    assert top and len(re.findall(r"<image ", text)) >= len(top)
    titles = re.findall(r"(blur 1|noise 3)\s*</text>", text)  # each corrupted image's condition
    assert titles == ["blur 1" if t < 24 else "noise 3" for t in top]
    for j in range(len(top)):
        assert fmt_fixed(float(st2.top_val_corrupted[f, j]), 2) in text
    with pytest.raises(ValueError, match="the 48 corrupted images"):
        feature_card(st2, f, images, CLASSES, corrupted=corrupted)
