"""Running cells in an executor's namespace, without sockets: the runner's messages
are collected from its ``send`` callback."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lan2gpu_magic.capture import plan_cell
from worker_kernel.execute import CellRunner
from worker_kernel.protocol import messages as m
from worker_kernel.protocol.errors import RemoteExecutionError, RemoteTraceback
from worker_kernel.protocol.messages import Message
from worker_kernel.protocol.serialize import dump_values, load_values, loads
from worker_kernel.protocol.wire import digest
from worker_kernel.streams import OutputChannel


@pytest.fixture
def runner():
    sent: list[Message] = []
    channel = OutputChannel(interval=0.01)
    r = CellRunner("unit", channel, sent.append)
    r.sent = sent  # type: ignore[attr-defined]
    yield r
    channel.close()


def run(
    runner: CellRunner, code: str, ns: dict | None = None, keep: bool = False, **plan_kw
) -> Message:
    ns = ns if ns is not None else {}
    plan = plan_cell(code, ns, **plan_kw)
    payload, _ = dump_values({n: ns[n] for n in plan.inputs}, namespace=ns)
    msg = Message(
        digests=[digest(f) for f in payload.frames],
        kind=m.EXECUTE,
        content={
            "code": code,
            "filename": "<cell>",
            "inputs": payload.entries,
            "outputs": list(plan.outputs),
            "required": sorted(plan.required),
            "always": sorted(plan.always),
            "deletes": list(plan.deletes),
            "keep_namespace": keep,
        },
        buffers=payload.frames,
        session="s",
    )
    runner.sent.clear()  # type: ignore[attr-defined]
    runner.run(msg, "client")
    return runner.sent[-1]  # type: ignore[attr-defined]


def outputs(result: Message) -> dict:
    entries = result.content.get("outputs", [])
    used = sum(e["nframes"] for e in entries)
    values, failed = load_values(entries, result.buffers[:used])
    assert not failed
    return values


def test_outputs_come_back_and_inputs_go_in(runner):
    result = run(runner, "b = a * 2\nc = b.sum()", {"a": np.arange(4)})
    assert result.kind == m.RESULT and result.content["status"] == "ok"
    out = outputs(result)
    assert out["b"].tolist() == [0, 2, 4, 6] and out["c"] == 12


def test_rebinding_to_the_same_interned_value_still_returns_it(runner):
    run(runner, "x = 1")
    assert outputs(run(runner, "x = 1")) == {"x": 1}


def test_the_notebooks_session_holds_only_what_the_notebook_sent(runner):
    run(runner, "fh_like = [1, 2]")
    # The notebook no longer has it (deleted, %reset): not found on the worker either.
    result = run(runner, "n = len(fh_like)")
    assert result.content["status"] == "error"
    assert result.content["error"]["evalue"] == "name 'fh_like' is not defined"
    # Sent again, it is there.
    assert outputs(run(runner, "n = len(fh_like)", {"fh_like": [1]})) == {"n": 1}


def test_a_named_session_keeps_its_values_and_returns_those_the_cell_may_bind(runner):
    run(runner, "fh_like = [1, 2]", keep=True)
    result = run(runner, "if False:\n    fh_like = None\nn = len(fh_like)", keep=True)
    assert outputs(result) == {"n": 2, "fh_like": [1, 2]}
    assert runner.namespace["fh_like"] == [1, 2]


def test_unchanged_inputs_are_not_sent_back_but_augmented_ones_are(runner):
    a = np.zeros(3)
    assert "a" not in outputs(run(runner, "if False:\n    a = 1\ny = 0", {"a": a}))
    assert outputs(run(runner, "a += 1", {"a": a}))["a"].tolist() == [1, 1, 1]


def test_last_expression_is_the_value(runner):
    result = run(runner, "x = 20\nx + 22")
    n = result.content["value"]["nframes"]
    assert loads(result.buffers[-n:]) == 42


def test_unpicklable_output_is_skipped_with_a_reason_unless_required(runner):
    result = run(runner, "import threading\nlock = threading.Lock()\nn = 1")
    assert "lock" in result.content["skipped"]
    assert set(outputs(result)) == {"threading", "n"}
    result = run(runner, "import threading\nlock = threading.Lock()", outputs="lock")
    assert result.content["status"] == "error"
    assert "output `lock`" in result.content["error"]["evalue"]


def test_required_output_that_was_not_defined_is_an_error(runner):
    result = run(runner, "x = 1", outputs="x,missing")
    assert result.content["status"] == "error"
    assert "missing" in result.content["error"]["evalue"]


def test_deleted_names_are_reported(runner):
    run(runner, "z = 1")
    result = run(runner, "del z", {"z": 1})
    assert result.content["deleted"] == ["z"]


def test_errors_carry_cell_frames_and_chained_causes(runner):
    code = "def f(q):\n    return 1 / q\ntry:\n    f(0)\nexcept ZeroDivisionError as e:\n    raise ValueError('bad q') from e"
    result = run(runner, code)
    assert result.content["status"] == "error"
    tb = RemoteTraceback.from_json(result.content["error"])
    assert tb.ename == "ValueError" and tb.evalue == "bad q"
    assert [f.lineno for f in tb.frames] == [6]
    assert tb.frames[0].filename == "<cell>"
    assert tb.cause is not None and tb.cause_is_direct
    assert [(f.name, f.line) for f in tb.cause.frames] == [
        ("<module>", "f(0)"),
        ("f", "return 1 / q"),
    ]


def test_stream_output_is_ordered_across_stdout_and_stderr(runner):
    run(runner, "import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')")
    streams = [
        (msg.content["name"], msg.content["text"]) for msg in runner.sent if msg.kind == m.STREAM
    ]
    assert streams == [("stdout", "one\n"), ("stderr", "two\n"), ("stdout", "three\n")]


def test_display_sends_a_mime_bundle(runner):
    code = "class H:\n    def _repr_html_(self):\n        return '<b>hi</b>'\ndisplay(H())"
    run(runner, code)
    shown = [msg for msg in runner.sent if msg.kind == m.DISPLAY]
    assert shown[0].content["data"]["text/html"] == "<b>hi</b>"
    assert "text/plain" in shown[0].content["data"]


def test_remote_execution_error_pickles_and_renders():
    tb = RemoteTraceback(ename="KeyError", evalue="'k'")
    err = RemoteExecutionError("KeyError: 'k'", "w1", tb, ("line 1", "line 2"))
    back = pickle.loads(pickle.dumps(err))
    assert back.ename == "KeyError" and back.worker == "w1"
    assert back._render_traceback_() == ["line 1", "line 2"]


def test_in_place_changes_to_arrays_lists_and_dicts_come_back(runner):
    ns = {"out": np.zeros(4), "items": [1], "table": {"a": 1}, "same": np.ones(2)}
    result = run(runner, "out[:] = 7\nitems.append(2)\ntable['b'] = 2\nn = same.sum()", ns)
    back = outputs(result)
    assert back["out"].tolist() == [7, 7, 7, 7]
    assert back["items"] == [1, 2] and back["table"] == {"a": 1, "b": 2}
    assert "same" not in back  # read, not changed: not sent back


def test_bindings_before_an_error_come_back_with_it(runner):
    result = run(runner, "first = 1\nraise ValueError('late')\nsecond = 2")
    assert result.content["status"] == "error"
    assert outputs(result) == {"first": 1}


def test_notebook_functions_see_the_sessions_globals(runner):
    ns: dict = {"__name__": "__main__"}
    exec(  # noqa: S102
        "scale = 2\ndef helper():\n    return scale\ncount = 0\ndef bump():\n    global count\n    count += 1",
        ns,
    )
    result = run(runner, "scale = 3\nres = helper()\nbump()", ns)
    back = outputs(result)
    assert back["res"] == 3  # as locally: helper reads the global the cell set
    assert back["count"] == 1  # the helper's global write comes back


def test_helpers_can_read_globals_before_the_cell_sets_them(runner):
    ns: dict = {"__name__": "__main__"}
    exec("scale = 2\ndef helper():\n    return scale", ns)  # noqa: S102
    run(runner, "scale = 5")  # the session now has a stale `scale`
    back = outputs(run(runner, "res = helper()\nscale = 4", ns))
    assert back == {"res": 2, "scale": 4}


def test_a_variable_named_like_a_builtin_is_still_handled(runner):
    run(runner, "len = 3")
    assert outputs(run(runner, "if False:\n    len = 4\nn = 1")) == {"n": 1}
    assert outputs(run(runner, "len = 5")) == {"len": 5}
