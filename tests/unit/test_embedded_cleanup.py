"""Folders of embedded workers whose notebook process is gone are removed; others stay."""

from __future__ import annotations

import os
import subprocess
import sys

from lan2gpu_magic.embedded import PREFIX, remove_stale


def test_only_folders_of_dead_owners_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{PREFIX}{gone.pid}-abc"
    mine = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{PREFIX}not-a-pid"
    for folder in (dead, mine, other):
        folder.mkdir()
        (folder / "worker.log").write_text("...")
    assert remove_stale(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and other.exists()
