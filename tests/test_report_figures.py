"""The study report's per-layer figures (mechvit.viz.figures): colour = model (the study's colours), line style =
input, keys outside the axes and inside the saved figure, 95% CI bands that draw the numbers they are given;
and the per-layer CI the logit-lens and attention steps store (mechvit.study.steps.logit_lens.layer_cis)."""

import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image
from scipy import stats

from mechvit.analysis.attention import AttentionStats, PairedAttention
from mechvit.analysis.logit_lens import LogitLensResult
from mechvit.analysis.similarity import CKAResult
from mechvit.study.steps.logit_lens import band_words, layer_cis
from mechvit.viz import figures as F

MODELS = ["base", "blur1", "blur2", "blur4", "noise1", "noise2", "noise4", "clean"]  # the default study's
INPUTS = ["clean", "gaussian_blur/4", "gaussian_noise/4"]
L = 6


def model_colour(i: int) -> str:
    return to_hex(F.color(i))


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def paired(g) -> PairedAttention:
    r = lambda: torch.rand(L, 2, generator=g)  # noqa: E731
    return PairedAttention(r(), r(), r(), r(), 0.01 * r(), r(), n_images=10)


def cka(g) -> CKAResult:
    lin = torch.rand(L, generator=g, dtype=torch.float64)
    ci = (lin - 0.05 * torch.rand(L, generator=g), lin + 0.05 * torch.rand(L, generator=g))
    return CKAResult([str(i) for i in range(L)], lin, lin - 0.01, "resid_post", "cls", 300, linear_ci=ci)


def band_of(mean: torch.Tensor, g) -> dict:
    return {
        "low": (mean - 0.1 * torch.rand(len(mean), generator=g)).tolist(),
        "high": (mean + 0.1 * torch.rand(len(mean), generator=g)).tolist(),
    }


def laid_out(fig):
    r = fig._get_renderer()
    fig.draw(r)  # lays out the constrained-layout figure
    return r


def assert_keys_beside_the_data(fig, tmp_path, n_keys: int):
    """Every key is a figure legend (none inside an axes), lies inside the saved figure, and overlaps neither an
    axes (with its tick and axis labels) nor the title nor another key."""
    r = laid_out(fig)
    assert len(fig.legends) == n_keys and not any(a.get_legend() for a in fig.axes)
    boxes = [lg.get_window_extent(r) for lg in fig.legends]
    whole = fig.bbox
    for bb in boxes:
        assert whole.x0 <= bb.x0 and bb.x1 <= whole.x1 and whole.y0 <= bb.y0 and bb.y1 <= whole.y1, (
            bb,
            whole,
        )
        for ax in fig.axes:
            if ax.get_visible():
                assert not bb.overlaps(ax.get_tightbbox(r)), ax
        if fig._suptitle is not None:
            assert not bb.overlaps(fig._suptitle.get_window_extent(r))
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :])
    # saved at the figure's own size: nothing drawn outside it is cut off, nothing is added
    F.save_report_figure(fig, tmp_path / "fig")
    w, h = fig.get_size_inches() * 150
    assert Image.open(tmp_path / "fig.png").size == (round(w), round(h))


def series(ax) -> list:
    """The data lines of ``ax`` (not reference lines such as axhline, whose labels start with '_')."""
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def dashes(line) -> tuple:
    # get_linestyle() names every dash tuple '--'; the dash pattern (offset, on-off sequence) tells them apart
    offset, seq = line._dash_pattern
    return offset, tuple(seq or ())


def style(line) -> tuple:
    return to_hex(line.get_color()), dashes(line)


