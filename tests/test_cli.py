"""The `mechvit` command: every subcommand has --help; user errors are one line on stderr with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm

from mechvit import HookedViT
from mechvit.cli import main
from mechvit.training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ARCH = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("cmd", ["study", "convert", "train", "evaluate", "cards", "train-sae"])
def test_every_subcommand_has_help(cmd, capsys):
    try:
        code = main([cmd, "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    assert "usage:" in capsys.readouterr().out


def test_train_sae_help_names_the_mechvit_command(capsys):
    assert main(["train-sae", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mechvit train-sae ") and "python -m mechvit.sae" not in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("study", "convert", "train", "evaluate", "cards", "train-sae"):
        assert cmd in out


def test_cards_is_a_mechvit_command(capsys):
    """``mechvit cards`` is ``python -m mechvit.training cards``: the same report, and a card whose accuracy
    hides its count is one error line (exit 2), not a traceback."""
    code, out, _ = run(capsys, "cards", str(ROOT / "checkpoints" / "fmnist_vit_clean_ft"))
    assert code == 0 and out == "fmnist_vit_clean_ft: 12 accuracy records, up to date\n"
    with pytest.raises(SystemExit):
        main(["cards", "--help"])
    assert "(counts, Wilson 95% CIs)" in " ".join(capsys.readouterr().out.split())  # not 95%%


def test_cards_exits_1_when_a_block_is_missing_without_write(tmp_path, capsys):
    """``mechvit cards DIR`` is a check (README): status 1, and a line saying to rerun with --write, when a
    card's accuracy block is missing or incomplete; 0 once written. --table with --write is a usage error."""
    card = json.loads((ROOT / "checkpoints" / "fmnist_vit_clean_ft" / "card.json").read_text())
    card.pop("accuracy")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text(json.dumps(card))
    code, out, _ = run(capsys, "cards", str(tmp_path / "m"))
    assert code == 1 and out.splitlines() == [
        "m: 12 accuracy records (12 new) to write (--write)",
        "cards to write: 1 of 1; rerun with --write to complete their accuracy blocks",
    ]
    code, out, _ = run(capsys, "cards", str(tmp_path / "m"), "--write")
    assert code == 0 and out == "m: 12 accuracy records (12 new) written\n"
    code, out, _ = run(capsys, "cards", str(tmp_path / "m"))
    assert code == 0 and out == "m: 12 accuracy records, up to date\n"
    with pytest.raises(SystemExit) as e:
        main(["cards", str(tmp_path / "m"), "--write", "--table", "checkpoints"])
    assert e.value.code == 2
    assert "argument --table: not allowed with argument --write" in capsys.readouterr().err
    code, _, err = run(capsys, "cards", str(tmp_path / "none"))
    _one_line_error(code, err, "mechvit cards: error: no card.json in")


def test_readme_cli_overview_lists_every_command():
    parser = __import__("mechvit.cli", fromlist=["build_parser"]).build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("- **CLI**"))
    listed = line.split("`mechvit ", 1)[1].split("`", 1)[0].split(" | ")
    assert sorted(listed) == sorted(commands), line
    assert (
        "mechvit cards"
        in (ROOT / "docs" / "training.md").read_text().split("## Commands", 1)[1].split("\n## ")[0]
    )


def _one_line_error(code, err, prefix):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def test_study_config_errors_are_one_line(tmp_path, capsys):
    line = _one_line_error(
        *run(capsys, "study", "--config", str(tmp_path / "nope.yaml"))[::2], "mechvit study: error:"
    )
    assert "does not exist" in line
    line = _one_line_error(
        *run(capsys, "study", "--validate", "--set", "sae.store.hook=blocks.9.hook_foo")[::2],
        "mechvit study: error: sae.store.hook: unknown hook 'blocks.9.hook_foo'",
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "configs" / "fashion_mnist.yaml").read_text().replace("severity: 4", "severity: four", 1)
    )
    _one_line_error(
        *run(capsys, "study", "--config", str(bad))[::2],
        "mechvit study: error: conditions[0].severity: expected int, got str",
    )
    _one_line_error(
        *run(capsys, "study", "--validate", "--set", "nonsense")[::2], "mechvit study: error: --set"
    )
    _one_line_error(
        *run(capsys, "study", "--only", "bogus", "--set", "models.base.checkpoint=" + str(tmp_path / "none"))[
            ::2
        ],
        "mechvit study: error:",
    )


def test_validate_the_shipped_configs(capsys):
    for name in ("fashion_mnist.yaml", "fashion_mnist_all_saes.yaml", "fashion_mnist_relu.yaml",
                 "fashion_mnist_seeds.yaml"):  # fmt: skip
        code, out, _ = run(capsys, "study", "--config", str(ROOT / "configs" / name), "--validate")
        assert code == 0 and "valid" in out and "checked against the base model" in out, out
    code, out, _ = run(
        capsys, "study", "--config", str(ROOT / "configs" / "imagenet_paper.yaml"), "--validate"
    )
    assert code == 0 and "valid" in out
    # nothing downloaded, nothing trained: what was not checked is said
    assert "models.base's pretrained timm weights (vit_base_patch16_224) are not downloaded" in out
    assert "no checkpoint yet at checkpoints/imagenet_vitb16_gaussian_blur_1," in out
    assert "the checks against the base model run when the study starts" in out


