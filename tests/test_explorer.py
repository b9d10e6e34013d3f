"""The feature explorer page: its embedded data against the Python computation, and the page itself driven in
headless Chromium (tests/browser.py): loads offline without console errors, lists, searches and sorts every
live latent, and shows the numbers Python computed."""

import base64
import copy
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mechvit.analysis.features import decoder_directions, nearest_cosine
from mechvit.viz.explorer import ExplorerSAE, explorer_array, write_explorer
from tests.browser import (
    broken_images,
    broken_links,
    chromium,
    collect,
    open_page,
    screenshot,
    skip_without_chromium,
)
from tests.test_analysis_features import CLASSES, random_sae, tiny_model

HOOK = "blocks.0.hook_resid_post"


def page_data(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', text, re.S)
    assert m, "no embedded data"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tiny_model(0)
    ft = fine_tuned(base)
    saes = [
        ExplorerSAE("base s0", random_sae(HOOK, seed=0), "base", condition="noise", seed=0),
        ExplorerSAE("base s1", random_sae(HOOK, seed=1), "base", condition="noise", seed=1),
        ExplorerSAE("ft s0", random_sae(HOOK, seed=2), "ft", condition="noise", seed=0),
    ]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(40, 1, 28, 28, generator=g)
    labels = torch.arange(40) % 10
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    out = tmp_path_factory.mktemp("explorer")
    from mechvit.viz.explorer import explorer_data

    _, stats = explorer_data(
        saes,
        {"base": base, "ft": ft},
        images,
        labels,
        CLASSES,
        corrupted=corrupted,
        k=4,
        n_assoc=8,
        progress=False,
    )
    path = write_explorer(
        out,
        saes,
        {"base": base, "ft": ft},
        images,
        labels,
        CLASSES,
        corrupted=corrupted,
        corrupted_name="noise",
        k=4,
        n_assoc=8,
        cards=1,
        progress=False,
        stats=stats,
    )
    return path, saes, stats, images, labels


def test_page_data_matches_the_python_computation(built):
    path, saes, stats, *_ = built
    data = page_data(path)
    assert path.name == "features.html" and [s["name"] for s in data["saes"]] == [s.name for s in saes]
    dirs = {s.name: decoder_directions(s.sae) for s in saes}
    for entry, spec in zip(data["saes"], saes, strict=True):
        st = stats[spec.name]
        live = st.live
        assert entry["live"] == live.tolist() and entry["d_sae"] == st.d_sae
        np.testing.assert_allclose(entry["density"], st.density[live], rtol=1e-3)
        assert entry["top"] == st.top_idx[live].tolist()
        assert entry["label"] == [st.label[f] for f in live]
        assert data["map_bits"] == 4
        for key, want in (("maps", st.top_maps), ("maps_c", st.top_maps_corrupted)):
            q = explorer_array(data, entry, key).reshape(len(live), 4, 4, 4)
            maps = q / 255 * st.max_act[live][:, None, None, None]
            # 16 levels of each latent's max (half a level off; a patch where it fires reads at least level 1)
            np.testing.assert_allclose(maps, want[live], atol=float(st.max_act.max()) / 15 + 1e-6)
            assert ((q > 0) == (want[live] > 0)).all()
        assert data["prob_max"] == 65535
        for key, want in (("p_abl", st.probs_ablate), ("p_dbl", st.probs_double)):
            got = explorer_array(data, entry, key).reshape(len(live), 4, 10)
            np.testing.assert_allclose(got, want[live], atol=0.5 / 65535 + 1e-7)
        logit = explorer_array(data, entry, "logit").reshape(len(live), -1)
        np.testing.assert_allclose(
            logit, st.logit_effect[live], atol=np.abs(st.logit_effect[live]).max() / 65534
        )
        # a latent that never fires on a clean token: mean activation None (shown "–"), its mean on the
        # corrupted tokens, and the basis of its direct logit effect
        assert entry["mean_act"] == [
            None if np.isnan(v) else pytest.approx(v, rel=1e-3) for v in st.mean_act[live]
        ]
        np.testing.assert_allclose(
            np.array(entry["mean_act_c"], dtype=float), st.mean_act_corrupted[live], rtol=1e-3
        )  # None -> NaN where it never fires on a corrupted token
        assert [data["effect_bases"][b] for b in entry["effect_basis"]] == st.effect_basis[live].tolist()
        # the ablate/double probabilities are on the clean top images, or on the corrupted ones for a latent that
        # never fires on a clean token
        assert [data["effect_bases"][b] for b in entry["ablation_set"]] == st.ablation_set[live].tolist()
        assert (st.ablation_set[live] == st.effect_basis[live]).all()
        # the images each label comes from (its top corrupted ones for a latent that never fires on a clean token)
        assert [data["effect_bases"][b] for b in entry["label_set"]] == st.label_set[live].tolist()
        assert entry["class_counts"] == st.class_counts[live].tolist()
    probs = explorer_array(data, data["models"]["base"], "probs").reshape(-1, 10)
    np.testing.assert_allclose(probs, stats["base s0"].probs, atol=0.5 / 65535 + 1e-7)
    probs_c = explorer_array(data, data["models"]["base"], "probs_c").reshape(-1, 10)  # "before" on corrupted
    np.testing.assert_allclose(probs_c, stats["base s0"].probs_corrupted, atol=0.5 / 65535 + 1e-7)
    # counterparts (other model, same condition and seed) and seed replicates (same model and condition)
    assert data["format"] == "mechvit-explorer/6" and data["effect_bases"] == ["clean", "corrupted", "none"]
    assert any("corrupted" in st.effect_basis[st.live] for st in stats.values())  # the case is covered
    b0, b1, f0 = data["saes"]
    assert [m["sae"] for m in b0["matches"]] == ["ft s0"] and [m["sae"] for m in b0["replicates"]] == [
        "base s1"
    ]
    assert [m["sae"] for m in b1["matches"]] == ["ft s0"] and [m["sae"] for m in f0["matches"]] == ["base s0"]
    assert f0["stability"] is None and f0["replicates"] == []
    live0 = stats["base s0"].live
    idx, cos = nearest_cosine(dirs["base s0"][live0], dirs["ft s0"])
    assert b0["matches"][0]["idx"] == idx.tolist()
    np.testing.assert_allclose(b0["matches"][0]["cos"], cos, rtol=1e-3)
    _, cos_rep = nearest_cosine(dirs["base s0"][live0], dirs["base s1"])
    np.testing.assert_allclose(b0["stability"], cos_rep, rtol=1e-3)  # one replicate: the mean is its cosine


def fine_tuned(base):
    ft = copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ft


def test_shared_model_activations_change_nothing(built):
    """explorer_data computes each model's activations once for all its SAEs (feature_stats(cache=...)): the
    second replicate's stats, and the other model's, equal a computation of their own."""
    from mechvit.analysis.features import feature_stats

    _, saes, stats, images, labels = built
    g = torch.Generator().manual_seed(1)  # the fixture's images, then its corrupted images
    assert torch.equal(torch.rand(images.shape, generator=g), images)
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    base = tiny_model(0)
    for spec, model in ((saes[1], base), (saes[2], fine_tuned(base))):
        alone = feature_stats(
            model, spec.sae, images, labels, CLASSES, corrupted=corrupted, k=4, n_assoc=8, progress=False
        )
        shared = stats[spec.name]
        for name in (
            "density", "mean_act", "top_idx", "top_maps", "top_idx_corrupted", "hist", "logit_effect", "probs",
            "probs_ablate", "probs_double", "probs_corrupted",
        ):  # fmt: skip
            np.testing.assert_allclose(
                getattr(shared, name),
                getattr(alone, name),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{spec.name} {name}",
            )
        assert shared.label == alone.label


def test_page_is_self_contained_and_cards_are_written(built):
    path, saes, stats, *_ = built
    text = path.read_text(encoding="utf-8")
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    # the exported card's SVG namespace is a name, not a request
    no_ns = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in no_ns and "https://" not in no_ns and '<link rel="stylesheet"' not in text
    assert re.search(r"<script[^>]+src=", text) is None
    data = page_data(path)
    for entry in data["saes"]:
        (f, card), *rest = entry["cards"].items()
        assert not rest
        assert int(f) == int(
            stats[entry["name"]].live[np.argmax(stats[entry["name"]].density[stats[entry["name"]].live])]
        )
        for key in ("png", "svg"):
            assert (path.parent / card[key]).is_file()


def test_bad_arguments_are_refused(built, tmp_path):
    _, saes, _, images, labels = built
    models = {"base": tiny_model(0), "ft": tiny_model(1)}
    with pytest.raises(ValueError, match="unique"):
        write_explorer(tmp_path, [saes[0], saes[0]], models, images, labels, CLASSES, progress=False)
    with pytest.raises(ValueError, match="not among the models"):
        write_explorer(tmp_path, [ExplorerSAE("x", saes[0].sae, "nope")], models, images, labels, CLASSES)
    with pytest.raises(ValueError, match="corrupted_labels"):
        write_explorer(
            tmp_path, saes[:1], models, images, labels, CLASSES, corrupted=images[:5], progress=False
        )
    assert not (tmp_path / "features.html").exists()


# ---- in the browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(built):
    path = built[0]
    with chromium() as driver:
        page = open_page(driver, path, ready="body[data-ready]")
        yield driver, page


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def show(driver, sae_index: int, query: str = ""):
    driver.find_elements("css selector", "#saes button")[sae_index].click()
    box = driver.find_element("css selector", "#search")
    js(
        driver, "arguments[0].value = ''; arguments[0].dispatchEvent(new Event('input'))", box
    )  # clear() fires no event
    if query:
        box.send_keys(query)  # typed, as a user would


@skip_without_chromium
def test_loads_offline_without_console_errors(browser):
    driver, page = browser
    assert page.console_errors == []
    assert page.network == [], page.network
    assert any(u.startswith("file://") for u in page.requests)
    assert broken_images(driver) == []
    assert js(driver, "return document.querySelectorAll('#detail figure.topimg').length") > 0


@skip_without_chromium
def test_index_lists_every_live_feature_of_every_sae(browser, built):
    driver, _ = browser
    _, saes, stats, *_ = built
    for i, spec in enumerate(saes):
        show(driver, i)
        live = stats[spec.name].live.tolist()
        assert sorted(js(driver, "return explorer.visibleIds()")) == live
        assert js(driver, "return document.getElementById('count').textContent").startswith(
            f"{len(live)} of {len(live)} live"
        )
        # virtualised: scrolling to the end renders the last row
        js(driver, "const l = document.getElementById('list'); l.scrollTop = l.scrollHeight;")
        driver.implicitly_wait(0)
        last = js(driver, "return explorer.visibleIds().at(-1)")
        assert driver.find_elements("css selector", f'#spacer .row[data-feature="{last}"]')
    assert collect(driver).console_errors == []


@skip_without_chromium
def test_search_and_sort(browser, built):
    driver, _ = browser
    _, saes, stats, *_ = built
    st = stats["base s0"]
    live = st.live
    f = int(live[len(live) // 2])
    show(driver, 0, f"#{f}")
    assert js(driver, "return explorer.visibleIds()") == [f]
    word = st.label[int(live[0])].split(" ")[0].lower()
    show(driver, 0, word)
    want = sorted(int(g) for g in live if word in st.label[g].lower())
    assert sorted(js(driver, "return explorer.visibleIds()")) == want and want
    show(driver, 0, "")
    header = driver.find_element("css selector", '#thead [data-sort="density"]')
    header.click()  # first click on a numeric column: descending
    dens = np.array([float(f"{v:.4g}") for v in st.density[live]])
    desc = live[np.lexsort((live, -dens))].tolist()
    assert js(driver, "return explorer.visibleIds()") == desc
    driver.find_element("css selector", '#thead [data-sort="density"]').click()
    asc = live[np.lexsort((live, dens))].tolist()
    assert js(driver, "return explorer.visibleIds()") == asc
    driver.find_element("css selector", '#thead [data-sort="id"]').click()


def _expected_order(data_entry: dict, key: str, direction: int) -> list[int]:
    """The live ids sorted as the index must sort them: by the column's value (nulls last), ties by id."""
    live = data_entry["live"]
    if key == "id":
        vals = live
    elif key.startswith("match:"):
        vals = next(m["cos"] for m in data_entry["matches"] if m["model"] == key[6:])  # keyed by model
    else:
        vals = data_entry[key]
    nulls = [f for f, v in zip(live, vals, strict=True) if v is None]
    rest = sorted(
        ((v, f) for f, v in zip(live, vals, strict=True) if v is not None),
        key=lambda t: (direction * t[0], t[1]),
    )
    return [f for _, f in rest] + nulls


@skip_without_chromium
def test_sort_by_every_column(browser, built):
    """id, density, mean activation, label, seed stability and the matched cosine to each other model's SAE
    (change under fine-tuning): first click sorts (ids and labels ascending, numbers descending), the second
    reverses."""
    driver, _ = browser
    path, *_ = built
    data = page_data(path)
    entry = data["saes"][0]  # base s0: has replicates (stability) and a counterpart (ft s0)
    show(driver, 0, "")
    keys = [e.get_attribute("data-sort") for e in driver.find_elements("css selector", "#thead [data-sort]")]
    assert keys == ["id", "density", "mean_act", "label", "stability", "match:ft"]
    names = [e.text for e in driver.find_elements("css selector", "#thead [data-sort]")]
    assert names[-2:] == ["seed stab.", "cos ft"]
    for key in keys:
        if key == "id":  # already sorted by id ascending: the first click reverses
            driver.find_element("css selector", '#thead [data-sort="mean_act"]').click()
        for direction in (1, -1) if key in ("id", "label") else (-1, 1):
            driver.find_element("css selector", f'#thead [data-sort="{key}"]').click()
            got = js(driver, "return explorer.visibleIds()")
            if key == "label":  # the browser's locale collation: check the shown labels are in order
                labels = [entry["label"][entry["live"].index(f)] for f in got]
                ordered = js(
                    driver,
                    "const l = arguments[0], d = arguments[1];"
                    "return l.every((x, i) => i === 0 || d * l[i - 1].localeCompare(x, undefined, {numeric: true}) <= 0)",
                    labels,
                    direction,
                )
                assert ordered and sorted(got) == entry["live"], (key, direction)
            else:
                assert got == _expected_order(entry, key, direction), (key, direction)
            assert driver.find_element("css selector", f'#thead [data-sort="{key}"]').get_attribute(
                "class"
            ) == ("sorted asc" if direction > 0 else "sorted")
    # search keeps the sort: the filtered ids in the same order
    word = entry["label"][0].split(" ")[0].lower()
    box = driver.find_element("css selector", "#search")
    box.send_keys(word)
    want = [
        f
        for f in _expected_order(entry, keys[-1], 1)
        if word in entry["label"][entry["live"].index(f)].lower()
    ]
    assert js(driver, "return explorer.visibleIds()") == want and want
    show(driver, 0, "")
    driver.find_element("css selector", '#thead [data-sort="id"]').click()


def _feature_with_images(st, k_min=2):
    for f in st.live[np.argsort(-st.density[st.live], kind="stable")]:
        if (st.top_idx[f] >= 0).sum() >= k_min and (st.top_idx_corrupted[f] >= 0).sum() >= 1:
            return int(f)
    raise AssertionError("no latent with images")


@skip_without_chromium
def test_clicking_a_feature_shows_its_images_numbers_and_ablation(browser, built, tmp_path):
    driver, _ = browser
    _, saes, stats, images, labels = built
    st = stats["base s0"]
    f = _feature_with_images(st)
    show(driver, 0, f"#{f}")
    driver.find_element("css selector", f'#spacer .row[data-feature="{f}"]').click()
    detail = driver.find_element("css selector", "#detail")
    assert detail.get_attribute("data-feature") == str(f) and detail.get_attribute("data-sae") == "base s0"
    shown = [
        int(e.get_attribute("data-image")) for e in driver.find_elements("css selector", "#topimgs figure")
    ]
    assert shown == [int(i) for i in st.top_idx[f] if i >= 0]
    vals = [
        float(e.get_attribute("data-value")) for e in driver.find_elements("css selector", "#topimgs figure")
    ]
    np.testing.assert_allclose(vals, st.top_val[f][: len(vals)], rtol=1e-3)
    stat = {
        e.get_attribute("data-key"): float(e.get_attribute("data-value"))
        for e in driver.find_elements("css selector", "#detail .stat")
    }
    assert stat["density"] == pytest.approx(float(st.density[f]), rel=1e-3)
    assert stat["mean_act"] == pytest.approx(float(st.mean_act[f]), rel=1e-3)
    assert stat["max_act"] == pytest.approx(float(st.max_act[f]), rel=1e-3)
    assert driver.find_element("css selector", "#label").text == st.label[f]
    # the heatmap is drawn: the canvas of the top image is not uniform
    var = js(
        driver,
        "const c = document.querySelector('#topimgs canvas'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let s = 0, s2 = 0;"
        "for (let i = 0; i < d.length; i += 4) { s += d[i + 1]; s2 += d[i + 1] * d[i + 1]; }"
        "const n = d.length / 4; return s2 / n - (s / n) ** 2;",
    )
    assert var > 10
    # ablation panel: before = the model's probabilities, ablated / doubled = the precomputed ones
    rows = driver.find_elements("css selector", "#ablation tr[data-image]")
    assert [int(r.get_attribute("data-image")) for r in rows] == shown
    for r in rows:
        i, j = int(r.get_attribute("data-image")), int(r.get_attribute("data-j"))
        before, abl, dbl = r.find_elements("css selector", "td[data-p]")
        pred = int(before.get_attribute("data-pred"))
        tol = 1e-5  # uint16 in the page, 5 decimals in the table's data-p
        assert float(before.get_attribute("data-p")) == pytest.approx(float(st.probs[i, pred]), abs=tol)
        assert float(abl.get_attribute("data-p")) == pytest.approx(
            float(st.probs_ablate[f, j, pred]), abs=tol
        )
        assert float(dbl.get_attribute("data-p")) == pytest.approx(
            float(st.probs_double[f, j, pred]), abs=tol
        )
    # the row below: the top images among the corrupted ones
    shown_c = [
        int(e.get_attribute("data-image")) for e in driver.find_elements("css selector", "#topimgs-c figure")
    ]
    assert shown_c == [int(i) for i in st.top_idx_corrupted[f] if i >= 0]
    assert {
        e.get_attribute("data-set") for e in driver.find_elements("css selector", "#topimgs-c figure")
    } == {"corrupted"}
    head = driver.find_element("css selector", ".imgrow[data-set=corrupted] .rowhead")
    assert head.text == "corrupted" and head.get_attribute("title") == "noise"  # the corrupted set's name
    # the matched latent of the fine-tuned model's SAE, side by side, and a link that opens it
    data = js(driver, "return explorer.data.saes[0].matches[0]")
    pos = int(np.searchsorted(st.live, f))
    block = driver.find_element("css selector", '.match[data-sae="ft s0"]')
    assert int(block.get_attribute("data-feature")) == data["idx"][pos]
    assert float(block.get_attribute("data-cos")) == pytest.approx(data["cos"][pos])
    assert broken_links(driver, built[0]) == []  # the feature card links (when this latent has one)
    pixels = screenshot(driver, tmp_path / "explorer.png")
    assert pixels.std() > 20  # not blank
    block.find_element("css selector", "a.open").click()
    assert detail.get_attribute("data-sae") == "ft s0"
    assert detail.get_attribute("data-feature") == str(data["idx"][pos])
    assert collect(driver).console_errors == []


@skip_without_chromium
def test_every_latent_exports_a_feature_card(browser, built, tmp_path):
    """The page draws a card of any latent (not only those with a Python-written card): an SVG with the
    latent's label and numbers and one picture per top image, and a PNG at 300 dpi (7.5 in wide)."""
    driver, _ = browser
    _, saes, stats, *_ = built
    st = stats["ft s0"]
    f = _feature_with_images(st)
    show(driver, 2, "")
    js(driver, "explorer.open('ft s0', arguments[0])", f)
    assert driver.find_element("css selector", "#card-svg-btn").is_displayed()
    assert driver.find_element("css selector", "#card-png-btn").text == "PNG 300 dpi"
    svg = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "explorer.cardSvg('ft s0', arguments[0]).then(done, (e) => done('ERROR ' + e));",
        f,
    )
    assert svg.startswith("<svg") and f"latent #{f}" in svg, svg[:200]
    label = st.label[f].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert label in svg and "density " in svg
    assert svg.count("<image ") == min(6, int((st.top_idx[f] >= 0).sum()))
    uri = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "explorer.cardSvg('ft s0', arguments[0]).then((s) => explorer.cardPng(s, 300)).then(done, (e) => done('ERROR ' + e));",
        f,
    )
    assert uri.startswith("data:image/png;base64,"), uri[:80]
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.width == round(720 * 300 / 96)
        px = np.asarray(im.convert("RGB"), dtype=float)
    assert px.std() > 20  # text, bars and images, not a blank sheet
    assert (np.abs(px[..., 0] - px[..., 2]) > 60).mean() > 0.001  # coloured heatmap / bars drawn
    # the buttons download both files
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)}
    )
    driver.find_element("css selector", "#card-svg-btn").click()
    driver.find_element("css selector", "#card-png-btn").click()
    stem = tmp_path / f"ft_s0_latent_{f}"
    for _ in range(100):
        if stem.with_suffix(".svg").is_file() and stem.with_suffix(".png").is_file():
            break
        time.sleep(0.1)
    assert stem.with_suffix(".svg").read_text(encoding="utf-8") == svg
    with Image.open(stem.with_suffix(".png")) as im:
        assert im.width == round(720 * 300 / 96)
    assert collect(driver).console_errors == []


