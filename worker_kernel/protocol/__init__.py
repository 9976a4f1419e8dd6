"""The contract the notebook side and the worker speak.

What both sides share, and all of ``worker_kernel`` the notebook side may import (a
lint rule, ``banned-api`` in pyproject.toml): messages, framing and signing
(:mod:`.wire`), receiving one message frame by frame from a socket someone else owns
(:mod:`.receive`), serialization of values and Numba kernels (:mod:`.serialize`,
:mod:`.rebuild`), the handshake's version check and lan2gpu's version
(:mod:`.versions`), the shared key (:mod:`.keys`), the error tree (:mod:`.errors`),
sizes (:mod:`.units`) and process liveness (:mod:`.pids`). Nothing here opens a
socket, and nothing here imports IPython, or numba at import time.
"""

from __future__ import annotations

from .messages import MAGIC, PROTOCOL_VERSION, Message, new_id
from .wire import Limits, Wire

__all__ = ["MAGIC", "PROTOCOL_VERSION", "Limits", "Message", "Wire", "new_id"]