def test_validate_checks_the_config_against_the_base_model(capsys):
    """The checks that need the model (the SAE hook, the SAE run length and k, ...) run at --validate, with
    the study's one-line errors, not only when the study starts."""
    cases = {
        "sae.store.hook=blocks.9.hook_resid_post": "sae.store.hook: unknown hook 'blocks.9.hook_resid_post'; "
        "this model has 6 blocks",
        "sae.train.k=5000": "sae.train: k (5000) must not exceed d_sae (1152",
        "sae.train.lr_warmup_steps=5000": "sae.train: lr_warmup_steps must be in [0, 980)",
        "attention.view_layers=[7]": "attention.view_layers: [7] out of range",
    }
    for override, message in cases.items():
        code, out, err = run(capsys, "study", "--validate", "--set", override)
        assert out == "", override
        _one_line_error(code, err, f"mechvit study: error: {message}")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("mechvit") and "unrecognized arguments: --no-such-flag" in err[0]
    )
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_convert_timm_name_and_checkpoint(tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "convert",
        "vit_tiny_patch16_224",
        str(tmp_path / "a"),
        "--set",
        "img_size=28",
        "patch_size=7",
        "in_chans=1",
        "num_classes=10",
        "embed_dim=32",
        "depth=2",
        "num_heads=2",
    )
    assert code == 0 and "2 layers" in out
    m = HookedViT.from_pretrained(tmp_path / "a")
    assert (m.cfg.n_layers, m.cfg.d_model, m.cfg.grid_size) == (2, 32, (4, 4))
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
    save_checkpoint(tmp_path / "ck", tm, {"model": {"name": "vit_tiny_patch16_224", "kwargs": ARCH}})
    code, out, _ = run(capsys, "convert", str(tmp_path / "ck"), str(tmp_path / "b"))
    assert code == 0
    m = HookedViT.from_pretrained(tmp_path / "b")
    sd = m.to_timm_state_dict()
    assert all((sd[k] == v).all() for k, v in tm.state_dict().items())  # same weights round trip


def test_convert_errors(tmp_path, capsys):
    _one_line_error(
        *run(capsys, "convert", "not_a_model_xyz", str(tmp_path / "o"))[::2],
        "mechvit convert: error: 'not_a_model_xyz' is neither a folder nor a timm model name",
    )
    (tmp_path / "empty").mkdir()
    _one_line_error(
        *run(capsys, "convert", str(tmp_path / "empty"), str(tmp_path / "o"))[::2], "mechvit convert: error:"
    )


def test_train_and_evaluate_delegate_with_clear_errors(tmp_path, capsys):
    _one_line_error(
        *run(capsys, "train", "--config", str(tmp_path / "missing.yaml"))[::2], "mechvit train: error:"
    )
    cfg = tmp_path / "t.yaml"
    cfg.write_text("out: x\nmodel: {name: vit_tiny_patch16_224}\nepochz: 3\n")
    line = _one_line_error(*run(capsys, "train", "--config", str(cfg))[::2], "mechvit train: error:")
    assert "epochz" in line
    line = _one_line_error(
        *run(capsys, "train", "--config", str(cfg), "--set", "epochs")[::2], "mechvit train: error:"
    )
    assert "--set expects KEY=VALUE" in line and "'epochs'" in line
    _one_line_error(*run(capsys, "evaluate", str(tmp_path / "nope"))[::2], "mechvit evaluate: error:")


