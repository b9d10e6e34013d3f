"""The explorer page's texts and controls in headless Chromium (tests/browser.py), with known answers:

- a latent that never fires on the clean images: mean activation "–", its mean on the corrupted images, the
  direct logit effect at that mean (and said so, on the page and the page's card), its top corrupted images with
  their heatmaps and conditions, and its ablate/double effect measured on them (the numbers feature_stats
  computed, equal to a hand splice), its label from its top corrupted images, marked "(corrupted images)" and
  searchable; an older page's effect at a clean mean of 0, and its ablation that was never measured: "not
  measured"; an older page's unlabelled latent: "-";
- density always a percentage; the page's card at k = 8 keeps its 6 images inside its width;
- a sort by "cos <model>" survives a change of replicate and a followed match link; labels sort numerically;
- the index is a keyboard listbox (arrows, Page Up/Down, Home, End, Enter), links (#sae=...&f=...) are followed
  when the hash changes in an open page, and a link whose latent is not a number is refused with a message.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch

from mechvit._numbers import fmt_fixed, fmt_sig
from mechvit.analysis.features import FeatureStats
from mechvit.viz.explorer import ExplorerSAE, explorer_array, explorer_data, explorer_html
from tests.browser import chromium, collect, skip_without_chromium
from tests.test_analysis_features import CLASSES, random_sae, tiny_model

HOOK = "blocks.0.hook_resid_post"
CORR = "noise 2 + noise 4"
GROUPS = [("noise 2", 40), ("noise 4", 40)]  # the corrupted set: the 40 images under each condition


def _signed(v, decimals: int) -> str:
    """``v`` as the page prints a logit effect: half up (mechvit._numbers), "+" for one that rounds to zero."""
    text = fmt_fixed(float(v), decimals)
    return text if text.startswith("-") else "+" + text


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def wait_for(driver, script, *args, timeout=10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script, *args))


def fresh(driver, path: Path, fragment: str = ""):
    """Load the page anew (a navigation to the same page that changes only the hash would not reload it)."""
    driver.get("about:blank")
    driver.get(path.resolve().as_uri() + fragment)
    wait_for(driver, "return document.body && document.body.dataset.ready === '1'")


def stat_values(driver) -> dict:
    return {
        e.get_attribute("data-key"): (
            float(e.get_attribute("data-value")),
            e.find_element("css selector", "span").text,
        )
        for e in driver.find_elements("css selector", "#detail .stat")
    }


# ---- a page of real statistics (tiny model, random SAE, noisy copies), the default k = 8 ---------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    model = tiny_model(0)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(40, 1, 28, 28, generator=g)
    labels = torch.arange(40) % 10
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    corrupted = torch.cat([corrupted, (images + 0.6 * torch.randn(images.shape, generator=g)).clamp(0, 1)])
    data, stats = explorer_data(
        [ExplorerSAE("base s0", random_sae(HOOK, seed=0), "base")], {"base": model}, images, labels, CLASSES,
        corrupted=corrupted, corrupted_labels=labels.repeat(2), corrupted_name=CORR, corrupted_groups=GROUPS,
        progress=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("explorer_real") / "features.html"
    path.write_text(explorer_html(data), encoding="utf-8")
    return path, data, stats["base s0"], model, corrupted


@pytest.fixture(scope="module")
def driver():
    with chromium() as d:
        yield d


def _corrupted_only(st: FeatureStats) -> int:
    """The listed latent that never fires on a clean token and fires most often on the corrupted ones."""
    only = np.flatnonzero(st.effect_basis == "corrupted")
    assert len(only), "the fixture has no latent that fires only on the corrupted images"
    return int(only[np.argmax(st.density_corrupted[only])])


@skip_without_chromium
def test_a_latent_that_never_fires_on_clean_images(real, driver):
    path, data, st, *_ = real
    f = _corrupted_only(st)
    entry = data["saes"][0]
    i = entry["live"].index(f)
    assert entry["mean_act"][i] is None and data["effect_bases"][entry["effect_basis"][i]] == "corrupted"
    fresh(driver, path, f"#sae=base+s0&f={f}")
    assert driver.find_element("css selector", "#detail").get_attribute("data-feature") == str(f)
    stats = stat_values(driver)
    assert np.isnan(stats["mean_act"][0]) and stats["mean_act"][1] == "–"  # not "0.000"
    assert stats["mean_act_corrupted"][0] == pytest.approx(float(st.mean_act_corrupted[f]), rel=1e-3)
    assert stats["density"][1] == "0%"
    # the direct logit effect: measured at the corrupted mean, and the panel says so
    panel = driver.find_element("css selector", "#logit-effect")
    assert panel.get_attribute("data-basis") == "corrupted"
    assert (
        panel.find_element("css selector", "h3").text.lower()
        == f"direct logit effect at the {CORR} mean activation"
    )
    note = driver.find_element("css selector", "#logit-note").text
    mean_c = fmt_fixed(entry["mean_act_c"][i], 3)  # as the page prints it (half up, mechvit._numbers)
    assert f"mean activation on the {CORR} tokens where it fires ({mean_c}" in note
    printed = [
        t.text
        for t in driver.find_elements("css selector", "#detail svg.logits text")
        if t.text not in CLASSES
    ]
    want = explorer_array(data, entry, "logit").reshape(len(entry["live"]), -1)[i]
    assert printed == [_signed(v, 2) for v in want] and np.abs(st.logit_effect[f]).max() > 0.005
    np.testing.assert_allclose(want, st.logit_effect[f], atol=np.nanmax(np.abs(st.logit_effect)) / 65534)
    # its images: none in the clean row (which says so), its top corrupted images in the row below
    assert (
        driver.find_element("css selector", "#noimgs").text
        == f"never active on the clean images (its top {CORR} images are below)"
    )
    # its classes: those of its top corrupted images, the images its label comes from
    n_c = int(st.class_counts[f].sum())
    assert st.label_set[f] == "corrupted" and n_c >= int((st.top_idx_corrupted[f] >= 0).sum()) > 0
    assert driver.find_element("css selector", "#classes h3").text.lower() == (
        f"classes of top {n_c} corrupted image{'s' if n_c > 1 else ''}"
    )
    assert driver.find_element("css selector", "#classes-note").text == (
        f"its top {CORR} images: it never fires on a clean image"
    )
    assert driver.find_element("css selector", "#hist").text.startswith(
        "none: never active on the clean images"
    )
    check_corrupted_images_and_ablation(driver, real, f)
    # the index: "–", and last when sorted by mean activation (either direction: no value)
    row = driver.find_element("css selector", f'#spacer .row[data-feature="{f}"]')
    assert row.find_elements("css selector", "div")[2].text == "–"
    for _ in range(2):
        driver.find_element("css selector", '#thead [data-sort="mean_act"]').click()
        ids = js(driver, "return explorer.visibleIds()")
        nulls = [g for g, v in zip(entry["live"], entry["mean_act"], strict=True) if v is None]
        assert sorted(ids[-len(nulls) :]) == sorted(nulls) and f in nulls
    # the page's card says it too
    svg = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "explorer.cardSvg('base s0', arguments[0]).then(done, (e) => done('ERROR ' + e));",
        f,
    )
    assert "direct logit effect (at the corrupted mean act*)" in svg
    assert f"* at its mean activation on the {CORR} images ({mean_c}); it never fires on clean images" in svg
    assert "mean act – (" + CORR + ": " in svg and "never active on the clean images" in svg
    assert f">classes of the top {n_c} corrupted image" in svg and "top 0" not in svg
    assert f'class="l">{st.shown_label(f)}</text>' in svg and st.shown_label(f).endswith(
        " (corrupted images)"
    )
    # ... and shows its top corrupted images, each with its condition
    top_c = [int(t) for t in st.top_idx_corrupted[f] if t >= 0]
    assert svg.count("<image ") == min(6, len(top_c)) > 0
    conds = re.findall(r'<text [^>]*class="cond">([^<]*)</text>', svg)
    assert conds == [group_of(t) for t in top_c[:6]]
    assert f"top {CORR} images: never active on the clean images" in svg
    assert collect(driver).console_errors == []


def group_of(img: int) -> str:
    """The condition corrupted image ``img`` of the fixture came from."""
    start = 0
    for name, count in GROUPS:
        if img < start + count:
            return name
        start += count
    raise AssertionError(img)


def check_corrupted_images_and_ablation(driver, real, f):
    """The open latent ``f`` never fires on a clean image: its top corrupted images, captioned with their
    condition, with the heatmap on exactly the patches where it fires; its ablate/double table on those images,
    the numbers feature_stats computed (and a hand splice gives), "before" the model's own prediction there."""
    from tests.test_analysis_features import reference_probs

    path, data, st, model, corrupted = real
    figs = driver.find_elements("css selector", "#topimgs-c figure")
    top_c = [int(t) for t in st.top_idx_corrupted[f] if t >= 0]
    assert [int(e.get_attribute("data-image")) for e in figs] == top_c and top_c
    assert [e.get_attribute("data-group") for e in figs] == [group_of(t) for t in top_c]
    assert len({group_of(t) for t in top_c}) == 2 or len(top_c) == 1 or True  # either condition may lead
    for e, t in zip(figs, top_c, strict=True):
        assert group_of(t) in e.find_element("css selector", "figcaption").text
        assert (
            CLASSES[int(data["images"]["labels_corrupted"][t])]
            in e.find_element("css selector", "figcaption").text
        )
    # the heatmap: a grayscale picture tinted orange exactly on the patches where the latent fires (centre pixels)
    for j, e in enumerate(figs):
        tinted = js(
            driver,
            "const c = arguments[0].querySelector('canvas'), g = arguments[1], ctx = c.getContext('2d');"
            "const out = []; for (let r = 0; r < g; r++) for (let q = 0; q < g; q++) {"
            "const p = ctx.getImageData(Math.floor((q + 0.5) * c.width / g), Math.floor((r + 0.5) * c.height / g), 1, 1).data;"
            "out.push(p[0] - p[2] > 20); } return out;",
            e,
            st.grid[0],
        )
        assert tinted == (st.top_maps_corrupted[f, j] > 0).reshape(-1).tolist(), j
    # the ablation table: on those corrupted images
    table = driver.find_element("css selector", "#ablation")
    assert table.get_attribute("data-set") == "corrupted"
    head = table.find_element("xpath", "preceding-sibling::h3[1]").text
    assert (
        head.lower() == f"ablate / double on the top {CORR} images (it never fires on a clean image)".lower()
    )
    rows = driver.find_elements("css selector", "#ablation tr[data-image]")
    assert [int(r.get_attribute("data-image")) for r in rows] == top_c
    for r in rows:
        i, j = int(r.get_attribute("data-image")), int(r.get_attribute("data-j"))
        assert r.get_attribute("data-set") == "corrupted" and group_of(i) in r.text
        before, abl, dbl = r.find_elements("css selector", "td[data-p]")
        pred = int(before.get_attribute("data-pred"))
        assert pred == int(np.argmax(st.probs_corrupted[i]))
        tol = 1e-5  # uint16 in the page, 5 decimals in the table's data-p
        assert float(before.get_attribute("data-p")) == pytest.approx(
            float(st.probs_corrupted[i, pred]), abs=tol
        )
        assert float(abl.get_attribute("data-p")) == pytest.approx(
            float(st.probs_ablate[f, j, pred]), abs=tol
        )
        assert float(dbl.get_attribute("data-p")) == pytest.approx(
            float(st.probs_double[f, j, pred]), abs=tol
        )
        for factor, cell in ((0.0, abl), (2.0, dbl)):  # the known answer: a splice by hand on that image
            want = reference_probs(model, random_sae(HOOK, seed=0), corrupted[i : i + 1], HOOK, f, factor)[0]
            assert float(cell.get_attribute("data-p")) == pytest.approx(float(want[pred]), abs=3e-5)
    # the splice moves the prediction on some image (the table is not all zeros)
    assert (
        max(float(r.find_elements("css selector", "td[data-p]")[1].get_attribute("data-p")) for r in rows) > 0
    )


