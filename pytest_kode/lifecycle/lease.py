"""E2B sandboxes on a short lease, renewed by a heartbeat while the run lives (SPEC 3.6).

A sandbox the run holds is created with a lifetime of one lease (default 60 s) instead of its
``timeout_ms``; a daemon thread renews it every third of a lease, never past the sandbox's own
deadline (``timeout_ms`` from creation, or the last ``set_timeout``): ``timeout_ms`` stays the
lifetime on every backend, and the lease only bounds how long a killed run's sandboxes outlive
it. If the run is killed the renewals stop and E2B ends the sandbox within one lease. Released
sandboxes leave the heartbeat: disposed ones are gone, kept and reused ones get their long
lifetime.

The E2B API cannot change a sandbox's metadata after creation, so ``kode_heartbeat`` keeps its
creation value; whether a run still renews is read from the lifetime left (see
:func:`lease_state`).
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from pytest_kode._threads import start_thread


class Leasable(Protocol):
    """What the heartbeat needs of a sandbox (``E2BSandbox`` has it)."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def deadline(self) -> float | None: ...

    @property
    def disposed(self) -> bool: ...

    def lease(self, lease_ms: int) -> None: ...


__all__ = ["DEFAULT_LEASE_S", "LEASE_ENV", "Heartbeat", "lease_state", "parse_lease"]

DEFAULT_LEASE_S = 60.0
_RENEWERS = 8  # renewals in flight at once
LEASE_ENV = "KODE_SANDBOX_LEASE"
LEASE_TAG = "kode_lease"
"""Metadata tag with the lease (seconds) a sandbox was created on; absent: not leased."""


def parse_lease(raw: str | float, source: str) -> float:
    """A lease in seconds from ``raw`` (> 0); ValueError names ``source`` and the bad value."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{source}: expected a number of seconds > 0, got {raw!r}")
    return value


def env_lease() -> float | None:
    raw = os.environ.get(LEASE_ENV)
    return parse_lease(raw, LEASE_ENV) if raw else None


def lease_state(
    metadata: dict[str, str], end_at: datetime.datetime | None, now: datetime.datetime
) -> str:
    """``leased`` (on a lease: renewed by a live run, or ending within one lease by itself),
    ``released`` (given a lifetime beyond its lease: kept or reused, nobody renews it) or
    ``unknown`` (no lease tag or no end time)."""
    raw = metadata.get(LEASE_TAG)
    if not raw or end_at is None:
        return "unknown"
    try:
        lease = float(raw)
    except ValueError:
        return "unknown"
    left = (end_at - now).total_seconds()
    # A renewal sets exactly one lease from "now"; allow for clock skew and request latency.
    return "leased" if left <= lease + max(5.0, lease * 0.1) else "released"


class Heartbeat:
    """Renews the lease of every sandbox it holds, from a daemon thread, until stopped.

    Never blocks or fails a test: a renewal that fails is reported once through ``on_error``
    and the sandbox is dropped when it is gone.
    """

    def __init__(self, lease_s: float, on_error: Callable[[str], None] | None = None) -> None:
        self.lease_s = lease_s
        self.interval_s = max(0.05, lease_s / 3)
        self.renewals = 0
        self._on_error = on_error
        self._sandboxes: dict[int, Leasable] = {}
        self._failed: set[int] = set()
        self._lock = threading.Lock()
        # One per sandbox, held across its renewal: discard() waits for that sandbox's renewal
        # in flight (so none lands after the caller gave a kept sandbox its long lifetime), and
        # for nobody else's.
        self._renewing: dict[int, threading.Lock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lease_ms(self) -> int:
        return max(1000, int(self.lease_s * 1000))

    def add(self, sandbox: Leasable) -> None:
        """Renew ``sandbox``'s lease from now on (starts the thread on first use)."""
        with self._lock:
            self._sandboxes[id(sandbox)] = sandbox
            if self._thread is None and not self._stop.is_set():
                self._thread = start_thread(self._run, name="kode-heartbeat")

    def discard(self, sandbox: object) -> None:
        with self._renewal_lock(id(sandbox)), self._lock:
            self._sandboxes.pop(id(sandbox), None)
            self._failed.discard(id(sandbox))
            self._renewing.pop(id(sandbox), None)

    def _renewal_lock(self, key: int) -> threading.Lock:
        with self._lock:
            return self._renewing.setdefault(key, threading.Lock())

    def __contains__(self, sandbox: object) -> bool:
        with self._lock:
            return id(sandbox) in self._sandboxes

    def stop(self) -> None:
        """Stop renewing (idempotent); waits briefly for a renewal in flight."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
            self._sandboxes.clear()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def beat(self) -> None:
        """Renew every held sandbox once, now, in parallel: one stalled request (each has a
        short timeout of its own) must not hold up the others' renewals."""
        from concurrent.futures import ThreadPoolExecutor

        with self._lock:
            held = list(self._sandboxes.items())
        if len(held) <= 1:
            for key, sandbox in held:
                self._beat_one(key, sandbox)
            return
        with ThreadPoolExecutor(min(_RENEWERS, len(held)), "kode-heartbeat-renew") as pool:
            for key, sandbox in held:
                pool.submit(self._beat_one, key, sandbox)

    def _beat_one(self, key: int, sandbox: Leasable) -> None:
        if self._stop.is_set():
            return
        with self._renewal_lock(key):
            with self._lock:
                if key not in self._sandboxes:
                    return  # released meanwhile: its fate decides its lifetime now
            gone, error = self._renew(sandbox)
            if not gone and error is None:
                return
        if gone:
            self.discard(sandbox)
            return
        with self._lock:
            first = key not in self._failed
            self._failed.add(key)
        if first and self._on_error is not None:
            self._on_error(
                f"could not renew the lease of sandbox {sandbox.sandbox_id} "
                f"({sandbox.backend}): {error}; it ends {self.lease_s:g}s after the last "
                "renewal unless a later one gets through"
            )

    def _renew(self, sandbox: Leasable) -> tuple[bool, Exception | None]:
        """Renew one lease, never past the sandbox's deadline: (gone, error)."""
        from pytest_kode.errors import SandboxNotFoundError

        deadline = sandbox.deadline
        left_ms = self.lease_ms if deadline is None else int((deadline - time.time()) * 1000)
        if left_ms <= 0:
            return True, None  # its timeout_ms lifetime is over: the service ends it on time
        last = left_ms <= self.lease_ms
        try:
            # The last renewal ends it at its deadline (E2B counts whole seconds, rounded up).
            sandbox.lease(left_ms if last else self.lease_ms)
        except SandboxNotFoundError:
            return True, None
        except Exception as exc:
            return sandbox.disposed, exc
        self.renewals += 1
        return last, None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()
