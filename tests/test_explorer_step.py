"""The explorer step's table and image-set statement (mechvit.study.steps.explorer)."""

from types import SimpleNamespace

from mechvit.study.steps.explorer import image_sets, sae_table

ROWS = [
    {"name": "base · r0", "live": 719, "listed": 719, "d_sae": 768, "stability": 0.4},
    {"name": "blur4 · r0", "live": 734, "listed": 3, "d_sae": 768, "stability": 0.5},
]


def test_table_drops_the_listed_column_unless_max_latents_bounds_the_page():
    t = sae_table(ROWS, ["sae/a", "sae/b"], 500, 1000, bounded=False)
    assert "listed (max_latents)" not in t.columns
    assert t.columns[:4] == ["SAE", "folder", "live latents", "dead (explorer images)"]
    assert [r[3] for r in t.rows] == [49, 34]  # d_sae - live on the explorer's images
    assert "500 clean + 1000 corrupted" in t.title
    t = sae_table(ROWS, ["sae/a", "sae/b"], 500, 1000, bounded=True)
    assert [r[t.columns.index("listed (max_latents)")] for r in t.rows] == [719, 3]


def _ctx(n_eval=200, n_fidelity=None, n_heldout=None):
    from mechvit.study.config import SAESection

    sae = SAESection(n_eval_images=n_eval, n_fidelity_images=n_fidelity, n_heldout_images=n_heldout)
    return SimpleNamespace(cfg=SimpleNamespace(sae=sae, conditions=["a", "b"]))


def test_image_sets_name_the_sae_steps_held_out_images_and_how_they_relate():
    """The SAE step's dead counts are over sae.heldout_images (n_heldout_images, else n_fidelity_images, else
    n_eval_images), not n_eval_images: the default study's 1,000 held-out images are a superset of the
    explorer's 500."""
    txt = image_sets(_ctx(n_eval=200, n_fidelity=5000, n_heldout=1000), 500)
    assert "500 clean test images" in txt and "(1500 images)" in txt
    assert "held-out 1000 clean test images (sae.heldout_images)" in txt
    assert "(3000 images: a superset of the explorer's" in txt and "at most d_sae minus" in txt
    assert "200" not in txt and "subset" not in txt  # n_eval_images (the overlap controls') plays no part
    # no n_heldout_images: n_fidelity_images; neither: n_eval_images
    assert "held-out 300 clean" in image_sets(_ctx(n_eval=200, n_fidelity=300), 500)
    sub = image_sets(_ctx(n_eval=200), 500)
    assert "held-out 200 clean" in sub and "(600 images: a subset of the explorer's" in sub
    assert "at least d_sae minus" in sub
    assert "the same images" in image_sets(_ctx(n_eval=200, n_heldout=500), 500)
