"""Fixtures the local-backend test modules share (both isolation modes, leak checks)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import _event_loops
import pytest
from _local import MODES, skip_without_bwrap

from pytest_kode.backends.local import _process


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_bwrap: the test needs local bubblewrap isolation")
    # Before any test: no loop that nobody owns (see _event_loops).
    _event_loops.forget_current_loop()


def pytest_runtest_setup(item: pytest.Item) -> None:
    skip_without_bwrap(item)


@pytest.fixture(params=MODES)
def isolation(request: pytest.FixtureRequest) -> str:
    """Each test that asks for it runs under bubblewrap and without isolation."""
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A private sandbox root that must be empty again when the test ends."""
    path = tmp_path / "root"
    yield path
    leftovers = sorted(os.listdir(path)) if path.exists() else []
    assert not leftovers, f"sandbox files left behind: {leftovers}"


def _children() -> set[tuple[int, int, str]]:
    return set(_process.descendants(os.getpid()))


@pytest.fixture
def no_leaked_children() -> Iterator[None]:
    """Every process a sandbox started must be gone once it is disposed.

    Only processes new since the test began count: others (a run's watchdog, a session
    emulator) are not this test's.
    """
    before = _children()
    yield
    deadline = time.monotonic() + 2.0
    while (left := _children() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"processes outlived their sandbox: {left}"
