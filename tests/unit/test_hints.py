"""Every hint names an option, setting or command that exists.

The messages lan2gpu prints tell the user what to do; a hint that names an option
nobody accepts is worse than none. This reads every string literal of the two
packages (docstrings aside), and checks each `--option` it mentions against the
real parsers, each backticked command against the parser it names (parsed for
real), and each `Lan2GPU.setting` against the settings class.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from lan2gpu_magic import options as magic_options
from lan2gpu_magic.__main__ import build_parser as cli_parser
from lan2gpu_magic.client import connect
from lan2gpu_magic.config import Lan2GPU
from worker_kernel.options import COMMANDS, OPTIONS, build_parser, command_parser

ROOT = Path(__file__).resolve().parents[2]
# Options of other programs that messages mention on purpose.
EXTERNAL = {"--kernel": "jupyter console --kernel NAME", "--allow-root": "jupyter server",
            # argv of the worker's own executor subprocess (worker_kernel/executor.py)
            "--connect": "executor", "--identity": "executor", "--memory-budget": "executor",
            "--data-bind": "executor",
            # Dask's own command lines (dask worker, dask scheduler)
            "--preload": "dask worker", "--scheduler-file": "dask scheduler",
            "--resources": "dask worker",
            # the plugin turns each --x switch into click's --x/--no-x pair
            "--no": "dask_plugin: --no-SWITCH"}  # fmt: skip
# Placeholders in hints, and a value that parses where they stand.
PLACEHOLDERS = {"ADDRESS": "tcp://10.0.0.7:7340", "S": "30", "N": "2", "NAME": "x", "X": "x",
                "PATH": "/tmp/key", "SECONDS": "30"}  # fmt: skip


def _docstrings(tree: ast.AST) -> set[int]:
    """Docstrings, and the flags given to ``add_argument`` (they define, not mention)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            ids |= {id(a) for a in node.args}
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def messages() -> Iterator[tuple[str, str]]:
    """(file, text) of every string literal that is not a docstring; an f-string's
    replacement fields read as X."""
    for package in ("lan2gpu_magic", "worker_kernel"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            skip = _docstrings(tree)
            # argparse %-formats help: "%%lan2gpu" there reads "%lan2gpu".
            helps = {
                id(k.value)
                for n in ast.walk(tree)
                if isinstance(n, ast.Call)
                for k in n.keywords
                if k.arg in ("help", "description", "epilog")
            }
            inner = {
                id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.JoinedStr):
                    text = "".join(
                        v.value if isinstance(v, ast.Constant) else "X" for v in node.values
                    )
                    yield path.name, text
                elif (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and id(node) not in skip | inner
                ):
                    text = node.value
                    yield path.name, text.replace("%%", "%") if id(node) in helps else text


def _flags(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _flags(sub)


def all_flags() -> set[str]:
    parsers = [magic_options.cell_parser(), magic_options.line_parser(), cli_parser(),
               build_parser({})] + [command_parser(name) for name in COMMANDS]  # fmt: skip
    return {flag for p in parsers for flag in _flags(p)}


def test_every_option_a_message_names_exists():
    known = all_flags() | set(EXTERNAL)
    unknown = sorted(
        {
            (flag, where)
            for where, text in messages()
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text)
            if flag not in known
        }
    )
    assert unknown == [], f"messages name options no parser accepts: {unknown}"


def _parse_command(command: str) -> None:
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command.replace("{", "").replace("}", ""))]
    if words[:1] == ["%%lan2gpu"]:
        magic_options.cell_parser().parse_args(words[1:])
    elif words[:1] == ["%lan2gpu"]:
        magic_options.line_parser().parse_args(words[1:])
    elif words[:3] == ["python", "-m", "lan2gpu_magic"]:
        cli_parser().parse_args(words[3:])
    elif words[:3] == ["python", "-m", "worker_kernel"]:
        rest = words[3:]
        if rest[:1] and rest[0] in COMMANDS:
            command_parser(rest[0]).parse_args(rest[1:])
        else:
            build_parser({}).parse_args(rest)


def _commands() -> Iterator[tuple[str, str]]:
    prefixes = ("%lan2gpu", "%%lan2gpu", "python -m lan2gpu_magic", "python -m worker_kernel")
    for where, text in messages():
        for quoted in re.findall(r"`([^`]+)`", text):
            if quoted.startswith(prefixes) and "|" not in quoted and "..." not in quoted:
                yield where, quoted


def test_every_command_a_message_shows_parses():
    found = list(_commands())
    assert any("connect ADDRESS --timeout" in c for _, c in found)  # the scan sees the hints
    for where, command in found:
        try:
            _parse_command(command)
        except (SystemExit, Exception) as exc:  # argparse exits, the magic raises UsageError
            if isinstance(exc, magic_options.HelpShown) or (
                isinstance(exc, SystemExit) and exc.code == 0
            ):
                continue  # `... --help`
            pytest.fail(f"{where}: `{command}` does not parse: {exc!r}")