@skip_without_chromium
def test_classes_of_top_images_count_the_images_the_latent_fired_on(real, driver):
    path, data, st, *_ = real
    entry = data["saes"][0]
    n_top = st.class_counts.sum(1)
    fewer = [f for f in entry["live"] if 0 < n_top[f] < st.n_assoc]
    full = [f for f in entry["live"] if n_top[f] == st.n_assoc]
    assert fewer and full and st.n_assoc == 32
    fresh(driver, path)
    for f in (fewer[0], full[0]):
        js(driver, "explorer.open('base s0', arguments[0])", f)
        n = int(n_top[f])
        want = f"Classes of top {n} image{'s' if n > 1 else ''}"
        assert driver.find_element("css selector", "#classes h3").text.lower() == want.lower()
        svg = driver.execute_async_script(
            "const done = arguments[arguments.length - 1]; explorer.cardSvg('base s0', arguments[0]).then(done);",
            f,
        )
        assert f">classes of the top {n} image" in svg


def search(driver, query: str) -> list[int]:
    box = driver.find_element("css selector", "#search")
    box.clear()
    box.send_keys(query)
    return js(driver, "return explorer.visibleIds()")


@skip_without_chromium
def test_a_label_from_corrupted_images_is_marked_and_searchable(real, driver):
    """A latent that fires only on the corrupted images is labelled from its top corrupted images: the label is
    marked "(corrupted images)" in the index, the panel, a matched latent's line and the card, and a search finds
    it by its label (and "corrupted images" finds exactly the latents labelled so); a clean label has no mark."""
    path, data, st, *_ = real
    entry = data["saes"][0]
    live = np.asarray(entry["live"])
    assert [data["effect_bases"][b] for b in entry["label_set"]] == st.label_set[live].tolist()
    assert entry["label"] == [st.label[g] for g in live]  # the plain label; the page adds the mark
    f = _corrupted_only(st)
    assert st.label_set[f] == "corrupted" and st.label[f] != "-"
    shown = f"{st.label[f]} (corrupted images)"
    assert st.shown_label(f) == shown
    marked = sorted(live[st.label_set[live] == "corrupted"].tolist())
    assert len(marked) >= 2
    fresh(driver, path, f"#sae=base+s0&f={f}")
    label = driver.find_element("css selector", "#label")
    assert label.text == shown and label.get_attribute("data-set") == "corrupted"
    tag = label.find_element("css selector", ".lset")
    assert tag.text == "(corrupted images)" and "never fires on a clean image" in tag.get_attribute("title")
    # the index row: the same text, the mark as a tag
    cell = driver.find_element("css selector", f'#spacer .row[data-feature="{f}"]').find_elements(
        "css selector", "div"
    )[3]
    assert cell.get_attribute("textContent") == shown and cell.get_attribute("title") == shown
    assert cell.find_elements("css selector", ".lset")
    # search: by its label's class association, by the whole shown label, and by the mark
    assert f in search(driver, st.label_class[f].lower())
    assert f in search(driver, shown.upper())
    assert sorted(search(driver, "corrupted images")) == marked
    assert search(driver, "(corrupted images)") and f in search(driver, "(corrupted images)")
    # a clean label: no mark, not found by the mark
    clean = int(live[np.argmax(st.density[live])])
    assert st.label_set[clean] == "clean" and clean not in marked
    search(driver, "")
    js(driver, "explorer.open('base s0', arguments[0])", clean)
    label = driver.find_element("css selector", "#label")
    assert label.text == st.label[clean] and label.get_attribute("data-set") == "clean"
    assert not label.find_elements("css selector", ".lset")
    assert collect(driver).console_errors == []


