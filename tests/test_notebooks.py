"""The notebooks run end to end at small sizes, so they never rot."""

import os
import pathlib

import pytest
from conftest import mnist_dir

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    data = mnist_dir()
    if data is None and "mnist" in path.read_text().lower():
        pytest.skip("MNIST files not available (set SWIMDIST_DATA_DIR)")
    monkeypatch.setenv("SWIMDIST_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if data:
        monkeypatch.setenv("SWIMDIST_DATA_DIR", data)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(path.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
