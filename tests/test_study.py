"""`mechvit study` end to end on tiny checkpoints: the report is complete and self-contained, steps are cached
under their hashes, an interrupted study resumes without recomputing finished steps."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from mechvit.study import run_study
from mechvit.study.config import ConfigError, study_config_from_dict
from mechvit.study.steps import attention as attention_step
from mechvit.training.checkpoint import save_checkpoint

ARCH = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
ALL_STEPS = ["robustness", "logit_lens", "attention", "sae", "sae_analysis", "explorer", "patching", "cka"]


def make_checkpoints(root: Path) -> dict[str, Path]:
    """A base model and two 'fine-tuned' ones (different random weights; cards say what they have seen)."""
    out = {}
    for i, (name, seen) in enumerate(
        [("base", None), ("ft_blur", ["gaussian_blur"]), ("ft_noise", ["gaussian_noise"])]
    ):
        torch.manual_seed(i)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
        card = {
            "model": {"name": "vit_tiny_patch16_224", "kwargs": ARCH},
            "config": {"corruption": {"seen": seen} if seen else None},
        }
        save_checkpoint(root / name, model, card)
        out[name] = root / name
    return out


def tiny_config(ck: dict[str, Path], **sections) -> dict:
    cfg = {
        "name": "tiny",
        "title": "tiny study",
        "progress": False,
        "num_threads": 1,
        "models": {
            "base": {"name": "base", "checkpoint": str(ck["base"])},
            "finetuned": [
                {"name": "ft_blur", "checkpoint": str(ck["ft_blur"])},
                {"name": "ft_noise", "checkpoint": str(ck["ft_noise"])},
            ],
        },
        "conditions": [
            {"corruption": "gaussian_blur", "severity": 4},
            {"corruption": "gaussian_noise", "severity": 4},
        ],
        "robustness": {
            "corruptions": ["gaussian_blur", "gaussian_noise", "contrast"],
            "severities": [1, 4],
            "n_images": 32,
            "batch_size": 32,
        },
        "logit_lens": {"n_images": 16},
        "attention": {"n_images": 8, "n_views": 1},
        "sae": {
            "architectures": ["batchtopk", "standard"],
            "replicates": 2,
            "epochs": 1,
            "n_train_images": 32,
            "n_eval_images": 8,
            "n_fidelity_images": 12,  # the splices: 12 clean test images
            "n_heldout_images": 6,  # held-out EV / L0 / dead / dense: 6 images, clean and under each condition
            "top_features": 1,
            "top_images": 2,
            "store": {"hook": "blocks.1.hook_resid_post", "buffer_size": 256},
            "train": {"expansion_factor": 2, "k": 4, "batch_size": 64},
        },
        "patching": {"n_images": 4},
        "cka": {"n_images": 8},
        "explorer": {"n_images": 32},  # counted in the test images the study loads (not capped by the others)
    }
    cfg.update(sections)
    return cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ck"))


@pytest.fixture(scope="module")
def finished(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run = run_study(study_config_from_dict(tiny_config(checkpoints)), out)
    return run, out


def test_study_runs_every_step_and_writes_the_report(finished):
    run, out = finished
    assert run.computed == ALL_STEPS and run.cached == []
    for name in ("report.html", "report.md", "metrics.json"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["steps"]) == ALL_STEPS
    rob = metrics["steps"]["robustness"]["metrics"]
    # seen vs unseen: each fine-tuned model's seen corruption comes from its card
    assert {s["model"]: s["seen"] for s in rob["seen_unseen"]} == {
        "base": [],
        "ft_blur": ["gaussian_blur"],
        "ft_noise": ["gaussian_noise"],
    }
    est = rob["estimates"]
    # no other blur corruption among the three: no same-family group; contrast and noise are other families
    assert set(est["ft_blur"]["accuracy"]) == {"clean", "seen", "unseen_other"}
    assert est["ft_blur"]["groups"]["unseen_other"] == [
        "contrast/1",
        "contrast/4",
        "gaussian_noise/1",
        "gaussian_noise/4",
    ]
    assert set(est["base"]["accuracy"]) == {"clean", "all_corrupted"}
    assert est["ft_blur"]["groups"]["seen"] == ["gaussian_blur/1", "gaussian_blur/4"]
    clean = est["ft_blur"]["accuracy"]["clean"]
    assert clean["low"] <= clean["estimate"] <= clean["high"]
    assert {t["cell"] for t in rob["mcnemar"] if t["model"] == "ft_blur"} == {
        "gaussian_blur/1",
        "gaussian_blur/4",
    }
    assert "claims" in metrics and metrics["claims"]["per_model"]
    # SAEs: 2 replicates x 3 models x 2 architectures, each with its own seed, one folder each
    sae_m = metrics["steps"]["sae"]["metrics"]
    keys = {k for k in sae_m if k.count("|") == 2}
    assert keys == {
        f"{a}|{m}|{r}"
        for a in ("batchtopk", "standard")
        for m in ("base", "ft_blur", "ft_noise")
        for r in (0, 1)
    }
    assert len({sae_m[k]["seed"] for k in keys}) == len(keys)
    for k in keys:  # held-out EV and L0 with CIs over the held-out images, around the step's own numbers
        h = sae_m[k]["heldout"]
        for name in ("explained_variance", "l0"):
            ci = h[f"{name}_ci"]
            assert ci["estimate"] == pytest.approx(h[name], rel=1e-9, abs=1e-12)
            assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["n"] == 6  # the 6 held-out test images
        assert h["n_rows"] == 6 * 3 * 16  # x (clean + 2 conditions) x 16 patch tokens
        assert sae_m[k]["spliced_clean"]["n_images"] == 12 == sae_m[k]["spliced_clean"]["accuracy_drop"]["n"]
    assert sae_m["ablation_gap"]["kl"] >= 0
    saes = sorted(p.name for p in (out / "sae" / "saes").iterdir())
    assert "batchtopk__ft_blur__r1" in saes and "standard__base__r0" in saes
    assert not (out / "sae" / "_acts").exists() and not (out / ".staging").exists()
    oc = metrics["steps"]["sae_analysis"]["metrics"]["overlap_controls"]
    assert set(oc) == {"batchtopk", "standard"}
    summary = oc["batchtopk"]["summary"]
    assert set(summary) == {"base vs ft_blur", "base vs ft_noise"}
    mc = summary["base vs ft_blur"]["matched_cos"]
    assert (
        mc["within_reference"]["n"] == 1 and mc["between"]["n"] == 4
    )  # 2 seeds: 1 within pair, 2 x 2 between
    assert mc["test"]["p_value"] is not None
    code = metrics["steps"]["sae_analysis"]["metrics"]["code_cosine"]
    assert "batchtopk|ft_blur|base|gaussian_blur/4" in code  # the base's SAEs shared by both models
    assert metrics["key_numbers"]


def test_report_html_has_every_section_and_every_image_embedded(finished):
    run, out = finished
    page = (out / "report.html").read_text()
    for sec in ["summary", "models", *ALL_STEPS]:
        assert f"id='{sec}'" in page, sec
    imgs = re.findall(r"<img src='([^']*)'", page)
    n_figures = sum(len(r.figures) for r in run.results.values())
    assert len(imgs) == n_figures >= 14
    for src in imgs:  # embedded, so the page opens offline
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for href in re.findall(r"href='([^'#]*)'", page):  # SVGs, CSVs, attention views: files in the out dir
        assert (out / href).is_file(), href
    assert not re.search(r"<(script|img|link)[^>]+(src|href)=['\"]https?:", page)
    for f in (f for r in run.results.values() for f in r.figures):
        assert (out / f["svg"]).read_text().lstrip().startswith(("<?xml", "<svg"))
    md = (out / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link


def _t_interval(values: torch.Tensor) -> tuple[list, list]:
    """Per column of ``values [N, L]``: mean -+ t(0.975, N-1) sd / sqrt(N) (``mean_ci`` under 20 values)."""
    from scipy import stats

    v = values.double()
    n, m, sd = v.shape[0], v.mean(0), v.std(0)
    half = stats.t.ppf(0.975, n - 1) * sd / n**0.5
    return (m - half).tolist(), (m + half).tolist()


def test_per_layer_curves_carry_cis_equal_to_an_independent_computation(finished, checkpoints):
    """The logit-lens and attention bands: in metrics.json beside the means (``ci95``), equal to a t interval
    over the images (16 and 8 here: under 20, ``mean_ci`` uses Student's t) of the per-image values recomputed
    here from the same models and images; the captions state n and what the band is."""
    from mechvit.analysis import compare_attention, logit_lens
    from mechvit.study.context import StudyContext

    run, out = finished
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    ctx = StudyContext(study_config_from_dict(tiny_config(checkpoints)), out)
    x, y = ctx.test_images(16)
    blur = ctx.inputs(16)["gaussian_blur/4"]
    lens = logit_lens(ctx.model("ft_blur"), ctx.prep(blur), y, include_embed=True, progress=False)
    got = steps["logit_lens"]["metrics"]["ft_blur|gaussian_blur/4"]
    assert got["ci95"]["correct_prob"]["n"] == 16 and len(got["ci95"]["top1_acc"]["low"]) == len(
        got["layers"]
    )
    for key, per_image in (("correct_prob", lens.correct_prob), ("top1_acc", lens.top1)):
        lo, hi = _t_interval(per_image)
        np.testing.assert_allclose(got["ci95"][key]["low"], lo, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["ci95"][key]["high"], hi, rtol=1e-5, atol=1e-7)
        assert all(a - 1e-6 <= m <= b + 1e-6 for a, m, b in zip(lo, got[key], hi, strict=True))
    pa = compare_attention(
        ctx.model("ft_noise"), ctx.prep(x[:8]), images_b=ctx.prep(blur[:8]), progress=False
    )
    att = steps["attention"]["metrics"]
    for key in ("entropy_diff", "mse", "cosine"):
        lo, hi = _t_interval(pa.per_image[key])
        ci = att["clean_vs_corrupted"]["ft_noise|gaussian_blur/4"]["ci95"][key]
        assert ci["n"] == 8
        np.testing.assert_allclose(ci["low"], lo, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ci["high"], hi, rtol=1e-5, atol=1e-7)
    assert set(att["base_vs_finetuned"]["ft_blur|clean"]["ci95"]) == {"cosine", "entropy_diff"}
    assert set(att["stats"]["base"]["ci95"]) == {"entropy", "distance_px"}
    captions = {f["png"].split("/")[-1]: f["caption"] for r in run.results.values() for f in r.figures}
    assert "bands: 95% CI over the 16 images of each layer's mean (Student's t)" in captions["logit_lens.png"]
    for name in (
        "attention_clean_vs_corrupted.png",
        "attention_stats.png",
        "attention_base_vs_finetuned.png",
    ):
        assert "bands: 95% CI over the 8 images" in captions[name], name
    assert "bands: 95% percentile bootstrap CI over the 8 images" in captions["cka.png"]
    assert "first row: the base against each fine-tune on the same images" in captions["cka.png"]


def test_report_links_the_overlap_csvs_and_words_tokens_and_image_sets_right(finished):
    """The overlap controls' CSVs are linked (as logit_lens.csv is); "patch tokens", not "patches tokens"; the
    feature pages say which mean activation ranks them; the explorer note names the SAE step's held-out set."""
    run, out = finished
    page = (out / "report.html").read_text()
    hrefs = re.findall(r"href='([^'#]*)'", page)
    for a in ("batchtopk", "standard"):
        assert f"sae_analysis/overlap_controls_{a}.csv" in hrefs
        assert (out / "sae_analysis" / f"overlap_controls_{a}.csv").is_file()
    md = (out / "report.md").read_text()
    assert "(sae_analysis/overlap_controls_batchtopk.csv)" in md and "logit_lens/logit_lens.csv" in md
    assert "patches tokens" not in page and "(patch tokens)" in page
    features = [
        f["caption"]
        for f in run.results["sae_analysis"].figures
        if f["png"].split("/")[-1].startswith("features_")
    ]
    assert features and all(
        "ranked by mean activation over all patch tokens of the 8 clean" in c for c in features
    )
    note = json.loads((out / "metrics.json").read_text())["steps"]["explorer"]["metrics"]["live_counted_on"]
    assert "held-out 6 clean test images (sae.heldout_images)" in note and "(18 images: a subset of" in note


def test_attention_views_are_offline_circuitsvis_pages(finished):
    _, out = finished
    page = (out / "attention" / "attention_views_ft_blur.html").read_text()
    assert "CircuitsVis.render(" in page and "AttentionHeads" in page and "unpkg.com" not in page
    # every view page loads the one shared copy of the bundle beside it (not 8 MB inlined into each)
    assert re.findall(r"<script[^>]+src=['\"]([^'\"]+)", page) == ["circuitsvis.js"]
    assert "var CircuitsVis=" in (out / "attention" / "circuitsvis.js").read_text()
    assert '"CLS"' in page and '"r0c0"' in page and '"r3c3"' in page and '"L1H1"' in page


def test_attention_views_show_the_chosen_layers(checkpoints, tmp_path):
    """``attention.view_layers`` (negative from the last) limits the circuitsvis views to those blocks, with
    the heads named after their real layer; a block the model lacks is refused before any step runs."""
    att = {"n_images": 4, "n_views": 1, "view_layers": [-1]}
    run_study(
        study_config_from_dict(tiny_config(checkpoints, attention=att)), tmp_path / "a", only=["attention"]
    )
    page = (tmp_path / "a" / "attention" / "attention_views_base.html").read_text()
    assert '"L1H0"' in page and '"L1H1"' in page and '"L0H0"' not in page
    for layers, message in (
        ([2], r"\[2\] out of range; this model has 2 blocks"),
        ([1, -1], "names a block twice"),
    ):
        cfg = tiny_config(checkpoints, attention={**att, "view_layers": layers})
        with pytest.raises(ConfigError, match=message):
            run_study(study_config_from_dict(cfg), tmp_path / "b", only=["attention"])


def test_rerun_skips_finished_steps_and_recomputes_only_what_changed(finished, checkpoints, tmp_path):
    import shutil

    out = shutil.copytree(
        finished[1], tmp_path / "study"
    )  # reruns below change it: never the shared fixture's
    again = run_study(study_config_from_dict(tiny_config(checkpoints)), out)
    assert again.computed == [] and again.cached == ALL_STEPS
    # a step without its done-marker (as after a crash) runs again, alone
    (out / "patching" / "done.json").unlink()
    again = run_study(study_config_from_dict(tiny_config(checkpoints)), out)
    assert again.computed == ["patching"]
    # a changed config section invalidates that step only
    cfg = tiny_config(checkpoints, cka={"n_images": 12})
    assert run_study(study_config_from_dict(cfg), out).computed == ["cka"]
    # the SAE step's result changes the SAE analysis hash: both rerun, nothing else
    cfg = tiny_config(checkpoints, cka={"n_images": 12})
    cfg["sae"] = {**cfg["sae"], "train": {**cfg["sae"]["train"], "k": 3}, "architectures": ["batchtopk"]}
    assert run_study(study_config_from_dict(cfg), out).computed == ["sae", "sae_analysis", "explorer"]


def test_only_keeps_the_other_finished_steps_and_refuses_a_stale_upstream(finished, checkpoints, tmp_path):
    """--only reruns the steps named and keeps every other finished, up-to-date step in metrics.json and the
    report; a step that reads an upstream step outside --only refuses when that step's finished result was
    made under other settings (it would analyse SAEs of another config under this one's name), and a step
    whose upstream has not run says to add it."""
    import json
    import shutil

    out = shutil.copytree(finished[1], tmp_path / "study")
    cfg = tiny_config(checkpoints)
    again = run_study(study_config_from_dict(cfg), out, only=["cka"], force=True)
    assert again.computed == ["cka"] and set(again.cached) == set(ALL_STEPS) - {"cka"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["steps"]) == set(ALL_STEPS) and metrics["claims"]
    stale = {**cfg, "sae": {**cfg["sae"], "train": {**cfg["sae"]["train"], "k": 3}}}
    with pytest.raises(ValueError, match="reads step 'sae', whose finished result .* is out of date"):
        run_study(study_config_from_dict(stale), out, only=["sae_analysis"])
    with pytest.raises(ValueError, match=r"needs \['sae'\], not run in .* add sae to --only"):
        run_study(study_config_from_dict(cfg), tmp_path / "empty", only=["sae_analysis"])


def test_patching_positions_and_explorer_max_latents_bound_the_work(finished, checkpoints, tmp_path):
    import shutil

    from mechvit.viz.explorer import read_explorer_data

    out = shutil.copytree(finished[1], tmp_path / "study")
    full = json.loads((out / "metrics.json").read_text())["steps"]
    cfg = tiny_config(checkpoints, patching={"n_images": 4, "positions": [0, 5, 16]})
    cfg["explorer"] = {"max_latents": 3}
    run = run_study(study_config_from_dict(cfg), out)
    assert run.computed == ["explorer", "patching"]
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    pm = steps["patching"]["metrics"]
    for key in ("within_by_position", "across_models"):
        assert pm[key] and set(pm[key]) == set(full["patching"]["metrics"][key])
        for r in pm[key].values():  # layers x the three positions only, the same scores as the full sweep's
            assert r["labels"]["position"] == ["CLS", "r1c0", "r3c3"] and len(r["values"][0]) == 3
        for k, r in pm[key].items():
            ref = full["patching"]["metrics"][key][k]["values"]
            np.testing.assert_allclose(r["values"], np.asarray(ref)[:, [0, 5, 16]], rtol=1e-4, atol=1e-5)
    assert pm["within_by_layer"] == full["patching"]["metrics"]["within_by_layer"]
    assert (out / "patching" / "patching_within.png").is_file()
    em = steps["explorer"]["metrics"]["saes"]
    assert len(em) == 12 and all(s["listed"] == min(3, s["live"]) for s in em.values())
    assert any(s["live"] > 3 for s in em.values())
    page = read_explorer_data(out / "explorer" / "features.html")
    assert all(len(s["live"]) <= 3 and s["n_live"] >= len(s["live"]) for s in page["saes"])
    assert "explorer.max_latents is 3" in " ".join(run.results["explorer"].notes)


def test_interrupted_study_resumes(checkpoints, tmp_path, monkeypatch):
    cfg = study_config_from_dict(
        tiny_config(checkpoints, sae={"enabled": False}, patching={"enabled": False}, cka={"enabled": False})
    )
    calls = []

    def crash(ctx, w, prev):
        calls.append("attention")
        w.path("partial.txt").write_text("half written")
        raise RuntimeError("killed")

    monkeypatch.setattr(attention_step, "run", crash)
    with pytest.raises(RuntimeError, match="killed"):
        run_study(cfg, tmp_path)
    assert (tmp_path / "robustness" / "done.json").is_file() and (
        tmp_path / "logit_lens" / "done.json"
    ).is_file()
    assert not (tmp_path / "attention").exists() and not (tmp_path / "report.html").exists()
    monkeypatch.undo()
    run = run_study(cfg, tmp_path)
    assert run.cached == ["robustness", "logit_lens"] and run.computed == ["attention"]
    assert (tmp_path / "report.html").is_file() and calls == ["attention"]


def _without_timings(obj):
    """A result with its wall-clock fields dropped (they differ from run to run)."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "train_seconds_group")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_steps_side_by_side_give_the_results_of_one_after_the_other(finished, checkpoints, tmp_path):
    """``parallel_steps`` 2: the steps that fork no workers of their own run after the others, two at a time in
    forked one-thread processes; every step's result is the sequential run's (both at one thread), the
    report lists them in its own order and files land in each step's folder."""
    run = run_study(study_config_from_dict(tiny_config(checkpoints, parallel_steps=2)), tmp_path)
    assert run.computed == ALL_STEPS and run.cached == []
    assert list(run.results) == ALL_STEPS
    for step in ALL_STEPS:
        got = json.loads((tmp_path / step / "result.json").read_text())
        want = json.loads((finished[1] / step / "result.json").read_text())
        assert _without_timings(got) == _without_timings(want), step
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["steps"]) == ALL_STEPS and metrics["wall_seconds"] > 0
    side = {"sae_analysis", "patching", "cka"}
    assert run.side_by_side == [s for s in ALL_STEPS if s in side]
    assert all(v["side_by_side"] == (k in side) for k, v in metrics["steps"].items())
    assert (tmp_path / "patching" / "patching_within.png").is_file() and not (tmp_path / ".staging").exists()
    # a rerun finds every step up to date
    assert (
        run_study(study_config_from_dict(tiny_config(checkpoints, parallel_steps=2)), tmp_path).computed == []
    )


