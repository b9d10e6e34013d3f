"""The benchmarks keep what they print (benchmarks/_common.py: kept_output): a file per run naming the commit,
the command line and the CPU, written atomically, a JSON copy of the numbers when the run gives one
(scripts/sae_sweep.py), and nothing for an interrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import kept_output  # noqa: E402


def test_a_finished_benchmark_keeps_what_it_printed(tmp_path, capsys):
    with kept_output("bench_x", tmp_path):
        print("| model | s |")
        print("| tiny | 0.5 |")
    files = list(tmp_path.glob("bench_x-*.md"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    text = files[0].read_text()
    assert text.startswith("# bench_x\n") and "at commit " in text and "UTC; CPU " in text
    assert text.endswith("| model | s |\n| tiny | 0.5 |\n")
    out = capsys.readouterr()
    assert "| tiny | 0.5 |" in out.out and f"kept: {files[0]}" in out.err  # the terminal still sees it


def test_a_finished_run_keeps_its_data_as_json_beside_the_markdown(tmp_path, capsys):
    """``kept.data`` goes to ``<same name>.json`` with the provenance of the .md (scripts/sae_sweep.py)."""
    with kept_output("sweep_x", tmp_path, command=["python", "s.py", "--k", "4"]) as kept:
        print("| k | EV |")
        kept.data = {"rows": [{"k": 4, "ev": 0.1 + 0.2}]}
    assert kept.path.parent == tmp_path and kept.data_path == kept.path.with_suffix(".json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.path.name, kept.data_path.name])
    stored = json.loads(kept.data_path.read_text())
    assert stored["data"] == {"rows": [{"k": 4, "ev": 0.1 + 0.2}]}  # every bit of the float
    assert stored["name"] == "sweep_x" and stored["command"] == "python s.py --k 4"
    assert stored["markdown"] == kept.path.name and isinstance(stored["dirty"], bool)
    assert kept.path.name.endswith(f"-{stored['commit']}{'+dirty' * stored['dirty']}.md")
    assert kept.path.read_text().startswith(f"# sweep_x\n\n`python s.py --k 4` at commit {stored['commit']}")


def test_an_interrupted_benchmark_keeps_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), kept_output("bench_y", tmp_path) as kept:
        print("half a table")
        kept.data = {"rows": []}
        raise KeyboardInterrupt
    assert kept.path is None and kept.data_path is None
    assert not list(tmp_path.iterdir())
    assert sys.stdout is sys.__stdout__ or not hasattr(sys.stdout, "parts")  # stdout restored


def test_data_is_strict_json_and_data_that_is_not_json_keeps_the_markdown(tmp_path, capsys):
    """NaN becomes null and numpy numbers Python ones; data JSON cannot hold loses neither the printed table
    nor its explanation."""
    import numpy as np

    with kept_output("sweep_nan", tmp_path) as kept:
        print("| k | EV |")
        kept.data = {"ev": float("nan"), "k": np.int64(4), "l0": np.float32(0.5)}
    assert json.loads(kept.data_path.read_text())["data"] == {"ev": None, "k": 4, "l0": 0.5}
    with pytest.raises(ValueError, match=r"kept .*sweep_bad-.*\.md, but not its data: it is not JSON"):
        with kept_output("sweep_bad", tmp_path) as kept:
            print("| k | EV |")
            kept.data = {"path": object()}
    (md,) = tmp_path.glob("sweep_bad-*.md")
    assert md.read_text().endswith("| k | EV |\n") and not list(tmp_path.glob("sweep_bad-*.json"))


def test_the_sweep_follows_the_benchmarks_results_folder(tmp_path, monkeypatch):
    """``MECHVIT_BENCH_RESULTS`` moves scripts/sae_sweep.py's kept output as it moves the benchmarks'; its
    ``--results`` wins over it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sae_sweep", Path(__file__).resolve().parents[1] / "scripts" / "sae_sweep.py"
    )
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    seen = []
    monkeypatch.setattr(sweep, "kept_output", lambda name, folder, command: seen.append(folder) or _stop())
    monkeypatch.setenv("MECHVIT_BENCH_RESULTS", str(tmp_path / "env"))
    for argv, want in (([], tmp_path / "env"), (["--results", str(tmp_path / "cli")], tmp_path / "cli")):
        with pytest.raises(_Stop):
            sweep.main(["--config", "configs/fashion_mnist.yaml", "--layer", "0", "--grid", "x2:4", *argv])
        assert Path(seen[-1]) == want


class _Stop(Exception):
    pass


def _stop():
    raise _Stop
