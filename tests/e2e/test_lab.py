"""``%%lan2gpu`` in a real JupyterLab, driven in Debian's headless Chromium.

What a user sees: live output while the cell runs, a cell that raised, a cell
interrupted from the Kernel menu, the workers table; lan2gpu's news is never
shown as an error (stderr). The screenshots it takes are the ones linked from
the README (``LAN2GPU_SCREENSHOTS=docs/screenshots pytest tests/e2e/test_lab.py``
writes them there).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from .dashboard_server import TOKEN, JupyterServer
from .lab_page import keep_screenshots, run_cell, write_notebook

pytest.importorskip("jupyterlab")

STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
CELLS = [
    "%load_ext lan2gpu_magic\n%lan2gpu connect {address} --key-file {key}",
    "%%lan2gpu\nimport time\nfor step in range(6):\n    print('step', step, 'on the worker')\n"
    "    time.sleep(0.7)\ntotal = 42",
    "%%lan2gpu\nsettings = {'lr': 0.1}\nrate = settings['learning_rate']",
    "%%lan2gpu\nimport time\nprint('working...')\ntime.sleep(120)",
    "%lan2gpu workers",
]


def _dismiss_news(page: Any) -> None:
    """JupyterLab asks once whether to fetch its news; answer, so no toast covers a cell."""
    no = page.locator(".jp-toast-button", has_text="No")
    with contextlib.suppress(Exception):  # no question asked (another version): fine
        no.first.click(timeout=10_000)


def _cell(page: Any, index: int) -> Any:
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _wait_text(page: Any, index: int, text: str, timeout: float = 60_000) -> None:
    _cell(page, index).locator(".jp-OutputArea").get_by_text(text).first.wait_for(timeout=timeout)


def _wait_idle(page: Any, index: int, timeout: float = 120_000) -> None:
    # The prompt shows the execution count once the cell is done ("[3]:", not "[*]:").
    page.wait_for_function(
        """(i) => {
            const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
            const prompt = cell && cell.querySelector('.jp-InputPrompt');
            return prompt && /\\[\\d+\\]/.test(prompt.textContent);
        }""",
        arg=index,
        timeout=timeout,
    )


def test_a_notebook_in_jupyterlab(worker_factory, browser, tmp_path: Path) -> None:
    worker = worker_factory("lab")
    root = tmp_path / "lab"
    root.mkdir()
    sources = [c.replace("{address}", worker.address).replace("{key}", str(worker.key_file))
               for c in CELLS]  # fmt: skip
    write_notebook(root / "lan2gpu.ipynb", sources)
    server = JupyterServer(
        root, [], worker.key_file, app="jupyterlab", extra=("--LabApp.expose_app_in_browser=True",)
    )
    shots = tmp_path / "shots"
    shots.mkdir()
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(f"{server.url}/lab/tree/lan2gpu.ipynb?token={TOKEN}")
        page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
            "window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel?.status "
            "=== 'idle'",
            timeout=120_000,
        )
        run_cell(page, 0)
        _dismiss_news(page)
        _wait_idle(page, 0)
        _wait_text(page, 0, "lan2gpu: connected to lab")
        assert _cell(page, 0).locator(STDERR).count() == 0  # news is not shown as an error

        run_cell(page, 1)  # live output: the first lines are there while the cell still runs
        _wait_text(page, 1, "step 2 on the worker")
        assert "running on lab GPU0" in _cell(page, 1).inner_text()
        _cell(page, 1).screenshot(path=str(shots / "live-output.png"))
        _wait_idle(page, 1)
        assert "ran on lab GPU0" in _cell(page, 1).inner_text()

        run_cell(page, 2)  # an error: the cell's own line, and a status line that says so
        _wait_idle(page, 2)
        text = _cell(page, 2).inner_text()
        assert "raised KeyError on lab GPU0" in text and "learning_rate" in text, text
        assert "magic.py" not in text
        _cell(page, 2).screenshot(path=str(shots / "remote-error.png"))

        run_cell(page, 3)  # interrupted from the Kernel menu's command
        _wait_text(page, 3, "working...")
        page.wait_for_timeout(1500)  # as a user would: it has been running a while
        page.evaluate("window.jupyterapp.commands.execute('notebook:interrupt-kernel')")
        _wait_idle(page, 3, timeout=30_000)
        text = _cell(page, 3).inner_text()
        assert "cancelled on lab GPU0" in text and "the session is intact" in text, text
        assert "KeyboardInterrupt" in text and "client.py" not in text
        _cell(page, 3).screenshot(path=str(shots / "interrupted.png"))

        run_cell(page, 4)
        _wait_idle(page, 4)
        table = _cell(page, 4).locator("table.lan2gpu-workers")
        table.wait_for(timeout=30_000)
        assert "lab" in table.inner_text() and "CUDA simulator" in table.inner_text()
        _cell(page, 4).screenshot(path=str(shots / "workers.png"))
        assert problems == [], problems
    finally:
        server.stop()
    keep_screenshots(shots)
