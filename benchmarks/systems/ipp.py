"""ipyparallel: a local cluster with one engine, ``DirectView.apply_sync``.

The array goes client -> controller -> engine and back (ipyparallel's design);
``operator.neg`` is the remote function, so nothing of ours is pickled.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import numpy as np

from . import Options

_START_TIMEOUT = 120.0


def noop() -> None:
    return None


class IPyParallel:
    label = "ipyparallel, DirectView.apply"
    trivial_call = "apply_sync(noop)"

    def __init__(self) -> None:
        import ipyparallel as ipp  # type: ignore[import-untyped]

        self.cluster: Any = ipp.Cluster(n=1, log_level=logging.WARNING)
        try:
            self.cluster.start_cluster_sync()
            self.client: Any = self.cluster.connect_client_sync()
            self.client.wait_for_engines(1, timeout=_START_TIMEOUT, interactive=False)
            self.view: Any = self.client[0]
        except BaseException:
            self.cluster.stop_cluster_sync()
            raise

    def trivial(self) -> None:
        self.view.apply_sync(noop)

    def roundtrip(self, a: np.ndarray) -> np.ndarray:
        b: np.ndarray = self.view.apply_sync(operator.neg, a)
        return b

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.stop_cluster_sync()


def start(options: Options) -> IPyParallel:
    return IPyParallel()
