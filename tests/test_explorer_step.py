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


def test_image_sets_name_both_counts_image_sets():
    ctx = SimpleNamespace(cfg=SimpleNamespace(sae=SimpleNamespace(n_eval_images=200), conditions=["a", "b"]))
    txt = image_sets(ctx, 500)
    assert "500 clean test images" in txt and "(1500 images)" in txt
    assert "held-out 200 clean test images" in txt and "600 images: a subset of the explorer's" in txt
    assert "the same images" in image_sets(ctx, 200)
    assert "superset" in image_sets(ctx, 100)
