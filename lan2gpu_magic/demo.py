"""``python -m lan2gpu_magic demo [NOTEBOOK]``: run a notebook in a fresh kernel and
print each cell's output as soon as that cell finishes.

The kernel talks to this process over Unix sockets (no TCP port, so ipykernel has
no reason to warn about plain-text TCP); the first ``%%lan2gpu`` cell starts a
local worker by itself. The executed notebook, images included, is written to a
file whose path is printed at the end.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
DEFAULT_NOTEBOOK = "01-quickstart.ipynb"


def find_notebook(name: str | Path) -> Path:
    """``name`` as given, else in ./notebooks, else in the checkout's notebooks/."""
    given = Path(name)
    for candidate in (given, Path.cwd() / "notebooks" / given, REPO_NOTEBOOKS / given):
        if candidate.is_file():
            return candidate
    known = (
        sorted(p.name for p in REPO_NOTEBOOKS.glob("*.ipynb")) if REPO_NOTEBOOKS.is_dir() else []
    )
    listed = f" The notebooks that come with lan2gpu: {', '.join(known)}." if known else ""
    raise FileNotFoundError(
        f"no notebook {str(name)!r} here, in ./notebooks or in {REPO_NOTEBOOKS}.{listed}"
    )


def _show_outputs(cell: Any) -> None:
    for output in cell.get("outputs", []):
        kind = output.get("output_type")
        if kind == "stream":
            sys.stdout.write(output.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            if "text/plain" in data:
                print(data["text/plain"])
            others = sorted(set(data) - {"text/plain"})
            if others:
                print(f"[{', '.join(others)} output: open the executed notebook to see it]")
        elif kind == "error":
            print(f"{output.get('ename')}: {output.get('evalue')}")
    sys.stdout.flush()


def _show_cell(cell: Any) -> None:
    count = cell.get("execution_count")
    label = f"In [{count}]" if count is not None else "In [ ]"
    print(f"\n--- {label} ---\n{cell.source}\n--- out ---")
    _show_outputs(cell)


def run(name: str | Path, timeout: float, output: Path | None = None) -> int:
    """Execute the notebook in a fresh kernel; print every code cell as it finishes."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    try:
        notebook = find_notebook(name)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    nb = nbformat.read(notebook, as_version=4)
    cells = sum(c.cell_type == "code" for c in nb.cells)
    # A fresh private folder (0700) unless told where: nobody else can plant a link there.
    output = output or Path(tempfile.mkdtemp(prefix="lan2gpu-demo-")) / notebook.name
    print(
        f"running {notebook} ({cells} code cells) in a fresh Python kernel; the first "
        "%%lan2gpu cell starts a local worker (CUDA simulator without a GPU), which takes "
        "about 10 s",
        flush=True,
    )
    t0 = time.monotonic()
    failed = None
    with tempfile.TemporaryDirectory(prefix="lan2gpu-demo-") as sockets:
        # An absolute socket path: the kernel runs in the notebook's folder.
        km = KernelManager(kernel_name="python3", transport="ipc", ip=f"{sockets}/kernel")
        client = NotebookClient(
            nb, km=km, timeout=timeout, on_cell_executed=lambda cell, **_: _show_cell(cell)
        )
        try:
            client.execute(cwd=str(notebook.parent))
        except Exception as exc:  # nbclient's CellExecutionError and kernel failures
            failed = exc
        finally:
            # nbclient leaves a kernel it was given running: shut it down properly, so
            # its exit handlers stop the local worker and remove its files.
            if km.has_kernel:
                km.shutdown_kernel(now=False)
            km.cleanup_resources()
            output.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, output)
    print(f"\nthe executed notebook, images included: {output} (open it in Jupyter)")
    if failed is not None:
        print(f"the notebook failed: {failed}", file=sys.stderr)
        return 1
    print(f"{notebook}: all {cells} code cells ran in {time.monotonic() - t0:.0f} s.")
    return 0