def test_train_sae_errors(tmp_path, capsys):
    code = main(
        [
            "train-sae",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--hook",
            "blocks.0.hook_resid_post",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["train-sae", "--hook", "x"]) == 2  # an argparse error names the mechvit command too
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("mechvit train-sae: error:")


@pytest.mark.slow  # 20-70 s: a fresh interpreter imports torch, timm and sae-lens
def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "mechvit"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mechvit.cli"]
    p = subprocess.run([*cmd, "study", "--validate", "--set", "seed=x"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "mechvit study: error: seed: expected int, got str 'x'"
    p = subprocess.run([*cmd, "study", "--validate"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    json.dumps(p.stdout)


def test_unsupported_features_and_bad_devices_are_one_line(tmp_path, capsys):
    line = _one_line_error(
        *run(
            capsys,
            "convert",
            "vit_tiny_patch16_224",
            str(tmp_path / "o"),
            "--set",
            "depth=1",
            "embed_dim=32",
            "num_heads=2",
            "img_size=32",
            "scale_attn_norm=true",
        )[::2],
        "mechvit convert: error:",
    )
    assert "scale_attn_norm" in line  # the NotImplementedError names the feature
    line = _one_line_error(
        *run(capsys, "convert", "vit_tiny_patch16_224", str(tmp_path / "o"), "--set", "depht=1")[::2],
        "mechvit convert: error: timm.create_model('vit_tiny_patch16_224') refused --set",
    )
    assert "depht" in line
    assert not (tmp_path / "o").exists()
    ckpt = str(ROOT / "checkpoints" / "fmnist_vit_base")
    for argv in (
        ["evaluate", ckpt, "--device", "cudx"],
        [
            "train-sae",
            "--checkpoint",
            ckpt,
            "--hook",
            "blocks.0.hook_resid_post",
            "--out",
            "x",
            "--device=gpu",
        ],
        ["explore", "--sae", "s", "--model", ckpt, "--out", "x", "--device", "cuda:99"],
    ):
        line = _one_line_error(*run(capsys, *argv)[::2], f"mechvit {argv[0]}: error: --device: expected")
        assert repr(argv[-1].removeprefix("--device=")) in line


def test_a_device_named_in_a_config_is_a_user_error():
    import torch

    from mechvit.cli import _is_user_error

    with pytest.raises(RuntimeError) as e:
        torch.device("cudx")
    assert _is_user_error(e.value)
    assert _is_user_error(FileExistsError(17, "File exists", "/some/out"))  # e.g. --out names a file
    assert not _is_user_error(RuntimeError("shape mismatch in a matmul"))  # a bug keeps its traceback
    assert not _is_user_error(KeyError("x"))


def test_a_second_study_on_one_out_folder_is_refused_in_one_line(tmp_path, capsys):
    import os

    from mechvit._io import FolderLock

    out = tmp_path / "run"
    with FolderLock(out):  # another run holds the folder
        line = _one_line_error(
            *run(capsys, "study", "--out", str(out), "--quiet", "--only", "cka")[::2], "mechvit study: error:"
        )
    assert f"{out} is in use by another run (pid {os.getpid()})" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing computed
    (tmp_path / "a_file").write_text("")
    line = _one_line_error(
        *run(capsys, "study", "--out", str(tmp_path / "a_file"), "--quiet")[::2], "mechvit study: error:"
    )
    assert "File exists" in line and "a_file" in line


def test_study_quiet_turns_every_bar_off(monkeypatch, capfd):
    """--quiet sets progress=False, which the runner turns into runtime.progress_bars(False): sae-lens's own
    training and norm-estimation bars are silent inside it (and shown outside it, so this can fail)."""
    import torch

    import mechvit.study
    from mechvit.runtime import progress_bars
    from mechvit.sae.train import SAETrainingConfig, train_sae

    seen = {}

    def fake_run_study(cfg, out, **kw):
        seen["progress"] = cfg.progress
        raise ValueError("stop here")

    monkeypatch.setattr(mechvit.study, "run_study", fake_run_study)
    run(capfd, "study", "--quiet")
    assert seen["progress"] is False
    run(capfd, "study")
    assert seen["progress"] is True

    def train() -> str:
        g = torch.Generator().manual_seed(0)
        batches = iter([torch.randn(32, 8, generator=g) for _ in range(4)])
        cfg = SAETrainingConfig(
            expansion_factor=1, k=2, batch_size=32, total_samples=64, n_batches_for_norm_estimate=2
        )
        capfd.readouterr()
        train_sae(batches, 8, cfg)
        return capfd.readouterr().err

    assert "Training SAE" in train()
    with progress_bars(False):
        err = train()
    assert "Training SAE" not in err and "Estimating norm" not in err and "it/s" not in err, err


def test_study_help_lists_every_step_for_only(capsys):
    from mechvit.study.steps import STEPS

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for step in STEPS:
        words = (
            out[out.rindex("--only") : out.rindex("--validate")].replace("(", " ").replace(")", " ").split()
        )
        assert step.name in words, step.name


def test_a_timm_typo_and_a_disabled_only_step_are_one_line(capsys, tmp_path):
    """Finding 10: a typo in a ``timm:`` name gave a RuntimeError traceback (base: at --validate; fine-tune: in a
    step); finding 11: --only on a disabled step ran nothing and exited 0."""
    _one_line_error(
        *run(capsys, "study", "--validate", "--set", "models.base={name: b, timm: vit_tiny_patch16_2244}")[
            ::2
        ],
        "mechvit study: error: models.base.timm: unknown timm model 'vit_tiny_patch16_2244'",
    )
    _one_line_error(
        *run(capsys, "study", "--only", "cka", "--set", "cka.enabled=false", "--out", str(tmp_path / "x"))[
            ::2
        ],
        "mechvit study: error: --only cka: cka is disabled in this config (cka.enabled: false)",
    )
    assert not (tmp_path / "x").exists()


def test_validate_checks_every_image_count_against_its_split(capsys):
    """An image count larger than its split is refused by --validate (naming the keys), not when the study
    first loads the images."""
    code, out, err = run(capsys, "study", "--validate", "--set", "robustness.n_images=20000")
    assert out == ""
    _one_line_error(
        code,
        err,
        "mechvit study: error: robustness.n_images: the test split holds 10000 images, the config asks for "
        "20000 (robustness.n_images: 20000)",
    )
    code, out, err = run(capsys, "study", "--validate", "--set", "sae.n_train_images=70000")
    assert out == ""
    _one_line_error(code, err, "mechvit study: error: sae.n_train_images: the train split holds 60000 images")
