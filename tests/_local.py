"""What the local-backend test modules share: the isolation modes they run in.

``needs_bwrap`` tests skip cleanly where bubblewrap does not work *or* the run's switch
(``--sandbox-isolation=none``, ``KODE_SANDBOX_ISOLATION=none``) turns it off. The decision is
made when the test runs (``tests/conftest.py``), not at import: the plugin applies
``--sandbox-isolation`` after the root conftest has already been imported.
"""

from __future__ import annotations

import os
import time

import pytest

from pytest_kode.backends.local import detect_isolation

needs_bwrap = pytest.mark.needs_bwrap
MODES = [pytest.param("bwrap", marks=needs_bwrap), "none"]


def have_bwrap() -> bool:
    """Whether local sandboxes get bubblewrap in this run (probed once per process)."""
    return detect_isolation() == "bwrap"


def skip_without_bwrap(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_bwrap") is not None and not have_bwrap():
        pytest.skip("needs bubblewrap, which does not work here or is switched off")


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


def wait_for_procs(marker: str, count: int = 1) -> list[int]:
    """``procs_with(marker)`` once ``count`` of them run (or after 10 s, whatever it is then).

    ``start`` and a backgrounded ``&`` return once the shell is forked, not once it has
    exec'd the command: until then its command line does not carry the marker.
    """
    deadline = time.monotonic() + 10
    while len(found := procs_with(marker)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return found