@skip_without_chromium
def test_an_older_page_keeps_the_unlabelled_corrupted_only_latents(real, driver, tmp_path):
    """A mechvit-explorer/5 page (no label_set; a latent that fires only on corrupted images was labelled "-" with
    no class counts) still opens: such a latent reads "-", with no mark and no classes; clean labels unchanged."""
    path, data, st, *_ = real
    f = _corrupted_only(st)
    entry = dict(data["saes"][0])
    only = [i for i, g in enumerate(entry["live"]) if st.label_set[g] == "corrupted"]
    del entry["label_set"]
    entry["label"] = ["-" if i in only else v for i, v in enumerate(entry["label"])]
    entry["class_counts"] = [[0] * 10 if i in only else v for i, v in enumerate(entry["class_counts"])]
    v5 = {**data, "format": "mechvit-explorer/5", "saes": [entry]}
    v5_path = tmp_path / "v5.html"
    v5_path.write_text(explorer_html(v5), encoding="utf-8")
    fresh(driver, v5_path, f"#sae=base+s0&f={f}")
    label = driver.find_element("css selector", "#label")
    assert label.text == "-" and label.get_attribute("data-set") == "none"
    assert driver.find_element("css selector", "#classes").text.endswith(
        "none: never active on the clean images"
    )
    assert search(driver, "corrupted images") == []
    assert search(driver, "-") and f in search(driver, "-")
    clean = int(st.live[np.argmax(st.density[st.live])])
    search(driver, "")
    js(driver, "explorer.open('base s0', arguments[0])", clean)
    label = driver.find_element("css selector", "#label")
    assert label.text == st.label[clean] and label.get_attribute("data-set") == "clean"
    svg = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; explorer.cardSvg('base s0', arguments[0]).then(done);",
        f,
    )
    assert 'class="l">-</text>' in svg and ">classes of the top images<" in svg
    assert collect(driver).console_errors == []


