"""The magic in terminal IPython, on a real pseudo-terminal: the status line is
redrawn in place (not printed again per state), and the workers table fits 100
columns."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
UP_AND_CLEAR = "\x1b[1A\r\x1b[2K"


def _screen(raw: str) -> list[str]:
    """The lines a terminal would show: a line redrawn over the one above replaces it."""
    lines: list[str] = []
    for printed in raw.replace("\r\n", "\n").split("\n"):
        text = printed
        while text.startswith(UP_AND_CLEAR):
            text = text[len(UP_AND_CLEAR) :]
            if lines:
                lines.pop()
        lines.append(ANSI.sub("", text).replace("\r", ""))
    return lines


def _ipython_on_a_tty(code: str, timeout: float = 120) -> str:
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAN2GPU_", "NUMBA_"))}
    env.update(LAN2GPU_DISCOVERY="0", COLUMNS="100", TERM="xterm")
    process = subprocess.Popen(
        [sys.executable, "-m", "IPython", "--no-banner", "--simple-prompt", "--colors=nocolor",
         "-c", code],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )  # fmt: skip
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the terminal closed: IPython exited
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
        process.wait(30)
    return b"".join(chunks).decode(errors="replace")


def test_status_line_is_redrawn_in_place_and_the_table_fits(shared_worker):
    cell = "import time\nprint('from the worker')\ntime.sleep(1.5)\nx = 41 + 1"
    code = (
        "ip = get_ipython()\n"
        "ip.run_line_magic('load_ext', 'lan2gpu_magic')\n"
        f"ip.run_line_magic('lan2gpu', 'connect {shared_worker.address} "
        f"--key-file {shared_worker.key_file}')\n"
        f"ip.run_cell_magic('lan2gpu', '', {cell!r})\n"
        "print('x is', x)\n"
        "import numpy as np\n"
        "rows = np.arange(4.0)\n"
        # A split cell's output comes from its chunk threads.
        "ip.run_cell_magic('lan2gpu', '--split rows', 'print(\"chunk\", lan2gpu_rank)\\ny = -rows')\n"
        "print('y is', y.tolist())\n"
        "ip.run_line_magic('lan2gpu', 'workers')\n"
    )
    raw = _ipython_on_a_tty(code)
    screen = _screen(raw)
    text = "\n".join(screen)
    assert "from the worker" in text and "x is 42" in text, raw
    status = [line for line in screen if line.startswith("lan2gpu: r")]
    # One line for the cell, ending as "ran on"; "running on" was drawn over.
    assert len(status) == 1 and status[0].startswith("lan2gpu: ran on shared GPU0"), screen
    # The split cell: its chunk's output, then one line that counts the chunks.
    chunks = [line for line in screen if "chunks done" in line]
    assert chunks == ["lan2gpu: 1/1 chunks done on 1 slot(s)"], screen
    assert "[0] chunk 0" in text and "y is [-0.0, -1.0, -2.0, -3.0]" in text, screen
    assert text.index("x is 42") < text.index("[0] chunk 0") < text.index("y is")
    table = screen[screen.index(next(s for s in screen if s.startswith("worker "))) :]
    assert any(line.startswith("shared ") for line in table), table
    assert any("CUDA simulator (cc 5.0)" in line for line in table), table
    assert max(len(line) for line in table) <= 100, table