def band_bounds(coll, x) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) at each ``x`` of a fill_between band."""
    v = coll.get_paths()[0].vertices
    return (
        np.array([v[np.isclose(v[:, 0], xi), 1].min() for xi in x]),
        np.array([v[np.isclose(v[:, 0], xi), 1].max() for xi in x]),
    )


def test_line_styles_are_distinct():
    from matplotlib.lines import Line2D

    pats = {dashes(Line2D([], [], ls=F.line_style(j))) for j in range(8)}
    assert len(pats) == 8 and F.line_style(8) == F.line_style(0)


def test_between_models_colour_is_the_model_style_the_input_and_bands_are_the_given_numbers(tmp_path):
    g = _g()
    between = {(n, lab): paired(g) for n in MODELS[1:] for lab in INPUTS}
    bands = {
        k: {key: band_of(p.per_layer()[key], g) for key in ("cosine", "entropy_diff")}
        for k, p in between.items()
    }
    fig = F.attention_between_models(between, MODELS, INPUTS, "base", bands)
    for ax, key in zip(fig.axes[:2], ("cosine", "entropy_diff"), strict=True):
        lines = series(ax)
        assert len(lines) == 21 and len({style(ln) for ln in lines}) == 21  # no two series look alike
        assert len(ax.collections) == 21
        for ln, coll, (k, p) in zip(lines, ax.collections, between.items(), strict=True):
            n, lab = k
            assert ln.get_label() == f"{n}, {lab}"
            assert to_hex(ln.get_color()) == model_colour(
                MODELS.index(n)
            )  # the model's colour in every figure
            assert ln.get_linestyle() == {"clean": "-", "gaussian_blur/4": "--", "gaussian_noise/4": ":"}[lab]
            np.testing.assert_allclose(ln.get_ydata(), p.per_layer()[key].numpy(), rtol=1e-6)
            lo, hi = band_bounds(coll, np.arange(L))
            np.testing.assert_allclose(lo, bands[k][key]["low"], rtol=1e-6)
            np.testing.assert_allclose(hi, bands[k][key]["high"], rtol=1e-6)
            assert to_hex(coll.get_facecolor()[0][:3]) == model_colour(MODELS.index(n))
    model_key, input_key = fig.legends
    assert [t.get_text() for t in model_key.get_texts()] == MODELS[1:]
    assert [to_hex(h.get_color()) for h in model_key.legend_handles] == [model_colour(i) for i in range(1, 8)]
    assert [t.get_text() for t in input_key.get_texts()] == INPUTS
    assert_keys_beside_the_data(fig, tmp_path, 2)
    # a list of the fine-tunes alone (the old call) keeps the same colours: the base is taken to come first
    old = F.attention_between_models(between, MODELS[1:], INPUTS, "base")
    assert [to_hex(ln.get_color()) for ln in series(old.axes[0])] == [
        to_hex(ln.get_color()) for ln in series(fig.axes[0])
    ]


def test_cka_colour_is_the_model_style_the_input_and_bands_are_the_results_cis(tmp_path):
    g = _g(1)
    groups = {
        "base vs fine-tuned": {(n, lab): cka(g) for n in MODELS[1:] for lab in INPUTS},
        "clean vs corrupted": {(n, lab): cka(g) for n in MODELS for lab in INPUTS[1:]},
    }
    fig = F.cka_curves(groups, "linear CKA (cls)", models=MODELS, inputs=INPUTS)
    for ax, group in zip(fig.axes[:2], groups.values(), strict=True):
        lines = series(ax)
        assert len(lines) == len(group) and len({style(ln) for ln in lines}) == len(group)
        for ln, coll, ((n, lab), r) in zip(lines, ax.collections, group.items(), strict=True):
            assert to_hex(ln.get_color()) == model_colour(MODELS.index(n))
            assert ln.get_linestyle() == F.line_style(INPUTS.index(lab))  # the same style in both panels
            lo, hi = band_bounds(coll, np.arange(L))
            np.testing.assert_allclose(lo, r.linear_ci[0].numpy(), rtol=1e-6)
            np.testing.assert_allclose(hi, r.linear_ci[1].numpy(), rtol=1e-6)
    # the colours are the logit lens's (and every other report figure's) for the same model
    lens = {
        (n, lab): LogitLensResult(
            [str(i) for i in range(L)], torch.rand(4, L, generator=g), torch.rand(4, L, generator=g) > 0.5,
            torch.zeros(4, L), torch.zeros(4, L),
        )
        for n in MODELS
        for lab in INPUTS
    }  # fmt: skip
    lens_fig = F.logit_lens_curves(lens, MODELS, INPUTS)
    assert {ln.get_label(): to_hex(ln.get_color()) for ln in series(lens_fig.axes[0])} == {
        n: model_colour(i) for i, n in enumerate(MODELS)
    }
    assert [t.get_text() for t in fig.legends[0].get_texts()] == MODELS
    assert_keys_beside_the_data(fig, tmp_path, 2)
    # a result without a CI (the secondary, every-token CKA) draws its line and no band
    no_ci = cka(g)
    no_ci.linear_ci = None
    fig = F.cka_curves({"one": {("blur1", "clean"): no_ci}}, "CKA", models=MODELS, inputs=INPUTS)
    assert len(series(fig.axes[0])) == 1 and not fig.axes[0].collections


def test_logit_lens_bands_are_the_given_cis_top1_in_percent(tmp_path):
    g = _g(2)
    layers = ["embed", *map(str, range(L))]
    results = {
        (n, lab): LogitLensResult(
            layers, torch.rand(20, L + 1, generator=g), torch.rand(20, L + 1, generator=g) > 0.5,
            torch.zeros(20, L + 1), torch.zeros(20, L + 1),
        )
        for n in MODELS[:3]
        for lab in INPUTS
    }  # fmt: skip
    bands = {
        k: {"correct_prob": layer_cis(r.correct_prob, seed=0), "top1_acc": layer_cis(r.top1.double(), seed=0)}
        for k, r in results.items()
    }
    fig = F.logit_lens_curves(results, MODELS[:3], INPUTS, bands)
    ax = fig.axes  # row 0: probability per input, row 1: top-1 (%)
    x = np.arange(L + 1)
    for j, lab in enumerate(INPUTS):
        for i, n in enumerate(MODELS[:3]):
            lo, hi = band_bounds(ax[j].collections[i], x)
            np.testing.assert_allclose(lo, bands[(n, lab)]["correct_prob"]["low"], rtol=1e-6)
            np.testing.assert_allclose(hi, bands[(n, lab)]["correct_prob"]["high"], rtol=1e-6)
            lo, hi = band_bounds(ax[3 + j].collections[i], x)
            np.testing.assert_allclose(lo, 100 * np.array(bands[(n, lab)]["top1_acc"]["low"]), rtol=1e-6)
            assert lo.max() <= 100.0 and hi.max() <= 100.0 + 1e-9
    assert [t.get_text() for t in ax[0].get_xticklabels()] == layers
    assert_keys_beside_the_data(fig, tmp_path, 1)


def test_attention_change_and_stats_keys_sit_outside_the_axes(tmp_path):
    g = _g(3)
    conds = INPUTS[1:]
    pairs = {(n, lab): paired(g) for n in MODELS for lab in conds}
    bands = {k: {"cosine": band_of(p.per_layer()["cosine"], g)} for k, p in pairs.items()}
    fig = F.attention_change_curves(pairs, MODELS, conds, bands)
    lines = series(fig.axes[2])
    assert len({style(ln) for ln in lines}) == len(lines) == 16
    assert len(fig.axes[2].collections) == 16 and not fig.axes[1].collections  # bands where given
    assert_keys_beside_the_data(fig, tmp_path, 2)
    st = {
        n: AttentionStats(torch.rand(L, 2, generator=g), 10 * torch.rand(L, 2, generator=g), n_images=10)
        for n in MODELS
    }
    sb = {n: {"distance_px": band_of(s.distance.mean(1), g)} for n, s in st.items()}
    fig = F.attention_layer_stats(st, sb)
    lo, hi = band_bounds(fig.axes[1].collections[3], np.arange(L))
    np.testing.assert_allclose(hi, sb["blur4"]["distance_px"]["high"], rtol=1e-6)
    assert_keys_beside_the_data(fig, tmp_path / "stats", 1)


def test_overlap_controls_key_is_beside_the_bars(tmp_path):
    e = {"estimate": 0.5, "low": 0.45, "high": 0.55}
    summary = {
        f"base vs {m}": {
            "matched_cos": {"within_reference": e, "within_other": e, "between": e, "floor": e},
            "act_corr": {"within_reference": e, "within_other": e, "between": e},
        }
        for m in ("blur4", "noise4", "clean")
    }
    fig = F.overlap_controls_figure(summary, {"matched_cos": "matched", "act_corr": "corr"})
    (key,) = fig.legends
    assert [t.get_text() for t in key.get_texts()] == [
        "within base",
        "within other",
        "between",
        "floor (random rows)",
    ]
    assert_keys_beside_the_data(fig, tmp_path, 1)


def test_robustness_heatmap_names_one_severity_or_the_mean_over_several():
    rows = [
        {"model": m, "corruption": c, "severity": s, "top1": 0.5}
        for m in ("base", "ft")
        for c in ("clean", "blur")
        for s in (1, 2, 4)
    ]
    fig = F.robustness_heatmap(rows, ["base", "ft"], ["blur"], {"base": [], "ft": ["blur"]}, [4])
    assert fig.axes[0].get_xlabel() == "corruption (at severity 4)"
    fig = F.robustness_heatmap(rows, ["base", "ft"], ["blur"], {"base": [], "ft": ["blur"]}, [1, 2, 4])
    assert fig.axes[0].get_xlabel() == "corruption (mean over severities 1, 2, 4)"


def test_heatmap_annotations_round_half_up_on_the_decimal_value():
    """The cells' texts on the study's rounding rule (mechvit._numbers), where Python's format rounds the binary
    float (0.125 -> 0.12, 2.675 -> 2.67, 1.005 -> 1.00, 62.5 -> 62) and prints -0.00."""
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    F.heatmap(ax, np.array([[0.125, -0.001], [2.675, 1.005]]), ["a", "b"], ["r0", "r1"], fmt="{:.2f}")
    assert [t.get_text() for t in ax.texts] == ["0.13", "0.00", "2.68", "1.01"]
    # a float32 tensor by its float32 repr (0.145, not the float64 0.14499999582767487 it converts to)
    ax = fig.add_subplot()
    F.heatmap(ax, torch.tensor([[0.145, -0.375]]), ["a", "b"], ["r0"], fmt="{:.2f}", cmap=F.DIVERGING)
    assert [t.get_text() for t in ax.texts] == ["0.15", "-0.38"]
    ax = fig.add_subplot()  # a callable
    F.heatmap(ax, np.array([[0.5, 2.0]]), ["a", "b"], ["r0"], fmt=lambda x: f"<{x:g}>")
    assert [t.get_text() for t in ax.texts] == ["<0.5>", "<2>"]
    # the report's top-1 heatmap: 62.5% reads 63
    rows = [
        {"model": m, "corruption": c, "severity": 4, "top1": 0.625}
        for m in ("base", "ft")
        for c in ("clean", "blur")
    ]
    fig = F.robustness_heatmap(rows, ["base", "ft"], ["blur"], {"base": [], "ft": ["blur"]}, [4])
    assert [t.get_text() for t in fig.axes[0].texts] == ["63"] * 4


def test_feature_comparison_titles_round_half_up():
    from mechvit.viz.features import feature_comparison_figure

    maps = torch.zeros(2, 1, 2, 2)
    maps[0, 0, 0, 0], maps[1, 0, 1, 1] = 0.125, 0.145  # float32: 0.145 by its float32 repr
    fig = feature_comparison_figure(
        torch.rand(2, 1, 8, 8, generator=_g()), maps, maps, [3], [4], ("a", "b"), ["x", "y"], top_images=2,
        pair_cosine=[-0.001],
    )  # fmt: skip
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles[:2] == ["y\nmax 0.15", "x\nmax 0.13"]  # Python's format: 0.14, 0.12
    assert "b\nfeature 4\n(cos 0.00)" in [a.get_ylabel() for a in fig.axes]  # Python's: -0.00


@pytest.mark.parametrize(
    "fmt, x, text",
    [
        ("{:.2f}", 0.125, "0.13"), ("{:.2f}", -0.001, "0.00"), ("{:.0f}", -2.5, "-3"), ("{:+.2f}", -0.001, "+0.00"),
        ("{:+.2f}", 0.125, "+0.13"), ("{:+.2f}", -0.125, "-0.13"), ("{0:.1f}", 0.9065 * 100, "90.7"),
        ("{:.1%}", 0.5625, "56.3%"), ("{:,.0f}", 1234567.5, "1,234,568"), ("p={:.2g}", 0.0125, "p=0.013"),
        ("{:.3g}", 9.995, "10"), ("{0:.2f} ({0:.0%})", 0.125, "0.13 (13%)"), ("no number", 0.125, "no number"), (" {:.1f} ", np.float32(0.25), " 0.3 "),
        # formats the rule does not write: as str.format writes them
        ("{:>6.2f}", 0.125, "  0.12"), ("{}", 0.125, "0.125"), ("{:.2e}", 0.125, "1.25e-01"), ("{:,.2g}", 0.125, "0.12"),
    ],
)  # fmt: skip
def test_number_format_writes_a_format_string_on_the_rounding_rule(fmt, x, text):
    assert F.number_format(fmt)(x) == text
    assert F.number_format(None) is None


# ---- the step's per-layer CI -------------------------------------------------------------------------------


def test_layer_cis_equal_scipys_bca_bootstrap_per_layer():
    rng = np.random.default_rng(7)
    x = np.column_stack([rng.random(60), rng.random(60) ** 3, (rng.random(60) > 0.3).astype(float)])
    got = layer_cis(x, seed=5)
    assert got["n"] == 60 and got["confidence"] == 0.95 and "BCa" in got["method"]
    for j in range(3):
        ref = stats.bootstrap(
            (x[:, j],), np.mean, n_resamples=9999, method="BCa", random_state=np.random.default_rng(5)
        ).confidence_interval
        assert got["low"][j] == pytest.approx(ref.low, rel=1e-9)
        assert got["high"][j] == pytest.approx(ref.high, rel=1e-9)
        assert got["low"][j] < x[:, j].mean() < got["high"][j]


def test_layer_cis_under_20_images_are_student_t_and_constant_layers_collapse():
    x = np.array([[0.1, 1.0], [0.4, 1.0], [0.3, 1.0], [0.9, 1.0], [0.5, 1.0]])
    got = layer_cis(torch.tensor(x), seed=0)
    m, sd = x[:, 0].mean(), x[:, 0].std(ddof=1)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert got["low"][0] == pytest.approx(m - half) and got["high"][0] == pytest.approx(m + half)
    assert got["low"][1] == got["high"][1] == 1.0  # a layer where every image agrees
    assert "5 images" in band_words(5) and "Student's t" in band_words(5) and "BCa" in band_words(20)
    with pytest.raises(ValueError, match="images, layers"):
        layer_cis(x[:, 0], seed=0)


def test_code_cosine_key_sits_beside_the_bars(tmp_path):
    """The code-cosine figure's one key (own SAEs, raw activations, mismatched patch) is beside the panels: inside
    the first panel it covered the first model's bars."""
    est = lambda v: {"estimate": v, "low": v - 0.01, "high": v + 0.01}  # noqa: E731
    code = {
        f"batchtopk|{m}|{m}|{c}": {"code": {"over_images": est(0.74)}, "raw": {"over_images": est(0.75)},
                                   "mismatched": {"over_images": est(0.55)}}
        for m in ("base", "blur4", "noise4", "clean") for c in ("gaussian_blur/4", "gaussian_noise/4")
    }  # fmt: skip
    fig = F.code_cosine_controls_figure(code, ["batchtopk"], ["gaussian_blur/4", "gaussian_noise/4"])
    assert_keys_beside_the_data(fig, tmp_path, 1)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "code cosine (own SAEs)", "raw activation cosine", "mismatched patch",
    ]  # fmt: skip


