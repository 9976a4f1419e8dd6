"""Run one cell inside an executor: load inputs, exec, collect outputs.

The cell runs in the session's namespace, which persists between cells. The last
expression's value comes back like IPython's ``Out``.

The notebook's own session mirrors the notebook: before each cell the names
earlier cells left are cleared, so the namespace holds what the notebook sent
(inputs, and the globals its functions and kernels read) and nothing stale; a
name the notebook deleted is a ``NameError`` here too. Only values that could
not travel back (an open file, a lock) stay, as the README promises. A named
``--session`` keeps its namespace between cells instead.

Outputs are the names the notebook side found the cell may bind, but only those
it really bound this time: a name whose object is a different one after the
cell (or, in a named session, a value of the session the notebook did not
send). An input the cell did not rebind is not sent back (the notebook has it),
unless it was augmented-assigned (``a += 1`` on an array) or asked for with
``--out``. Nothing is parked in process-wide places (builtins) while a cell
runs.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import linecache
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from . import health
from .array_cache import ArrayCache
from .display import mimebundle
from .protocol import buffer_pool, compress, refs
from .protocol.contents import ExecuteContent, ResultContent
from .protocol.errors import RemoteFrame, RemoteTraceback, SerializationError
from .protocol.messages import DISPLAY, RESULT, STREAM, TRANSFER, Buffer, Message
from .protocol.outcomes import CellStatus
from .protocol.serialize import dump_values, dumps, load_values
from .protocol.wire import digest
from .streams import OutputChannel, RemoteStream

Send = Callable[[Message], None]
TRANSFER_NOTICE_BYTES = 1 << 20


# Values whose in-place changes are detected and sent back (their pickles are stable).
_MUTABLE = (np.ndarray, list, dict, set, bytearray)


def _serialization_error(content: ResultContent, name: str, message: str) -> ResultContent:
    content["status"] = CellStatus.ERROR
    content["error"] = RemoteTraceback(ename="SerializationError", evalue=message).to_json()
    content["serialization_error"] = name
    return content


class TimeoutInterrupt(BaseException):
    """Raised in the cell's thread when the service says its time is up."""


@dataclass(frozen=True)
class CellRequest:
    """What an ``execute`` message asks for (see ``lan2gpu_magic.capture``)."""

    id: str
    client: str
    session: str
    code: str
    filename: str
    line_offset: int
    inputs: list[dict[str, Any]]
    outputs: tuple[str, ...]
    required: frozenset[str]
    always: frozenset[str]
    deletes: tuple[str, ...]
    refs: dict[str, str]  # input frames sent by reference: index -> digest
    have: frozenset[str]  # digests the client can supply for outputs
    bandwidth: float  # the link, as the client measured it (bytes/s; 0: unknown)
    compress: str  # "auto", "on" or "off"
    keep_namespace: bool = False  # a named session: names of earlier cells stay
    kept: frozenset[str] = frozenset()  # came back but the notebook cannot load them

    @classmethod
    def from_message(cls, msg: Message, client: str) -> CellRequest:
        # The service checked the types that matter before; a key left out of an
        # older client's request gets its default.
        c = cast(ExecuteContent, msg.content)
        link: dict[str, Any] = dict(msg.content.get("link") or {})
        return cls(
            id=str(c.get("request") or msg.id),  # retries of one request share its id
            client=client,
            session=msg.session,
            code=str(c["code"]),
            filename=str(c.get("filename") or f"<lan2gpu cell {msg.id[:8]}>"),
            line_offset=int(c.get("line_offset", 0)),
            inputs=list(c.get("inputs", [])),
            outputs=tuple(c.get("outputs", [])),
            required=frozenset(c.get("required", [])),
            always=frozenset(c.get("always", [])),
            deletes=tuple(c.get("deletes", [])),
            refs={str(k): str(v) for k, v in dict(c.get("refs", {})).items()},
            have=frozenset(str(d) for d in c.get("have", [])),
            bandwidth=float(link.get("bandwidth", 0.0)),
            compress=str(link.get("compress", "auto")),
            keep_namespace=bool(c.get("keep_namespace", False)),
            kept=frozenset(str(n) for n in c.get("kept", [])),
        )


