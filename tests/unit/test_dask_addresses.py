"""How a cluster address becomes ``distributed.Client`` arguments, and the settings the
Dask plugin's service reads from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from lan2gpu_magic.dask_backend import client_arguments, is_cluster_address
from lan2gpu_magic.errors import ConfigurationError
from worker_kernel.options import build_parser


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("dask://sched:8786", {"address": "tcp://sched:8786"}),
        ("dask+tcp://10.0.0.5:8786", {"address": "tcp://10.0.0.5:8786"}),
        ("dask+tls://sched.lab:8786", {"address": "tls://sched.lab:8786"}),
    ],
)
def test_cluster_addresses_name_the_dask_scheme(address: str, expected: dict) -> None:
    assert is_cluster_address(address)
    assert client_arguments(address) == expected


def test_a_scheduler_file_is_a_cluster_address(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    assert is_cluster_address(str(path))
    with pytest.raises(ConfigurationError, match="does not exist"):
        client_arguments(str(path))
    path.write_text("{}")
    assert client_arguments(str(path)) == {"scheduler_file": str(path)}


def test_lan_addresses_are_not_clusters() -> None:
    assert not is_cluster_address("tcp://10.0.0.7:7340")
    with pytest.raises(ConfigurationError, match="dask://HOST:8786"):
        client_arguments("tcp://10.0.0.7:7340")


@pytest.mark.parametrize(
    ("raw", "mode"), [("1", "on"), ("true", "on"), ("0", "off"), ("no", "off"), ("auto", "auto")]
)
def test_lan2gpu_simulate_takes_the_usual_truthy_values(raw: str, mode: str) -> None:
    args = build_parser({"LAN2GPU_SIMULATE": raw}).parse_args(["--bind", "tcp://127.0.0.1:*"])
    assert args.simulate == mode
