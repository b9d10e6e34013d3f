"""scripts/sae_sweep.py (the sweep docs/sae.md quotes in "Choosing the SAE") keeps what it printed and the same
numbers as JSON (benchmarks/_common.py: kept_output): run on a tiny study config, the kept files name the
command, commit and dirty state, and hold exactly the numbers the sweep computed."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from test_study import ARCH, make_checkpoints, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("sae_sweep", ROOT / "scripts" / "sae_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the sweep sets torch's threads for the process


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def test_a_tiny_sweep_keeps_its_table_and_json_with_what_it_computed(tmp_path, capsys, one_thread):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(make_checkpoints(tmp_path / "ck"))))
    results = tmp_path / "results"
    argv = ["--config", str(config), "--model", "ft_blur", "--layer", "1", "--grid", "x2:4", "x2:4:3e-3:0.25"]
    kept = _script().main([*argv, "--results", str(results)])
    printed = capsys.readouterr().out
    data = kept.data

    # what the sweep computed, checked on its own terms (tiny_config: 32 train images, 6 held-out images clean
    # and under 2 conditions, 12 splice images; 28 px, 7 px patches: 16 patch tokens; width 32, x2)
    assert data["training_tokens"] == 32 * 16 and data["heldout_tokens"] == 6 * 3 * 16
    assert data["hook"] == "blocks.1.hook_resid_post" and data["splice_images"] == 12
    assert data["parts"] == ["clean", "gaussian_blur-4", "gaussian_noise-4"]
    rows = data["rows"]
    assert [(r["grid"], r["seed"], r["d_sae"]) for r in rows] == [("x2:4", 1, 64), ("x2:4:3e-3:0.25", 2, 64)]
    assert (rows[1]["lr"], rows[1]["aux_coefficient"]) == (3e-3, 0.25)
    for r in rows:
        assert r["d_sae"] == 2 * ARCH["embed_dim"] and r["k"] == 4
        assert math.isclose(r["l0"], sum(r["l0_by_part"]) / 3, rel_tol=1e-9)  # three equal parts
        assert 0 <= r["dead_features"] <= r["d_sae"] and 0 <= r["dense_features"] <= r["d_sae"]
        assert r["explained_variance"] <= 1 and r["pca_explained_variance"] <= 1 and r["kl"] >= 0

    # the files: one .md and its .json, nothing half-written, named by script, date and commit
    commit = _git("rev-parse", "--short", "HEAD").strip()
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    assert sorted(p.name for p in results.iterdir()) == sorted([kept.path.name, kept.data_path.name])
    assert kept.path.name.startswith("sae_sweep-") and kept.path.name.endswith(
        f"-{commit}{'+dirty' * dirty}.md"
    )
    assert kept.data_path == kept.path.with_suffix(".json")

    # the .json: provenance, and exactly the numbers computed (JSON keeps a float to the last bit)
    stored = json.loads(kept.data_path.read_text())
    command = " ".join(["python", "scripts/sae_sweep.py", *argv, "--results", str(results)])
    assert stored["data"] == data
    assert (stored["name"], stored["command"], stored["commit"], stored["dirty"]) == (
        "sae_sweep",
        command,
        commit,
        dirty,
    )
    assert stored["markdown"] == kept.path.name and stored["cpu"] and stored["cores"] >= 1

    # the .md: the header, then what the terminal saw; its table rows are the computed numbers, rounded
    text = kept.path.read_text()
    title, provenance, body = text.split("\n\n", 2)
    assert title == "# sae_sweep"
    assert (
        provenance.startswith(f"`{command}` at commit {commit}{'+dirty' * dirty}, ")
        and "UTC; CPU " in provenance
    )
    assert body == printed
    table = [line.split("|")[1:-1] for line in body.splitlines() if line.startswith("| ft_blur |")]
    assert len(table) == len(rows)
    for cells, r in zip(table, rows, strict=True):
        cells = [c.strip() for c in cells]
        assert cells[:7] == [
            "ft_blur",
            "1",
            "x2",
            "4",
            f"{r['lr']:g}",
            f"{r['aux_coefficient']:g}",
            str(r["seed"]),
        ]
        ev, pca, l0, by_part, dead, dense, drop, kl = cells[7:]
        assert float(ev) == round(r["explained_variance"], 3) and float(pca) == round(
            r["pca_explained_variance"], 3
        )
        assert float(l0) == round(r["l0"], 2)
        assert [float(v) for v in by_part.split(", ")] == [round(v, 2) for v in r["l0_by_part"]]
        assert dead == f"{r['dead_features']} / 64" and dense == f"{r['dense_features']} / 64"
        assert float(drop) == round(r["top1_drop_pp"], 1) and float(kl) == round(r["kl"], 4)
