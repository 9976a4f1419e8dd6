"""Notebook-side settings, as a traitlets ``Configurable``.

Set them in ``ipython_config.py`` / ``jupyter_server_config.py``
(``c.Lan2GPU.workers = ["tcp://10.0.0.7:7340"]``) or live with
``%config Lan2GPU.connect_timeout = 30``.
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import Bool, Dict, Float, List, Unicode, default
from traitlets.config import Configurable

from .pool import workers_from_env


class Lan2GPU(Configurable):
    workers = List(
        Unicode(),
        help="Worker addresses (tcp://HOST:PORT). Default: $LAN2GPU_WORKERS, comma-separated.",
    ).tag(config=True)
    cluster = Unicode(
        help="A Dask cluster to run cells on instead of LAN workers: dask://HOST:8786, "
        "dask+tls://HOST:8786 or a scheduler file (.json). Default: $LAN2GPU_CLUSTER."
    ).tag(config=True)
    key_file = Unicode(
        help="Shared key file. Default: $LAN2GPU_KEY_FILE, else ~/.config/lan2gpu/key."
    ).tag(config=True)
    server_keys = Dict(
        value_trait=Unicode(),
        help="For workers run with --encrypt: address -> that worker's public key file "
        "(worker.key), pinned when connecting.",
    ).tag(config=True)
    embedded_worker = Bool(
        True,
        help="Start a local worker on 127.0.0.1 (CUDA simulator without a GPU) when no "
        "worker is configured.",
    ).tag(config=True)
    connect_timeout = Float(10.0, help="Seconds to wait for a worker's handshake.").tag(config=True)
    discovery = Bool(
        help="Find workers on the LAN by mDNS/DNS-SD (_lan2gpu._tcp). Default: on, unless "
        "$LAN2GPU_DISCOVERY is 0."
    ).tag(config=True)
    insecure_plaintext = Bool(
        help="Connect without encryption, to workers started with --insecure-plaintext: "
        "cells, arrays and results then cross the network readable by anyone on the path. "
        "Default: off (encrypted with keys derived from the shared key), unless "
        "$LAN2GPU_INSECURE_PLAINTEXT is 1."
    ).tag(config=True)
    discovery_wait = Float(
        1.0, help="Seconds to wait for LAN announcements before the first cell is placed."
    ).tag(config=True)
    allow_simulator = Bool(
        False,
        help="Let GPU cells run on CUDA-simulator workers even when real GPU workers are "
        "known (like --simulate on every cell). Without it a simulator is used only when no "
        "real GPU worker is known.",
    ).tag(config=True)
    default_timeout = Float(
        0.0, help="Default --timeout for %%lan2gpu cells, in seconds (0: no limit)."
    ).tag(config=True)

    @default("workers")
    def _default_workers(self) -> list[str]:
        return workers_from_env()

    @default("cluster")
    def _default_cluster(self) -> str:
        return os.environ.get("LAN2GPU_CLUSTER", "")

    @default("insecure_plaintext")
    def _insecure_plaintext_default(self) -> bool:
        return os.environ.get("LAN2GPU_INSECURE_PLAINTEXT", "0") in ("1", "true", "yes")

    @default("discovery")
    def _default_discovery(self) -> bool:
        return os.environ.get("LAN2GPU_DISCOVERY", "1").lower() not in ("0", "false", "no")

    @default("key_file")
    def _default_key_file(self) -> str:
        return os.environ.get("LAN2GPU_KEY_FILE", "")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
