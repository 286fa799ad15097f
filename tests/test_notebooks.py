"""The walkthrough notebook runs top to bottom (its code cells, in order, with a tiny budget)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_walkthrough_runs(monkeypatch):
    monkeypatch.setenv("FAIRNESS_NOTEBOOK_ITERATIONS", "2")
    monkeypatch.chdir(NOTEBOOK.parent)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    scope: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name}:{cell['id']}", "exec"), scope)
    assert scope["result"].report_path.exists()
    assert len(scope["images"]) == 4
