"""The quickstart notebook runs top to bottom on the default model, so it never rots."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    """Headless (MPLBACKEND=Agg for the kernel, as in CI), the notebook still shows its figure inline."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "MPLBACKEND": "Agg"})
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "log-likelihood:" in text and "Paris" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure is not shown"
