"""Feature cards: PNG at print resolution and SVG with the card's text, from one call; bad input refused."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

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
    assert f"density {100 * float(st.density[f]):.3g}%" in text
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
