import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
requires_fmnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist not installed (make test installs it)",
)


@requires_fmnist
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SOP_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("SOP_NOTEBOOK_KNN_TRAIN", "500")
    monkeypatch.setenv("SOP_NOTEBOOK_KNN_VAL", "200")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    cell_outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    outputs = "".join(o.get("text", "") for o in cell_outputs)
    assert "top-1" in outputs and "->" in outputs
    # the progress bar draws as a widget (the notebook extra installs ipywidgets): no warning at each refresh
    assert 'install "ipywidgets"' not in outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell_outputs)
    images = [o for o in cell_outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the retrievals and the SOPs
    assert os.path.isdir(tmp_path / "runs" / "notebook")


def test_notebook_is_valid_json():
    nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))
    pytest.importorskip("ipykernel")