@skip_without_chromium
def test_card_images_fit_the_card_at_k_8(real, driver):
    """k = 8 (write_explorer's and `mechvit explore`'s default): the page's card shows 6 images, all inside its
    720 px width with its 16 px margins."""
    path, data, st, *_ = real
    assert data["saes"][0]["k"] == 8
    f = int(
        next(
            g
            for g in st.live[np.argsort(-st.density[st.live], kind="stable")]
            if (st.top_idx[g] >= 0).sum() >= 6
        )
    )
    fresh(driver, path)
    svg = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; explorer.cardSvg('base s0', arguments[0]).then(done);",
        f,
    )
    width = int(re.search(r'<svg[^>]* width="(\d+)"', svg).group(1))
    boxes = [(float(x), float(w)) for x, w in re.findall(r'<image x="([\d.]+)" y="74" width="([\d.]+)"', svg)]
    assert width == 720 and len(boxes) == 6
    assert boxes[0][0] == 16 and all(x + w <= width - 16 for x, w in boxes), boxes
    assert all(b[0] - (a[0] + a[1]) >= 8 for a, b in zip(boxes, boxes[1:], strict=False))  # no overlap
    # rasterised, the last image's heatmap/picture ends inside the card: the right margin stays white
    png = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; explorer.cardPng(arguments[0], 96).then(done);", svg
    )
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))) as im:
        px = np.asarray(im.convert("RGB"), dtype=int)
    top, bottom = 74, 74 + int(boxes[0][1])
    assert (px[top:bottom, width - 12 :] == 255).all()  # nothing drawn in the last 12 px
    assert (px[top:bottom, int(boxes[-1][0]) : int(boxes[-1][0] + boxes[-1][1])] != 255).any()


@skip_without_chromium
def test_an_older_page_shows_an_effect_at_a_clean_mean_of_zero_as_not_measured(real, driver, tmp_path):
    """Pages written before effect_basis computed every effect at the clean mean activation, 0 for a latent
    that never fires on a clean token: the page shows "not measured" instead of its all-zero bars."""
    path, data, st, *_ = real
    f = _corrupted_only(st)
    old = {**data, "saes": [dict(data["saes"][0])]}
    del old["effect_bases"], old["saes"][0]["effect_basis"], old["saes"][0]["mean_act_c"]
    del old["saes"][0]["ablation_set"]
    old_path = tmp_path / "old.html"
    old_path.write_text(explorer_html(old), encoding="utf-8")
    fresh(driver, old_path, f"#sae=base+s0&f={f}")
    panel = driver.find_element("css selector", "#logit-effect")
    assert panel.get_attribute("data-basis") == "none" and not panel.find_elements("css selector", "svg")
    assert (
        driver.find_element("css selector", "#logit-note").text
        == "not measured (never fires on clean images)"
    )
    # nor was its ablation (older pages measured it on clean top images only): "not measured", not a table of 0%
    assert no_ablation_table(driver).startswith(
        "not measured (this page (before mechvit-explorer/5) measured"
    )
    clean = int(st.live[np.argmax(st.density[st.live])])
    js(driver, "explorer.open('base s0', arguments[0])", clean)
    assert driver.find_element("css selector", "#logit-effect").get_attribute("data-basis") == "clean"
    assert driver.find_element("css selector", "#ablation").get_attribute("data-set") == "clean"
    assert collect(driver).console_errors == []


def no_ablation_table(driver) -> str:
    """The ablation panel's text where it holds no table (asserted), and no percentage."""
    panel = driver.find_element("css selector", "#ablation")
    assert panel.get_attribute("data-set") == "none" and not panel.find_elements("css selector", "tr")
    assert "%" not in panel.text
    return panel.text