def test_every_setting_and_keyword_a_message_names_exists():
    traits = set(Lan2GPU.class_trait_names())
    keywords = set(inspect.signature(connect).parameters)
    for where, text in messages():
        for name in re.findall(r"Lan2GPU\.(\w+)", text):
            assert name in traits, f"{where}: Lan2GPU.{name} is no setting"
        for call in re.findall(r"\bconnect\(([^)]*)\)", text):
            for keyword in re.findall(r"(\w+)=", call):
                assert keyword in keywords, f"{where}: connect() takes no {keyword}="


def test_the_unreachable_worker_hint_offers_real_ways_to_wait_longer():
    hint = next(t for _, t in messages() if "To wait longer" in t)
    assert "`%lan2gpu connect ADDRESS --timeout S`" in hint
    args = magic_options.line_parser().parse_args(["connect", "tcp://h:1", "--timeout", "3"])
    assert args.timeout == 3.0
    assert cli_parser().parse_args(["ping", "tcp://h:1", "--timeout", "3"]).timeout == 3.0


# -- python -m worker_kernel: one table for options, variables and --help ----------------

# A valid value for each variable, other than its default.
SAMPLES = {
    "LAN2GPU_BIND": "tcp://127.0.0.1:7",
    "LAN2GPU_KEY_FILE": "/tmp/other-key",
    "LAN2GPU_NAME": "box9",
    "LAN2GPU_SIMULATE": "auto",
    "LAN2GPU_GPUS": "0,2",
    "LAN2GPU_SIMULATED_GPUS": "3",
    "LAN2GPU_ADVERTISE": "0",
    "LAN2GPU_HEARTBEAT": "2.5",
    "LAN2GPU_REPLAY_WINDOW": "60",
    "LAN2GPU_MAX_MESSAGE_BYTES": "1G",
    "LAN2GPU_EXECUTOR_START_TIMEOUT": "30",
    "LAN2GPU_CANCEL_GRACE": "2",
    "LAN2GPU_SESSION_IDLE": "60",
    "LAN2GPU_ENCRYPT": "1",
    "LAN2GPU_AUTHORIZED_KEYS": "/tmp/allowed",
    "LAN2GPU_INSECURE_PLAINTEXT": "1",
    "LAN2GPU_HANDSHAKE_TIMEOUT": "9",
    "LAN2GPU_MEMORY_LIMIT": "3G",
    "LAN2GPU_SESSION_MEMORY": "1G",
    "LAN2GPU_CACHE_MEMORY": "1G",
    "LAN2GPU_POOL_MEMORY": "256M",
    "LAN2GPU_POOL_PREFAULT": "1",
    "LAN2GPU_DIRECT_DATA": "0",
    "LAN2GPU_MAX_EXECUTORS": "3",
    "LAN2GPU_MAX_KERNELS": "2",
    "LAN2GPU_KERNEL_GRACE": "5",
    "LAN2GPU_STALL_GRACE": "5",
    "LAN2GPU_LOG_LEVEL": "DEBUG",
}


def test_every_worker_option_has_its_variable_in_help_and_the_variable_works():
    parser = build_parser({})
    text = parser.format_help()
    flags = {f for a in parser._actions for f in a.option_strings} - {"-h", "--help"}
    table = {o.flag for o in OPTIONS} | {
        f"--no-{o.flag[2:]}" for o in OPTIONS if o.kind == "switch"
    }
    assert flags == table
    with_env = [o for o in OPTIONS if o.env]
    assert {o.env for o in with_env} == set(SAMPLES), "give each variable a sample value here"
    for option in with_env:
        assert option.env is not None
        action = next(a for a in parser._actions if option.flag in a.option_strings)
        assert option.env in (action.help or ""), option.flag
        assert option.env in text.split("environment variables", 1)[1]
        default = getattr(parser.parse_args([]), option.dest)
        changed = getattr(
            build_parser({option.env: SAMPLES[option.env]}).parse_args([]), option.dest
        )
        assert changed != default, f"${option.env} does not change {option.flag}"


def test_worker_help_shows_the_other_commands():
    text = build_parser({}).format_help()
    for name in COMMANDS:
        assert f"python -m worker_kernel {name}" in text
        assert (
            command_parser(name).format_help().startswith(f"usage: python -m worker_kernel {name}")
        )


def test_a_bad_variable_names_itself():
    from worker_kernel.protocol.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"\$LAN2GPU_HEARTBEAT='fast'"):
        build_parser({"LAN2GPU_HEARTBEAT": "fast"})