@skip_without_chromium
def test_card_links_resolve(browser, built):
    driver, _ = browser
    path, _, stats, *_ = built
    data = page_data(path)
    f = int(next(iter(data["saes"][0]["cards"])))
    show(driver, 0, "")
    js(driver, "explorer.open('base s0', arguments[0])", f)
    assert driver.find_element("css selector", "#card-png").get_attribute("href").endswith(".png")
    assert broken_links(driver, path) == []


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists()
    and not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="needs Fashion-MNIST",
)
def test_command_line_writes_the_page(tmp_path):
    from mechvit.cli import main
    from mechvit.sae import ActivationStoreConfig, SAETrainingConfig, train_sae_for_hook

    model = tiny_model(0)
    model.save_pretrained(tmp_path / "vit")
    store = ActivationStoreConfig(hook=HOOK, tokens="patches", model_batch_size=16, buffer_size=256)
    cfg = SAETrainingConfig(architecture="topk", k=4, expansion_factor=2, batch_size=64, total_samples=64 * 4)
    train_sae_for_hook(model, torch.rand(16, 1, 28, 28), store, cfg, out_dir=tmp_path / "sae_a")
    code = main(
        [
            "explore",
            "--sae",
            str(tmp_path / "sae_a"),
            "--model",
            str(tmp_path / "vit"),
            "--out",
            str(tmp_path / "out"),
            "--n-images",
            "30",
            "--corruption",
            "gaussian_noise",
            "--severity",
            "2",
            "--k",
            "3",
        ]
    )
    assert code == 0
    data = page_data(tmp_path / "out" / "features.html")
    assert data["saes"][0]["name"] == "sae_a" and data["saes"][0]["model"] == "vit"
    assert data["images"]["n"] == 30 and data["images"]["n_corrupted"] == 30
    assert data["images"]["corrupted_name"] == "gaussian_noise 2" and data["saes"][0]["live"]
    assert (
        main(["explore", "--sae", str(tmp_path / "vit"), "--model", str(tmp_path / "vit"), "--out", "x"]) != 0
    )


