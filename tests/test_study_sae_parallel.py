"""The study's SAE step with the models' SAE groups trained in forked one-thread processes
(``sae.parallel_models``) against the same step in one process: the same SAEs bit for bit, the same
metrics; a worker's error reaches the caller; the worker count follows the config."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mechvit import runtime
from mechvit.runtime import forked_map
from mechvit.study import run_study
from mechvit.study.config import ConfigError, study_config_from_dict
from mechvit.study.context import parallel_workers
from mechvit.study.steps import sae as sae_step
from tests.test_study import make_checkpoints, tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ck"))


def _sae_study(checkpoints, out, parallel: int):
    cfg = tiny_config(checkpoints)
    cfg["sae"] = {**cfg["sae"], "architectures": ["batchtopk"], "parallel_models": parallel}
    return run_study(study_config_from_dict(cfg), out, only=["sae"], report=False)


def test_forked_workers_train_the_saes_of_one_process(checkpoints, tmp_path):
    _sae_study(checkpoints, tmp_path / "one", 1)
    threads = torch.get_num_threads()
    run = _sae_study(checkpoints, tmp_path / "two", 2)
    assert torch.get_num_threads() == threads  # the workers' one thread stays in the workers
    assert run.computed == ["sae"]
    one = sorted((tmp_path / "one" / "sae" / "saes").iterdir())
    two = sorted((tmp_path / "two" / "sae" / "saes").iterdir())
    assert [d.name for d in one] == [d.name for d in two] and len(one) == 3 * 2  # 3 models x 2 replicates
    for a, b in zip(one, two, strict=True):
        wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (a.name, key)
        ma, mb = (json.loads((d / "mechvit_sae.json").read_text()) for d in (a, b))
        assert ma["heldout_metrics"] == mb["heldout_metrics"] and ma["spliced_clean"] == mb["spliced_clean"]
    ra, rb = (json.loads((tmp_path / d / "sae" / "result.json").read_text()) for d in ("one", "two"))
    drop = ("train_seconds_group",)
    for key, value in ra["metrics"].items():
        other = rb["metrics"][key]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in drop}
            other = {k: v for k, v in other.items() if k not in drop}
        assert value == other, key


def test_a_worker_error_reaches_the_study(checkpoints, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("the SAE trainer failed in a worker")

    monkeypatch.setattr(sae_step, "train_saes", broken)  # forked workers inherit the patched module
    with pytest.raises(ValueError, match="the SAE trainer failed in a worker"):
        _sae_study(checkpoints, tmp_path / "broken", 2)
    assert not list((tmp_path / "broken").glob("sae/saes/*"))


def test_worker_count_follows_the_config():
    def ctx(parallel, threads, device="cpu"):
        cfg = SimpleNamespace(sae=SimpleNamespace(parallel_models=parallel), num_threads=threads)
        return SimpleNamespace(cfg=cfg, device=torch.device(device))

    assert parallel_workers(ctx(None, 2), 4, ctx(None, 2).cfg.sae) == 2
    assert parallel_workers(ctx(None, 8), 3, ctx(None, 8).cfg.sae) == 3  # never more than the models left
    assert parallel_workers(ctx(1, 2), 4, ctx(1, 2).cfg.sae) == 1
    assert parallel_workers(ctx(4, 1), 1, ctx(4, 1).cfg.sae) == 1
    meta = ctx(None, 2, "meta")
    assert parallel_workers(meta, 4, meta.cfg.sae) == 1  # not on an accelerator
    import multiprocessing as mp

    real = mp.get_all_start_methods
    try:
        mp.get_all_start_methods = lambda: ["spawn"]  # a platform that cannot fork (Windows)
        assert parallel_workers(ctx(None, 2), 4, ctx(None, 2).cfg.sae) == 1
    finally:
        mp.get_all_start_methods = real


def test_no_workers_inside_a_worker():
    """Inside a forked_map worker (a step run side by side with another) a step's own fan-out is one process:
    forked_map does not nest."""
    cfg = SimpleNamespace(sae=SimpleNamespace(parallel_models=None), num_threads=2)
    c = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
    assert parallel_workers(c, 4, cfg.sae) == 2
    got = dict(forked_map(lambda i: (runtime.in_forked_worker(), parallel_workers(c, 4, cfg.sae)), [0, 1], 2))
    assert got == {0: (True, 1), 1: (True, 1)}
    assert not runtime.in_forked_worker()


@pytest.mark.parametrize("section", ["sae", "explorer"])
@pytest.mark.parametrize("bad", [0, True])
def test_parallel_models_is_checked(checkpoints, section, bad):
    cfg = tiny_config(checkpoints)
    cfg[section] = {**cfg.get(section, {}), "parallel_models": bad}
    with pytest.raises(ConfigError, match=rf"{section}.parallel_models: expected (null|int).* got .*{bad}"):
        study_config_from_dict(cfg)
    cfg[section]["parallel_models"] = 3
    assert getattr(study_config_from_dict(cfg), section).parallel_models == 3


def test_explorer_worker_count_follows_its_own_setting():
    def ctx(sae, explorer, threads):
        cfg = SimpleNamespace(
            sae=SimpleNamespace(parallel_models=sae), explorer=SimpleNamespace(parallel_models=explorer),
            num_threads=threads,
        )  # fmt: skip
        return SimpleNamespace(cfg=cfg, device=torch.device("cpu"))

    assert parallel_workers(ctx(1, None, 2), 4, ctx(1, None, 2).cfg.explorer) == 2
    c = ctx(None, 1, 2)
    assert parallel_workers(c, 4, c.cfg.explorer) == 1 and parallel_workers(c, 4, c.cfg.sae) == 2


def test_sae_sweep_script_prints_a_row_per_configuration(checkpoints, tmp_path):
    """``scripts/sae_sweep.py`` (the sweep behind the default SAE, docs/sae.md) on the tiny study: one table
    row per grid entry, with the held-out numbers of the study's own held-out set; a bad grid entry is
    refused with what was expected."""
    import subprocess
    import sys

    import yaml

    cfg = tiny_config(checkpoints)
    cfg["sae"] = {**cfg["sae"], "n_fidelity_images": 8, "n_heldout_images": None}  # held-out: the 8 as well
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "scripts/sae_sweep.py", "--config", str(tmp_path / "tiny.yaml"), "--layer", "1"]
    cmd += ["--results", str(tmp_path / "results")]  # its kept output, not in the repo
    grid = ["--grid", "x2:4", "x4:2:3e-3:0.5", "x2:4", "--mix", "0.25"]
    done = subprocess.run([*cmd, *grid], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| base |")]
    aux = 1 / 32  # the tiny config leaves sae.train.aux_coefficient at its default: x2:4 keeps it
    assert [tuple(c.strip() for c in r[2:7]) for r in rows] == [
        ("x2", "4", "0.001", f"{aux:g}", "1"),
        ("x4", "2", "0.003", "0.5", "2"),
        ("x2", "4", "0.001", f"{aux:g}", "3"),  # a repeated entry: the next seed, not the same SAE
    ]
    for r in rows:
        ev, l0 = float(r[7]), float(r[9])
        parts = [float(v) for v in r[10].split(",")]  # clean, blur-4, noise-4: their mean is the held-out L0
        assert -1.0 < ev <= 1.0 and 0 < l0 and len(parts) == 3
        assert sum(parts) / 3 == pytest.approx(l0, abs=0.01)
    assert rows[0][7:] != rows[2][7:]
    assert "(mix fraction 0.25)" in done.stdout
    assert "384 held-out tokens" in done.stdout  # 8 images x 3 inputs (clean + 2 conditions) x 16 patches
    bad = subprocess.run([*cmd, "--grid", "8:4"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "expected expansion:k[:lr[:aux]] like x8:14" in bad.stderr


def test_robustness_step_in_forked_workers_equals_one_process(checkpoints, tmp_path):
    """``robustness.parallel_models`` = 2: the models' groups in forked one-thread processes give the
    one-process step result exactly (metrics, notes, the order of every table)."""
    out = {}
    for parallel in (1, 2):
        cfg = tiny_config(checkpoints)
        cfg["robustness"] = {**cfg.get("robustness", {}), "parallel_models": parallel}
        run_study(study_config_from_dict(cfg), tmp_path / str(parallel), only=["robustness"])
        out[parallel] = json.loads((tmp_path / str(parallel) / "robustness" / "result.json").read_text())
    assert out[1]["metrics"] == out[2]["metrics"] and len(out[2]["metrics"]["rows"]) > 3
    assert out[1]["notes"] == out[2]["notes"] and out[1]["tables"] == out[2]["tables"]
