"""Test set-up: the main thread starts with no current event loop, as ``asyncio.run()`` leaves it.

Why: pytest-asyncio before 1.4 saves "the current loop" with ``asyncio.get_event_loop()`` before
it installs a test's loop (pytest-asyncio issue #724). In the main thread, with no loop ever
set, that call *makes* one, which pytest-asyncio restores afterwards and never closes. The first
test that then calls ``asyncio.run()`` unsets it; held in a reference cycle, the loop is
collected during some later test (a hypothesis test, whose allocations run the collector).
Under ``filterwarnings = error`` its "unclosed event loop" warning aborts its ``__del__`` before
``close()``, so its self-pipe, an AF_UNIX socket pair, is finalized unclosed too, and pytest 8.2,
which reports only a phase's last unraisable exception, shows
``Exception ignored in: <socket.socket fd=-1, family=1, type=1, proto=0>``.

Saying once that there is no current loop makes ``get_event_loop()`` raise instead (as it
always does from Python 3.14), which pytest-asyncio handles: it then saves and restores None.
Loaded by ``tests/conftest.py``; also a plugin of its own (``-p _event_loops``) for the test
that runs it in a pytest of its own.
"""

from __future__ import annotations

import asyncio

import pytest


def forget_current_loop() -> None:
    """No current event loop in this thread, so that ``get_event_loop()`` makes none."""
    asyncio.set_event_loop(None)


def pytest_configure(config: pytest.Config) -> None:
    forget_current_loop()