@dataclass
class Outcome:
    ran: bool = False  # the cell's code started (its bindings may be worth returning)
    poisoned: bool = False  # a sticky CUDA error: this executor must be replaced
    status: CellStatus = CellStatus.OK
    error: RemoteTraceback | None = None
    value: Any = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def new_namespace(display: Callable[..., None]) -> dict[str, Any]:
    """A fresh session namespace, with ``display`` available as in IPython."""
    cell_builtins = dict(vars(builtins))
    cell_builtins["display"] = display
    return {"__name__": "__main__", "__builtins__": cell_builtins}


def _remote_traceback(
    exc: BaseException, filename: str, notes: tuple[str, ...] = ()
) -> RemoteTraceback:
    te = traceback.TracebackException.from_exception(exc)
    tb = _convert(te, filename, top=True)
    return dataclasses.replace(tb, notes=tb.notes + notes) if notes else tb


def _convert(te: traceback.TracebackException, filename: str, top: bool) -> RemoteTraceback:
    frames = list(te.stack)
    if top:
        # Drop the executor's own frames above the cell.
        first = next((i for i, f in enumerate(frames) if f.filename == filename), len(frames))
        frames = frames[first:]
    cause: RemoteTraceback | None = None
    direct = False
    if te.__cause__ is not None:
        cause, direct = _convert(te.__cause__, filename, top=False), True
    elif te.__context__ is not None and not te.__suppress_context__:
        cause = _convert(te.__context__, filename, top=False)
    return RemoteTraceback(
        ename=te.exc_type.__qualname__ if te.exc_type else "Exception",
        evalue=str(te).strip(),
        frames=tuple(
            RemoteFrame(f.filename, f.lineno or 0, f.name, (f.line or "").rstrip()) for f in frames
        ),
        text="".join(te.format_exception_only()),
        notes=tuple(getattr(te, "__notes__", None) or ()),
        cause=cause,
        cause_is_direct=direct,
    )


def _compile(req: CellRequest) -> tuple[Any, Any]:
    tree = ast.parse(req.code, req.filename, "exec")
    ast.increment_lineno(tree, req.line_offset)
    # Keep the source findable for tracebacks: blank lines stand in for the
    # lines before the cell body (the magic line).
    source = "\n" * req.line_offset + req.code
    linecache.cache[req.filename] = (
        len(source),
        None,
        source.splitlines(keepends=True),
        req.filename,
    )
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        expr = tree.body.pop()
        assert isinstance(expr, ast.Expr)  # noqa: S101 - narrowing for mypy
        last = ast.Expression(expr.value)
    body = compile(tree, req.filename, "exec")
    return body, compile(last, req.filename, "eval") if last is not None else None


class _Identity:
    """What each of some names held at one moment, to tell later which were rebound.

    Weak references where the value allows them (arrays do), so a large value the
    cell replaces is not kept alive; a strong one otherwise, so its id is not reused.
    """

    def __init__(self, ns: dict[str, Any], names: tuple[str, ...]) -> None:
        self.ns = ns
        self.held: dict[str, Any] = {}
        for name in names:
            if name in ns:
                value = ns[name]
                try:
                    self.held[name] = weakref.ref(value)
                except TypeError:
                    self.held[name] = (value,)

    def same(self, name: str) -> bool:
        """Whether ``name`` still holds the very object it held then."""
        held = self.held.get(name)
        if held is None or name not in self.ns:
            return False
        then = held() if isinstance(held, weakref.ref) else held[0]
        return then is self.ns[name]


def _named(entries: Iterable[Mapping[str, Any]], digests: Sequence[str]) -> dict[str, list[str]]:
    """The digests of each named value's frames (``entries`` in frame order)."""
    named: dict[str, list[str]] = {}
    at = 0
    for entry in entries:
        count = int(entry["nframes"])
        named[str(entry["name"])] = list(digests[at : at + count])
        at += count
    return named