@skip_without_chromium
def test_an_ablation_that_was_not_measured_says_so(real, driver, tmp_path):
    """A format-4 page (effect_basis, no ablation_set) measured no ablation for a latent that never fires on a
    clean image; a listed latent whose ablation_set is "none": "not measured", never a row of 0%."""
    path, data, st, *_ = real
    f = _corrupted_only(st)
    i = data["saes"][0]["live"].index(f)
    v4 = {**data, "format": "mechvit-explorer/4", "saes": [dict(data["saes"][0])]}
    del v4["saes"][0]["ablation_set"]
    v4_path = tmp_path / "v4.html"
    v4_path.write_text(explorer_html(v4), encoding="utf-8")
    fresh(driver, v4_path, f"#sae=base+s0&f={f}")
    assert driver.find_element("css selector", "#logit-effect").get_attribute("data-basis") == "corrupted"
    assert no_ablation_table(driver).startswith("not measured (this page (before mechvit-explorer/5)")
    assert driver.find_elements("css selector", "#topimgs-c figure")  # its images are still shown
    # a latent whose ablation was not measured (ablation_set "none", e.g. never firing): said so
    clean = int(st.live[np.argmax(st.density[st.live])])
    none = {**data, "saes": [dict(data["saes"][0])]}
    sets = list(none["saes"][0]["ablation_set"])
    c = none["saes"][0]["live"].index(clean)
    sets[c] = sets[i] = data["effect_bases"].index("none")
    none["saes"][0]["ablation_set"] = sets
    none_path = tmp_path / "none.html"
    none_path.write_text(explorer_html(none), encoding="utf-8")
    for g in (clean, f):
        fresh(driver, none_path, f"#sae=base+s0&f={g}")
        assert no_ablation_table(driver) == "not measured (its effects were not computed)"
    assert collect(driver).console_errors == []


# ---- a synthetic page (controlled numbers): 2 models x 2 replicates -----------------------------------------

D_SAE = 300
# density -> what the page shows: always a percentage (two decimals from 0.1%, two significant digits below)
DENSITIES = {0: (4.1e-5, "0.0041%"), 1: (0.00123, "0.12%"), 2: (0.608, "60.80%"), 3: (9.0e-4, "0.090%"),
             4: (0.000999, "0.10%"), 5: (2.04e-6, "0.00020%"), 6: (1.0, "100.00%")}  # fmt: skip
BAGS = {10: "Bag 100% · centre", 11: "Bag 62% · centre", 12: "Bag 9% · centre"}
SAES = [
    ("base · r0", "base", 0),
    ("base · r1", "base", 1),
    ("blur4 · r0", "blur4", 0),
    ("blur4 · r1", "blur4", 1),
]


