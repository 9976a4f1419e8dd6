"""Render a remote traceback the way Python renders a local one.

Source lines the worker could not see (functions defined in other notebook
cells travel as bytecode) are filled in from this process's ``linecache``, where
IPython keeps every cell, so the frames read like a local error.
"""

from __future__ import annotations

import linecache

from worker_kernel.protocol.errors import RemoteTraceback

_RED = "\x1b[31m"
_GREEN = "\x1b[32m"
_CYAN = "\x1b[36m"
_BOLD_RED = "\x1b[1;31m"
_RESET = "\x1b[0m"

_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def register_source(filename: str, source: str) -> None:
    """Make ``source`` findable by ``linecache`` under ``filename`` (for tracebacks)."""
    lines = source.splitlines(keepends=True)
    linecache.cache[filename] = (len(source), None, lines, filename)


def _paint(text: str, color: str, enabled: bool) -> str:
    return f"{color}{text}{_RESET}" if enabled else text


def _block(tb: RemoteTraceback, header: str, color: bool) -> list[str]:
    lines: list[str] = []
    if tb.frames:
        lines.append(header)
        for frame in tb.frames:
            name = _paint(frame.name, _CYAN, color)
            where = _paint(f'"{frame.filename}", line {frame.lineno}', _GREEN, color)
            lines.append(f"  File {where}, in {name}")
            source = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
            if source:
                lines.append(f"    {source.strip()}")
    tail = tb.text.rstrip("\n") if tb.text else f"{tb.ename}: {tb.evalue}"
    tail_lines = tail.split("\n")
    last = tail_lines[-1]
    if last.startswith(tb.ename):
        tail_lines[-1] = _paint(tb.ename, _BOLD_RED, color) + last[len(tb.ename) :]
    lines.extend(tail_lines)
    lines.extend(tb.notes)
    return lines


def render(tb: RemoteTraceback, worker: str, *, color: bool = True) -> list[str]:
    """Lines of text for ``tb`` (cause chain first, as Python prints it)."""
    chain: list[tuple[RemoteTraceback, str]] = []
    link: RemoteTraceback | None = tb
    separator = ""
    while link is not None and len(chain) < 32:
        chain.append((link, separator))
        separator = _CAUSE if link.cause_is_direct else _CONTEXT
        link = link.cause
    lines: list[str] = []
    header = f"Traceback (most recent call last), on worker {worker}:"
    for i, (link, _) in enumerate(reversed(chain)):
        if i:
            # The separator belongs to the link printed before this one.
            lines += ["", chain[len(chain) - i][1], ""]
        lines += _block(link, _paint(header, _RED, color), color)
    return lines
