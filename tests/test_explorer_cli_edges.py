"""`mechvit explore` edge cases: which model an SAE runs on (the model hash its manifest records), SAE
folders with the same basename, SAEs that record no hook (--hook), and the study's SAE folders on the
command line as docs/explorer.md shows them."""

import json
from pathlib import Path

import pytest
import torch

import mechvit.viz.explorer as explorer
from mechvit.cli import main
from mechvit.sae import model_fingerprint
from tests.test_analysis_features import random_sae, tiny_model

HOOK = "blocks.0.hook_resid_post"
HAS_FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny HookedViTs (different weights) saved with save_pretrained, with their sha256."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("vit_a", 0), ("vit_b", 1)):
        m = tiny_model(seed)
        m.save_pretrained(root / name)
        out[name] = (root / name, model_fingerprint(m))
    return out


def save_sae(path: Path, hook: str | None = HOOK, seed: int = 0, **manifest) -> Path:
    sae = random_sae(hook or HOOK, seed=seed)
    sae.cfg.metadata.hook_name = hook
    sae.save_model(path)
    if manifest:
        (path / "mechvit_sae.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """run_cli up to write_explorer: the ExplorerSAE entries and models it would write (random images)."""
    got = {}

    def fake_write(out, entries, models, *args, **kwargs):
        got["entries"], got["models"] = entries, models
        page = tmp_path / "fake.html"
        page.write_text("x")
        return page

    def fake_data(split, root=None):
        return torch.rand(4, 1, 28, 28), torch.arange(4)

    monkeypatch.setattr(explorer, "write_explorer", fake_write)
    monkeypatch.setattr("mechvit.data.load_fashion_mnist", fake_data)
    return got


def explore(*args: str, out: Path | str = "unused") -> int:
    return main(["explore", *args, "--out", str(out), "--n-images", "4", "--k", "2", "--device", "cpu"])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    return next(line for line in err.splitlines() if line.startswith("mechvit explore: error:"))


# ---- 1. the model an SAE runs on ---------------------------------------------------------------------------


def test_an_sae_is_never_run_on_a_single_model_its_manifest_does_not_record(models, tmp_path, capsys):
    (_, ha), (pb, hb) = models["vit_a"], models["vit_b"]
    sae = save_sae(tmp_path / "sae", model_sha256=ha)
    out = tmp_path / "out"
    assert explore("--sae", str(sae), "--model", str(pb), out=out) != 0
    line = error_line(capsys)
    assert ha in line and hb in line and str(pb) in line and str(sae) in line
    assert not out.exists()


def test_the_single_model_is_used_when_the_manifest_records_no_hash_or_its_hash(models, tmp_path, captured):
    (pa, ha) = models["vit_a"]
    for i, manifest in enumerate([{}, {"training": {"seed": 3}}, {"model_sha256": ha}]):
        sae = save_sae(tmp_path / f"s{i}" / "sae", **manifest)
        assert explore("--sae", str(sae), "--model", str(pa)) == 0
        assert [(e.name, e.model) for e in captured["entries"]] == [("sae", "vit_a")]


def test_the_hash_picks_the_model_among_several(models, tmp_path, captured, capsys):
    (pa, ha), (pb, hb) = models["vit_a"], models["vit_b"]
    sa, sb = save_sae(tmp_path / "sa", model_sha256=ha), save_sae(tmp_path / "sb", model_sha256=hb)
    assert explore("--sae", str(sb), "--sae", str(sa), "--model", str(pa), "--model", f"b={pb}") == 0
    assert [(e.name, e.model) for e in captured["entries"]] == [("sb", "b"), ("sa", "vit_a")]
    # a hash none of several models has, and no hash with several models: errors naming what to write
    other = save_sae(tmp_path / "other", model_sha256="0" * 64)
    assert explore("--sae", str(other), "--model", str(pa), "--model", str(pb)) != 0
    line = error_line(capsys)
    assert "0" * 64 in line and ha in line and hb in line and f"MODEL={other}" in line
    none = save_sae(tmp_path / "none")
    assert explore("--sae", str(none), "--model", str(pa), "--model", str(pb)) != 0
    assert "records no model hash" in error_line(capsys)


def test_an_explicit_model_prefix_applies_the_sae_on_purpose_with_a_warning(
    models, tmp_path, captured, capsys
):
    (pa, ha), (pb, hb) = models["vit_a"], models["vit_b"]
    sae = save_sae(tmp_path / "sae", model_sha256=ha)
    assert explore("--sae", f"vit_b={sae}", "--model", str(pa), "--model", str(pb)) == 0
    assert [(e.name, e.model) for e in captured["entries"]] == [("sae", "vit_b")]
    err = capsys.readouterr().err
    assert "warning" in err and ha in err and hb in err


@pytest.mark.skipif(not HAS_FMNIST, reason="needs Fashion-MNIST")
def test_study_sae_folders_are_matched_by_hash_as_the_docs_show(tmp_path):
    """docs/explorer.md: `--sae runs/x/sae/saes/A` with several --model entries, matched by the model hash in
    the SAE's manifest (the study's SAE step records it as train_sae does)."""
    from mechvit.model import HookedViT
    from mechvit.study import run_study
    from mechvit.study.config import study_config_from_dict
    from mechvit.training.checkpoint import load_checkpoint
    from tests.test_study import make_checkpoints, tiny_config

    ck = make_checkpoints(tmp_path / "ck")
    cfg = tiny_config(ck)
    cfg["sae"] = {**cfg["sae"], "architectures": ["batchtopk"]}
    run_study(study_config_from_dict(cfg), tmp_path / "study", only=["sae"], report=False)
    saes = tmp_path / "study" / "sae" / "saes"
    for name in ("base", "ft_blur"):
        manifest = json.loads((saes / f"batchtopk__{name}__r0" / "mechvit_sae.json").read_text())
        assert manifest["model_sha256"] == model_fingerprint(HookedViT.from_timm(load_checkpoint(ck[name])))
    code = main(
        [
            "explore",
            "--sae",
            str(saes / "batchtopk__ft_blur__r0"),
            "--sae",
            str(saes / "batchtopk__base__r0"),
            "--model",
            f"base={ck['base']}",
            "--model",
            f"ft_blur={ck['ft_blur']}",
            "--out",
            str(tmp_path / "out"),
            "--n-images",
            "8",
            "--k",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    from tests.test_explorer import page_data

    data = page_data(tmp_path / "out" / "features.html")
    assert {s["name"]: s["model"] for s in data["saes"]} == {
        "batchtopk__ft_blur__r0": "ft_blur",
        "batchtopk__base__r0": "base",
    }


# ---- 2. names and hooks the command line can give -----------------------------------------------------------


def test_distinct_names_are_the_shortest_distinguishing_path_ends(tmp_path):
    from mechvit.viz.explorer import distinct_names

    assert distinct_names(["runs/a/sae", "runs/b/sae", "x/other"]) == ["a/sae", "b/sae", "other"]
    assert distinct_names(["r/s0/x/sae", "r/s1/x/sae", "xa/sae"]) == ["s0/x/sae", "s1/x/sae", "xa/sae"]
    assert distinct_names(["one"]) == ["one"]
    assert distinct_names(["a/sae", "./a/../a/sae"]) == [None, None]  # the same folder twice


def test_saes_with_the_same_basename_get_distinct_names(models, tmp_path, captured, capsys):
    pa, _ = models["vit_a"]
    a, b = save_sae(tmp_path / "a" / "sae"), save_sae(tmp_path / "b" / "sae", seed=1)
    assert explore("--sae", str(a), "--sae", str(b), "--model", str(pa)) == 0
    assert [e.name for e in captured["entries"]] == ["a/sae", "b/sae"]
    # NAME@=DIR and NAME@MODEL=DIR name them; the same folder twice needs names
    assert explore("--sae", f"seed0@={a}", "--sae", f"seed1@vit_a={b}", "--model", str(pa)) == 0
    assert [(e.name, e.model) for e in captured["entries"]] == [("seed0", "vit_a"), ("seed1", "vit_a")]
    assert explore("--sae", str(a), "--sae", str(a), "--model", str(pa)) != 0
    assert "given twice" in error_line(capsys)
    assert explore("--sae", f"x@={a}", "--sae", f"y@={a}", "--model", str(pa)) == 0
    assert explore("--sae", f"sae@={a}", "--sae", str(tmp_path / "b" / "sae"), "--model", str(pa)) != 0
    assert "NAME@" in error_line(capsys)


def test_hook_option_applies_to_saes_that_record_none(models, tmp_path, captured, capsys):
    pa, _ = models["vit_a"]
    with pytest.raises(SystemExit):
        main(["explore", "--help"])
    assert "--hook" in capsys.readouterr().out
    plain = save_sae(tmp_path / "plain", hook=None)
    assert explore("--sae", str(plain), "--model", str(pa)) != 0
    assert "--hook" in error_line(capsys)
    assert explore("--sae", str(plain), "--model", str(pa), "--hook", HOOK) == 0
    assert captured["entries"][0].hook == HOOK
    # a recorded hook: --hook may repeat it, not contradict it
    rec = save_sae(tmp_path / "rec", hook="blocks.1.hook_resid_post")
    assert explore("--sae", str(rec), "--model", str(pa)) == 0
    assert captured["entries"][0].hook == "blocks.1.hook_resid_post"
    assert explore("--sae", str(rec), "--model", str(pa), "--hook", "blocks.1.hook_resid_post") == 0
    assert explore("--sae", str(rec), "--model", str(pa), "--hook", HOOK) != 0
    line = error_line(capsys)
    assert "blocks.1.hook_resid_post" in line and HOOK in line
    assert explore("--sae", str(plain), "--model", str(pa), "--hook", "blocks.9.hook_resid_post") != 0
    assert "not a hook of this model" in error_line(capsys)


@pytest.mark.skipif(not HAS_FMNIST, reason="needs Fashion-MNIST")
def test_hook_and_distinct_names_reach_the_page(models, tmp_path):
    pa, _ = models["vit_a"]
    a, b = save_sae(tmp_path / "a" / "sae", hook=None), save_sae(tmp_path / "b" / "sae", seed=1)
    out = tmp_path / "out"
    assert explore("--sae", str(a), "--sae", str(b), "--model", str(pa), "--hook", HOOK, out=out) == 0
    from tests.test_explorer import page_data

    data = page_data(out / "features.html")
    assert [s["name"] for s in data["saes"]] == ["a/sae", "b/sae"]
