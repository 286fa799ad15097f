"""The walkthrough notebooks run top to bottom (their code cells, in order, with a tiny budget)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"
SD15_NOTEBOOK = NOTEBOOK.parent / "sd15.ipynb"


def _run_code_cells(notebook: Path) -> dict:
    """Execute a notebook's code cells in order in one namespace, as a kernel would."""
    scope: dict = {}
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{notebook.name}:{cell['id']}", "exec"), scope)
    return scope


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_walkthrough_runs(monkeypatch):
    monkeypatch.setenv("FAIRNESS_NOTEBOOK_ITERATIONS", "2")
    monkeypatch.chdir(NOTEBOOK.parent)
    scope = _run_code_cells(NOTEBOOK)
    assert scope["result"].report_path.exists()
    assert len(scope["images"]) == 4


@pytest.mark.timeout(600)
def test_sd15_walkthrough_runs_on_a_tiny_pipeline(monkeypatch, tmp_path):
    """The GPU walkthrough, every cell in order, on a tiny SD pipeline with the real backends."""
    monkeypatch.setenv("FAIRNESS_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FAIRNESS_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.chdir(SD15_NOTEBOOK.parent)
    scope = _run_code_cells(SD15_NOTEBOOK)
    result = scope["result"]
    assert result.train.steps == 2 and any(result.train.adapter_dir.iterdir())
    assert result.report_path.exists() and len(scope["images"]) == 4
