"""The quick-start notebook executes top to bottom and shows the model beating MostPop."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    line = next(ln for ln in text.splitlines() if ln.startswith("SASRec test NDCG@10"))
    ours, pop = float(line.split()[3]), float(line.split()[-1])
    assert ours > 2 * pop, line
    assert "recent history" in text
