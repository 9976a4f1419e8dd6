"""The README's commands work as written on a fresh machine: every extra they name
exists, nothing is installed from an index that does not have it, and each command
says how long it takes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
DURATION = re.compile(
    r"\b(\d+(\.\d+)?\s*(ms|s|seconds?|min|minutes?)|a (few )?(second|minute)s?)\b", re.I
)


def _blocks() -> list[tuple[str, str]]:
    """(the text just before, the block) for every ```bash block."""
    found = []
    for match in re.finditer(r"```bash\n(.*?)```", README, re.S):
        before = README[: match.start()].rstrip().split("\n\n")[-1]
        found.append((before, match.group(1)))
    return found


def test_every_command_block_says_how_long_it_takes():
    blocks = _blocks()
    assert len(blocks) >= 5
    for before, block in blocks:
        assert DURATION.search(before) or DURATION.search(block), block


def test_every_extra_the_readme_installs_exists_and_nothing_comes_from_an_index():
    installs = re.findall(r"pip install ([^\n`]+)", README)
    assert installs
    for command in installs:
        for extra in re.findall(r"\[([\w,-]+)\]", command):
            for name in extra.split(","):
                assert name in EXTRAS, f"`pip install {command}`: no extra {name!r}"
        # lan2gpu is not on PyPI: a checkout (.) or a wheel file, never the bare name.
        assert not re.search(r"(^|\s)['\"]?lan2gpu(\[|\s|$)", command), command


def test_the_browser_extra_brings_jupyterlab_and_says_how_to_run_it_as_root():
    assert any(dep.startswith("jupyterlab") for dep in EXTRAS["lab"])
    dashboard = README.split("## Dashboard", 1)[1].split("\n## ", 1)[0]
    assert "'.[lab]'" in dashboard and "--allow-root" in dashboard
    assert "[cu12]` brings" in README  # what the CUDA extra is for
