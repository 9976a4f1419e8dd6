"""lan2gpu's JupyterLab extension in a real ``jupyter lab``, driven in Debian's headless
Chromium: the sidebar panel (workers, GPUs, cells, this server's own marked), the status
bar item, the dashboard in a lab tab, the launcher and palette entries, and the form that
installs a kernelspec. Its screenshots (light and dark theme) are the README's
(``LAN2GPU_SCREENSHOTS=docs/screenshots pytest tests/e2e/test_lab_sidebar.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .dashboard_server import TOKEN, JupyterServer
from .lab_page import keep_screenshots, run_cell, write_notebook

pytest.importorskip("jupyterlab")

PANEL = "#lan2gpu-panel"


def _command(page: Any, command: str, args: dict[str, Any] | None = None) -> None:
    page.evaluate(
        "([c, a]) => { void window.jupyterapp.commands.execute(c, a); }", [command, args or {}]
    )


def test_the_lan2gpu_sidebar_in_jupyterlab(worker_factory, browser, tmp_path: Path) -> None:
    worker = worker_factory("sidebar")
    doomed = worker_factory("doomed", key_file=worker.key_file)
    root = tmp_path / "lab"
    root.mkdir()
    write_notebook(
        root / "cells.ipynb",
        ["%load_ext lan2gpu_magic", "%%lan2gpu --worker sidebar\nimport time\ntime.sleep(8)"],
    )
    server = JupyterServer(
        root,
        [worker.address, doomed.address],
        worker.key_file,
        app="jupyterlab",
        extra=("--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None"),
    )
    shots = tmp_path / "shots"
    shots.mkdir()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

        def console(msg: Any) -> None:
            # The one refused request the test makes on purpose (the bad form) is logged
            # by the browser as a failed load; every other error counts.
            refused = "/lan2gpu/api/kernelspecs?" in msg.location.get("url", "")
            if msg.type == "error" and not (refused and "400" in msg.text):
                problems.append(f"console: {msg.text} ({msg.location})")

        page.on("console", console)
        page.goto(f"{server.url}/lab/tree/cells.ipynb?token={TOKEN}")
        page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
            "window.jupyterapp.shell.currentWidget.sessionContext?.session?.kernel?.status "
            "=== 'idle'",
            timeout=120_000,
        )
        # Installed by pip, nothing enabled or built by hand.
        assert page.evaluate("window.jupyterapp.hasPlugin('lan2gpu:plugin')")

        # The status bar says what is there before the panel was ever opened.
        status = page.locator(".lan2gpu-status")
        status.get_by_text("lan2gpu: 2 workers · 2 GPUs · 0 running").wait_for(timeout=60_000)

        status.click()  # opens the panel
        panel = page.locator(PANEL)
        panel.wait_for(state="visible", timeout=30_000)
        sidebar = panel.locator('.lan2gpu-worker[data-worker="sidebar"]')
        sidebar.locator(".lan2gpu-gpu", has_text="CUDA simulator").wait_for(timeout=30_000)
        assert "up" in sidebar.locator(".lan2gpu-state").inner_text()
        assert panel.get_attribute("data-polling") == "true"

        # A cell of this lab's own notebook shows up running, marked as mine, then goes.
        run_cell(page, 0)
        page.wait_for_timeout(1000)
        run_cell(page, 1)
        mine = panel.locator(".lan2gpu-jobs-running .lan2gpu-job.lan2gpu-mine")
        mine.wait_for(timeout=60_000)
        assert "sidebar" in mine.inner_text()
        gpu = sidebar.locator(".lan2gpu-gpu").first
        gpu.get_by_text("1 running").wait_for(timeout=10_000)
        assert gpu.locator("svg.lan2gpu-spark").count() == 1
        status.get_by_text("1 running").wait_for(timeout=10_000)
        panel.screenshot(path=str(shots / "lab-sidebar-light.png"))
        mine.wait_for(state="detached", timeout=60_000)

        # A killed worker is shown unreachable, with the reason.
        doomed.process.kill()
        doomed.process.wait(30)
        down = panel.locator('.lan2gpu-worker.lan2gpu-down[data-worker="doomed"]')
        down.wait_for(timeout=60_000)
        assert down.locator(".lan2gpu-state").inner_text() != "up"
        status.get_by_text("lan2gpu: 1 worker · 1 GPU · 0 running").wait_for(timeout=30_000)

        # Dark theme: the panel follows JupyterLab's theme.
        _command(page, "apputils:change-theme", {"theme": "JupyterLab Dark"})
        page.wait_for_function(
            "() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000
        )
        page.wait_for_timeout(500)
        background = panel.evaluate("(n) => getComputedStyle(n).backgroundColor")
        assert background not in ("rgb(255, 255, 255)", "rgba(0, 0, 0, 0)"), background
        panel.screenshot(path=str(shots / "lab-sidebar-dark.png"))
        _command(page, "apputils:change-theme", {"theme": "JupyterLab Light"})

        # Clicking a worker opens the full dashboard in a main-area tab.
        sidebar.locator(".lan2gpu-worker-line").click()
        tab = page.locator("#lan2gpu-dashboard")
        tab.wait_for(state="visible", timeout=30_000)
        frame = page.frame_locator("#lan2gpu-dashboard iframe")
        frame.locator("#workers").get_by_text("sidebar").first.wait_for(timeout=60_000)

        # Hidden, the panel stops polling.
        _command(page, "filebrowser:activate")
        panel.wait_for(state="hidden", timeout=30_000)
        page.wait_for_function(
            f"() => document.querySelector('{PANEL}').dataset.polling === 'false'",
            timeout=10_000,
        )

        # Launcher and palette entries.
        _command(page, "launcher:create")
        page.locator(".jp-LauncherCard", has_text="lan2gpu dashboard").wait_for(timeout=30_000)
        page.locator(".jp-LauncherCard", has_text="Install a lan2gpu kernel").wait_for()
        commands = page.evaluate("window.jupyterapp.commands.listCommands()")
        assert {"lan2gpu:open-dashboard", "lan2gpu:install-kernel"} <= set(commands)

        # The install form: a bad value is refused with the server's reason ...
        _command(page, "lan2gpu:install-kernel")
        form = page.locator(".lan2gpu-form")
        form.wait_for(timeout=30_000)
        form.locator('input[name="name"]').fill("lan-a100")
        form.locator('input[name="min_memory"]').fill("lots")
        page.locator(".jp-Dialog-button.jp-mod-accept").click()
        error = page.locator(".jp-Dialog", has_text="the kernel was not installed")
        error.wait_for(timeout=30_000)
        assert "--min-memory 'lots'" in error.inner_text()
        error.locator("button.jp-Dialog-button").last.click()
        error.wait_for(state="detached", timeout=10_000)
        # ... and a good one installs a kernelspec that the lab then lists.
        _command(page, "lan2gpu:install-kernel")
        form.wait_for(timeout=30_000)
        form.locator('input[name="name"]').fill("lan-a100")
        form.locator('input[name="gpu"]').fill("A100")
        form.locator('input[name="min_memory"]').fill("40G")
        form.locator('input[name="simulate"]').check()
        page.locator(".jp-Dialog-button.jp-mod-accept").click()
        installed = page.locator(".jp-Dialog", has_text="lan2gpu kernel installed")
        installed.wait_for(timeout=30_000)
        installed.locator("button.jp-Dialog-button").last.click()
        spec = json.loads((root / "data" / "kernels" / "lan-a100" / "kernel.json").read_text())
        assert spec["argv"][-5:] == ["--gpu", "A100", "--min-memory", "40G", "--simulate"]
        page.wait_for_function(
            "() => 'lan-a100' in window.jupyterapp.serviceManager.kernelspecs.specs.kernelspecs",
            timeout=30_000,
        )
        assert problems == [], problems
    finally:
        server.stop()
    keep_screenshots(shots)
