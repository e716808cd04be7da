"""Creates paced to the E2B plan's rate across every process of a run.

One token bucket for the whole run, kept as a single number in the run folder (the *theoretical
arrival time* of the generic cell rate algorithm) and read-modify-written under a file lock of its
own, so the xdist workers of a run together never create faster than the plan allows, however
many there are. The bucket starts full (``burst`` creates back to back), then hands out one slot
per interval. A process takes its slot under the lock and sleeps outside it, so slots are handed
out in order and nobody waits for another's sleep.

Paced a little below the plan's rate (``SAFETY``): the cloud's bucket refills on its own clock,
and a create that arrives a few milliseconds early costs a 429 and a whole ``Retry-After``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["SAFETY", "CreatePacer"]

SAFETY = 0.95


class CreatePacer:
    """A run-wide create-rate limit: :meth:`wait` blocks until this process may create."""

    def __init__(
        self,
        folder: Path,
        rate: float,
        burst: int = 1,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 creates per second, got {rate!r}")
        self._file = folder / "create-pace"
        self._lock_path = folder / "create-pace.lock"
        self.rate = rate
        self.interval_s = 1.0 / (rate * SAFETY)
        self.burst = max(1, burst)
        self._sleep = sleep
        self._clock = clock  # wall clock: the run's processes share it, monotonic clocks do not
        self.waited_s = 0.0
        self.granted = 0

    def wait(self) -> float:
        """Take the next create slot; sleep until it comes. Returns the seconds slept."""
        from filelock import FileLock

        self._file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self._lock_path)):
            now = self._clock()
            try:
                arrival = float(self._file.read_text(encoding="ascii"))
            except (FileNotFoundError, ValueError):
                arrival = now
            arrival = max(arrival, now)
            # The bucket's depth: a slot may start up to (burst - 1) intervals before its turn.
            start = max(now, arrival - (self.burst - 1) * self.interval_s)
            self._file.write_text(repr(arrival + self.interval_s), encoding="ascii")
        delay = start - now
        if delay > 0:
            self._sleep(delay)
        self.waited_s += max(0.0, delay)
        self.granted += 1
        return max(0.0, delay)
