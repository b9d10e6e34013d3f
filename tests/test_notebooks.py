"""Every notebook is stored without outputs and runs headless, top to bottom, on small settings."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart",
        "02_activation_patching",
        "03_sae_feature_overlap",
        "04_robustness_study",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless(path, monkeypatch):
    monkeypatch.setenv("MECHVIT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MECHVIT_NOTEBOOK_THREADS", os.environ.get("MECHVIT_TEST_THREADS", "1"))
    nb = nbformat.read(path, as_version=4)
    # a cell error raises CellExecutionError and fails the test
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
