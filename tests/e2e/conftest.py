"""Fixtures for the end-to-end tests that need more than one host."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .netns import Lan, two_hosts


@pytest.fixture
def lan() -> Iterator[Lan]:
    """A worker's host and a notebook's host, joined by a link (network namespaces)."""
    with two_hosts() as hosts:
        yield hosts
