"""The command lines: ``python -m worker_kernel`` and ``python -m lan2gpu_magic``."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time

from lan2gpu_magic.__main__ import main as magic_main


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(tmp_path):
    key = tmp_path / "k"
    first = run("-m", "worker_kernel", "keygen", "--key-file", str(key))
    assert first.returncode == 0 and str(key) in first.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    second = run("-m", "worker_kernel", "keygen", "--key-file", str(key))
    assert second.returncode == 2 and "already exists" in second.stderr


def test_help_documents_every_option_and_environment_variable():
    out = run("-m", "worker_kernel", "--help").stdout
    for option in ("--bind", "--key-file", "--simulate", "--name", "--heartbeat", "--cancel-grace"):
        assert option in out
    for env in ("LAN2GPU_BIND", "LAN2GPU_KEY_FILE", "LAN2GPU_NAME", "LAN2GPU_SIMULATE"):
        assert env in out


def test_worker_refuses_to_start_without_a_key(tmp_path):
    done = run(
        "-m",
        "worker_kernel",
        "--bind",
        "tcp://127.0.0.1:*",
        "--key-file",
        str(tmp_path / "no"),
        "--simulate",
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "keygen" in done.stderr


def test_worker_refuses_to_start_without_an_address(tmp_path):
    done = run("-m", "worker_kernel", "--simulate")
    assert done.returncode == 2 and "--bind" in done.stderr


def test_worker_refuses_a_key_other_users_can_read(tmp_path):
    key = tmp_path / "k"
    run("-m", "worker_kernel", "keygen", "--key-file", str(key))
    key.chmod(0o644)
    done = run(
        "-m", "worker_kernel", "--bind", "tcp://127.0.0.1:*", "--key-file", str(key), "--simulate"
    )
    assert done.returncode == 2 and "chmod 600" in done.stderr


def test_environment_configures_the_worker(worker_factory, tmp_path):
    worker = worker_factory(
        "from-flags", env={"LAN2GPU_HEARTBEAT": "0.5", "LAN2GPU_NAME": "ignored"}
    )
    from lan2gpu_magic import connect

    with connect(worker.address, key_file=worker.key_file) as c:
        assert c.info.heartbeat == 0.5  # from the environment
        assert c.info.name == "from-flags"  # the command line wins


def test_ping_command(shared_worker, capsys):
    assert (
        magic_main(["ping", shared_worker.address, "--key-file", str(shared_worker.key_file)]) == 0
    )
    assert "shared (" in capsys.readouterr().out


def test_demo_by_bare_name_streams_each_cell_and_writes_the_notebook(tmp_path):
    """From another folder, by the name the README gives; each cell is printed when it
    finishes, numbered as the notebook numbers it; no plain-TCP warning from ipykernel."""
    out = tmp_path / "executed.ipynb"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAN2GPU_", "NUMBA_"))}
    env["LAN2GPU_DISCOVERY"] = "0"
    process = subprocess.Popen(
        [sys.executable, "-m", "lan2gpu_magic", "demo", "01-quickstart.ipynb", "--output",
         str(out)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[tuple[float, str]] = []
    with process.stdout:
        for line in process.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))
    assert process.wait(300) == 0, "\n".join(t for _, t in lines)
    text = "\n".join(t for _, t in lines)
    assert "without encryption" not in text and "WARNING" not in text
    numbers = [int(m) for _, t in lines for m in re.findall(r"^--- In \[(\d+)\] ---$", t)]
    nb = json.loads(out.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert numbers == [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    first = next(at for at, t in lines if t == "--- In [1] ---")
    assert lines[-1][0] - first > 2.0  # the first cell came out long before the end
    assert "[text/html output: open the executed notebook to see it]" in text
    assert f"the executed notebook, images included: {out}" in text
    assert any(o.get("output_type") for c in code for o in c["outputs"])


def test_demo_of_an_unknown_notebook_lists_the_ones_there_are(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lan2gpu_magic", "demo", "nope.ipynb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no notebook 'nope.ipynb'" in done.stderr and "01-quickstart.ipynb" in done.stderr