def test_a_step_failing_side_by_side_stops_the_study_and_resumes(checkpoints, tmp_path, monkeypatch):
    cfg = study_config_from_dict(
        tiny_config(
            checkpoints, parallel_steps=2, sae={"enabled": False}, patching={"enabled": False},
            cka={"enabled": False},
        )
    )  # fmt: skip

    def crash(ctx, w, prev):
        w.path("partial.txt").write_text("half written")
        raise RuntimeError("killed in a worker")

    monkeypatch.setattr(attention_step, "run", crash)
    with pytest.raises(RuntimeError, match="killed in a worker"):
        run_study(cfg, tmp_path)
    assert (tmp_path / "robustness" / "done.json").is_file()  # ran before the held-back steps
    assert not (tmp_path / "attention").exists() and not (tmp_path / "report.html").exists()
    monkeypatch.undo()
    run = run_study(cfg, tmp_path)
    assert "robustness" in run.cached and "attention" in run.computed
    assert (tmp_path / "report.html").is_file() and (tmp_path / "attention" / "done.json").is_file()


def test_parallel_steps_is_checked(checkpoints):
    for bad in (0, -1, True):
        with pytest.raises(ConfigError, match=rf"parallel_steps: expected (null|int).* got .*{bad}"):
            study_config_from_dict(tiny_config(checkpoints, parallel_steps=bad))


