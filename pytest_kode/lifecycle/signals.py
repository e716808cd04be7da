"""SIGTERM as an orderly stop, so CI cancellation disposes sandboxes like Ctrl-C does (SPEC 3.6).

By default SIGTERM ends Python at once: no ``finally``, no ``pytest_sessionfinish``, no disposal.
While a session runs, :class:`TerminateGuard` turns the first SIGTERM into ``KeyboardInterrupt``
in the main thread; pytest then interrupts the session and the plugin's sweep settles every
sandbox. Further SIGTERMs are ignored while that clean-up runs (CI follows up with SIGKILL after
its grace period; the watchdog and the leases cover that). A second Ctrl-C (SIGINT) keeps
pytest's own behaviour: it interrupts the clean-up, and the process exits promptly.

Under xdist the controller passes a stop on to the workers (as SIGTERM, which they take as
their orderly stop; a Ctrl-C in a terminal reaches them directly and a forwarded SIGTERM after it
is ignored), so they dispose their sandboxes at once instead of after xdist's 10 s grace. A worker
whose controller vanished (killed) stops itself the same way.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from pytest_kode._threads import start_thread

__all__ = ["TerminateGuard"]


class TerminateGuard:
    """A pytest plugin object: installs the SIGTERM handler at configure, restores the previous
    one at unconfigure. Does nothing outside the main thread (signal handlers live there)."""

    def __init__(self, forward_to: Callable[[], list[int]] | None = None) -> None:
        self._previous: dict[int, Any] = {}
        self._forward_to = forward_to
        self._parent_stop = threading.Event()
        self._parent_thread: threading.Thread | None = None
        self.stopping = False
        self.finishing = False

    def install(self) -> None:
        """Take over SIGTERM (and SIGINT, to note the stop and pass it on; pytest's
        KeyboardInterrupt behaviour stays)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        previous_int = signal.getsignal(signal.SIGINT)
        if callable(previous_int):
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

    def restore(self) -> None:
        self._parent_stop.set()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def watch_parent(self, interval_s: float = 0.25) -> None:
        """Stop this process (as by SIGTERM) when its parent dies: an xdist worker whose
        controller was killed would otherwise finish its current test first."""
        parent = os.getppid()

        def watch() -> None:
            while not self._parent_stop.wait(interval_s):
                if os.getppid() != parent:
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

        self._parent_thread = start_thread(watch, name="kode-parent")

    def _forward(self) -> None:
        if self._forward_to is None:
            return
        for pid in self._forward_to():
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass  # gone already

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping or self.finishing:
            return  # already on the way out: let the disposal finish
        self.stopping = True
        self._forward()
        raise KeyboardInterrupt("SIGTERM: stopping the run and disposing its sandboxes")

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        first = not self.stopping
        self.stopping = True
        if first:
            self._forward()
        previous = self._previous.get(signal.SIGINT)
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self) -> None:
        # From here on the run settles its sandboxes; an interrupt would only cut that short.
        self.finishing = True

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self) -> None:
        self.restore()