def synthetic(seed: int, n: int = 20, k: int = 3, grid: int = 4) -> FeatureStats:
    rng = np.random.default_rng(seed)
    F, C = D_SAE, len(CLASSES)
    density = rng.uniform(0.002, 0.3, F)
    for f, (d, _) in DENSITIES.items():
        density[f] = d
    label = [f"{CLASSES[f % C]} {50 + f % 50}% · top-left" for f in range(F)]
    for f, text in BAGS.items():
        label[f] = text
    maps = rng.random((F, k, grid, grid))
    return FeatureStats(
        hook=HOOK, grid=(grid, grid), n_images=n, n_corrupted=0, density=density, density_corrupted=None,
        mean_act=rng.gamma(2, 1, F), max_act=maps.max((1, 2, 3)), hist=rng.integers(0, 5, (F, 6)),
        top_idx=rng.integers(0, n, (F, k)), top_val=rng.random((F, k)), top_maps=maps, top_idx_corrupted=None,
        top_val_corrupted=None, top_maps_corrupted=None, class_counts=rng.multinomial(8, np.full(C, 0.1), F),
        location=rng.random((F, grid, grid)), label=label, label_class=label, label_where=label,
        logit_effect=rng.normal(0, 1, (F, C)), probs=rng.dirichlet(np.ones(C), n),
        probs_ablate=rng.dirichlet(np.ones(C), (F, k)), probs_double=rng.dirichlet(np.ones(C), (F, k)), n_assoc=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    saes = [ExplorerSAE(name, random_sae(HOOK, d_sae=D_SAE, seed=s), m, condition="mix", seed=r)
            for s, (name, m, r) in enumerate(SAES)]  # fmt: skip
    stats = {name: synthetic(s) for s, (name, _, _) in enumerate(SAES)}
    g = torch.Generator().manual_seed(0)
    data, _ = explorer_data(
        saes, {"base": None, "blur4": None}, torch.rand(20, 1, 28, 28, generator=g), torch.arange(20) % 10,
        CLASSES, stats=stats, progress=False,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("explorer_synth") / "features.html"
    path.write_text(explorer_html(data), encoding="utf-8")
    return path, data


def sae_button(driver, name):
    return next(b for b in driver.find_elements("css selector", "#saes button") if b.text == name)


@skip_without_chromium
def test_density_is_always_a_percentage(synth, driver):
    path, data = synth
    fresh(driver, path)
    assert js(driver, "return [0, null].map(explorer.fmtDensity)") == ["0%", "–"]
    for d, text in DENSITIES.values():
        assert js(driver, "return explorer.fmtDensity(arguments[0])", d) == text, (d, text)
    # in the index (sorted by density, ascending: the smallest come first), the panel and the card
    driver.find_element("css selector", '#thead [data-sort="density"]').click()
    driver.find_element("css selector", '#thead [data-sort="density"]').click()
    cells = {
        int(r.get_attribute("data-feature")): r.find_elements("css selector", "div")[1].text
        for r in driver.find_elements("css selector", "#spacer .row")
    }
    for f in (5, 0, 3, 4):
        assert cells[f] == DENSITIES[f][1]
    assert all(re.fullmatch(r"\d+(\.\d+)?%", t) for t in cells.values()), cells
    js(driver, "explorer.open('base · r0', 0)")
    assert stat_values(driver)["density"][1] == "0.0041%"
    svg = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; explorer.cardSvg('base · r0', 0).then(done);"
    )
    assert "density 0.0041% ·" in svg
    driver.find_element("css selector", '#thead [data-sort="id"]').click()


# ---- the page's numbers on the study's rounding rule (mechvit._numbers) -------------------------------------

# (function, arguments, text): half up on the decimal value, as mechvit._numbers; toFixed/toPrecision round the
# binary value (1.005 is 1.00499999..., 0.9065 * 100 is 90.64999999999999) and print "-0.000"
KNOWN = [
    ("fmtFixed", (0.5625, 1, 100), "56.3"), ("fmtFixed", (0.125, 2), "0.13"), ("fmtFixed", (-2.5, 0), "-3"),
    ("fmtFixed", (9.995, 2), "10.00"), ("fmtFixed", (1.005, 2), "1.01"), ("fmtFixed", (0.0004, 3), "0.000"),
    ("fmtFixed", (-0.0004, 3), "0.000"), ("fmtFixed", (-0.0, 2), "0.00"), ("fmtFixed", (0.9065, 1, 100), "90.7"),
    ("fmtFixed", (0.9065 * 100, 1), "90.7"), ("fmtFixed", (0.9065 - 0.851, 4), "0.0555"),
    ("fmtFixed", (-1.005, 2), "-1.01"), ("fmtFixed", (1e21, 0), "1000000000000000000000"),
    ("fmtFixed", (1.5e-300, 2), "0.00"), ("fmtFixed", (123456.5, 0), "123457"), ("fmtFixed", (2.675, 2), "2.68"),
    ("fmtSig", (9.995, 3), "10"), ("fmtSig", (2.5, 1), "3"), ("fmtSig", (0.9065, 3, 100), "90.7"),
    ("fmtSig", (1e-7, 2, 100), "1e-05"), ("fmtSig", (1.25e-7, 2), "1.3e-07"), ("fmtSig", (-0.00012345, 3), "-0.000123"),
    ("fmtSig", (123456.0, 3), "1.23e+05"), ("fmtSig", (0.0, 3), "0"), ("fmtSig", (-0.0, 3), "0"),
    ("fmtSig", (1.5e300, 2), "1.5e+300"), ("fmtSig", (5e-324, 2), "5e-324"),
]  # fmt: skip
# density -> text: two decimals from 0.1%, two significant digits below, half up
DENSITY_TIES = {0.000125: "0.013%", 0.5625: "56.25%", 0.0056255: "0.56%", 1.25e-7: "0.000013%", 1e-7: "0.000010%",
                0.00099951: "0.10%", 0.0009994: "0.10%", 0.00099949: "0.10%", 0.0009949: "0.099%"}  # fmt: skip


def _grid() -> list[float]:
    """Values over many magnitudes and both signs: ties (k / 2^n), short decimals (ties in decimal, not in binary),
    float noise around them, and plain random floats."""
    rng = np.random.default_rng(0)
    vals = [0.5625, 0.125, -2.5, 9.995, 1.005, 0.0004, -0.0004, 1e-7, 0.9065 * 100, 0.1 + 0.2, 0.9065 - 0.851,
            0.12449999999996, 99.95, 0.995, 0.045, -0.0, 0.0, 1e21, 1.5e-300, 5e-324, 123456789.125]  # fmt: skip
    for _ in range(400):
        m = 10.0 ** rng.uniform(-9, 7) * rng.choice([-1, 1])
        vals += [
            float(m),
            float(f"{m:.{rng.integers(1, 6)}g}"),
            float(rng.integers(-(10**6), 10**6) / 2.0 ** rng.integers(0, 12)),
        ]
        vals.append(float(f"{m:.3g}") * 100 / 100)  # noise of an arithmetic step
    return vals


def _density(v: float) -> str:
    """What the page shows for a density, from mechvit._numbers: the exponent of its 2-significant-digit rounding
    picks two decimals (from 0.1%) or two significant digits (below)."""
    if v <= 0:
        return "0%"
    e = Decimal(fmt_sig(v, 2, 100)).adjusted()
    return fmt_fixed(v, 2 if e >= -1 else 1 - e, 100) + "%"


@skip_without_chromium
def test_the_page_rounds_numbers_as_mechvit_numbers(synth, driver):
    path, data = synth
    fresh(driver, path)
    call = "return arguments[0].map(([f, a]) => explorer[f](...a))"
    assert js(driver, call, [[f, a] for f, a, _ in KNOWN]) == [t for *_, t in KNOWN]
    assert [(fmt_fixed if f == "fmtFixed" else fmt_sig)(*a) for f, a, _ in KNOWN] == [t for *_, t in KNOWN]
    assert js(driver, "return [null, undefined, NaN].map((v) => explorer.fmtFixed(v, 2))") == ["–"] * 3
    # the same text as mechvit._numbers on a grid of values, decimals, significant digits and scales
    cases, want = [], []
    for v in _grid():
        for scale in (1, 100):
            for d in (0, 1, 2, 3, 5):
                cases.append(["fmtFixed", [v, d, scale]])
                want.append(fmt_fixed(v, d, scale))
            for p in (1, 2, 3, 4, 12):
                cases.append(["fmtSig", [v, p, scale]])
                want.append(fmt_sig(v, p, scale))
    got = js(driver, call, cases)
    bad = [(c, g, w) for c, g, w in zip(cases, got, want, strict=True) if g != w]
    assert not bad, bad[:10]
    # densities: the known answers, the ties and the grid
    dens = [d for d, _ in DENSITIES.values()] + list(DENSITY_TIES) + [abs(v) / 1e3 for v in _grid()]
    got = js(driver, "return arguments[0].map(explorer.fmtDensity)", dens)
    assert got == [_density(v) for v in dens]
    known = [t for _, t in DENSITIES.values()] + list(DENSITY_TIES.values())
    assert got[: len(known)] == known
    # on the page: a latent whose mean activation (4 significant digits, e.g. 1.2345) toFixed(3) rounds the other
    # way, in its panel and its card
    entry = data["saes"][0]
    fixed = js(driver, "return arguments[0].map((v) => v === null ? null : v.toFixed(3))", entry["mean_act"])
    i = next(
        i
        for i, (v, t) in enumerate(zip(entry["mean_act"], fixed, strict=True))
        if v is not None and t != fmt_fixed(v, 3)
    )
    f, text = entry["live"][i], fmt_fixed(entry["mean_act"][i], 3)
    js(driver, "explorer.open(arguments[0], arguments[1])", entry["name"], f)
    assert stat_values(driver)["mean_act"][1] == text
    svg = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; explorer.cardSvg(arguments[0], arguments[1]).then(done);",
        entry["name"], f,
    )  # fmt: skip
    assert f"mean act {text} ·" in svg


