"""The notebooks in notebooks/ run top to bottom in a real kernel (nbclient)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # Like a laptop: no simulator and no configured worker, so the embedded one starts.
    for name in list(os.environ):
        if name.startswith("LAN2GPU_") or name == "NUMBA_ENABLE_CUDASIM":
            monkeypatch.delenv(name)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(path.parent))
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "Traceback" not in text.replace("RemoteExecutionError", "")
    if path.name == "01-quickstart.ipynb":
        assert "started a local worker" in text
        assert "sum on the worker: 97920.0" in text
        assert "ndarray [ 0.  3.  6.  9. 12.] True" in text
        assert "GPU sum 5000.00, numpy sum 5000.00" in text
        assert "step 0\nstep 1\nstep 2" in text
        assert "log is open: True - steps here: 3" in text
        assert "RemoteExecutionError: IndexError" in text
    if path.name == "03-split-across-workers.ipynb":
        assert text.count("lan2gpu: 3/3 chunks done on 3 slot(s)") == 2
        assert "pi is about 3.1" in text and "(19200 samples on 3 workers)" in text
        assert sorted(re.findall(r"\[\d\] rows \d+", text)) == [
            "[0] rows 30",
            "[1] rows 30",
            "[2] rows 30",
        ]
        assert "image 90x180 from 3 bands" in text
        images = [
            o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
        ]
        assert len(images) == 1
        assert "deeper image: (90, 180) iterations up to 60" in text
    if path.name == "04-dask-cluster.ipynb":
        assert "connected to the Dask cluster at dask://127.0.0.1:" in text
        assert "2 worker(s), 2 with lan2gpu" in text
        assert text.count("dask-worker-") >= 2 and "dashboard: http://127.0.0.1:" in text
        assert "computed on the worker: [1. 3. 5. 7.]" in text
        assert "ndarray 127.0 True" in text
        assert "step 0\nstep 1\nstep 2" in text
        assert "the session remembers [0, 1, 2] and runs where it did: True" in text
        assert sorted(re.findall(r"\[\d\] rows \d+", text)) == ["[0] rows 32", "[1] rows 32"]
        assert "pieces joined: (64,) total 2080.0 equal: True" in text
        assert "RemoteExecutionError: KeyError" in text
    if path.name == "02-choosing-workers.ipynb":
        assert "lan2gpu: ran on small-box GPU0" in text
        assert "two GPUs of one host: 0,1" in text
        assert "2262 primes below 20000; GPUs visible: ''" in text
        assert "NoWorkerAvailable: no worker matches" in text
        assert "| alternating: True" in text
