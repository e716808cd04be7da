"""The emulator's state: the sandbox registry, lifetimes, running processes, faults, counters.

Everything here is plain threads and locks, no asyncio: the ASGI handlers call in from the event
loop, the LocalSandbox reader threads call in with output, the reaper thread expires sandboxes.
Output reaches an asyncio stream through a :class:`ProcessRecord` subscriber queue, fed with
``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import datetime
import random
import secrets
import signal as _signal
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pytest_kode._threads import start_thread
from pytest_kode.emulator._profile import CreateLimits, IdempotencyTable, resolve_profile
from pytest_kode.plans import CloudPlan

if TYPE_CHECKING:
    from pathlib import Path

    from pytest_kode.sandbox import SandboxFS

ENVD_VERSION = "0.6.4"
"""Newest envd feature gate the SDK checks (``e2b/envd/versions.py``), so every feature is on."""

DEFAULT_TIMEOUT_S = 300
WORK_DIR = "/home/user"
# The real proxy keeps paused sandboxes for weeks; the LocalSandbox watchdog needs some bound.
_PAUSED_LOCAL_TIMEOUT_MS = 24 * 3600 * 1000

State = Literal["running", "paused"]


current_sandbox: contextvars.ContextVar[EmulatedSandbox] = contextvars.ContextVar(
    "kode_emulator_sandbox"
)
"""The sandbox an envd request is addressed to, set by the router before the RPC runs."""


class LocalProcessLike(Protocol):
    """What the daemon side needs from ``pytest_kode.backends.local.LocalProcess``."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def signal(self, signum: int) -> None: ...

    def wait(self, timeout_ms: int | None = None) -> Any: ...

    def send_stdin(self, data: str | bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None: ...

    def is_running(self) -> bool: ...


class LocalSandboxLike(Protocol):
    """What the emulator needs from ``pytest_kode.backends.local.LocalSandbox``."""

    @property
    def sandbox_id(self) -> str: ...

    @property
    def fs(self) -> SandboxFS: ...

    def host_path(self, path: str) -> Path: ...

    def get_host_url(self, port: int) -> str: ...

    def spawn(
        self,
        argv: list[str],
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        stdin: bool = False,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> LocalProcessLike: ...

    def set_timeout(self, timeout_ms: int) -> None: ...

    def dispose(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """A process as the client described it (what ``List`` reports back)."""

    cmd: str
    args: tuple[str, ...]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None


@dataclasses.dataclass(frozen=True)
class ProcessEnd:
    """How a process ended, in envd's terms (Go's ``ProcessState``)."""

    exit_code: int
    exited: bool
    status: str
    error: str | None

    @classmethod
    def from_returncode(cls, returncode: int, signalled: int | None = None) -> ProcessEnd:
        """``returncode`` as LocalProcess reports it (128 + N for a signal death)."""
        if returncode < 0:
            signalled, returncode = -returncode, 128 - returncode
        if signalled is not None and returncode == 128 + signalled:
            # Go reports exit code -1 and "signal: killed" for a process ended by a signal.
            name = (_signal.strsignal(signalled) or str(signalled)).lower()
            return cls(-1, False, f"signal: {name}", f"signal: {name}")
        status = f"exit status {returncode}"
        return cls(returncode, True, status, status if returncode else None)


Event = tuple[Literal["stdout", "stderr"], bytes] | tuple[Literal["end"], ProcessEnd]


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the loop is closed: the emulator is stopping and nobody listens any more


class ProcessRecord:
    """One process started through envd: fans its output out to every attached stream."""

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self.process: LocalProcessLike | None = None
        self.deadline_exceeded = False
        self.signalled: int | None = None
        self._lock = threading.Lock()
        self._subscribers: list[_Subscriber] = []
        self._end: ProcessEnd | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def ended(self) -> bool:
        return self._end is not None

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> _Subscriber:
        subscriber = _Subscriber(loop)
        with self._lock:
            if self._end is not None:
                subscriber.put(("end", self._end))
            else:
                self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def publish_stdout(self, data: bytes) -> None:
        self._publish(("stdout", bytes(data)))

    def publish_stderr(self, data: bytes) -> None:
        self._publish(("stderr", bytes(data)))

    def _publish(self, event: Event) -> None:
        with self._lock:
            for subscriber in self._subscribers:
                subscriber.put(event)

    def finish(self, end: ProcessEnd) -> None:
        with self._lock:
            if self._end is not None:
                return
            self._end = end
            subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber.put(("end", end))

    def send_signal(self, signum: int) -> None:
        """Signal the process tree; remembered so the end reads "signal: killed" like envd."""
        if self.process is None or self.ended:
            return
        self.signalled = signum
        try:
            self.process.signal(signum)
        except OSError:
            pass  # it exited in between

    def kill(self) -> None:
        self.send_signal(_signal.SIGKILL)


@dataclasses.dataclass
class EmulatedSandbox:
    """One sandbox as the control plane and the daemon side see it."""

    sandbox_id: str
    template_id: str
    client_id: str
    access_token: str
    metadata: dict[str, str]
    env_vars: dict[str, str]
    allow_internet_access: bool
    network_isolated: bool
    auto_pause: bool
    started_at: datetime.datetime
    end_at: datetime.datetime
    local: LocalSandboxLike
    state: State = "running"
    gone: bool = False
    processes: dict[int, ProcessRecord] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def running(self) -> bool:
        return self.state == "running" and not self.gone

    def register(self, record: ProcessRecord) -> None:
        with self.lock:
            self.processes[record.pid] = record

    def forget(self, record: ProcessRecord) -> None:
        with self.lock:
            if self.processes.get(record.pid) is record:
                del self.processes[record.pid]

    def live_processes(self) -> list[ProcessRecord]:
        with self.lock:
            return [record for record in self.processes.values() if not record.ended]

    def find_process(
        self, *, pid: int | None = None, tag: str | None = None
    ) -> ProcessRecord | None:
        for record in self.live_processes():
            if (pid is not None and record.pid == pid) or (
                tag is not None and record.spec.tag == tag
            ):
                return record
        return None

    def kill_processes(self) -> None:
        for record in self.live_processes():
            record.kill()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Registry:
    """All emulated sandboxes plus the test-facing knobs (faults, counters)."""

    def __init__(
        self,
        local_factory: Callable[..., LocalSandboxLike],
        profile: str | CloudPlan | None = None,
    ) -> None:
        self._local_factory = local_factory
        self.limits = CreateLimits(resolve_profile(profile))
        self.idempotency = IdempotencyTable()
        # Added to this machine's clock for every time the emulator reports or compares, so a
        # client with a skewed clock can be tested (E2BEmulator.clock_offset_s).
        self.clock_offset_s = 0.0
        self.fault_retry_after_s = 1
        self._creating = 0
        self._flaky_fraction = 0.0
        self._flaky_statuses: tuple[int, ...] = (429,)
        self._flaky_random = random.Random()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lost_answers: collections.deque[tuple[int, float]] = collections.deque()
        self._lock = threading.RLock()
        self._sandboxes: dict[str, EmulatedSandbox] = {}
        self.templates: set[str] = {"base"}
        # Built templates (pytest_kode.emulator._templates): name/id -> LocalTemplate.
        self.local_templates: dict[str, Any] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.created_count = 0
        self.latency_ms = 0  # before every answer (a round trip)
        self.create_latency_ms = 0  # the least a create takes on the server (a VM boot)
        self._create_faults: collections.deque[int] = collections.deque()
        self.kill_faults = 0  # the next kills answered 500, the sandbox left running
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()

    # -- life-cycle of the registry ---------------------------------------------------------
    def start_reaper(self, interval_s: float = 0.1) -> None:
        self._stop.clear()
        self._reaper = start_thread(
            self._reap_loop, args=(interval_s,), name="kode-emulator-reaper"
        )

    def close(self) -> None:
        """Stop the reaper and destroy every sandbox."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
            self._reaper = None
        with self._lock:
            doomed = list(self._sandboxes.values())
            self._sandboxes.clear()
        for sandbox in doomed:
            _destroy(sandbox)

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` on the server's event loop after the current answer went out."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    def run_worker(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` in a tracked thread that :meth:`close` joins."""

        def body() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._workers.discard(thread)

        with self._lock:  # held until the thread is registered, so body() finds it to discard
            thread = start_thread(body, name=name)
            self._workers.add(thread)

    def _reap_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.reap()

    def reap(self) -> list[str]:
        """End every running sandbox past its end time (kill, or pause with autoPause)."""
        now = self.now()
        with self._lock:
            expired = [sb for sb in self._sandboxes.values() if sb.running and sb.end_at <= now]
            for sandbox in expired:
                if not sandbox.auto_pause:
                    del self._sandboxes[sandbox.sandbox_id]
        for sandbox in expired:
            if sandbox.auto_pause:
                self.pause(sandbox)
            else:
                _destroy(sandbox)
        return [sandbox.sandbox_id for sandbox in expired]

    @property
    def plan(self) -> CloudPlan:
        return self.limits.plan

    def now(self) -> datetime.datetime:
        """The emulator's clock: this machine's, moved by :attr:`clock_offset_s`."""
        return utcnow() + datetime.timedelta(seconds=self.clock_offset_s)

    def reserve_slot(self) -> bool:
        """Count one create against the concurrency limit; False when the plan's is reached."""
        limit = self.plan.max_concurrent
        with self._lock:
            running = sum(1 for sb in self._sandboxes.values() if sb.running)
            if limit is not None and running + self._creating >= limit:
                return False
            self._creating += 1
            return True

    def release_slot(self) -> None:
        with self._lock:
            self._creating -= 1

    def lose_create_answers(self, n: int, status: int, hold_s: float) -> None:
        with self._lock:
            self._lost_answers.extend([(status, hold_s)] * n)

    def take_lost_answer(self) -> tuple[int, float] | None:
        with self._lock:
            return self._lost_answers.popleft() if self._lost_answers else None

    # -- faults -----------------------------------------------------------------------------
    def fail_next_creates(self, n: int, status: int) -> None:
        with self._lock:
            self._create_faults.extend([status] * n)

    def clear_create_faults(self) -> None:
        with self._lock:
            self._create_faults.clear()
            self._flaky_fraction = 0.0
            self._lost_answers.clear()
            self.kill_faults = 0

    def fail_next_kills(self, n: int) -> None:
        with self._lock:
            self.kill_faults += n

    def take_kill_fault(self) -> bool:
        with self._lock:
            if self.kill_faults <= 0:
                return False
            self.kill_faults -= 1
            return True

    def take_create_fault(self) -> int | None:
        with self._lock:
            if self._create_faults:
                return self._create_faults.popleft()
            if self._flaky_fraction and self._flaky_random.random() < self._flaky_fraction:
                return self._flaky_random.choice(self._flaky_statuses)
            return None

    def flaky_creates(self, fraction: float, statuses: tuple[int, ...], seed: int | None) -> None:
        with self._lock:
            self._flaky_fraction = fraction
            self._flaky_statuses = statuses
            self._flaky_random = random.Random(seed)

    # -- sandboxes --------------------------------------------------------------------------
    def create(
        self,
        *,
        template_id: str,
        timeout_s: int,
        metadata: dict[str, str],
        env_vars: dict[str, str],
        allow_internet_access: bool,
        auto_pause: bool = False,
    ) -> EmulatedSandbox:
        """Create a sandbox (blocking: starts a LocalSandbox). Raises KeyError."""
        if template_id not in self.templates:
            raise KeyError(template_id)
        local, isolated = self._new_local(
            env_vars, allow_internet_access, timeout_s, self.local_templates.get(template_id)
        )
        now = self.now()
        sandbox = EmulatedSandbox(
            sandbox_id=_new_id(),
            template_id=template_id,
            client_id=secrets.token_hex(4),
            access_token=secrets.token_hex(16),
            metadata=dict(metadata),
            env_vars=dict(env_vars),
            allow_internet_access=allow_internet_access,
            network_isolated=isolated,
            auto_pause=auto_pause,
            started_at=now,
            end_at=now + datetime.timedelta(seconds=timeout_s),
            local=local,
        )
        with self._lock:
            self._sandboxes[sandbox.sandbox_id] = sandbox
            self.created_count += 1
        return sandbox

    def _new_local(
        self,
        env_vars: dict[str, str],
        allow_internet_access: bool,
        timeout_s: int,
        local_template: Any = None,
    ) -> tuple[LocalSandboxLike, bool]:
        from pytest_kode.errors import BackendUnavailableError

        extra = {"local_template": local_template} if local_template is not None else {}

        timeout_ms = max(1, timeout_s) * 1000 + 60_000  # our reaper kills first; this is a backstop
        if not allow_internet_access:
            try:
                return self._local_factory(env_vars, False, timeout_ms, **extra), True
            except BackendUnavailableError:
                pass  # no network namespace here: create anyway, the sandbox records it
        return self._local_factory(env_vars, True, timeout_ms, **extra), False

    def get(self, sandbox_id: str) -> EmulatedSandbox | None:
        with self._lock:
            sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is not None and sandbox.running and sandbox.end_at <= self.now():
            # Past its end but the reaper has not come by yet: settle its fate now.
            self.reap()
            with self._lock:
                sandbox = self._sandboxes.get(sandbox_id)
        return sandbox

    def all(self) -> list[EmulatedSandbox]:
        self.reap()
        with self._lock:
            return list(self._sandboxes.values())

    def kill(self, sandbox_id: str) -> bool:
        with self._lock:
            sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return False
        _destroy(sandbox)
        return True

    def set_timeout(self, sandbox: EmulatedSandbox, timeout_s: int) -> None:
        """End the sandbox ``timeout_s`` from now, clamped to the plan's maximum lifetime
        (infra ``KeepAliveFor``: the end never passes ``start + MaxInstanceLength``)."""
        now = self.now()
        end = now + datetime.timedelta(seconds=timeout_s)
        if self.plan.max_lifetime_s is not None:
            end = min(
                end, sandbox.started_at + datetime.timedelta(seconds=self.plan.max_lifetime_s)
            )
        sandbox.end_at = end
        _set_local_timeout(sandbox, int((end - now).total_seconds() * 1000) + 60_000)

    def lifetime_over(self, sandbox: EmulatedSandbox) -> bool:
        """Whether the sandbox has lived the plan's maximum lifetime."""
        limit = self.plan.max_lifetime_s
        return limit is not None and (self.now() - sandbox.started_at).total_seconds() >= limit

    def pause(self, sandbox: EmulatedSandbox) -> None:
        # Pausing keeps the file system, not memory: processes end (as with mode="filesystem").
        sandbox.state = "paused"
        sandbox.kill_processes()
        _set_local_timeout(sandbox, _PAUSED_LOCAL_TIMEOUT_MS)

    def resume(self, sandbox: EmulatedSandbox, timeout_s: int) -> None:
        sandbox.state = "running"
        sandbox.started_at = self.now()
        self.set_timeout(sandbox, timeout_s)


def _set_local_timeout(sandbox: EmulatedSandbox, timeout_ms: int) -> None:
    try:
        sandbox.local.set_timeout(timeout_ms)
    except Exception:  # noqa: BLE001 - the backstop watchdog is best effort
        pass


def _destroy(sandbox: EmulatedSandbox) -> None:
    sandbox.gone = True
    sandbox.kill_processes()
    sandbox.local.dispose()


def _new_id() -> str:
    # Real ids are 20 lowercase alphanumerics; keep that shape so id checks elsewhere hold.
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(20))
