"""The shared key file: created 0600, never overwritten, refused when exposed."""

from __future__ import annotations

import os
import stat

import pytest

from worker_kernel.protocol.errors import ConfigurationError
from worker_kernel.protocol.keys import generate_key_file, load_key


def test_generated_key_is_private_and_loads(tmp_path):
    path = generate_key_file(tmp_path / "sub" / "key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_key(path)) == 32


def test_keygen_refuses_to_overwrite(tmp_path):
    path = generate_key_file(tmp_path / "key")
    before = path.read_text()
    with pytest.raises(ConfigurationError, match="already exists"):
        generate_key_file(path)
    assert path.read_text() == before


def test_group_readable_key_is_refused_with_the_fix(tmp_path):
    path = generate_key_file(tmp_path / "key")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigurationError, match=f"chmod 600 {path}"):
        load_key(path)


def test_missing_key_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigurationError, match="keygen --key-file"):
        load_key(tmp_path / "absent")


def test_garbage_key_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text("not hex at all")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigurationError, match="hex key"):
        load_key(path)


def test_default_key_file_follows_the_environment(tmp_path, monkeypatch):
    path = generate_key_file(tmp_path / "env-key")
    monkeypatch.setenv("LAN2GPU_KEY_FILE", str(path))
    assert load_key() == load_key(path)
