"""Background jobs on a few long-lived threads: disposal and prewarm creates.

On a cloud backend a kill or a create is a network round trip; done on a test's path it delays
the test by that much, every test. :class:`BackgroundJobs` runs such jobs on up to N threads that
stay alive while there is work (an idle one ends after a while), so handing a job over is a
queue append and a wake-up, not a thread start: starting a thread waits for it to get the GIL,
milliseconds per test on a busy interpreter. The end of the session waits for the jobs, with a
bound.

Its threads block SIGINT/SIGTERM (see :mod:`pytest_kode._threads`) and are daemons: a killed run
leaves what they had not finished to the lease and the watchdog.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from pytest_kode._threads import start_thread

__all__ = ["BackgroundJobs", "Disposer"]

_log = logging.getLogger(__name__)

# Kills run concurrently (each is mostly waiting on the network); more would only add load.
MAX_THREADS = 4
# An idle thread ends after this long; submit() starts a new one when needed.
IDLE_S = 5.0


class BackgroundJobs:
    """Runs jobs on up to ``max_threads`` background threads; :meth:`wait` settles them."""

    def __init__(self, max_threads: int, *, name: str) -> None:
        self._max_threads = max_threads
        self._name = name
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
            # A new thread only for a job no idle thread will take (one woken but not yet
            # running still counts as idle, and its job as queued).
            if len(self._jobs) > self._idle and len(self._threads) < self._max_threads:
                number = len(self._threads)
                self._threads.append(start_thread(self._work, name=f"{self._name}-{number}"))
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
                    woke = self._cond.wait(timeout=IDLE_S)
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
                _log.exception("pytest-kode: a background job (%s) failed", self._name)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()


class Disposer(BackgroundJobs):
    """Disposes done sandboxes in the background: each job is a kill and whatever must follow it
    (counting, the journal, freeing a ``--sandbox-max-concurrent`` slot)."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        super().__init__(max_threads, name="kode-disposer")
