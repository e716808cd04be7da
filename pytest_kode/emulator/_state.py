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
import functools
import json
import random
import secrets
import shutil
import signal as _signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pytest_kode._threads import start_thread
from pytest_kode.emulator._metrics import MetricsRecorder
from pytest_kode.emulator._profile import CreateLimits, IdempotencyTable, resolve_profile
from pytest_kode.emulator._snapshots import Snapshot, SnapshotFailed, SnapshotStore, copy_tree
from pytest_kode.errors import KodeError
from pytest_kode.plans import CloudPlan

if TYPE_CHECKING:
    from pathlib import Path

    from pytest_kode.emulator._watch import DirWatcher
    from pytest_kode.sandbox import SandboxFS

ENVD_VERSION = "0.6.4"
"""Newest envd feature gate the SDK checks (``e2b/envd/versions.py``), so every feature is on."""

DEFAULT_TIMEOUT_S = 300
# The size every emulated sandbox reports (E2B's default: 2 vCPU, 512 MiB, a small disk).
CPU_COUNT = 2
MEMORY_MB = 512
DISK_MB = 1024
WORK_DIR = "/home/user"
# The real proxy keeps paused sandboxes for weeks; the LocalSandbox watchdog needs some bound.
_PAUSED_LOCAL_TIMEOUT_MS = 24 * 3600 * 1000
_WORKER_JOIN_S = 10.0

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

    def resize(self, rows: int, cols: int) -> None: ...

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
    @property
    def metadata_path(self) -> Path: ...

    def spawn(
        self,
        argv: list[str],
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        stdin: bool = False,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        pty: tuple[int, int] | None = None,
        tag: str | None = None,
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
    pty: bool = False


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


Event = (
    tuple[Literal["stdout", "stderr", "pty"], bytes]
    | tuple[Literal["end"], ProcessEnd]
    | tuple[Literal["abort"], None]
)


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

    def publish_pty(self, data: bytes) -> None:
        self._publish(("pty", bytes(data)))

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

    def abort(self) -> None:
        """The sandbox is going away: attached streams break off without an end event."""
        with self._lock:
            subscribers, self._subscribers = self._subscribers, []
        for subscriber in subscribers:
            subscriber.put(("abort", None))

    def send_signal(self, signum: int) -> None:
        """Signal the process tree; remembered so the end reads "signal: killed" like envd."""
        if self.process is None or self.ended:
            return
        self.signalled = signum
        try:
            if signum == _signal.SIGKILL:
                # Returns once it is gone (reaped), as envd's kill does: a `kill -0 <pid>`
                # right after must not find it.
                self.process.kill()
            else:
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
    auto_resume: bool = False  # a paused sandbox wakes on daemon traffic
    pause_memory: bool = True  # what the timeout's auto-pause keeps (False: files only)
    pause_mode: str = "full"  # how the last pause was made: "full" or "filesystem"
    timeout_s: int = DEFAULT_TIMEOUT_S
    frozen: bool = False  # paused with its processes stopped (a "memory" pause)
    processes: dict[int, ProcessRecord] = dataclasses.field(default_factory=dict)
    # watcher id -> (watcher, watched in-sandbox path, include entry info)
    watchers: dict[str, tuple[DirWatcher, str, bool]] = dataclasses.field(default_factory=dict)
    _gone_callbacks: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    metrics: MetricsRecorder = dataclasses.field(
        default_factory=lambda: MetricsRecorder(
            cpu_count=CPU_COUNT, mem_total=MEMORY_MB << 20, disk_total=DISK_MB << 20
        )
    )
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Pause and resume one at a time; a pause deferred to a worker (pause_pending) that a
    # resume overtook is dropped, never carried out on the resumed sandbox.
    transition: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    pause_pending: bool = False

    @property
    def running(self) -> bool:
        return self.state == "running" and not self.gone

    def register(self, record: ProcessRecord) -> None:
        with self.lock:
            self.processes[record.pid] = record

    def sample_metrics(self, now: float) -> None:
        try:
            self.metrics.sample(_agent_pid(self.local), self.local.host_path(WORK_DIR), now)
        except Exception:  # noqa: BLE001 - a sandbox disposed meanwhile has nothing to measure
            pass

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

    def signal_processes(self, signum: int) -> None:
        """Send ``signum`` to every running process started through the daemon (their groups)."""
        for record in self.live_processes():
            if record.process is not None:
                try:
                    record.process.signal(signum)
                except (OSError, KodeError):
                    pass  # it ended in between

    def on_gone(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when the sandbox goes; returns the unsubscriber."""
        with self.lock:
            self._gone_callbacks.append(callback)

        def forget() -> None:
            with self.lock:
                if callback in self._gone_callbacks:
                    self._gone_callbacks.remove(callback)

        return forget

    def abort_streams(self) -> None:
        """Break off every open process and watch stream (the sandbox stops or pauses)."""
        for record in self.live_processes():
            record.abort()
        with self.lock:
            callbacks = list(self._gone_callbacks)
        for callback in callbacks:
            callback()

    def add_watcher(self, watcher: DirWatcher, path: str, include_entry: bool) -> str:
        watcher_id = secrets.token_hex(8)
        with self.lock:
            self.watchers[watcher_id] = (watcher, path, include_entry)
        return watcher_id

    def find_watcher(self, watcher_id: str) -> tuple[DirWatcher, str, bool] | None:
        with self.lock:
            return self.watchers.get(watcher_id)

    def remove_watcher(self, watcher: DirWatcher) -> None:
        with self.lock:
            for key, (candidate, _, _) in list(self.watchers.items()):
                if candidate is watcher:
                    del self.watchers[key]
        watcher.close()

    def close_watchers(self) -> None:
        with self.lock:
            doomed, self.watchers = self.watchers, {}
        for watcher, _, _ in doomed.values():
            watcher.close()


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
        self.snapshots = SnapshotStore()
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
        with self._lock:
            workers = list(self._workers)
        deadline = time.monotonic() + _WORKER_JOIN_S
        for worker in workers:  # disposals, process reapers; a long build is left behind
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self.snapshots.close()

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
            self._sample_metrics()

    def _sample_metrics(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                sb for sb in self._sandboxes.values() if sb.running and sb.metrics.next_due <= now
            ]
        for sandbox in due:
            sandbox.sample_metrics(now)

    def reap(self, *, wait: bool = True) -> list[str]:
        """End every running sandbox past its end time (kill, or pause with autoPause).

        ``wait=False`` (request handlers on the event loop) marks them gone at once and leaves
        disposing of their local sandboxes to a worker thread.
        """
        now = self.now()
        with self._lock:
            expired = [sb for sb in self._sandboxes.values() if sb.running and sb.end_at <= now]
            for sandbox in expired:
                if not sandbox.auto_pause:
                    del self._sandboxes[sandbox.sandbox_id]
        for sandbox in expired:
            if sandbox.auto_pause and wait:
                self.pause(sandbox)
            elif sandbox.auto_pause:
                # Seen at once; its processes stop in the worker. No transition lock here: this
                # runs on the event loop, which a slow pause elsewhere must never hold up.
                sandbox.pause_pending = True
                sandbox.state = "paused"
                self.run_worker(
                    functools.partial(self._deferred_pause, sandbox),
                    name=f"kode-emulator-pause-{sandbox.sandbox_id}",
                )
            elif wait:
                _destroy(sandbox)
            else:
                sandbox.gone = True
                self.run_worker(
                    functools.partial(_destroy, sandbox),
                    name=f"kode-emulator-expire-{sandbox.sandbox_id}",
                )
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
        """Create a sandbox (blocking: starts a LocalSandbox). Raises KeyError.

        ``template_id`` may name a snapshot: the sandbox then starts from a copy of its files,
        with its template and settings (``env_vars`` given here win).
        """
        snapshot = self.snapshots.get(template_id)
        if snapshot is None and template_id not in self.templates:
            raise KeyError(template_id)
        return self._start(
            template_id=template_id,
            timeout_s=timeout_s,
            metadata=metadata,
            env_vars=env_vars,
            allow_internet_access=allow_internet_access,
            auto_pause=auto_pause,
            snapshot=snapshot,
        )

    def _start(
        self,
        *,
        template_id: str,
        timeout_s: int,
        metadata: dict[str, str],
        env_vars: dict[str, str],
        allow_internet_access: bool,
        auto_pause: bool,
        snapshot: Snapshot | None,
    ) -> EmulatedSandbox:
        base_template = template_id
        if snapshot is not None:
            base_template = snapshot.template_id
            env_vars = {**snapshot.env_vars, **env_vars}
            allow_internet_access = snapshot.allow_internet_access
        local, isolated = self._new_local(
            env_vars, allow_internet_access, timeout_s, self.local_templates.get(base_template)
        )
        if snapshot is not None:
            try:
                copy_tree(snapshot.files, local.host_path(WORK_DIR))
            except BaseException:
                local.dispose()
                raise
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
            timeout_s=timeout_s,
        )
        sandbox.sample_metrics(time.monotonic())
        with self._lock:
            self._sandboxes[sandbox.sandbox_id] = sandbox
            self.created_count += 1
        return sandbox

    # -- snapshots and forks ----------------------------------------------------------------
    def snapshot(
        self, sandbox: EmulatedSandbox, name: str | None = None, *, keep: bool = True
    ) -> Snapshot:
        """Copy the sandbox's files and settings (blocking). Raises SnapshotFailed."""
        files = self.snapshots.directory()
        try:
            copy_tree(sandbox.local.host_path(WORK_DIR), files)
        except Exception as exc:  # noqa: BLE001 - any copy failure is reported the same way
            _remove_tree(files)
            if sandbox.gone:
                raise SnapshotFailed(
                    f"sandbox {sandbox.sandbox_id} was killed while its snapshot was taken"
                ) from exc
            raise SnapshotFailed(
                f"copying the files of sandbox {sandbox.sandbox_id} failed: {exc}"
            ) from exc
        if sandbox.gone:
            _remove_tree(files)
            raise SnapshotFailed(
                f"sandbox {sandbox.sandbox_id} was killed while its snapshot was taken"
            )
        snapshot = Snapshot(
            snapshot_id=_new_id(),
            names=(name,) if name else (),
            sandbox_id=sandbox.sandbox_id,
            template_id=sandbox.template_id,
            env_vars=dict(sandbox.env_vars),
            allow_internet_access=sandbox.allow_internet_access,
            files=files,
            created_at=self.now(),
        )
        if keep:
            self.snapshots.add(snapshot)
        return snapshot

    def fork(
        self, sandbox: EmulatedSandbox, count: int, timeout_s: int
    ) -> list[EmulatedSandbox | Exception]:
        """``count`` new sandboxes from a copy of ``sandbox`` (blocking). Raises SnapshotFailed
        when the copy cannot be taken; a fork that fails to start is returned as its error."""
        snapshot = self.snapshot(sandbox, keep=False)
        results: list[EmulatedSandbox | Exception] = []
        try:
            for _ in range(count):
                try:
                    results.append(
                        self._start(
                            template_id=sandbox.template_id,
                            timeout_s=timeout_s,
                            metadata=dict(sandbox.metadata),
                            env_vars={},
                            allow_internet_access=sandbox.allow_internet_access,
                            auto_pause=sandbox.auto_pause,
                            snapshot=snapshot,
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - reported per fork, as E2B does
                    results.append(exc)
        finally:
            _remove_tree(snapshot.files)
        return results

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
            self.reap(wait=False)
            with self._lock:
                sandbox = self._sandboxes.get(sandbox_id)
        return sandbox

    def all(self) -> list[EmulatedSandbox]:
        self.reap(wait=False)
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

    def pause(self, sandbox: EmulatedSandbox, *, memory: bool | None = None) -> None:
        """Pause (``memory``: as asked; None: as the sandbox's auto-pause is set up).

        A full pause keeps the running processes: they are stopped (SIGSTOP) and go on at
        resume, as from a memory snapshot. A filesystem-only pause ends them; files stay.
        Either way open streams and watches break off, as the VM's connections do."""
        with sandbox.transition:
            sandbox.pause_pending = False
            keep = sandbox.pause_memory if memory is None else memory
            sandbox.pause_mode = "full" if keep else "filesystem"
            sandbox.state = "paused"
            sandbox.abort_streams()
            sandbox.close_watchers()
            if keep:
                sandbox.signal_processes(_signal.SIGSTOP)
                sandbox.frozen = True
            else:
                sandbox.kill_processes()
            _set_local_timeout(sandbox, _PAUSED_LOCAL_TIMEOUT_MS)

    def _deferred_pause(self, sandbox: EmulatedSandbox) -> None:
        """The timeout's auto-pause, unless a resume (traffic to an auto-resume sandbox)
        overtook it: pausing then would freeze a sandbox that is serving that traffic."""
        with sandbox.transition:
            if sandbox.pause_pending and not sandbox.gone:
                self.pause(sandbox)

    def wake(self, sandbox: EmulatedSandbox) -> None:
        """Auto-resume: traffic for a paused sandbox set up for it (its daemon's, or a request
        to one of its ports) resumes it, for its first timeout."""
        with sandbox.transition:
            if sandbox.state == "paused" and sandbox.auto_resume and not sandbox.gone:
                self.resume(sandbox, sandbox.timeout_s)

    def resume(self, sandbox: EmulatedSandbox, timeout_s: int) -> None:
        with sandbox.transition:
            sandbox.pause_pending = False
            if sandbox.frozen:
                sandbox.signal_processes(_signal.SIGCONT)
                sandbox.frozen = False
            sandbox.started_at = self.now()
            # The new end before "running": the reaper takes a running sandbox past its end.
            self.set_timeout(sandbox, timeout_s)
            sandbox.state = "running"


def _set_local_timeout(sandbox: EmulatedSandbox, timeout_ms: int) -> None:
    try:
        sandbox.local.set_timeout(timeout_ms)
    except Exception:  # noqa: BLE001 - the backstop watchdog is best effort
        pass


def _destroy(sandbox: EmulatedSandbox) -> None:
    sandbox.gone = True
    sandbox.abort_streams()
    sandbox.close_watchers()
    sandbox.kill_processes()
    sandbox.local.dispose()


def _agent_pid(local: LocalSandboxLike) -> int | None:
    """The host pid of the local sandbox's agent, the root of all that runs in it (from the
    metadata file every local sandbox keeps)."""
    try:
        agent = json.loads(local.metadata_path.read_text()).get("agent") or {}
    except (OSError, ValueError):
        return None
    pid = agent.get("pid") if isinstance(agent, dict) else None
    return pid if isinstance(pid, int) else None


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _new_id() -> str:
    # Real ids are 20 lowercase alphanumerics; keep that shape so id checks elsewhere hold.
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(20))
