"""What a GPU host runs: ``python -m worker_kernel``.

::

    client (DEALER) ──signed frames──▶ service (ROUTER, asyncio)       service.py
                                          │ verify, queue per GPU      scheduler.py
                                          ▼
                                       executor subprocess, one per    executors.py
                                       (session, GPU): exec the cell   executor.py, execute.py
                                          │ stdout/display live        streams.py, display.py
                                          ▼
                                       outputs pickled, signed, sent back

The service never runs user code and never imports ``numba.cuda``; executors are
fresh processes (CUDA does not survive ``fork``). ``protocol/`` is the contract
shared with the notebook side.
"""

from __future__ import annotations

from .protocol.versions import __version__ as __version__
