"""What the local-backend test modules share: the isolation modes they run in."""

from __future__ import annotations

import os
import time

import pytest

from pytest_kode.backends.local import detect_isolation

HAVE_BWRAP = detect_isolation() == "bwrap"
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap does not work here")
MODES = [pytest.param("bwrap", marks=needs_bwrap), "none"]


def unique_sleep() -> str:
    """A sleep duration no other process uses, so /proc can tell ours apart."""
    return f"{600 + (time.monotonic_ns() % 100_000) / 1000:.3f}"


def procs_with(marker: str) -> list[int]:
    """Host pids whose command line has ``marker`` as one argument."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if marker.encode() in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found
