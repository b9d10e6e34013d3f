"""The benchmarks keep what they print (benchmarks/_common.py: kept_output): a file per run naming the commit,
the command line and the CPU, written atomically, and nothing for an interrupted run."""

from __future__ import annotations

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


def test_an_interrupted_benchmark_keeps_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), kept_output("bench_y", tmp_path):
        print("half a table")
        raise KeyboardInterrupt
    assert not list(tmp_path.iterdir())
    assert sys.stdout is sys.__stdout__ or not hasattr(sys.stdout, "parts")  # stdout restored
