"""``--sandbox-max-concurrent``: a cap on live sandboxes across every process of a run.

N slot files in the run folder; a live sandbox holds an exclusive lock on one of them. File locks
are released by the kernel when a process dies, so a crashed worker never strands a slot.

Beside each held slot lies a small record of its holder (process, worker, scope, owner), and a
process waiting for a slot leaves a ``wait-*.json`` record while it waits. From those two a wait
can be explained while it happens ("held by gw0's session sandbox ...") and a deadlock told from a
slow run: when every slot is held by a process that is itself waiting for a slot, nothing can ever
be freed (a worker's shared sandboxes live until its session ends, which its waiting test blocks),
so the wait fails at once with the holders and a cap that would work.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_kode.errors import SandboxCreateError

__all__ = ["ConcurrencyLimiter", "describe_waits"]

# A deadlock must look the same for this long before the wait gives up: a holder between two
# states (a disposal finishing in the background) must not be mistaken for a waiting one.
DEADLOCK_STABLE_S = 2.0
# A wait longer than this is reported while it happens, and again every REPORT_EVERY_S.
REPORT_AFTER_S = 3.0
REPORT_EVERY_S = 15.0
_DEADLOCK_FILE = "deadlock"


class ConcurrencyLimiter:
    def __init__(
        self,
        folder: Path,
        limit: int,
        *,
        worker: str = "main",
        timeout_s: float = 3600.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self._folder = folder
        self.limit = limit
        self._worker = worker
        self.timeout_s = timeout_s
        self._on_wait = on_wait
        self.waited_s = 0.0
        self._held = 0
        # Slots are taken by test and prewarm threads and given back by the disposer's.
        self._count_lock = threading.Lock()

    def acquire(self, *, wait: bool = True, scope: str = "function", owner: str = "") -> Any:
        """Block until a slot is free; return the held lock (pass it to :meth:`release`).

        With ``wait=False``, return None at once when no slot is free. Raises
        SandboxCreateError at once when waiting could never end (a deadlock).
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
        # or take slots on threads other than the test's. Made as they are tried: a free slot
        # is usually among the first, and a plan's limit is 100 slots.
        slots: list[FileLock] = []

        def slot_number(number: int) -> FileLock:
            while len(slots) <= number:
                slots.append(FileLock(str(self._slot_path(len(slots))), thread_local=False))
            return slots[number]

        me = {"pid": os.getpid(), "worker": self._worker, "scope": scope, "owner": owner}
        wait_file = self._folder / f"wait-{self._worker}-{os.getpid()}-{threading.get_ident()}"
        started = time.monotonic()
        delay = 0.01
        slept = False
        deadlocked_since: float | None = None
        reported_at: float | None = None
        try:
            while True:
                for number in range(self.limit):
                    slot = slot_number(number)
                    try:
                        slot.acquire(timeout=0)
                    except Timeout:
                        continue
                    _write_json(self._slot_path(number).with_suffix(".json"), me)
                    with self._count_lock:
                        if slept:  # taking a free slot is not waiting for one
                            self.waited_s += time.monotonic() - started
                        self._held += 1
                    return slot
                if not wait:
                    return None
                now = time.monotonic()
                if now - started > 0.2 and not wait_file.exists():
                    _write_json(wait_file, {**me, "since": time.time()})
                if now - started > 0.5:
                    if self._deadlocked():
                        deadlocked_since = deadlocked_since or now
                        # Once one process proved the deadlock, the next waits need no proof.
                        known = (self._folder / _DEADLOCK_FILE).exists()
                        if known or now - deadlocked_since >= DEADLOCK_STABLE_S:
                            raise self._deadlock_error(scope, owner)
                    else:
                        deadlocked_since = None
                if self._on_wait is not None and now - started >= REPORT_AFTER_S:
                    if reported_at is None or now - reported_at >= REPORT_EVERY_S:
                        reported_at = now
                        self._on_wait(describe_waits(self._folder, self.limit))
                if now - started > self.timeout_s:
                    raise SandboxCreateError(
                        f"waited {self.timeout_s:.0f}s for one of {self.limit} sandbox slots "
                        "(--sandbox-max-concurrent)",
                        hint="raise --sandbox-max-concurrent, or look for tests holding sandboxes",
                    )
                time.sleep(delay)
                slept = True
                delay = min(delay * 2, 0.2)
        finally:
            wait_file.unlink(missing_ok=True)

    def release(self, slot: Any) -> None:
        Path(slot.lock_file).with_suffix(".json").unlink(missing_ok=True)
        slot.release(force=True)
        with self._count_lock:
            self._held -= 1

    def _slot_path(self, number: int) -> Path:
        return self._folder / f"slot-{number}.lock"

    def _deadlocked(self) -> bool:
        """Every slot is held by a process that waits for a slot itself (so none can free)."""
        holders = _holders(self._folder, self.limit)
        if len(holders) < self.limit:
            return False  # a slot whose holder is unknown (just taken or just freed): no proof
        waiting = {entry["pid"] for entry in _waiters(self._folder)} | {os.getpid()}
        return all(holder["pid"] in waiting for holder in holders)

    def _deadlock_error(self, scope: str, owner: str) -> SandboxCreateError:
        (self._folder / _DEADLOCK_FILE).touch()
        holders = _holders(self._folder, self.limit)
        waiters = {entry["pid"] for entry in _waiters(self._folder)} | {os.getpid()}
        # Each waiting process needs one slot more than it holds; with that many nobody waits.
        works = len(holders) + len(waiters)
        return SandboxCreateError(
            f"--sandbox-max-concurrent {self.limit} can never give this {scope} sandbox "
            f"(for {owner or 'a test'}) a slot: all {self.limit} are held by "
            f"{_describe(holders)}, and every process holding one is itself waiting for another, "
            "so none can be freed (shared sandboxes live until their scope ends)",
            hint=f"use --sandbox-max-concurrent {works} or more (the {len(holders)} held + one "
            f"for each of the {len(waiters)} waiting process(es)), or share fewer sandboxes",
        )


