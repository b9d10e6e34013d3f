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


@pytest.mark.parametrize("cmd", ["study", "convert", "train", "evaluate", "train-sae"])
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
    for cmd in ("study", "convert", "train", "evaluate", "train-sae"):
        assert cmd in out


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
    for name in ("fashion_mnist.yaml", "imagenet_paper.yaml"):
        code, out, _ = run(capsys, "study", "--config", str(ROOT / "configs" / name), "--validate")
        assert code == 0 and "valid" in out


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


def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "mechvit"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "mechvit.cli"]
    p = subprocess.run([*cmd, "study", "--validate", "--set", "seed=x"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "mechvit study: error: seed: expected int, got str 'x'"
    p = subprocess.run([*cmd, "study", "--validate"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    json.dumps(p.stdout)
