"""Driving a JupyterLab page in Chromium (``--LabApp.expose_app_in_browser``), and keeping
the screenshots a test took (``LAN2GPU_SCREENSHOTS=DIR`` copies them there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


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