@skip_without_chromium
def test_labels_sort_numerically(synth, driver):
    path, _ = synth
    fresh(driver, path)
    driver.find_element("css selector", "#search").send_keys("bag ")
    driver.find_element("css selector", '#thead [data-sort="label"]').click()
    assert js(driver, "return explorer.visibleIds()") == [12, 11, 10]  # 9% < 62% < 100%
    driver.find_element("css selector", '#thead [data-sort="label"]').click()
    assert js(driver, "return explorer.visibleIds()") == [10, 11, 12]


def _order(entry: dict, model: str, direction: int) -> list[int]:
    cos = next(m["cos"] for m in entry["matches"] if m["model"] == model)
    return [
        f for _, f in sorted(zip(cos, entry["live"], strict=True), key=lambda t: (direction * t[0], t[1]))
    ]


@skip_without_chromium
def test_a_sort_by_a_match_column_survives_a_change_of_sae(synth, driver):
    path, data = synth
    entries = {e["name"]: e for e in data["saes"]}
    fresh(driver, path, "#sae=base+%C2%B7+r0&f=7")
    driver.find_element("css selector", '#thead [data-sort="match:blur4"]').click()  # descending
    assert js(driver, "return explorer.visibleIds()") == _order(entries["base · r0"], "blur4", -1)
    # another replicate: its counterpart is blur4 · r1, its column "cos blur4" too; the sort stays
    sae_button(driver, "base · r1").click()
    assert js(driver, "return [explorer.state.sort, explorer.state.dir]") == ["match:blur4", -1]
    assert js(driver, "return explorer.visibleIds()") == _order(entries["base · r1"], "blur4", -1)
    head = driver.find_element("css selector", '#thead [data-sort="match:blur4"]')
    assert head.text == "cos blur4" and head.get_attribute("class") == "sorted"
    # following the replicate link (base · r1 -> base · r0) keeps it as well
    js(driver, "explorer.open('base · r1', 7)")
    driver.find_element("css selector", '.match[data-sae="base · r0"] a.open').click()
    assert driver.find_element("css selector", "#detail").get_attribute("data-sae") == "base · r0"
    assert js(driver, "return explorer.visibleIds()") == _order(entries["base · r0"], "blur4", -1)
    # an SAE of blur4 has no "cos blur4" column: back to the id order
    driver.find_element("css selector", '.match[data-sae="blur4 · r0"] a.open').click()
    assert js(driver, "return [explorer.state.sort, explorer.state.dir]") == ["id", 1]
    assert js(driver, "return explorer.visibleIds()") == entries["blur4 · r0"]["live"]


