"""One place decides when a sandbox is created, shared, kept and disposed.

The fixtures ask the :class:`Provisioner` for sandboxes; shared scopes go through a
:class:`SandboxPool` whose lifetime pytest's own fixture scoping drives (a module pool is closed
when pytest leaves the module). Every sandbox a process holds has a *fate* decided when it was
obtained: ``dispose`` (the default), ``detach`` (a session sandbox under xdist, which the
controller disposes once every worker is done) or ``reuse`` (kept alive, its id cached for the
next run). Every sandbox is tracked, so a sweep at session end settles whatever a finalizer missed,
and journalled in the run folder, so the controller can dispose what a crashed worker left.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from pytest_kode._threads import start_thread
from pytest_kode.errors import (
    BackendUnavailableError,
    ConfigError,
    KodeError,
    SandboxNotFoundError,
)
from pytest_kode.lifecycle.idcache import IdCache, reuse_key
from pytest_kode.lifecycle.jobs import Disposer
from pytest_kode.lifecycle.limiter import ConcurrencyLimiter
from pytest_kode.lifecycle.pacing import CreatePacer
from pytest_kode.lifecycle.prewarm import SparePool, SpareSkipped
from pytest_kode.lifecycle.rundir import RunDir, SandboxRecord
from pytest_kode.plans import plan_named

if TYPE_CHECKING:
    from pytest_kode.backends.registry import BackendRegistry
    from pytest_kode.lifecycle.lease import Heartbeat, Leasable
    from pytest_kode.options import SandboxOptions
    from pytest_kode.sandbox import Sandbox

__all__ = ["KeptSandbox", "Provisioner", "RunSettings", "SandboxPool", "SandboxStats"]

KEEP_LIFETIME_MS = 3_600_000
# Said instead of claiming "kept"/"reused" for sandboxes that end with the run's own emulator.
EMULATOR_ENDS_NOTE = (
    "{what} keeps nothing on --sandbox-backend=emulator: the plugin's emulator stops when the run "
    "ends, and its sandboxes with it, so they were disposed instead. To keep sandboxes, run "
    "`pytest-kode emulator` yourself, export the variables it prints and use "
    "--sandbox-backend=e2b, or use the local or e2b backend"
)
# How long the end of the session waits for background disposals before it reports them.
DISPOSE_WAIT_S = 60.0


@dataclass(frozen=True)
class RunSettings:
    """The run-wide choices from the command line, ini file and environment (validated)."""

    backend: str = "auto"
    backend_explicit: bool = False
    template: str | None = None
    keep_failed: bool = False
    artifacts_dir: Path = Path("sandbox-artifacts")
    prewarm: int = 0
    reuse: bool = False
    max_concurrent: int | None = None
    plan: str = "hobby"  # the E2B plan whose limits E2B sandboxes are paced and capped to
    lease_s: float = 60.0  # E2B sandboxes' lease, renewed by the heartbeat (lifecycle.lease)
    # Done function-scope sandboxes made as new for the next test where the backend can
    # (Sandbox.recycle), instead of disposed and replaced by a create.
    recycle: bool = True


@dataclass
class SandboxStats:
    """What the run did with sandboxes; summed across xdist workers by the controller."""

    created: int = 0
    recycled: int = 0  # done sandboxes made as new under a new id (their old id: disposed)
    resumed: int = 0
    reused: int = 0
    disposed: int = 0
    kept: int = 0
    leaked: int = 0
    provision_s: float = 0.0
    exec_s: float = 0.0
    waited_s: float = 0.0
    paced_s: float = 0.0  # waiting for a create slot of the E2B plan's rate
    # Sandbox-seconds (creation to confirmed kill, or to release when kept) per backend.
    sandbox_s: dict[str, float] = field(default_factory=dict)
    # Function-scope sandboxes: how many tests got one and how long they waited for it.
    function_acquired: int = 0
    provision_wait_s: float = 0.0
    # Prewarm: spares handed out, the create time they hid, spares disposed unused.
    prewarm_taken: int = 0
    prewarm_recycled: int = 0  # of those, done sandboxes made as new
    prewarm_hidden_s: float = 0.0
    prewarm_unused: int = 0
    prewarm_lost: int = 0  # failed to create, or gone while waiting
    run_s: float = 0.0  # how long the processes that ran function-scope tests ran

    def add(self, other: dict[str, Any]) -> None:
        for name, value in other.items():
            if not hasattr(self, name):
                continue
            mine = getattr(self, name)
            if isinstance(mine, dict):
                for key, amount in value.items():
                    mine[key] = mine.get(key, 0.0) + amount
            else:
                setattr(self, name, mine + value)

    def add_life(self, backend: str, seconds: float) -> None:
        self.sandbox_s[backend] = self.sandbox_s.get(backend, 0.0) + seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KeptSandbox:
    """A sandbox left alive after a failure, with what a person needs to get into it."""

    sandbox_id: str
    backend: str
    nodeid: str
    access: str


@dataclass(frozen=True)
class _Backend:
    name: str  # as the user chose it ("emulator" stays "emulator": records must say so)
    cls: type[Sandbox]
    options: SandboxOptions
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmulatorEndpoint:
    """Where the run's E2B emulator listens (started by this process or by the controller)."""

    url: str
    api_key: str


