"""The contract the notebook side and the worker speak.

Sans-IO: messages, framing and signing (:mod:`.wire`), serialization of values
and Numba kernels (:mod:`.serialize`, :mod:`.rebuild`), the handshake's version
check (:mod:`.versions`), the shared key (:mod:`.keys`) and the error tree
(:mod:`.errors`). Nothing here opens a socket, and nothing here imports IPython,
or numba at import time.
"""

from __future__ import annotations

from .messages import MAGIC, PROTOCOL_VERSION, Message, new_id
from .wire import Limits, Wire

__all__ = ["MAGIC", "PROTOCOL_VERSION", "Limits", "Message", "Wire", "new_id"]