@skip_without_chromium
def test_keyboard_navigation_of_the_index(synth, driver):
    from selenium.webdriver.common.keys import Keys

    path, _ = synth
    fresh(driver, path, "#sae=base+%C2%B7+r0&f=0")
    lst = driver.find_element("css selector", "#list")
    assert (
        lst.get_attribute("role") == "listbox"
        and js(driver, "return document.getElementById('list').tabIndex") == 0
    )
    rows = driver.find_elements("css selector", "#spacer .row")
    assert rows and all(r.get_attribute("role") == "option" for r in rows)
    assert [r.get_attribute("data-feature") for r in rows if r.get_attribute("aria-selected") == "true"] == [
        "0"
    ]
    # Tab from the search box reaches the index
    box = driver.find_element("css selector", "#search")
    box.click()
    box.send_keys(Keys.TAB)
    assert js(driver, "return document.activeElement.id") == "list"

    def at():
        return js(
            driver,
            "return [explorer.state.feature, document.getElementById('detail').dataset.feature, location.hash]",
        )

    def visible(f):
        return js(
            driver,
            "const r = document.querySelector(`#spacer .row[data-feature='${arguments[0]}']`);"
            "if (!r) return false; const a = r.getBoundingClientRect(), b = document.getElementById('list').getBoundingClientRect();"
            "return a.top >= b.top - 0.5 && a.bottom <= b.bottom + 0.5 && r.classList.contains('sel') && r.getAttribute('aria-selected') === 'true'",
            f,
        )

    lst.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, Keys.ARROW_DOWN)
    assert at() == [3, "3", "#sae=base+%C2%B7+r0&f=3"] and visible(3)
    assert lst.get_attribute("aria-activedescendant") == "opt-3"
    lst.send_keys(Keys.ARROW_UP)
    assert at()[:2] == [2, "2"]
    lst.send_keys(Keys.END)  # the last row: rendered (virtualised list) and scrolled into view
    assert at()[:2] == [D_SAE - 1, str(D_SAE - 1)] and visible(D_SAE - 1)
    assert js(driver, "return explorer.renderedRows()") < 80
    lst.send_keys(Keys.ARROW_DOWN)  # stays on the last
    assert at()[0] == D_SAE - 1
    lst.send_keys(Keys.PAGE_UP)
    page = js(driver, "return Math.max(1, Math.floor(document.getElementById('list').clientHeight / 24) - 1)")
    assert at()[0] == D_SAE - 1 - page and visible(D_SAE - 1 - page)
    lst.send_keys(Keys.HOME)
    assert at()[0] == 0 and visible(0) and js(driver, "return document.getElementById('list').scrollTop") == 0
    # a search, then Enter: the first match opens (the open latent is not among them)
    box.send_keys("bag", Keys.ENTER)
    assert js(driver, "return document.activeElement.id") == "list"
    assert at()[0] == 10 and js(driver, "return explorer.visibleIds()") == [10, 11, 12]
    lst.send_keys(Keys.ARROW_DOWN, Keys.ENTER)
    assert at()[0] == 11
    js(driver, "arguments[0].value = ''; arguments[0].dispatchEvent(new Event('input'))", box)
    assert collect(driver).console_errors == []


@skip_without_chromium
def test_links_open_in_an_open_page_and_bad_ones_are_refused(synth, driver):
    path, _ = synth
    fresh(driver, path, "#sae=base+%C2%B7+r0&f=5")
    assert js(driver, "return [explorer.state.sae, explorer.state.feature]") == [0, 5]
    # the hash changes in the open page (a pasted link, or a link from elsewhere in the page)
    js(driver, "location.hash = arguments[0]", "sae=" + quote("blur4 · r1") + "&f=37")
    wait_for(driver, "return explorer.state.feature === 37")
    detail = driver.find_element("css selector", "#detail")
    assert detail.get_attribute("data-sae") == "blur4 · r1" and detail.get_attribute("data-feature") == "37"
    assert driver.find_element("css selector", "#saes button.on").text == "blur4 · r1"
    assert driver.find_elements("css selector", '#spacer .row.sel[data-feature="37"]')
    js(driver, "location.hash = 'f=12'")  # no SAE: the one shown
    wait_for(driver, "return explorer.state.feature === 12")
    assert detail.get_attribute("data-sae") == "blur4 · r1"
    # a latent that is not a whole number: refused, with a message; the page stays where it was
    for bad in ("abc", "1.5", "-3", ""):
        js(driver, "location.hash = arguments[0]", "sae=" + quote("base · r0") + "&f=" + bad)
        wait_for(driver, "return !!document.getElementById('notice')")
        msg = driver.find_element("css selector", "#notice").text
        assert f"“{bad}” is not a latent number" in msg and "still showing blur4 · r1 · latent #12" in msg
        assert js(driver, "return [explorer.state.sae, explorer.state.feature]") == [3, 12]
        assert "NaN" not in detail.text
        js(driver, "explorer.open('blur4 · r1', 12)")  # clears the message
        assert not driver.find_elements("css selector", "#notice")
    js(driver, "location.hash = 'sae=nope&f=3'")
    wait_for(driver, "return !!document.getElementById('notice')")
    assert "this page has no SAE named “nope”" in driver.find_element("css selector", "#notice").text
    # on a fresh load: the SAE it names, its densest latent, and the message
    fresh(driver, path, "#sae=blur4+%C2%B7+r0&f=abc")
    assert js(driver, "return [explorer.state.sae, explorer.state.feature]") == [2, 6]  # density 1.0
    msg = driver.find_element("css selector", "#notice").text
    assert "“abc” is not a latent number" in msg and "showing blur4 · r0 · latent #6" in msg
    assert "NaN" not in driver.find_element("css selector", "#detail").text
    assert collect(driver).console_errors == []
