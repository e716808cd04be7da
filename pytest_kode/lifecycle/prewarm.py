"""``--sandbox-prewarm N``: function-scope sandboxes created ahead of need.

N spares per kind of sandbox (backend + resolved options) are kept *in flight or ready*: they are
created concurrently on up to N long-lived threads (:mod:`.jobs`), so a slow create (a second on a cloud) overlaps
with the tests instead of adding to them. A test takes the oldest spare, ready or not: waiting
for a create that started earlier is never slower than starting one now, which is what the test
would do without prewarm. Every take starts one more create (top-up). A spare whose create failed
is skipped (the test creates its own, and reports that error if it fails again); one that waited
long is checked first, since a sandbox can vanish while it waits. At the end every spare left
over goes to the disposer, a create still in flight as soon as it lands (the end waits for those
creates, with a bound).

A done sandbox that its backend can make as new (:meth:`Sandbox.recycle`) comes back as a spare
instead of being disposed: the provisioner announces it (:meth:`SparePool.expect`), which puts
its spare first in line at once (so the next test waits the few ms for it instead of taking a
created one and starting another create), and hands it over (:meth:`SparePool.give_back`), or
says it could not be made as new (then a create replaces it).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_kode.lifecycle.jobs import BackgroundJobs

if TYPE_CHECKING:
    from pytest_kode.sandbox import Sandbox

__all__ = ["Spare", "SparePool", "SpareSkipped"]


class SpareSkipped(Exception):
    """Raised by a pool's ``create`` when no spare may be made now (not a failure)."""


# A spare idle longer than this is checked (one round trip) before it is handed out.
CHECK_AFTER_S = 2.0
# How long the end of the session waits for creates in flight before it stops waiting.
CLOSE_WAIT_S = 30.0


@dataclass
class Spare:
    """One sandbox being created ahead of need, then waiting to be taken."""

    started: float = field(default_factory=time.monotonic)
    sandbox: Sandbox | None = None
    error: BaseException | None = None
    create_s: float = 0.0
    ready_at: float = 0.0
    abandoned: bool = False  # the run ended first: whoever lands it disposes it
    recycled: bool = False  # a done sandbox made as new, not a create
    done: threading.Event = field(default_factory=threading.Event)


