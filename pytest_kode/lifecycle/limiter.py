"""``--sandbox-max-concurrent``: a cap on live sandboxes across every process of a run.

N slot files in the run folder; a live sandbox holds an exclusive lock on one of them. File locks
are released by the kernel when a process dies, so a crashed worker never strands a slot.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from pytest_kode.errors import SandboxCreateError

__all__ = ["ConcurrencyLimiter"]


class ConcurrencyLimiter:
    def __init__(self, folder: Path, limit: int, *, timeout_s: float = 3600.0) -> None:
        self._folder = folder
        self.limit = limit
        self.timeout_s = timeout_s
        self.waited_s = 0.0
        self._held = 0
        # Slots are taken by test and prewarm threads and given back by the disposer's.
        self._count_lock = threading.Lock()

    def acquire(self, *, wait: bool = True) -> Any:
        """Block until a slot is free; return the held lock (pass it to :meth:`release`).

        With ``wait=False``, return None at once when no slot is free.
        """
        from filelock import FileLock, Timeout

        if self._held >= self.limit and wait:
            # Waiting would wait for ourselves.
            raise SandboxCreateError(
                f"this process already holds all {self.limit} sandbox slots "
                "(--sandbox-max-concurrent) and asks for one more",
                hint=f"raise --sandbox-max-concurrent above {self.limit}: a test or its shared "
                "fixtures use that many sandboxes at once",
            )
        self._folder.mkdir(parents=True, exist_ok=True)
        # Not thread-local: the disposer's threads, and an async fixture's helper thread, release
        # or take slots on threads other than the test's.
        slots = [
            FileLock(str(self._folder / f"slot-{n}.lock"), thread_local=False)
            for n in range(self.limit)
        ]
        started = time.monotonic()
        delay = 0.01
        while True:
            for slot in slots:
                try:
                    slot.acquire(timeout=0)
                except Timeout:
                    continue
                with self._count_lock:
                    self.waited_s += time.monotonic() - started
                    self._held += 1
                return slot
            if not wait:
                return None
            if time.monotonic() - started > self.timeout_s:
                raise SandboxCreateError(
                    f"waited {self.timeout_s:.0f}s for one of {self.limit} sandbox slots "
                    "(--sandbox-max-concurrent)",
                    hint="raise --sandbox-max-concurrent, or look for tests holding sandboxes",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def release(self, slot: Any) -> None:
        slot.release(force=True)
        with self._count_lock:
            self._held -= 1
