"""What a kernelspec's placement may hold: values the kernel's own parser accepts, one
argv element each, and never a name that takes over another kernel."""

from __future__ import annotations

import json

import pytest

from lan2gpu_magic import kernelspec
from lan2gpu_magic.errors import ConfigurationError


def test_placement_is_the_kernels_own_options():
    argv = kernelspec.placement(
        {"gpu": "A100", "min_memory": "40G", "min_cc": "8.0", "gpus": "2", "cpu": False,
         "simulate": True, "workers": "tcp://10.0.0.7:7340,tcp://10.0.0.8:7340", "worker": None}
    )  # fmt: skip
    assert argv == [
        "--gpu", "A100", "--min-memory", "40G", "--min-cc", "8.0", "--gpus", "2",
        "--workers", "tcp://10.0.0.7:7340,tcp://10.0.0.8:7340", "--simulate",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"min_memory": "lots"}, "--min-memory 'lots'"),
        ({"min_cc": "eight"}, "--min-cc"),
        ({"gpus": "0"}, "1 or more"),
        ({"worker": "--cpu"}, "no leading '-'"),  # would be read as another flag
        ({"gpu": "A100\n--cpu"}, "control"),
        ({"workers": "x" * 600}, "at most 512"),
        ({"cpu": "false"}, "true or false"),  # a string is not a switch
        ({"shell": "rm -rf /"}, "unknown placement option"),
    ],
)
def test_placement_refuses_what_the_kernel_could_not_start_with(values, says):
    with pytest.raises(ConfigurationError, match=None) as info:
        kernelspec.placement(values)
    assert says in str(info.value)


def test_install_keeps_other_kernels_and_replaces_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))
    other = tmp_path / "kernels" / "python3"
    other.mkdir(parents=True)
    (other / "kernel.json").write_text(
        json.dumps({"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "Python 3", "language": "python"})
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="not a lan2gpu kernel"):
        kernelspec.install("Python3", "LAN", ["--cpu"], user=True)
    assert "ipykernel_launcher" in (other / "kernel.json").read_text()
    first = kernelspec.install("Lan-A100", "LAN A100", ["--gpu", "A100"], user=True)
    assert first.name == "lan-a100"  # Jupyter's names are lowercase
    again = kernelspec.install("lan-a100", "LAN A100", ["--gpu", "H100"], user=True)
    assert json.loads((again / "kernel.json").read_text())["argv"][-2:] == ["--gpu", "H100"]
    for bad in ("", "é", "a b", "x" * 65, "../up"):
        with pytest.raises(ConfigurationError, match="not a kernel name"):
            kernelspec.install(bad, "LAN", [], user=True)