def test_cka_panels_fill_rows_of_ncols_and_the_spare_slots_stay_empty(tmp_path):
    """The study's CKA figure: one panel per input (3) on the first row, one per condition (2) on the second;
    each panel's curves are its group's, the sixth slot is hidden, and the keys stay beside the data."""
    g = _g(3)
    groups = {
        **{f"base vs fine-tuned, {lab}": {(n, lab): cka(g) for n in MODELS[1:]} for lab in INPUTS},
        **{f"clean vs {lab}": {(n, lab): cka(g) for n in MODELS} for lab in INPUTS[1:]},
    }
    fig = F.cka_curves(groups, "linear CKA (cls)", models=MODELS, inputs=INPUTS, ncols=3)
    shown = [a for a in fig.axes if a.get_visible()]
    assert len(fig.axes) == 6 and len(shown) == 5 and not fig.axes[5].get_visible()
    rows = sorted({round(a.get_position().y0, 3) for a in shown}, reverse=True)
    assert len(rows) == 2  # two rows of panels
    for ax, (title, group) in zip(shown, groups.items(), strict=True):
        assert ax.get_title() == title
        lines = series(ax)
        assert [ln.get_label() for ln in lines] == [f"{n}, {lab}" for n, lab in group]
        assert {ln.get_linestyle() for ln in lines} == {F.line_style(INPUTS.index(next(iter(group))[1]))}
    assert [a.get_ylabel() for a in fig.axes[::3]] == ["linear CKA (cls)"] * 2
    assert_keys_beside_the_data(fig, tmp_path, 2)
    with pytest.raises(ValueError, match="ncols must be in 1..5"):
        F.cka_curves(groups, "CKA", models=MODELS, inputs=INPUTS, ncols=6)
