"""Disposal off the critical path: done sandboxes are killed by background threads.

On a cloud backend a kill is a network round trip; done on the test's teardown it delays the
next test by that much, every test. The :class:`Disposer` takes the kill (and whatever must follow
it: counting, the journal, freeing a ``--sandbox-max-concurrent`` slot) as a job, runs a few jobs
at once, and lets the end of the session wait for all of them, with a bound.

Its threads block SIGINT/SIGTERM (see :mod:`pytest_kode._threads`) and are daemons: a killed run
leaves what they had not finished to the lease and the watchdog, as before.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from pytest_kode._threads import start_thread

__all__ = ["Disposer"]

_log = logging.getLogger(__name__)

# Kills run concurrently (each is mostly waiting on the network); more would only add load.
MAX_THREADS = 4


class Disposer:
    """Runs disposal jobs in background threads; :meth:`wait` settles them."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self._max_threads = max_threads
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished yet (queued or running)."""
        with self._cond:
            return self._pending

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the background. It reports its own failures; it must not raise."""
        with self._cond:
            self._jobs.append(job)
            self._pending += 1
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            if self._idle == 0 and len(self._threads) < self._max_threads:
                number = len(self._threads)
                self._threads.append(start_thread(self._work, name=f"kode-disposer-{number}"))
            # All: wait() sleeps on the same condition, and must not take this wake-up.
            self._cond.notify_all()

    def wait(self, timeout_s: float | None, until: Callable[[], bool] | None = None) -> bool:
        """Block until every job is done (or ``until()`` holds); False when ``timeout_s`` ran out.

        ``until`` is checked whenever a job finishes, under the disposer's lock.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending and not (until is not None and until()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._idle += 1
                    # Idle threads end after a while; submit() starts new ones when needed.
                    woke = self._cond.wait(timeout=5.0)
                    self._idle -= 1
                    if not woke and not self._jobs:
                        self._threads = [
                            t for t in self._threads if t is not threading.current_thread()
                        ]
                        return
                job = self._jobs.popleft()
            try:
                job()
            except BaseException:  # a job reports its failures; this is a bug, not a leak
                _log.exception("pytest-kode: a disposal job failed")
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()