class CellRunner:
    """Runs cells of one session; owns its namespace."""

    def __init__(
        self,
        worker: str,
        channel: OutputChannel,
        send: Send,
        *,
        memory_limit: int = 0,
        session_memory: int = 0,
        cache_budget: int = 1 << 30,
    ) -> None:
        self.worker = worker
        self.memory_limit = memory_limit  # the worker's budget, shared by its sessions
        self.session_memory = session_memory
        self.cache = ArrayCache(cache_budget)
        pool = buffer_pool.current()
        pool.reclaimers.append(lambda nbytes: self.cache.shed(pool, nbytes))
        self.channel = channel
        self.send = send
        self.armed = False  # True while user code runs: interrupts may raise
        self._current: CellRequest | None = None
        self._inputs: dict[str, int] = {}  # id() of each input as loaded
        self._fresh: set[str] = set()  # outputs the last cell really bound
        self._input_digests: dict[str, list[str]] = {}  # as signed by the client
        self._kept: set[str] = set()  # values that could not go back to the notebook
        self.namespace = new_namespace(self.display)

    # -- display, available in cells ----------------------------------------

    def display(self, *objs: Any, **_: Any) -> None:
        """Show objects in the notebook (IPython's ``display``)."""
        req = self._current
        if req is None:
            return
        self.channel.flush()
        for obj in objs:
            data, metadata = mimebundle(obj)
            self.send(self._reply(req, DISPLAY, {"data": data, "metadata": metadata}))

    def _reply(
        self,
        req: CellRequest,
        kind: str,
        content: dict[str, Any],
        buffers: list[Buffer] | None = None,
    ) -> Message:
        return Message(
            kind=kind,
            content=content,
            buffers=buffers or [],
            session=req.session,
            parent=req.id,
            to=req.client,
        )

    # -- one cell -------------------------------------------------------------

    def fail(self, msg: Message, client: str, exc: Exception) -> None:
        """Answer a cell that this runner could not finish (a malformed request, a
        result that cannot be encoded): an error for the client; the session goes on."""
        reason = f"the worker could not finish this cell: {type(exc).__name__}: {exc}"
        content: ResultContent = {
            "status": CellStatus.ERROR,
            "worker": self.worker,
            "error": RemoteTraceback(ename="WorkerError", evalue=reason).to_json(),
        }
        self.answer(msg, client, content)

    def answer(self, msg: Message, client: str, content: ResultContent) -> None:
        """Send ``content`` as the result of the cell in ``msg``, which did not run."""
        reply = Message(
            kind=RESULT, content=dict(content), session=msg.session, parent=msg.request, to=client
        )
        self.send(reply)

    def run(self, msg: Message, client: str) -> dict[str, Any]:
        """Run the cell in ``msg``; send stream/display/result messages; return stats."""
        req = CellRequest.from_message(msg, client)
        frames, digests, missing = refs.join(msg.buffers, msg.digests, req.refs, self.cache.get)
        if missing:
            # Evicted, or changed in place: the client sends these again, no harm done.
            miss: ResultContent = {
                "status": CellStatus.CACHE_MISS,
                "worker": self.worker,
                "missing": missing,
            }
            self.send(self._reply(req, RESULT, dict(miss)))
            return {"status": CellStatus.CACHE_MISS}
        for frame, checksum in zip(frames, digests, strict=True):
            self.cache.put(checksum, frame)
        self.cache.bind(_named(req.inputs, digests))
        self._current = req
        started = time.perf_counter()
        try:
            outcome = self._execute(req, frames, digests)
            content, out = self._result(req, outcome)
        finally:
            self._current = None
        out_digests = [digest(f) for f in out]
        for frame, checksum in zip(out, out_digests, strict=True):
            self.cache.put(checksum, frame)
        self.cache.bind(_named(content.get("outputs", []), out_digests))
        sent, sent_digests, out_refs = refs.split(out, out_digests, req.have.__contains__)
        content["refs"] = out_refs
        nbytes = sum(memoryview(f).nbytes for f in sent)
        if nbytes >= TRANSFER_NOTICE_BYTES:
            self.send(self._reply(req, TRANSFER, {"bytes": nbytes}))
        content["stats"] = {
            "seconds": outcome.seconds,
            "total_seconds": time.perf_counter() - started,
            "bytes_in": msg.nbytes,
            "bytes_out": nbytes,
            "cached_in": len(req.refs),
            "cached_out": len(out_refs),
        }
        reply = self._reply(req, RESULT, dict(content), sent)
        reply.digests = sent_digests
        reply.codecs = compress.choose(sent, req.bandwidth, req.compress)
        self.send(reply)
        return {"status": content["status"], **content["stats"]}

    def _execute(self, req: CellRequest, frames: list[Buffer], digests: list[str]) -> Outcome:
        outcome = Outcome()
        self._fresh, self._inputs, self._input_digests = set(), {}, {}
        ns = self.namespace
        self._kept |= req.kept
        if not req.keep_namespace:
            self._mirror()
        session_values = _Identity(ns, req.outputs)  # before the notebook's values load
        values, failed = load_values(req.inputs, frames, namespace=ns)
        pos = 0
        for entry in req.inputs:
            count = int(entry["nframes"])
            self._input_digests[str(entry["name"])] = digests[pos : pos + count]
            pos += count
        if failed:
            lines = [f"  {name}: {reason}" for name, reason in failed.items()]
            outcome.status = CellStatus.ERROR
            outcome.error = RemoteTraceback(
                ename="SerializationError",
                evalue=(
                    f"{len(failed)} input(s) could not be loaded on worker {self.worker}:\n"
                    + "\n".join(lines)
                    + "\nInstall the missing modules on the worker, or ship a module's "
                    "code with the values by calling cloudpickle.register_pickle_by_value("
                    "module) in the notebook, or leave those names out with --in."
                ),
            )
            return outcome
        ns.update(values)
        self._kept -= set(values)
        outcome.ran = True
        self._inputs = {n: id(v) for n, v in values.items()}
        # Present now and unchanged by the load: a value the session held before.
        from_session = {n for n in req.outputs if session_values.same(n)}
        before = _Identity(ns, tuple(n for n in ns if not n.startswith("__")))
        del session_values
        send_stream = self._stream_sender(req)
        saved = sys.stdout, sys.stderr
        self.channel.begin(send_stream)
        sys.stdout = RemoteStream(self.channel, "stdout")
        sys.stderr = RemoteStream(self.channel, "stderr")
        t0 = time.perf_counter()
        try:
            body, last = _compile(req)
            self.armed = True
            exec(body, ns)  # noqa: S102 - running the user's cell is the point
            if last is not None:
                outcome.value = eval(last, ns)  # noqa: S307
            _synchronize_cuda()
        except KeyboardInterrupt:
            outcome.status = CellStatus.CANCELLED
        except TimeoutInterrupt:
            outcome.status = CellStatus.TIMEOUT
        except BaseException as exc:  # the cell's own error, SystemExit included
            outcome.status = CellStatus.ERROR
            outcome.poisoned = health.poisons_context(exc)
            notes: tuple[str, ...] = (health.POISONED_NOTE,) if outcome.poisoned else ()
            if isinstance(exc, MemoryError) and (self.memory_limit or self.session_memory):
                notes += (health.memory_note(self.memory_limit, self.session_memory),)
            outcome.error = _remote_traceback(exc, req.filename, notes)
        finally:
            self.armed = False
            outcome.seconds = time.perf_counter() - t0
            sys.stdout, sys.stderr = saved
            self.channel.end()
            # Bound by this cell: another object than before it. A value of the
            # session that the notebook did not send comes back too (the notebook
            # may lack it, or hold an older one).
            self._fresh = {
                n for n in req.outputs if n in ns and (not before.same(n) or n in from_session)
            }
            # Bound in ways the notebook could not see (`from m import *`, globals()):
            # they never go back, so they stay here for later cells.
            outputs = set(req.outputs)
            self._kept |= {
                n for n in ns if not n.startswith("__") and n not in outputs and not before.same(n)
            }
        return outcome

    def _mirror(self) -> None:
        """Clear what earlier cells left, but values that could not travel back."""
        ns = self.namespace
        for name in [n for n in ns if not n.startswith("__") and n not in self._kept]:
            del ns[name]

    def _stream_sender(self, req: CellRequest) -> Callable[[str, str], None]:
        def send(name: str, text: str) -> None:
            self.send(self._reply(req, STREAM, {"name": name, "text": text}))

        return send

    def _result(self, req: CellRequest, outcome: Outcome) -> tuple[ResultContent, list[Buffer]]:
        content: ResultContent = {"status": outcome.status, "worker": self.worker}
        if outcome.error is not None:
            content["error"] = outcome.error.to_json()
        if outcome.poisoned:
            content["poisoned"] = content["session_lost"] = True
        if not outcome.ran:
            return content, []
        # Even when the cell raised, what it bound before that comes back, as in IPython.
        ns = self.namespace
        if outcome.status == CellStatus.OK:
            missing = [n for n in sorted(req.required) if n not in ns]
            if missing:
                return _serialization_error(
                    content,
                    missing[0],
                    f"--out asked for {', '.join(missing)}, but the cell did not define "
                    "them on the worker",
                ), []
        chosen: dict[str, Any] = {}
        for name in req.outputs:
            if name not in ns or (name not in self._fresh and name not in req.required):
                continue
            same_input = self._inputs.get(name) == id(ns[name])
            if not same_input or name in req.required or name in req.always:
                chosen[name] = ns[name]
        try:
            payload, skipped = dump_values(
                chosen, strict=req.required, role="output", namespace=ns, keep_existing=True
            )
        except SerializationError as exc:  # a required output that cannot be pickled
            return _serialization_error(content, exc.name or "", str(exc)), []
        for name, frames in self._mutated_inputs(chosen).items():
            payload.add(name, frames)
        frames = list(payload.frames)
        content["outputs"] = payload.entries
        content["skipped"] = skipped
        # What could not travel stays here for later cells (the notebook lacks it).
        returned = set(chosen) - set(skipped)
        self._kept = {n for n in self._kept | set(skipped) if n in ns and n not in returned}
        content["deleted"] = [n for n in req.deletes if n not in ns]
        if outcome.value is not None:
            try:
                value_frames = dumps(outcome.value)
                content["value"] = {"nframes": len(value_frames)}
                frames.extend(value_frames)
            except Exception:  # an unpicklable result is still worth seeing
                content["value_repr"] = mimebundle(outcome.value)[0]
        return content, frames

    def _mutated_inputs(self, chosen: dict[str, Any]) -> dict[str, list[Buffer]]:
        """Inputs the cell changed in place (``out[i] = ...``, ``d[k] = v``), pickled.

        Arrays arrive as views of the received frames, so comparing a fresh pickle's
        digests with the digests signed in the request tells what changed. Only
        arrays and builtin containers are compared: their pickles are stable.
        """
        changed: dict[str, list[Buffer]] = {}
        ns = self.namespace
        for name, digests in self._input_digests.items():
            value = ns.get(name)
            if name in chosen or value is None or id(value) != self._inputs.get(name):
                continue
            if not isinstance(value, _MUTABLE):
                continue
            frames = _dumps_or_none(value)
            if frames is not None and [digest(f) for f in frames] != digests:
                changed[name] = frames
        return changed


def _synchronize_cuda() -> None:
    """Wait for kernels still running, so their errors count as this cell's: CUDA
    launches are asynchronous, and an illegal address may surface only here."""
    driver = getattr(sys.modules.get("numba.cuda.cudadrv.driver"), "driver", None)
    # Only a driver that came up: one that failed (no GPU here) has nothing to wait for.
    usable = getattr(driver, "is_initialized", False) and not getattr(
        driver, "initialization_error", None
    )
    if usable:
        sys.modules["numba.cuda"].synchronize()


def _dumps_or_none(value: Any) -> list[Buffer] | None:
    try:
        return dumps(value)
    except Exception:  # it arrived pickled; if it no longer pickles, leave it alone
        return None