def describe_waits(folder: Path, limit: int) -> str:
    """One line about who waits for a slot and who holds them (empty when nobody waits long)."""
    waiters = [w for w in _waiters(folder) if time.time() - w.get("since", time.time()) > 0]
    if not waiters:
        return ""
    longest = max(time.time() - float(w["since"]) for w in waiters)
    who = ", ".join(sorted({str(w["worker"]) for w in waiters}))
    return (
        f"[sandbox slots] {who} waiting {longest:.0f}s for a free slot (--sandbox-max-concurrent "
        f"{limit}); held by {_describe(_holders(folder, limit)) or 'nobody known'}"
    )


def watch_waits(folder: Path, limit: int, write: Callable[[str], None]) -> threading.Event:
    """Report long waits of any process of the run from a thread; set the event to stop.

    The xdist controller runs it: its workers have no terminal of their own.
    """
    from pytest_kode._threads import start_thread

    stop = threading.Event()

    def watch() -> None:
        last = 0.0
        while not stop.wait(1.0):
            waits = _waiters(folder)
            if not waits:
                continue
            longest = max(time.time() - float(w["since"]) for w in waits)
            if longest >= REPORT_AFTER_S and time.monotonic() - last >= REPORT_EVERY_S:
                last = time.monotonic()
                line = describe_waits(folder, limit)
                if line:
                    write(line)

    start_thread(watch, name="kode-slot-watch")
    return stop


def _describe(holders: list[dict[str, Any]]) -> str:
    # A worker or session sandbox belongs to no test: its owner says nothing more.
    return ", ".join(
        f"{h['worker']}'s {h['scope']} sandbox"
        + (f" (of {h['owner']})" if h["scope"] not in ("worker", "session") else "")
        for h in holders
    )


def _holders(folder: Path, limit: int) -> list[dict[str, Any]]:
    found = []
    for number in range(limit):
        entry = _read_json(folder / f"slot-{number}.json")
        if entry is not None and _alive(entry.get("pid")):
            found.append(entry)
    return found


def _waiters(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in folder.glob("wait-*"):
        entry = _read_json(path)
        if entry is not None and "since" in entry and _alive(entry.get("pid")):
            found.append(entry)
    return found


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(path.name + f".{os.getpid()}.tmp")
    temp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(temp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