@dataclass
class _Held:
    fate: str  # "dispose" | "detach" | "reuse"
    backend: str
    slot: Any = None
    reuse_key: str | None = None
    limiter: ConcurrencyLimiter | None = None  # the one the slot came from
    # A function-scope sandbox of the spare pool's kind, which may come back to it made as new.
    spare_of: _Backend | None = None


class Provisioner:
    """Creates, tags, tracks and settles the sandboxes of one pytest process."""

    def __init__(
        self,
        config: pytest.Config,
        settings: RunSettings,
        registry: BackendRegistry,
        run_id: str,
        worker_id: str,
        *,
        run_dir: RunDir,
        distributed: bool = False,
        emulator: EmulatorEndpoint | None = None,
        id_cache: IdCache | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.registry = registry
        self.run_id = run_id
        self.worker_id = worker_id
        self.run_dir = run_dir
        self.distributed = distributed
        self.id_cache = id_cache
        self.stats = SandboxStats()
        self.kept: list[KeptSandbox] = []
        self._live: dict[int, Sandbox] = {}
        self._held: dict[int, _Held] = {}
        self._lock = threading.RLock()
        self._emulator_endpoint = emulator
        self._emulator: Any = None
        self._limiter = (
            ConcurrencyLimiter(
                self.slots_folder,
                settings.max_concurrent,
                worker=worker_id,
                on_wait=self._live_line,
            )
            if settings.max_concurrent
            else None
        )
        self.plan = plan_named(settings.plan)
        # E2B sandboxes only: the plan's concurrency limit unless --sandbox-max-concurrent says
        # otherwise, and its create rate (lifecycle.pacing), both across the run's processes.
        self._plan_limiter: ConcurrencyLimiter | None = None
        self._pacer: CreatePacer | None = None
        self._slots_held = 0  # by this process, including sandboxes still being disposed
        self._disposer = Disposer()
        self.dispose_wait_s = DISPOSE_WAIT_S
        self._spares = (
            SparePool(settings.prewarm, self._create_spare, self._discard_spare)
            if settings.prewarm
            else None
        )
        self._born: dict[int, float] = {}  # id(sandbox) -> monotonic time its life began
        # How many tests after the current one may want a function-scope sandbox (None:
        # unknown); set by the plugin from the collected items, it bounds prewarm.
        self.tests_left: Callable[[pytest.Item | None], int | None] = lambda item: None
        self.started = time.monotonic()
        self.notes: list[str] = []  # for the terminal summary (heartbeat, watchdog trouble)
        self._heartbeat: Heartbeat | None = None
        self._guarded = False
        self._guard_thread: threading.Thread | None = None
        self._closed = False

    # -- choosing a backend -----------------------------------------------------------------
    def backend_name(self, requested: str | None, options: SandboxOptions) -> str:
        """Resolve ``auto`` and check the backend can run; skips or raises with the reason."""
        name = requested or self.settings.backend
        if name == "auto":
            name = "e2b" if options.api_key is not None else "local"
        if name == "e2b" and options.api_key is None:
            reason = (
                "backend 'e2b' needs an API key: set E2B_API_KEY (or use --sandbox-backend=local)"
            )
            if self.settings.backend_explicit and self.settings.backend == "e2b":
                raise BackendUnavailableError(reason, backend="e2b")
            pytest.skip(reason)
        if name != "emulator":
            self.registry.load(name)  # unknown names fail here, with the list of known ones
        return name

    def _resolve(self, name: str, options: SandboxOptions) -> _Backend:
        if name == "emulator":
            endpoint = self.emulator_endpoint()
            return _Backend(
                name=name,
                cls=self.registry.load("e2b"),
                options=options.replace(api_key=endpoint.api_key),
                kwargs={"api_url": endpoint.url, "sandbox_url": endpoint.url},
            )
        return _Backend(name=name, cls=self.registry.load(name), options=options)

    def emulator_endpoint(self) -> EmulatorEndpoint:
        """The run's emulator: the controller's under xdist, else one started on first use."""
        with self._lock:
            if self._emulator_endpoint is None:
                if self._closed:
                    raise BackendUnavailableError(
                        "the run is over: its E2B emulator was stopped", backend="emulator"
                    )
                from pytest_kode.emulator import E2BEmulator
                from pytest_kode.lifecycle.watchdog import EMULATOR_SUBDIR

                # Under the run folder, so the watchdog removes them if this process is killed.
                self._guard()
                # As strict as the cloud on the run's plan, so what the cloud would refuse
                # fails here first.
                self._emulator = E2BEmulator(
                    root_dir=self.run_dir.path / EMULATOR_SUBDIR, profile=self.plan
                )
                self._emulator.start()
                self._emulator_endpoint = EmulatorEndpoint(
                    self._emulator.url, self._emulator.api_key
                )
            return self._emulator_endpoint

    # -- obtaining --------------------------------------------------------------------------
    def acquire(
        self,
        options: SandboxOptions,
        backend: str,
        *,
        item: pytest.Item | None,
        owner: str,
        scope: str = "function",
        reuse: bool = False,
        variant: str = "",
    ) -> Sandbox:
        """A ready sandbox for ``options`` on ``backend``, tagged with the run, worker and owner.

        ``owner`` is the node id the sandbox belongs to (the test, or the class/module sharing
        it). A ``session`` sandbox under xdist is shared by every worker; with ``reuse`` the
        sandbox outlives the run and the next run connects to it. ``variant`` keeps shared
        sandboxes of different fixture families apart (the async fixtures' from the sync ones').
        """
        resolved = self._resolve(backend, options)
        slot = self._slot(scope, owner) + (f":{variant}" if variant else "")
        key = reuse_key(backend, options.fingerprint(), scope, slot)
        if reuse and backend == "emulator":
            self._note_once(EMULATOR_ENDS_NOTE.format(what="--sandbox-reuse / reuse=True"))
            reuse = False
        reuse = reuse and options.sandbox_id is None and self.id_cache is not None
        if scope == "session" and self.distributed:
            # Under the run lock until the creator's pytest_kode_sandbox_created hook (the place
            # for set-up) is done, so the other workers connect to a ready sandbox.
            with self.run_dir.locked():
                if reuse:
                    # The first worker of this run to get it announces it (set-up, or the
                    # skip of set-up when resumed); the others connect to a ready sandbox.
                    first = not self.run_dir.announced(key)
                    sandbox = self._obtain_reused(resolved, owner, key, scope, counted=first)
                    # Only the first keeps it for reuse (and counts it); the others let go.
                    held = (
                        _Held("reuse", backend, reuse_key=key)
                        if first
                        else _Held("detach", backend)
                    )
                    self._adopt(sandbox, held, item, announce=first, scope=scope)
                    self.run_dir.mark_announced(key)
                else:
                    sandbox, fresh = self._obtain_run_shared(resolved, owner, key)
                    self._adopt(
                        sandbox, _Held("detach", backend), item, announce=fresh, scope=scope
                    )
            return sandbox
        if reuse:
            sandbox = self._obtain_reused(resolved, owner, key, scope)
            held = _Held("reuse", backend, reuse_key=key)
        else:
            sandbox = self._provide(resolved, owner, scope, options, item)
            recyclable = (
                scope == "function"
                and self.settings.recycle
                and self._spares is not None
                and options.sandbox_id is None
                and self.tests_left(item) != 0
            )
            held = _Held("dispose", backend, spare_of=resolved if recyclable else None)
        self._adopt(sandbox, held, item, scope=scope)
        return sandbox

    def _provide(
        self,
        resolved: _Backend,
        owner: str,
        scope: str,
        options: SandboxOptions,
        item: pytest.Item | None,
    ) -> Sandbox:
        """A new sandbox: a prewarmed spare for a function-scope test when there is one."""
        started = time.perf_counter()
        sandbox = None
        if scope == "function" and self._spares is not None and options.sandbox_id is None:
            key, later = self._prewarm_key(resolved), self.tests_left(item)
            spare = self._spares.take(key, resolved, later=later)
            while spare is not None:
                sandbox = self._spares.claim(spare)
                if sandbox is not None or not spare.recycled:
                    break
                # A done sandbox that could not be made as new: the next spare in line.
                spare = self._spares.take(key, resolved, later=later)
        if sandbox is None:
            sandbox = self._create(resolved, owner, scope=scope)
        if scope == "function":
            with self._lock:
                self.stats.provision_wait_s += time.perf_counter() - started
                self.stats.function_acquired += 1
        return sandbox

    def _adopt(
        self,
        sandbox: Sandbox,
        held: _Held,
        item: pytest.Item | None,
        announce: bool = True,
        *,
        scope: str,
    ) -> None:
        """Track ``sandbox`` with its fate, then tell the hooks (which may set it up)."""
        with self._lock:
            previous = self._held.get(id(sandbox))
            if previous is not None:
                # The slot and the limiter it came from: a plan limiter's slot given back to
                # --sandbox-max-concurrent's (or to none) would be held until the run ends.
                held.slot, held.limiter = previous.slot, previous.limiter
            self._held[id(sandbox)] = held
            self._live[id(sandbox)] = sandbox
        if not announce:
            return
        try:
            self.config.hook.pytest_kode_sandbox_created(sandbox=sandbox, item=item, scope=scope)
        except BaseException:
            self.release(sandbox)
            raise

    def _slot(self, scope: str, owner: str) -> str:
        if scope == "session":
            return "session"
        if scope == "worker":
            return self.worker_id
        return f"{self.worker_id}:{owner}"

    def _obtain_reused(
        self, resolved: _Backend, owner: str, key: str, scope: str, *, counted: bool = True
    ) -> Sandbox:
        """Connect to the cached sandbox for ``key``, or create one and cache it.

        ``counted``: connecting counts as a resume (False for a worker joining what another
        worker of this run already resumed).
        """
        assert self.id_cache is not None
        entry = self.id_cache.get(key)
        if entry is not None:
            sandbox = self.connect(
                resolved,
                str(entry["sandbox_id"]),
                take_slot=counted,
                resumes=counted,
                scope=scope,
            )
            if sandbox is not None:
                return sandbox
            self.id_cache.delete(key, str(entry["sandbox_id"]))
        sandbox = self._create(resolved, owner, reuse=True, scope=scope)
        self.id_cache.set(key, self._record(resolved, sandbox).as_dict())
        return sandbox

    def _obtain_run_shared(self, resolved: _Backend, owner: str, key: str) -> tuple[Sandbox, bool]:
        """The run's session sandbox for ``key`` (call with the run lock held); True if new."""
        known = self.run_dir.sessions().get(key)
        if known is not None:
            # Not a resume: the sandbox was created by another worker of this very run.
            sandbox = self.connect(resolved, known.sandbox_id, take_slot=False, resumes=False)
            if sandbox is not None:
                return sandbox, False
        sandbox = self._create(resolved, owner, scope="session")
        self.run_dir.set_session(key, self._record(resolved, sandbox))
        return sandbox, True

    def connect(
        self,
        resolved: _Backend,
        sandbox_id: str,
        *,
        take_slot: bool,
        resumes: bool = True,
        scope: str = "function",
    ) -> Sandbox | None:
        """Attach to a live sandbox by id, re-applying its lifetime; None when it is gone.

        ``resumes`` says whether a test will use it (counted as resumed) or it is only being
        reached to be disposed.
        """
        started = time.perf_counter()
        limiter = self._limiter_for(resolved)
        slot = (
            self._acquire_slot(limiter, scope=scope, owner=f"{sandbox_id} (resumed)")
            if take_slot
            else None
        )
        options = resolved.options.replace(sandbox_id=sandbox_id)
        options, kwargs = self._with_template(options, resolved)
        sandbox = resolved.cls(options, **kwargs)
        try:
            sandbox.init()
            if not sandbox.is_alive():
                raise SandboxNotFoundError("not alive", sandbox_id=sandbox_id)
            lease_s = self._lease_s(resolved)
            sandbox.set_timeout(resolved.options.timeout_ms)
            if lease_s:
                cast("Leasable", sandbox).lease(int(lease_s * 1000))
        except (SandboxNotFoundError, BackendUnavailableError):
            sandbox.detach()
            self._release_slot(slot, limiter)
            return None
        with self._lock:
            self._born[id(sandbox)] = time.monotonic()
            if resumes:
                self.stats.provision_s += time.perf_counter() - started
                self.stats.resumed += 1
            self._held[id(sandbox)] = _Held(
                "dispose", resolved.name, slot=slot, limiter=limiter if slot else None
            )
        if lease_s:
            self._renew(sandbox, lease_s)
        return sandbox

    @staticmethod
    def _on_e2b(resolved: _Backend) -> bool:
        return getattr(resolved.cls, "backend", None) == "e2b"

    def _limiter_for(self, resolved: _Backend) -> ConcurrencyLimiter | None:
        """The cap a sandbox of ``resolved`` counts against: --sandbox-max-concurrent for every
        backend, else the plan's concurrency limit for E2B ones."""
        if self._limiter is not None or not self._on_e2b(resolved):
            return self._limiter
        limit = self.plan.max_concurrent
        with self._lock:
            if self._plan_limiter is None and limit is not None:
                self._plan_limiter = ConcurrencyLimiter(
                    self.slots_folder, limit, worker=self.worker_id, on_wait=self._live_line
                )
            return self._plan_limiter

    def _check_lifetime(self, resolved: _Backend) -> None:
        """E2B ends every sandbox at the plan's maximum lifetime whatever it was promised: say
        so now rather than lose the sandbox in the middle of a test an hour in."""
        limit = self.plan.max_lifetime_s
        timeout_ms = resolved.options.timeout_ms
        if self._on_e2b(resolved) and limit is not None and timeout_ms > limit * 1000:
            raise ConfigError(
                f"timeout_ms={timeout_ms} is beyond the E2B {self.plan.name} plan's maximum "
                f"sandbox lifetime of {limit}s (E2B would end the sandbox then)",
                backend=resolved.name,
                hint=f"lower timeout_ms to at most {limit * 1000}, or set --sandbox-plan to "
                "your plan if it allows longer (pro: 24 h)",
            )

    def _pace_for(self, resolved: _Backend) -> CreatePacer | None:
        """The run's create pacer for E2B sandboxes (None: the plan has no rate limit)."""
        rate = self.plan.create_rate
        if not self._on_e2b(resolved) or rate is None:
            return None
        with self._lock:
            if self._pacer is None:
                self._pacer = CreatePacer(self.run_dir.path, rate, self.plan.create_burst)
            return self._pacer

    def _lease_s(self, resolved: _Backend) -> float | None:
        """The lease an E2B sandbox lives on while held; None when its own lifetime is shorter."""
        if getattr(resolved.cls, "backend", None) != "e2b":
            return None
        lease_s = self.settings.lease_s
        return lease_s if lease_s * 1000 < resolved.options.timeout_ms else None

    def _renew(self, sandbox: Sandbox, lease_s: float) -> None:
        with self._lock:
            if self._heartbeat is None:
                from pytest_kode.lifecycle.lease import Heartbeat

                self._heartbeat = Heartbeat(lease_s, self.notes.append)
            heartbeat = self._heartbeat
        heartbeat.add(cast("Leasable", sandbox))

    def guard_early(self) -> None:
        """Start the run's watchdog now, in a background thread, when this run talks to E2B.

        Starting it waits for a new interpreter to detach (~60 ms): overlapped with pytest's
        start and collection instead of delaying the first test. The thread imports nothing
        (everything it needs is loaded here first), so it cannot race the main thread's
        imports (two threads importing one package with import cycles, as the e2b SDK has, can
        deadlock); a create waits for it on the lock :meth:`_guard` holds throughout.
        """
        backend = self.settings.backend
        if backend == "auto":
            backend = "e2b" if os.environ.get("E2B_API_KEY") else "local"
        if backend not in ("e2b", "emulator"):
            return  # a local run's first sandbox starts it; a run may never make one
        import pytest_kode.backends.local
        import pytest_kode.lifecycle.watchdog  # noqa: F401

        pytest_kode.backends.local.default_root()
        probe: Callable[[], object] | None = None
        if backend == "emulator" and self._emulator_endpoint is None:
            # This process will run the emulator (an xdist worker uses the controller's), whose
            # sandboxes are local ones: the isolation probe (a bwrap run in its own network,
            # tens of ms of waiting) is done here rather than in the first create.
            from pytest_kode.backends.local import _bwrap, _network  # noqa: F401

            with contextlib.suppress(KodeError):  # a bad switch fails the first create
                if _bwrap.requested_isolation() != "none":
                    probe = _bwrap.diagnose

        def guard() -> None:
            self._guard()
            if probe is not None:
                with contextlib.suppress(Exception):  # the first create meets it and says so
                    probe()

        self._guard_thread = start_thread(guard, name="kode-guard")

    def _guard(self) -> None:
        """Register this process in the run registry and make sure the run's watchdog runs, so
        local sandboxes (and the run folder) do not outlive a killed run (once per process,
        before its first sandbox)."""
        from pytest_kode.backends.local import default_root
        from pytest_kode.lifecycle.watchdog import ensure_watchdog, register_process

        # Held throughout: spares are created from threads of their own, and none may create
        # before the watchdog runs.
        with self._lock:
            if self._guarded:
                return
            self._guarded = True
            try:
                register_process(self.run_dir.path, self.worker_id)
                ensure_watchdog(self.run_dir.path, [default_root()])
            except Exception as exc:  # the run goes on; only a killed run would leave leftovers
                self.notes.append(f"could not start the sandbox watchdog: {exc}")

    def _create_spare(self, resolved: _Backend) -> Sandbox:
        return self._create(resolved, "prewarm", spare=True)

    def _discard_spare(self, sandbox: Sandbox) -> None:
        with self._lock:
            held = self._held.pop(id(sandbox), _Held("dispose", sandbox.backend))
        if self._heartbeat is not None:
            self._heartbeat.discard(sandbox)
        self._dispose_later(sandbox, held)

    def _create(
        self,
        resolved: _Backend,
        owner: str,
        *,
        reuse: bool = False,
        spare: bool = False,
        scope: str = "function",
    ) -> Sandbox:
        """Create and track a sandbox; a ``spare`` never waits for a concurrency slot."""
        lease_s = self._lease_s(resolved)
        self._guard()
        self._check_lifetime(resolved)
        tagged = self._tagged(resolved, owner, lease_s, reuse=reuse)
        started = time.perf_counter()
        limiter = self._limiter_for(resolved)
        slot = self._acquire_slot(limiter, wait=not spare, scope=scope, owner=owner)
        if slot is None and spare and limiter is not None:
            raise SpareSkipped("no free sandbox slot for a spare")
        born = time.monotonic()
        try:
            sandbox = self._init_new(resolved, tagged, lease_s)
        except BaseException:
            self._release_slot(slot, limiter)
            raise
        with self._lock:
            self.stats.provision_s += time.perf_counter() - started
            self.stats.created += 1
        held = _Held("dispose", resolved.name, slot=slot, limiter=limiter if slot else None)
        self._track(resolved, sandbox, held, born, lease_s)
        return sandbox

    def _track(
        self,
        resolved: _Backend,
        sandbox: Sandbox,
        held: _Held,
        born: float,
        lease_s: float | None,
        *,
        recycled: bool = False,
    ) -> None:
        """Make a new sandbox (created, or recycled under a new id) known: in the journal
        first (the watchdog and the xdist controller), then its life, its fate, its lease."""
        record = self._record(resolved, sandbox)
        extra = {"recycled": True} if recycled else {}
        self.run_dir.record(self.worker_id, "created", record, **extra)
        with self._lock:
            self._born[id(sandbox)] = born
            self._held[id(sandbox)] = held
        if lease_s:
            self._renew(sandbox, lease_s)

    def _tagged(
        self, resolved: _Backend, owner: str, lease_s: float | None, *, reuse: bool = False
    ) -> SandboxOptions:
        """The options of a new sandbox, with the tags that say whose it is (gc, ls, the
        watchdog)."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        tags = {
            "kode_run": self.run_id,
            "kode_worker": self.worker_id,
            "kode_test": owner,
            "kode_created": now,
            "kode_heartbeat": now,
        }
        if lease_s:
            tags["kode_lease"] = f"{lease_s:g}"
        if reuse:
            tags["kode_reuse"] = "1"  # `pytest-kode gc` leaves these to `gc --cached`
        tagged: SandboxOptions = resolved.options.replace(
            metadata={**resolved.options.metadata, **tags}
        )
        return tagged

    def _init_new(
        self, resolved: _Backend, tagged: SandboxOptions, lease_s: float | None
    ) -> Sandbox:
        """Create and init one sandbox; a TemplateSpec template E2B does not have ready (404:
        its last build never finished, or it was deleted) is rebuilt once."""
        from pytest_kode.backends._e2b_errors import TemplateNotReadyError

        for attempt in (1, 2):
            options, kwargs = self._with_template(tagged, resolved)
            if lease_s:
                kwargs = {**kwargs, "lease_ms": int(lease_s * 1000)}
            pacer = self._pace_for(resolved)
            if pacer is not None:
                kwargs = {**kwargs, "pace": pacer.wait}
            sandbox = resolved.cls(options, **kwargs)
            try:
                return sandbox.init()
            except TemplateNotReadyError:
                sandbox.dispose()
                spec = tagged.template
                if attempt == 2 or isinstance(spec, str):
                    raise
                from pytest_kode.templates import forget_e2b_template

                self._template_log(f"template {options.template}: not ready on E2B, rebuilding")
                forget_e2b_template(
                    str(options.template),
                    domain=tagged.domain,
                    api_url=resolved.kwargs.get("api_url"),
                )
            except BaseException:
                sandbox.dispose()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _with_template(
        self, options: SandboxOptions, resolved: _Backend
    ) -> tuple[SandboxOptions, dict[str, Any]]:
        """Build a TemplateSpec template first (once per run, cached across runs; SPEC 5)."""
        if isinstance(options.template, str):
            return options, resolved.kwargs
        from pytest_kode.templates import prepare_template

        return prepare_template(
            options,
            resolved.cls.backend,
            resolved.kwargs,
            on_log=self._template_log,
            root=self.config.rootpath,  # local sources are relative to the rootdir
        )

    def _template_log(self, line: str) -> None:
        self._live_line(f"[sandbox template] {line}")

    def _live_line(self, line: str) -> None:
        """Show ``line`` on the terminal now, also from inside a test's set-up."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        # Builds run inside a test's set-up, where output is captured; show them live, as
        # pytest's live logging does.
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        suspended = getattr(capture, "global_and_fixture_disabled", None)
        with suspended() if suspended is not None else contextlib.nullcontext():
            reporter.write_line(line)

    @staticmethod
    def _record(resolved: _Backend, sandbox: Sandbox) -> SandboxRecord:
        options = sandbox.options.model_dump(mode="json", exclude={"api_key", "sandbox_id"})
        return SandboxRecord(resolved.name, sandbox.sandbox_id, options)

    # -- settling ---------------------------------------------------------------------------
    def release(self, sandbox: Sandbox, *, keep_for: str | None = None) -> None:
        """Settle a sandbox by its fate; ``keep_for`` keeps it an hour for that failed test."""
        with self._lock:
            if self._live.pop(id(sandbox), None) is None:
                return
            held = self._held.pop(id(sandbox), _Held("dispose", sandbox.backend))
            self.stats.exec_s += sandbox.exec_time_ms / 1000
        if self._heartbeat is not None:
            self._heartbeat.discard(sandbox)  # its fate sets its lifetime from here on
        if keep_for is not None and held.backend == "emulator":
            what = "--sandbox-keep-failed / keep_on_failure=True"
            self._note_once(EMULATOR_ENDS_NOTE.format(what=what))
            keep_for = None
        if keep_for is None and held.fate == "dispose":
            try:
                self.config.hook.pytest_kode_sandbox_disposing(sandbox=sandbox)
            finally:
                self._dispose_later(sandbox, held)
            return
        try:
            if keep_for is not None:
                self._keep(sandbox, keep_for)
            elif held.fate == "detach":
                sandbox.detach()
            else:
                self._keep_for_reuse(sandbox)
            fate = "kept" if keep_for is not None else held.fate
            record = SandboxRecord(held.backend, sandbox.sandbox_id, {})
            self.run_dir.record(self.worker_id, "released", record, fate=fate)
        finally:
            self._end_life(sandbox, held.backend)
            self._release_slot(held.slot, held.limiter or self._limiter)

    def _dispose_later(self, sandbox: Sandbox, held: _Held) -> None:
        """Hand ``sandbox`` to the background disposer; its slot is held until the kill is
        confirmed, and a kill that fails is reported in the summary. A sandbox of the spare
        pool's kind is first offered back to it, made as new (:meth:`_recycle`)."""
        spares, resolved = self._spares, held.spare_of
        key = self._prewarm_key(resolved) if resolved is not None else None
        spare = (
            spares.expect(key)
            if spares is not None and key is not None and sandbox.recyclable
            else None
        )

        def job() -> None:
            fresh: Sandbox | None = None
            error: BaseException | None = None
            try:
                if spare is not None:
                    assert resolved is not None
                    fresh = self._recycle(sandbox, resolved, held)
                if fresh is None:
                    sandbox.dispose()
            except Exception as exc:
                error = exc
            finally:
                if spare is not None:
                    assert spares is not None
                    spares.give_back(spare, key, resolved, fresh)
            error = error or getattr(sandbox, "kill_error", None)
            try:
                if error is None:
                    record = SandboxRecord(held.backend, sandbox.sandbox_id, {})
                    self.run_dir.record(self.worker_id, "released", record, fate="dispose")
            finally:
                with self._lock:
                    if error is None:
                        self.stats.disposed += 1
                    else:
                        # Left "created" in the journal: the xdist controller tries again.
                        self.stats.leaked += 1
                        self.notes.append(self._dispose_failure(sandbox, held.backend, error))
                self._end_life(sandbox, held.backend)
                if fresh is None:  # else the sandbox made as new holds it
                    self._release_slot(held.slot, held.limiter or self._limiter)

        self._disposer.submit(job)

    def _recycle(self, sandbox: Sandbox, resolved: _Backend, held: _Held) -> Sandbox | None:
        """``sandbox`` made as new under a new id, tracked as a new spare would be; None when
        its backend cannot (then it is disposed as usual)."""
        lease_s = self._lease_s(resolved)
        try:
            fresh = sandbox.recycle(self._tagged(resolved, "prewarm", lease_s))
        except Exception:
            return None  # whatever went wrong, disposing of it is the safe way out
        if fresh is None:
            return None
        with self._lock:
            self.stats.recycled += 1
        # The old sandbox's slot passes to the new one.
        kept = _Held("dispose", resolved.name, slot=held.slot, limiter=held.limiter)
        self._track(resolved, fresh, kept, time.monotonic(), lease_s, recycled=True)
        return fresh

    def _dispose_failure(self, sandbox: Sandbox, backend: str, error: BaseException) -> str:
        ends = (
            f"it ends by itself within its {self.settings.lease_s:g}s lease"
            if getattr(sandbox, "deadline", None) is not None
            else "it ends at its timeout_ms"
        )
        return (
            f"could not dispose sandbox {sandbox.sandbox_id} ({backend}): {error}; {ends}, "
            "or `pytest-kode gc` disposes it now"
        )

    def _end_life(self, sandbox: Sandbox, backend: str) -> None:
        with self._lock:
            born = self._born.pop(id(sandbox), None)
            if born is not None:
                self.stats.add_life(backend, time.monotonic() - born)

    def _acquire_slot(
        self,
        limiter: ConcurrencyLimiter | None,
        *,
        wait: bool = True,
        scope: str = "function",
        owner: str = "",
    ) -> Any:
        """A slot of ``limiter`` (None without a cap; None if ``wait`` is False and no slot is
        free)."""
        if limiter is None:
            return None
        if not wait:
            # A spare: never the last slot this process could get, which a test may need.
            with self._lock:
                if self._slots_held + 1 >= limiter.limit:
                    return None
                self._slots_held += 1  # reserved, so two spares cannot both pass the check
            slot = limiter.acquire(wait=False, scope=scope, owner=owner)
            if slot is None:
                with self._lock:
                    self._slots_held -= 1
            return slot
        # This process's sandboxes being disposed hold slots until their kill is confirmed:
        # wait for those first, rather than ask for more slots than the cap; a ready spare of
        # another kind gives its slot up.
        while True:
            self._disposer.wait(limiter.timeout_s, until=lambda: self._slots_held < limiter.limit)
            spares = self._spares
            if self._slots_held < limiter.limit or spares is None or not spares.evict_one():
                break
        slot = limiter.acquire(scope=scope, owner=owner)
        with self._lock:
            self._slots_held += 1
        return slot

    def _release_slot(self, slot: Any, limiter: ConcurrencyLimiter | None) -> None:
        if slot is None or limiter is None:
            return
        with self._lock:
            limiter.release(slot)
            self._slots_held -= 1

    def _dispose(self, sandbox: Sandbox) -> None:
        """Dispose now, in this thread (the controller's clean-up of what workers left)."""
        try:
            self.config.hook.pytest_kode_sandbox_disposing(sandbox=sandbox)
        finally:
            try:
                sandbox.dispose()
            except Exception:
                with self._lock:
                    self.stats.leaked += 1
                raise
            failed = getattr(sandbox, "kill_error", None)  # an E2B kill that never got through
            with self._lock:
                if failed is not None:
                    self.stats.leaked += 1
                    self.notes.append(
                        f"could not dispose sandbox {sandbox.sandbox_id}: {failed}; it ends "
                        "by itself within its lease"
                    )
                else:
                    self.stats.disposed += 1

    def _keep_for_reuse(self, sandbox: Sandbox) -> None:
        try:
            sandbox.set_timeout(sandbox.options.timeout_ms)  # retried by the backend
        except SandboxNotFoundError:
            sandbox.detach()
            return  # gone already: the next run notices and creates a new one
        except KodeError as exc:
            # Not renewed, so it ends within its lease: say so rather than count it as reused.
            self.notes.append(
                f"could not keep sandbox {sandbox.sandbox_id} for reuse: {exc}; the next run "
                "creates a new one"
            )
            sandbox.detach()
            return
        sandbox.detach()
        with self._lock:
            self.stats.reused += 1

    def _keep(self, sandbox: Sandbox, nodeid: str) -> None:
        from pytest_kode.reports import access_hint

        lifetime_ms = KEEP_LIFETIME_MS
        if self.plan.max_lifetime_s is not None and sandbox.backend == "e2b":
            lifetime_ms = min(lifetime_ms, self.plan.max_lifetime_s * 1000)
        try:
            sandbox.set_timeout(lifetime_ms)  # retried by the backend
        except KodeError as exc:
            # Never advertise a sandbox that will not be there: without the long lifetime it
            # ends within its lease.
            self.notes.append(f"could not keep the sandbox of failed test {nodeid}: {exc}")
            sandbox.detach()
            return
        self.kept.append(
            KeptSandbox(sandbox.sandbox_id, sandbox.backend, nodeid, access_hint(sandbox))
        )
        from pytest_kode.lifecycle.keeplist import remember_kept
        from pytest_kode.lifecycle.rundir import runs_root

        try:  # so `pytest-kode gc` spares it until then, and `ls` marks it
            until = time.time() + lifetime_ms / 1000
            remember_kept(runs_root(), sandbox.backend, sandbox.sandbox_id, until, nodeid)
        except OSError as exc:
            self.notes.append(f"could not record kept sandbox {sandbox.sandbox_id}: {exc}")
        sandbox.detach()
        with self._lock:
            self.stats.kept += 1

    def _note_once(self, note: str) -> None:
        with self._lock:
            if note not in self.notes:
                self.notes.append(note)

    def sweep(self) -> list[BaseException]:
        """Settle every sandbox still tracked (end of session, interrupt) and wait for the
        background disposals, with a bound; collect failures."""
        spares, self._spares = self._spares, None
        if spares is not None:
            spares.close()  # leftover spares go to the disposer
            with self._lock:  # added: the xdist controller sums its workers' here too
                self.stats.prewarm_taken += spares.taken
                self.stats.prewarm_recycled += spares.taken_recycled
                self.stats.prewarm_hidden_s += spares.hidden_s
                self.stats.prewarm_unused += spares.unused
                self.stats.prewarm_lost += spares.failed + spares.stale
        with self._lock:
            live = list(self._live.values())
        errors: list[BaseException] = []
        for sandbox in live:
            try:
                self.release(sandbox)
            except Exception as exc:  # one failure must not stop the others' disposal
                errors.append(exc)
        if not self._disposer.wait(self.dispose_wait_s):
            self.notes.append(
                f"{self._disposer.pending} sandbox disposal(s) still running after "
                f"{self.dispose_wait_s:g}s; E2B sandboxes end by themselves within their "
                "lease, local ones are removed by the run's watchdog; `pytest-kode ls` shows them"
            )
        with self._lock:
            if self.stats.function_acquired and not self.stats.run_s:
                self.stats.run_s = time.monotonic() - self.started
        return errors

    def dispose_record(self, record: SandboxRecord) -> bool:
        """Connect to a recorded sandbox and dispose it (the controller's clean-up of workers').

        Returns False when it was already gone.
        """
        from pytest_kode.options import SandboxOptions

        options = SandboxOptions(**{**record.options, "sandbox_id": None})
        resolved = self._resolve(record.backend, options)
        sandbox = self.connect(resolved, record.sandbox_id, take_slot=False, resumes=False)
        if sandbox is None:
            if record.backend == "local":
                # A worker killed mid-disposal (its disposer is a background thread) may leave
                # a half-removed local sandbox that cannot be connected to: clear what is left.
                from pytest_kode.backends.local import default_root, remove_local_sandbox

                remove_local_sandbox(record.sandbox_id, default_root())
            return False
        self._held.pop(id(sandbox), None)
        if self._heartbeat is not None:
            self._heartbeat.discard(sandbox)
        try:
            self._dispose(sandbox)
        finally:
            self._end_life(sandbox, record.backend)
        return True

    def close(self) -> None:
        if self._guard_thread is not None:
            self._guard_thread.join()  # before the run folder it writes to is removed
        with self._lock:  # waits for a test thread starting the emulator
            self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self._emulator is not None:
            self._emulator.stop()
            self._emulator = None

    @property
    def slots_folder(self) -> Path:
        """Where ``--sandbox-max-concurrent`` keeps its slots (shared by the run's processes)."""
        return self.run_dir.path / "slots"

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def waited_s(self) -> float:
        """Seconds spent waiting for a concurrency slot."""
        limiters = (self._limiter, self._plan_limiter)
        return sum(limiter.waited_s for limiter in limiters if limiter is not None)

    @property
    def paced_s(self) -> float:
        """Seconds spent waiting for a create slot of the plan's rate."""
        return self._pacer.waited_s if self._pacer is not None else 0.0

    # -- prewarming -------------------------------------------------------------------------
    @staticmethod
    def _prewarm_key(resolved: _Backend) -> tuple[str, str]:
        return (resolved.name, resolved.options.fingerprint())


class SandboxPool:
    """The sandboxes shared by the tests of one scope instance (a class, a module, a worker).

    Tests share a sandbox only when backend and resolved options are equal. Closing the pool
    settles them (dispose, or keep the ones a failed test used when keeping was asked for).
    """

    def __init__(self, provisioner: Provisioner, owner: str) -> None:
        self._provisioner = provisioner
        self._owner = owner
        self._entries: dict[tuple[str, str, str | None, str], Sandbox] = {}
        self._keep: dict[int, str] = {}

    def get(
        self,
        options: SandboxOptions,
        backend: str,
        item: pytest.Item | None,
        scope: str,
        reuse: bool,
        variant: str = "",
    ) -> Sandbox:
        key = (backend, options.fingerprint(), options.sandbox_id, variant)
        sandbox = self._entries.get(key)
        if sandbox is None or sandbox.disposed:
            sandbox = self._provisioner.acquire(
                options,
                backend,
                item=item,
                owner=self._owner,
                scope=scope,
                reuse=reuse,
                variant=variant,
            )
            self._entries[key] = sandbox
        return sandbox

    def keep_after_failure(self, sandbox: Sandbox, nodeid: str) -> None:
        self._keep.setdefault(id(sandbox), nodeid)

    def close(self) -> None:
        errors: list[Exception] = []
        for sandbox in self._entries.values():
            try:
                self._provisioner.release(sandbox, keep_for=self._keep.get(id(sandbox)))
            except Exception as exc:
                errors.append(exc)
        self._entries.clear()
        if errors:
            raise errors[0]