class SparePool:
    """Spares by kind; ``create(kind_args)`` makes one sandbox, ``discard`` disposes one."""

    def __init__(
        self,
        target: int,
        create: Callable[[Any], Sandbox],
        discard: Callable[[Sandbox], None],
        *,
        check_after_s: float = CHECK_AFTER_S,
    ) -> None:
        self.target = target
        self._create = create
        self._discard = discard
        self.check_after_s = check_after_s
        self._lock = threading.Lock()
        self._spares: dict[Any, collections.deque[Spare]] = {}
        # Topping up is a queue append, not a thread start, on the test's path.
        self._jobs = BackgroundJobs(max(1, target), name="kode-prewarm")
        self._closed = False
        # Counters for the summary.
        self.taken = 0
        self.hidden_s = 0.0
        self.failed = 0
        self.stale = 0
        self.unused = 0
        self.taken_recycled = 0

    def take(self, key: Any, args: Any, *, later: int | None = None) -> Spare | None:
        """The oldest spare of ``key`` (maybe still being created), after topping up.

        ``later``: how many more tests may still want one (None: unknown); no more spares than
        that are made, so the end of a run leaves none unused.
        """
        with self._lock:
            queue = self._spares.setdefault(key, collections.deque())
            spare = queue.popleft() if queue else None
        self.top_up(key, args, later=later)
        return spare

    def top_up(self, key: Any, args: Any, *, later: int | None = None) -> None:
        """Start creates until ``target`` spares of ``key`` (at most ``later``) are in flight
        or ready."""
        wanted = self.target if later is None else min(self.target, later)
        with self._lock:
            if self._closed:
                return
            queue = self._spares.setdefault(key, collections.deque())
            new = [Spare() for _ in range(wanted - len(queue))]
            queue.extend(new)
        for spare in new:
            self._jobs.submit(functools.partial(self._make, spare, args))

    def expect(self, key: Any) -> Spare | None:
        """Announce a done sandbox of ``key`` being made as new: the spare it will be, first
        in line (a test waits the few ms for it rather than start a create); None when no
        more spares are wanted (the run is ending): dispose of the sandbox instead."""
        with self._lock:
            if self._closed:
                return None
            spare = Spare(recycled=True)
            self._spares.setdefault(key, collections.deque()).appendleft(spare)
            return spare

    def give_back(self, spare: Spare, key: Any, args: Any, sandbox: Sandbox | None) -> None:
        """End what :meth:`expect` announced: ``sandbox`` made as new, or None when it could
        not be (the test that waits for it creates its own, and a create replaces it)."""
        if sandbox is None:
            with self._lock:
                queue = self._spares.get(key)
                if queue is not None and spare in queue:
                    queue.remove(spare)  # nobody waits for it: out of the line
            spare.error = SpareSkipped("the done sandbox could not be made as new")
            spare.done.set()  # whoever waits for it takes the next spare
            self.top_up(key, args)
            return
        self._land(spare, sandbox)

    def _make(self, spare: Spare, args: Any) -> None:
        try:
            sandbox = self._create(args)
        except BaseException as exc:
            spare.error = exc
            spare.done.set()
            return
        spare.create_s = time.monotonic() - spare.started
        self._land(spare, sandbox)

    def _land(self, spare: Spare, sandbox: Sandbox) -> None:
        """``spare``'s sandbox is ready: hand it to whoever waits, or dispose of it when the
        run ended while it was being made."""
        spare.ready_at = time.monotonic()
        with self._lock:
            spare.sandbox = sandbox
            late = spare.abandoned
            if late:
                self.unused += 1
        spare.done.set()
        if late:
            self._discard(sandbox)

    def claim(self, spare: Spare) -> Sandbox | None:
        """Wait for ``spare`` and return its sandbox if usable; None means create one instead."""
        waited_from = time.monotonic()
        try:
            spare.done.wait()
        except BaseException:  # Ctrl-C while waiting: nobody will take this one
            with self._lock:
                landed = spare.sandbox
                spare.abandoned = landed is None
            if landed is not None:
                self._discard(landed)
            raise
        waited = time.monotonic() - waited_from
        sandbox = spare.sandbox
        if sandbox is None:
            if not isinstance(spare.error, SpareSkipped):
                with self._lock:
                    self.failed += 1
            return None
        if time.monotonic() - spare.ready_at > self.check_after_s:
            try:
                alive = sandbox.is_alive()
            except Exception:
                alive = False
            if not alive:
                with self._lock:
                    self.stale += 1
                self._discard(sandbox)
                return None
        with self._lock:
            self.taken += 1
            self.taken_recycled += spare.recycled
            self.hidden_s += max(0.0, spare.create_s - waited)
        return sandbox

    def evict_one(self) -> bool:
        """Dispose of one ready spare (the newest) to free what it holds; False if none."""
        with self._lock:
            for queue in self._spares.values():
                for spare in reversed(queue):
                    if spare.sandbox is not None:
                        queue.remove(spare)
                        sandbox = spare.sandbox
                        self.unused += 1
                        break
                else:
                    continue
                break
            else:
                return False
        self._discard(sandbox)
        return True

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Start no more creates, discard every spare left, wait for those still in flight.

        Ready spares go to the disposer at once and a create still in flight disposes of its
        sandbox the moment it lands (:meth:`_make`), so their kills overlap with the creates
        still running instead of waiting for the last of them.
        """
        with self._lock:
            self._closed = True
            left = [spare for queue in self._spares.values() for spare in queue]
            self._spares.clear()
            ready = [spare.sandbox for spare in left if spare.sandbox is not None]
            for spare in left:
                spare.abandoned = spare.sandbox is None
            self.unused += len(ready)
        for sandbox in ready:
            self._discard(sandbox)
        self._jobs.wait(timeout_s)
