"""Fixtures of the unit tests: a connected ZeroMQ socket pair in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """Two PAIR sockets over inproc: (sender, receiver)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://unit-pair")
    b.connect("inproc://unit-pair")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()