def test_hook_beyond_the_model_fails_before_any_step(checkpoints, tmp_path):
    cfg = tiny_config(checkpoints)
    cfg["sae"]["store"]["hook"] = "blocks.5.hook_resid_post"
    cfg = study_config_from_dict(cfg)
    with pytest.raises(
        ConfigError, match=r"^sae.store.hook: unknown hook 'blocks.5.hook_resid_post'; this model has 2"
    ):
        run_study(cfg, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # the out folder's lock file, no step output


def test_missing_checkpoint_is_a_clear_error(checkpoints, tmp_path):
    cfg = tiny_config(checkpoints)
    cfg["models"]["finetuned"][0]["checkpoint"] = str(tmp_path / "nope")
    with pytest.raises(
        ConfigError, match=r"^models.finetuned\[0\].checkpoint: .*nope is not a mechvit checkpoint"
    ):
        run_study(study_config_from_dict(cfg), tmp_path / "out")


# ---- report rendering (no study run) ------------------------------------------------------------------
def test_report_p_values_never_render_as_zero_and_text_cells_align_left():
    from mechvit.study.report import is_p_column, p_cell, table_html, table_markdown
    from mechvit.study.result import Table

    assert is_p_column("p") and is_p_column("p (permutation)") and not is_p_column("pca")
    assert p_cell(3e-9) == "< 0.0001" and p_cell(0.10784) == "0.108" and p_cell(None) == "–"
    t = Table(
        "", ["model", "model only", "p"], [["blur4", 1163, 1e-300], ["blur1", 132, 0.0072562]], digits=4
    )
    md = table_markdown(t)
    assert "| blur4 | 1163 | < 0.0001 |" in md and "| blur1 | 132 | 0.00726 |" in md and "0.0000" not in md
    h = table_html(t)
    assert (
        "<td class='t'>blur4</td><td>1163</td><td class='t'>&lt; 0.0001</td>" not in h
    )  # numbers stay right
    assert "<td class='t'>blur4</td><td>1163</td><td>&lt; 0.0001</td>" in h


def test_report_notes_lose_machine_length_floats():
    from mechvit.study.report import render_markdown, tidy_note

    note = "denominator 95% CI (5.320852547189091, -0.014344346217402992): unstable; 7 of 32; 0.5 kept"
    assert tidy_note(note) == "denominator 95% CI (5.32, -0.0143): unstable; 7 of 32; 0.5 kept"
    from mechvit.study.report import Section

    md = render_markdown("t", "i", [Section("s", "S", paragraphs=["one", "two"])], "r")
    assert "> one\n>\n> two\n" in md  # two notes stay two paragraphs


def test_report_cka_key_number_quotes_its_ci():
    from mechvit.study.report import _cka_line

    v = {
        "layers": ["0", "1", "2"],
        "cka_linear": [0.9, 0.5, 0.7],
        "token_reduction": "cls",
        "n_examples": 300,
    }
    assert _cka_line("base vs x, clean", v) == (
        "CKA base vs x, clean (linear, cls token, 300 images; one estimate, no CI): min over layers 0.500 "
        "(layer 1), last layer 0.700"
    )
    v["cka_linear_ci95"] = {"low": [0.88, 0.41, 0.66], "high": [0.92, 0.56, 0.75]}
    assert _cka_line("p", v).endswith(
        "95% CI: bootstrap over images): min over layers 0.500 [0.410, 0.560] (layer 1), last layer 0.700 [0.660, 0.750]"
    )


def test_report_sae_quality_table_known_answer():
    from mechvit.study.report import sae_quality

    def sae(ev, pca, dead, dense, acc_sae, change, l0=11.9):
        return {
            "heldout": {"explained_variance": ev, "dead_features": dead, "dense_features": dense, "d_sae": 100,
                        "l0": l0},
            "pca_k_explained_variance": pca, "convergence": {"change": change},
            "spliced_clean": {"accuracy_clean": 0.855, "accuracy_sae": acc_sae, "n_images": 200,
                              "accuracy_drop": {"estimate": 0.855 - acc_sae, "low": 0.011, "high": 0.04}},
        }  # fmt: skip

    table, (note, relu) = sae_quality(
        {
            "batchtopk|base|0": sae(0.97, 0.90, 10, 5, 0.845, 0.001, l0=12.0),  # every bar met (1.0 pp, L0 = k)
            "batchtopk|base|1": sae(0.95, 0.96, 11, 6, 0.83, -0.007, l0=12.04),  # every bar missed
            "ablation_gap": {"kl": 0.3},
        },
        k=12,
        architectures=["batchtopk"],
    )  # fmt: skip
    assert table.rows[0] == ["batchtopk", "base", "0", "yes", "yes", "yes", "yes", "yes", "yes"]
    assert table.rows[1] == ["batchtopk", "base", "1", "no (0.950 < 0.970)", "no (12.040 > 12)", "no (11%)",
                             "no (6.0%)", "no (2.5 pp [1.1, 4.0] of 200 images)", "no (-0.0070)"]  # fmt: skip
    assert note.startswith("SAE quality: 1 of 2 SAEs meet every criterion")
    assert "ReLU + L1" in relu and "not tested in this run" in relu and "sae.architectures: batchtopk" in relu

    # ReLU + L1 has no k: EV >= 0.90 at L0 <= 32, whatever the PCA with the config's k gives
    table, notes = sae_quality(
        {
            "standard|base|0": sae(0.91, 0.95, 1, 2, 0.85, 0.0, l0=31.5),
            "standard|base|1": sae(0.89, 0.50, 1, 2, 0.85, 0.0, l0=33.0),
        },
        k=12,
        architectures=["batchtopk", "standard"],
    )  # fmt: skip
    assert table.rows[0][3:5] == ["yes", "yes"]
    assert table.rows[1][3:5] == ["no (0.890 < 0.900)", "no (33.000 > 32)"]
    assert len(notes) == 1  # ReLU + L1 was trained: no note that it was not
    # without the config's k (an older caller), the L0 check of a k architecture is not made: '–'
    table, _ = sae_quality({"batchtopk|base|0": sae(0.97, 0.90, 10, 5, 0.85, 0.0, l0=99.0)})
    assert table.rows[0][4] == "–"
    # a CI bound just under 0 keeps its sign and a digit: not "-0.0"
    low = sae(0.97, 0.90, 10, 5, 0.843, 0.0)
    low["spliced_clean"]["accuracy_drop"]["low"] = -0.0004
    table, notes = sae_quality({"batchtopk|base|0": low}, k=12)
    assert table.rows[0][7] == "no (1.2 pp [-0.04, 4.0] of 200 images; its CI reaches the bar: within noise)"
    # that SAE misses nothing else: counted apart, with the CI's half-width and what would decide it
    assert notes[0].startswith("SAE quality: 0 of 1 SAEs meet every criterion")
    assert notes[1].startswith("1 more SAE misses the bar only by less than the measurement can tell")
    assert "the same 200 images, here with a CI of about +-2.0 pp" in notes[1]
    assert "raise sae.n_fidelity_images" in notes[1]
    # a CI wholly over 1 pp is a miss (base|1 above: [1.1, 4.0]), and a within-noise top-1 with another miss
    # is not counted apart
    also = sae(0.97, 0.90, 30, 5, 0.843, 0.0)  # 30% dead
    also["spliced_clean"]["accuracy_drop"]["low"] = 0.0
    _, notes = sae_quality({"batchtopk|base|0": also}, k=12)
    assert len(notes) == 1
    # L0 and EV with their CIs: over k with a CI reaching k is within noise; a CI wholly over k, or an EV CI
    # under the bar, is a plain miss
    near = sae(0.97, 0.90, 10, 5, 0.85, 0.0, l0=12.013)
    near["heldout"]["l0_ci"] = {"low": 11.99, "high": 12.04}
    near["heldout"]["explained_variance_ci"] = {"low": 0.965, "high": 0.975}
    far = sae(0.955, 0.95, 10, 5, 0.85, 0.0, l0=12.2)
    far["heldout"]["l0_ci"] = {"low": 12.1, "high": 12.3}
    far["heldout"]["explained_variance_ci"] = {"low": 0.950, "high": 0.959}
    edge = sae(0.955, 0.95, 10, 5, 0.85, 0.0, l0=11.0)
    edge["heldout"]["explained_variance_ci"] = {"low": 0.950, "high": 0.961}
    table, notes = sae_quality({"batchtopk|a|0": near, "batchtopk|b|0": far, "batchtopk|c|0": edge}, k=12)
    assert table.rows[0][3:5] == [
        "yes",
        "no (12.013 > 12 [11.990, 12.040]; its CI reaches the bar: within noise)",
    ]
    assert table.rows[1][3:5] == ["no (0.955 < 0.960 [0.950, 0.959])", "no (12.200 > 12 [12.100, 12.300])"]
    assert table.rows[2][3] == "no (0.955 < 0.960 [0.950, 0.961]; its CI reaches the bar: within noise)"
    assert notes[0].startswith("SAE quality: 0 of 3 SAEs meet every criterion")
    assert notes[1].startswith("2 more SAEs miss the bar only by less than the measurement can tell")


def test_report_names_what_each_fine_tune_was_trained_on_and_flags_other_severities():
    from types import SimpleNamespace

    from mechvit.study.report import severity_note, trained_on

    def card(seen, sev):
        return {
            "init_from": {"path": "b"},
            "config": {"corruption": {"seen": seen, "severities": sev, "p": 1.0}},
        }

    assert trained_on(card(["gaussian_blur"], [1])) == "gaussian_blur at severity 1, p = 1"
    assert (
        trained_on({"init_from": {"path": "b"}, "config": {"corruption": None}})
        == "clean images (no corruption)"
    )
    assert trained_on({}) == "–"
    infos = {
        "base": SimpleNamespace(card={}),
        "blur1": SimpleNamespace(card=card(["gaussian_blur"], [1])),
        "blur4": SimpleNamespace(card=card(["gaussian_blur"], [4])),
    }
    note = severity_note(infos, {"severities": [4]})
    assert "blur1 (trained at 1)" in note and "blur4" not in note
    assert severity_note({"blur4": infos["blur4"]}, {"severities": [4]}) is None


def test_report_takes_the_clean_controls_from_the_study_not_from_the_robustness_step(tmp_path):
    """A study rerun with ``--only sae sae_analysis`` has no robustness metrics in its run: the claims still
    know the clean control (a fine-tune whose card names no corruption) from the study context, which every
    step and the report share."""
    from mechvit.study.config import study_config_from_dict
    from mechvit.study.context import StudyContext

    ck = make_checkpoints(tmp_path / "ck")
    cfg = tiny_config(ck)
    cfg["models"]["finetuned"].append(
        {"name": "clean", "checkpoint": str(ck["base"])}
    )  # its card: no corruption
    ctx = StudyContext(study_config_from_dict(cfg), tmp_path / "out")
    assert ctx.control_names == ["clean"]


def test_sae_run_configs_give_threshold_batches_to_batchtopk_alone(tmp_path):
    """``sae.train`` is shared by every architecture of ``sae.architectures``; ``threshold_batches`` (BatchTopK's
    inference threshold) reaches the BatchTopK runs only: a ReLU + L1 config with it would be refused."""
    from mechvit.study.config import study_config_from_dict
    from mechvit.study.context import StudyContext
    from mechvit.study.steps.sae import run_configs, sae_runs

    ck = make_checkpoints(tmp_path / "ck")
    cfg = tiny_config(ck)
    cfg["sae"]["architectures"] = ["batchtopk", "standard"]
    cfg["sae"].setdefault("train", {})["threshold_batches"] = 4
    ctx = StudyContext(study_config_from_dict(cfg), tmp_path / "out")
    runs = sae_runs(ctx)
    _, trains = run_configs(ctx, runs, 64 * 1024)
    got = {r.architecture: trains[r.key].threshold_batches for r in runs}
    assert got == {"batchtopk": 4, "standard": 0}


@pytest.mark.slow
def test_single_models_get_one_sae_judged_with_the_others_but_in_no_comparison(checkpoints, tmp_path):
    """sae.single_models: one SAE each (replicate 0, its own seed), in the SAE table and the quality bar and the
    code cosine, in no overlap comparison (no seed pair within the model); the report says
    the feature claim leaves it out; explorer.replicates keeps the first replicates of each replicated model and the single SAE."""
    cfg = tiny_config(checkpoints)
    cfg["sae"] = {**cfg["sae"], "architectures": ["batchtopk"], "models": ["base", "ft_blur"]}
    cfg["sae"]["single_models"] = ["ft_noise"]
    cfg["explorer"] = {**cfg["explorer"], "replicates": 1}
    for step in ("robustness", "logit_lens", "attention", "patching", "cka"):
        cfg[step] = {**cfg[step], "enabled": False}
    run_study(study_config_from_dict(cfg), tmp_path)
    steps = json.loads((tmp_path / "metrics.json").read_text())["steps"]
    sae = steps["sae"]["metrics"]
    keys = sorted(k for k in sae if k.count("|") == 2)
    assert keys == [f"batchtopk|{m}|{r}" for m, r in
                    [("base", 0), ("base", 1), ("ft_blur", 0), ("ft_blur", 1), ("ft_noise", 0)]]  # fmt: skip
    assert len({sae[k]["seed"] for k in keys}) == 5  # every SAE its own initialisation and data order
    # the single SAE is replicate 0 by the same rule: the SAE a replicated run would train first for that model
    from mechvit.sae import derive_seed

    assert sae["batchtopk|ft_noise|0"]["seed"] == derive_seed(cfg.get("seed", 0), "batchtopk", "ft_noise", 0)
    assert (tmp_path / "sae" / "saes" / "batchtopk__ft_noise__r0" / "cfg.json").is_file()
    analysis = steps["sae_analysis"]["metrics"]
    assert list(analysis["overlap_controls"]["batchtopk"]["summary"]) == ["base vs ft_blur"]
    # the code cosine is per model: the single SAE is there, with no CI over seeds
    own = analysis["code_cosine"]["batchtopk|ft_noise|ft_noise|gaussian_blur/4"]
    assert own["n_saes"] == 1 and own["code"]["over_seeds"] is None and own["code"]["over_images"]["n"] > 0
    assert (
        analysis["code_cosine"]["batchtopk|ft_noise|base|gaussian_blur/4"]["n_saes"] == 2
    )  # the base's, shared
    assert (tmp_path / "sae_analysis" / "features_batchtopk_ft_blur.png").is_file()
    assert not (tmp_path / "sae_analysis" / "features_batchtopk_ft_noise.png").exists()  # in the explorer
    page = steps["explorer"]["metrics"]["saes"]
    assert list(page) == ["base · r0", "ft_blur · r0", "ft_noise · r0"]
    # seed stability matches against the replicates on the page only: r1 is not there
    assert all(row["stability"] is None for row in page.values())
    md = (tmp_path / "report.md").read_text()
    assert "3 of the 5 SAEs" in md and "explorer.replicates is 1" in md
    assert re.search(r"\| batchtopk \| ft_noise \| 0 \| (yes|no|–)", md)  # judged against the bar
    assert "ft_noise has one SAE each (sae.single_models)" in md


def test_report_says_which_fine_tunes_the_feature_claim_leaves_out():
    from mechvit.study.report import sae_coverage_note

    names = ["base", "blur1", "blur4", "noise4", "clean"]
    note = sae_coverage_note(names, "base", ["clean"], ["base", "blur4", "noise4", "clean"])
    assert note.startswith("Features claim: tested on 2 of the 3 fine-tunes (blur4, noise4)")
    assert "blur1 has no SAEs in this run" in note and "single_models" not in note.split(". sae.models")[0]
    both = sae_coverage_note(names + ["noise1"], "base", ["clean"], ["base", "blur4", "noise4"], ["noise1"])
    assert "the ones with replicated SAEs (sae.models: base, blur4, noise4); noise1 has one SAE each" in both
    assert "so the claim says nothing about them; blur1 has no SAEs in this run" in both
    assert sae_coverage_note(names, "base", ["clean"], names) is None  # every fine-tune has SAEs
    assert sae_coverage_note(names, "base", ["clean"], []) is None  # no SAE step: nothing to say
    assert "tested on 0 of the 3 fine-tunes (none)" in sae_coverage_note(names, "base", ["clean"], ["base"])


def test_report_states_roles_ablation_gap_ci_and_final_top1_ci(finished, checkpoints):
    """The Models table says each model's role; the ablation gap and the SAE key numbers carry their CIs; the
    logit-lens table gives the final top-1 its CI; the under-the-bar warning is the report's, from the config."""
    from mechvit.study.report import ablation_warning, cell

    run, out = finished
    md = (out / "report.md").read_text()
    assert "| model | role | source |" in md
    assert re.search(r"\| base \| base \|", md) and re.search(r"\| ft_blur \| fine-tune \|", md)
    metrics = json.loads((out / "metrics.json").read_text())["steps"]
    gap = metrics["sae"]["metrics"]["ablation_gap"]
    assert gap["kl_ci"]["low"] <= gap["kl"] <= gap["kl_ci"]["high"] and gap["kl_ci"]["n"] == 12
    assert re.search(r"mean-ablation gap of the SAE hook's tokens \(base model\): KL \S+ \[95% CI", md)
    sae_lines = [line for line in md.splitlines() if line.startswith("- SAE batchtopk")]
    assert sae_lines and all(line.count("[95% CI") == 3 for line in sae_lines)  # EV, L0, spliced KL
    assert (
        "| model | input | final top-1 | final top-1 low | final top-1 high | mean first correct block |"
        in md
    )
    # the warning follows sae.ablation_warn_nats, read at report time (changing it retrains nothing)
    sae_cfg = study_config_from_dict(tiny_config(checkpoints)).sae
    text = ablation_warning({"kl": 0.05}, sae_cfg)
    assert "patch tokens at blocks.1.hook_resid_post" in text and "under 0.1" in text
    assert cell(-0.0001, 3) == "0.000" and cell(-0.01, 3) == "-0.010"
