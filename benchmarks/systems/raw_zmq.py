"""Raw pyzmq baseline: DEALER -> ROUTER in another process, one frame per array.

The server (``python -m benchmarks.systems.raw_zmq --ready-file F``) answers
``[b"neg", frame]`` with ``[b"neg", -frame]`` and ``[b"ping"]`` with ``[b"ping"]``.
Both sides send with ``copy=False``; nothing is signed, hashed or pickled, so
this is the floor for any ZeroMQ-based system on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import zmq

from ..procs import Child, spawn
from . import Options

_TIMEOUT_MS = 300_000


class RawZmq:
    label = "raw pyzmq DEALER/ROUTER"
    trivial_call = "1-frame echo"

    def __init__(self, server: Child) -> None:
        self.server = server
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.rcvtimeo = _TIMEOUT_MS
        self.socket.connect(server.ready["address"])

    def trivial(self) -> None:
        self.socket.send(b"ping")
        self.socket.recv()

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        self.socket.send_multipart([b"neg", a.data], copy=False)
        frames = self.socket.recv_multipart(copy=False)
        return np.frombuffer(frames[1].buffer, dtype=np.float32)

    def close(self) -> None:
        self.socket.close()
        self.context.term()
        self.server.stop()


def start(options: Options) -> RawZmq:
    argv = [sys.executable, "-m", "benchmarks.systems.raw_zmq"]
    ready = options.work / "raw-zmq.ready"
    server = spawn("raw-zmq", [*argv, "--ready-file", str(ready)], options.work, ready_file=ready)
    return RawZmq(server)


def serve(ready_file: Path) -> None:
    """The echo-negate server; runs until it is terminated."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.linger = 0
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": f"tcp://127.0.0.1:{port}", "pid": os.getpid()}))
    tmp.replace(ready_file)
    while True:
        frames = socket.recv_multipart(copy=False)
        peer, kind = frames[0], frames[1].bytes
        if kind == b"neg":
            out = np.negative(np.frombuffer(frames[2].buffer, dtype=np.float32))
            socket.send_multipart([peer, kind, out.data], copy=False)
        else:
            socket.send_multipart([peer, kind], copy=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", type=Path, required=True)
    serve(parser.parse_args().ready_file)


if __name__ == "__main__":
    main()
