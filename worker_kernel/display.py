"""Rich display from a remote cell, without IPython on the worker.

:func:`mimebundle` builds a Jupyter MIME bundle from the usual ``_repr_*_``
methods; ``display(obj)`` inside a cell sends one to the notebook, where it is
published like a local ``display``.
"""

from __future__ import annotations

import base64
from typing import Any

_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)


def _jsonable(value: Any) -> Any:
    # Binary image data travels base64-encoded, as in Jupyter messages.
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def _call_repr(method: Any) -> Any:
    try:
        return method()
    except Exception:  # as in IPython, a repr that raises is left out
        return None


def mimebundle(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(data, metadata)`` for ``obj``; always has ``text/plain``."""
    data: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method):
        try:
            bundle = method(include=None, exclude=None)
        except Exception:  # a broken repr must not fail the cell
            bundle = None
        if isinstance(bundle, tuple) and len(bundle) == 2:
            bundle, md = bundle
            if isinstance(md, dict):
                metadata.update(md)
        if isinstance(bundle, dict):
            data.update({str(k): _jsonable(v) for k, v in bundle.items()})
    for name, mime in _REPR_METHODS:
        method = getattr(obj, name, None)
        if mime in data or not callable(method) or isinstance(obj, type):
            continue
        value = _call_repr(method)
        if isinstance(value, tuple) and len(value) == 2:
            value, md = value
            metadata[mime] = md
        if value is not None:
            data[mime] = _jsonable(value)
    if "text/plain" not in data:
        try:
            data["text/plain"] = repr(obj)
        except Exception as exc:
            data["text/plain"] = f"<{type(obj).__name__} object; repr failed: {exc}>"
    return data, metadata
