"""The notebooks run top to bottom on the default model, so they never rot."""
import json
import os
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
FINETUNE_NOTEBOOK = NOTEBOOK.with_name("lora_finetune.ipynb")


def test_quickstart_notebook_executes(tmp_path):
    """Headless (MPLBACKEND=Agg for the kernel, as in CI), the notebook still shows its figure inline."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "MPLBACKEND": "Agg"})
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "log-likelihood:" in text and "Paris" in text
    assert "best answer:  Mars" in text
    ran, submitted = map(int, re.search(r"prompt tokens run: (\d+) of (\d+) submitted", text).groups())
    assert ran < submitted / 2  # the question (most of each prompt) ran once, not four times
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2, "a figure is not shown"


def execute(path: Path, cwd: Path, **env) -> list[dict]:
    """Run a notebook headless (MPLBACKEND=Agg for the kernel, as in CI) in `cwd`; -> every code cell's outputs."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env={**os.environ, "MPLBACKEND": "Agg", **env})
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


@pytest.mark.slow
def test_lora_finetune_notebook_executes(tmp_path):
    """With 10 training steps: the loss plot is shown, the adapter is saved in PEFT layout and served, and even
    10 steps raise the held-out log-likelihood."""
    start = time.perf_counter()
    outputs = execute(FINETUNE_NOTEBOOK, tmp_path, JAXGEN_NOTEBOOK_STEPS="10")
    print(f"lora_finetune.ipynb with 10 steps: {time.perf_counter() - start:.0f} s")
    text = "".join(o.get("text", "") for o in outputs)
    assert "step    9  loss" in text and "['velmora']" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot is not shown"
    config = json.loads((tmp_path / "velmora-lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert (tmp_path / "velmora-lora" / "adapter_model.safetensors").is_file()
    lls = {}
    for line in text.splitlines():
        if line.startswith("held-out log-likelihood, "):
            name, value = line.removeprefix("held-out log-likelihood, ").split(": ")
            lls[name] = float(value.split()[0])
    assert set(lls) == {"base", "velmora"}
    assert lls["velmora"] > lls["base"] + 10, lls
