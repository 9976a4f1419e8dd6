"""Driving a JupyterLab page in Chromium (``--LabApp.expose_app_in_browser``), and keeping
the screenshots a test took (``LAN2GPU_SCREENSHOTS=DIR`` copies them there)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_notebook(path: Path, sources: Sequence[str]) -> None:
    """A notebook of these code cells, for the python3 kernel."""
    cells = [
        {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
         "source": source}
        for source in sources
    ]  # fmt: skip
    nb = {
        "cells": cells,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip
    path.write_text(json.dumps(nb))


def run_cell(page: Any, index: int) -> None:
    """Run one cell of the open notebook, as Shift+Enter would (without waiting for it)."""
    page.evaluate(
        """(i) => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = i;
            window.jupyterapp.commands.execute('notebook:run-cell');
        }""",
        index,
    )


def keep_screenshots(shots: Path) -> None:
    """Check each is a real picture (not an empty frame), then copy them where asked."""
    for shot in shots.iterdir():
        assert shot.stat().st_size > 5_000, shot
    target = os.environ.get("LAN2GPU_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy(shot, Path(target) / shot.name)
