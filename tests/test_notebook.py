"""The walkthrough notebook runs top to bottom in a real Jupyter kernel (on fewer images, set
through its parameters cell), and is committed with its outputs."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
SMALL = "TRAIN_IMAGES = 1000\nEPOCHS = 1\nCROSSCHECK_STEPS = 3"


def stream_text(nb) -> str:
    return "".join(
        o.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.get("outputs", [])
    )


def test_the_walkthrough_runs_in_a_kernel(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = SMALL
    # Any failing cell raises CellExecutionError, naming the cell and its traceback.
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = stream_text(nb)
    assert re.search(r"\b\d+ passed, 0 failed\b", text) and "written by torch" in text
    accuracies = [
        line.split("test accuracy ")[1] for line in text.splitlines() if "evaluated by" in line
    ]
    assert len(accuracies) == 3 and len(set(accuracies)) == 1  # one checkpoint, three readers


def test_the_walkthrough_is_committed_with_its_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code[2:]), "a cell without output: execute it again"
    assert not any(o.output_type == "error" for c in code for o in c["outputs"])
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    # Committed with its full parameters, not the test's.
    assert SMALL not in "".join(c.source for c in code)
