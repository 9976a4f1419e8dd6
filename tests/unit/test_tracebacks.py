"""Remote tracebacks rendered like local ones, source lines filled in locally."""

from __future__ import annotations

from lan2gpu_magic.tracebacks import register_source, render
from worker_kernel.protocol.errors import RemoteFrame, RemoteTraceback


def test_missing_source_lines_come_from_the_local_linecache():
    register_source("<notebook cell 7>", "def helper(x):\n    return x[5]\n")
    tb = RemoteTraceback(
        ename="IndexError",
        evalue="index 5 is out of bounds",
        frames=(
            RemoteFrame("<lan2gpu In[8]>", 3, "<module>", "y = helper(a)"),
            RemoteFrame("<notebook cell 7>", 2, "helper", ""),  # the worker had no source
        ),
        text="IndexError: index 5 is out of bounds\n",
    )
    lines = render(tb, "box1", color=False)
    assert lines == [
        "Traceback (most recent call last), on worker box1:",
        '  File "<lan2gpu In[8]>", line 3, in <module>',
        "    y = helper(a)",
        '  File "<notebook cell 7>", line 2, in helper',
        "    return x[5]",
        "IndexError: index 5 is out of bounds",
    ]


def test_chains_print_cause_first_with_pythons_separators():
    inner = RemoteTraceback(
        ename="KeyError", evalue="'k'", frames=(RemoteFrame("<c>", 1, "<module>", "d['k']"),)
    )
    outer = RemoteTraceback(
        ename="ValueError",
        evalue="bad",
        frames=(RemoteFrame("<c>", 3, "<module>", "raise ValueError('bad')"),),
        cause=inner,
        cause_is_direct=False,
    )
    text = "\n".join(render(outer, "w", color=False))
    assert text.index("KeyError") < text.index("During handling") < text.index("ValueError: bad")


def test_syntax_error_text_keeps_its_caret_lines():
    tb = RemoteTraceback(
        ename="SyntaxError",
        evalue="invalid syntax",
        text='  File "<c>", line 1\n    x = (\n        ^\nSyntaxError: invalid syntax\n',
    )
    lines = render(tb, "w", color=False)
    assert lines[-2].strip() == "^" and lines[-1] == "SyntaxError: invalid syntax"