@skip_without_chromium
def test_circuitsvis_views_share_one_bundle_and_render_offline(tmp_path):
    from mechvit.viz.circuits import BUNDLE_NAME, save_attention_views

    tokens = ["CLS", "r0c0", "r0c1", "r1c0", "r1c1"]
    pattern = torch.softmax(torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    pages = [
        save_attention_views(
            tmp_path / "attention" / f"view{i}.html",
            [{"title": f"v{i}", "pattern": pattern}],
            tokens,
            shared_bundle=tmp_path / "assets",
        )
        for i in range(2)
    ]
    bundle = tmp_path / "assets" / BUNDLE_NAME
    assert bundle.stat().st_size > 500_000 and all(p.stat().st_size < 50_000 for p in pages)
    assert '<script src="../assets/circuitsvis.js"></script>' in pages[0].read_text()
    with chromium() as driver:
        for p in pages:
            page = open_page(driver, p, ready="#cv-0 *")  # React rendered into the view's div
            assert page.console_errors == [] and page.network == []
            assert "file://" + str(bundle) in page.requests


def test_max_latents_lists_the_most_often_firing_latents_with_the_same_numbers(built, tmp_path):
    path, saes, stats, images, labels = built
    g = torch.Generator().manual_seed(1)  # the fixture's images, then its corrupted images
    assert torch.equal(torch.rand(images.shape, generator=g), images)
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    base = tiny_model(0)
    models = {"base": base, "ft": fine_tuned(base)}
    full = page_data(path)
    # computed with the limit, and from the fixture's full stats: the same page data
    for kw in ({}, {"stats": stats}):
        out = write_explorer(
            tmp_path / str(len(kw)), saes, models, images, labels, CLASSES, corrupted=corrupted, k=4, n_assoc=8,
            max_latents=5, cards=1, progress=False, **kw,
        )  # fmt: skip
        data = page_data(out)
        for entry, ref, spec in zip(data["saes"], full["saes"], saes, strict=True):
            st = stats[spec.name]
            assert len(st.live) > 5 and entry["n_live"] == len(st.live) == len(ref["live"])
            assert entry["live"] == st.most_active(5).tolist()
            rows = [ref["live"].index(f) for f in entry["live"]]
            for key in ("label", "top", "top_c"):
                assert entry[key] == [ref[key][i] for i in rows], key
            for key in ("density", "stability"):
                if ref[key] is not None:
                    np.testing.assert_allclose(
                        entry[key], [ref[key][i] for i in rows], atol=1e-3, err_msg=key
                    )
            got = explorer_array(data, entry, "logit").reshape(5, -1)
            want = explorer_array(full, ref, "logit").reshape(len(ref["live"]), -1)[rows]
            np.testing.assert_allclose(got, want, atol=1e-3)  # each page scales to its own largest effect
            got = explorer_array(data, entry, "p_abl").reshape(5, 4, 10)
            want = explorer_array(full, ref, "p_abl").reshape(len(ref["live"]), 4, 10)[rows]
            np.testing.assert_allclose(got, want, atol=2 / 65535)
            (f, _), *rest = entry["cards"].items()
            assert not rest and int(f) in entry["live"]
    with pytest.raises(ValueError, match="max_latents must be >= 1"):
        write_explorer(tmp_path, saes, models, images, labels, CLASSES, max_latents=0, progress=False)


def test_forked_workers_give_the_pages_numbers_and_cards_of_one_process(built, tmp_path):
    """``workers=2``: each model's statistics and the feature cards in forked one-thread processes; the page's
    data equal the one-process page's (every array, to the one-thread forwards' float rounding, which the
    quantised arrays absorb) and the cards are written and linked the same."""
    from mechvit.viz.explorer import explorer_data

    _, saes, stats, images, labels = built
    g = torch.Generator().manual_seed(1)
    assert torch.equal(torch.rand(images.shape, generator=g), images)
    corrupted = (images + 0.3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    base = tiny_model(0)
    models = {"base": base, "ft": fine_tuned(base)}
    threads = torch.get_num_threads()
    kw = dict(corrupted=corrupted, k=4, n_assoc=8, progress=False)
    _, forked = explorer_data(saes, models, images, labels, CLASSES, workers=2, **kw)
    assert torch.get_num_threads() == threads  # the workers' one thread stays in the workers
    assert forked.keys() == stats.keys()
    for name, st in stats.items():
        for key in (
            "density",
            "mean_act",
            "top_idx",
            "top_maps",
            "top_maps_corrupted",
            "hist",
            "probs_ablate",
        ):
            np.testing.assert_allclose(getattr(forked[name], key), getattr(st, key), rtol=1e-5, atol=1e-6)
        assert forked[name].label == st.label
    one = write_explorer(tmp_path / "one", saes, models, images, labels, CLASSES, cards=1, stats=stats, **kw)
    two = write_explorer(
        tmp_path / "two", saes, models, images, labels, CLASSES, cards=1, stats=stats, workers=2, **kw
    )
    assert page_data(one) == page_data(two)
    for entry in page_data(two)["saes"]:
        (card,) = entry["cards"].values()
        for key in ("png", "svg"):
            a, b = one.parent / card[key], two.parent / card[key]
            assert b.is_file() and b.stat().st_size > 0 and a.is_file()
    with pytest.raises(ValueError, match="workers must be a number of processes >= 1, got 0"):
        explorer_data(saes, models, images, labels, CLASSES, workers=0, **kw)


@pytest.mark.parametrize("n_clean, n_corrupted", [(3, 6), (5, 2)])
def test_fewer_images_than_k_keep_one_width_for_both_sets(n_clean, n_corrupted):
    """With fewer clean (or corrupted) images than k, the page's corrupted top images, their maps and the
    ablations on them keep the clean ones' width (cut or padded with -1), so the page reads them with one k."""
    from mechvit.viz.explorer import explorer_data

    g = torch.Generator().manual_seed(3)
    images = torch.rand(n_clean, 1, 28, 28, generator=g)
    corrupted = torch.rand(n_corrupted, 1, 28, 28, generator=g)
    data, stats = explorer_data(
        [ExplorerSAE("s", random_sae(HOOK, seed=0), "base")], {"base": tiny_model(0)}, images,
        torch.arange(n_clean) % 10, CLASSES, corrupted=corrupted, corrupted_labels=torch.arange(n_corrupted) % 10,
        k=4, progress=False,
    )  # fmt: skip
    entry, st = data["saes"][0], stats["s"]
    k, n = entry["k"], len(entry["live"])
    assert k == min(4, n_clean) and all(len(t) == k for t in entry["top_c"] + entry["top_val_c"])
    maps_c = explorer_array(data, entry, "maps_c").reshape(n, k, 4, 4)
    assert ((maps_c > 0).any((2, 3)) == (np.array(entry["top_c"]) >= 0)).all()
    p_abl = explorer_array(data, entry, "p_abl").reshape(n, k, 10)
    for i, f in enumerate(entry["live"]):
        which, idx = st.ablation_images(f)
        assert which == data["effect_bases"][entry["ablation_set"][i]]
        assert idx.tolist() == (entry["top"][i] if which == "clean" else entry["top_c"][i])
        np.testing.assert_allclose(p_abl[i][idx >= 0], st.probs_ablate[f][idx >= 0], atol=1e-5)
        assert not p_abl[i][idx < 0].any()
