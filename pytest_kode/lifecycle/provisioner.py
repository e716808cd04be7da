"""One place decides when a sandbox is created, shared and disposed.

The fixtures ask the :class:`Provisioner` for sandboxes; shared scopes go through a
:class:`SandboxPool` whose lifetime pytest's own fixture scoping drives (a module pool is closed
when pytest leaves the module). Every sandbox the run creates is tracked here, so that a sweep at
session end disposes whatever a finalizer missed.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kode.errors import BackendUnavailableError, KodeError

if TYPE_CHECKING:
    from pytest_kode.backends.registry import BackendRegistry
    from pytest_kode.options import SandboxOptions
    from pytest_kode.sandbox import Sandbox

__all__ = ["KeptSandbox", "Provisioner", "RunSettings", "SandboxPool", "SandboxStats"]

KEEP_LIFETIME_MS = 3_600_000


@dataclass(frozen=True)
class RunSettings:
    """The run-wide choices from the command line, ini file and environment (validated)."""

    backend: str = "auto"
    backend_explicit: bool = False
    template: str | None = None
    keep_failed: bool = False
    artifacts_dir: Path = Path("sandbox-artifacts")
    prewarm: int = 0


@dataclass
class SandboxStats:
    """What the run did with sandboxes; summed across xdist workers by the controller."""

    created: int = 0
    resumed: int = 0
    reused: int = 0
    disposed: int = 0
    kept: int = 0
    leaked: int = 0
    provision_s: float = 0.0
    exec_s: float = 0.0

    def add(self, other: dict[str, Any]) -> None:
        for name, value in other.items():
            if hasattr(self, name):
                setattr(self, name, getattr(self, name) + value)

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
    name: str
    cls: type[Sandbox]
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: SandboxOptions | None = None


class Provisioner:
    """Creates, tags, tracks and disposes the sandboxes of one pytest process."""

    def __init__(
        self,
        config: pytest.Config,
        settings: RunSettings,
        registry: BackendRegistry,
        run_id: str,
        worker_id: str,
    ) -> None:
        self.config = config
        self.settings = settings
        self.registry = registry
        self.run_id = run_id
        self.worker_id = worker_id
        self.stats = SandboxStats()
        self.kept: list[KeptSandbox] = []
        self._live: dict[int, Sandbox] = {}
        self._lock = threading.Lock()
        self._emulator: Any = None
        self._prewarmed: dict[tuple[str, str], list[Sandbox]] = {}
        self._prewarm_threads: list[threading.Thread] = []

    # -- choosing a backend -----------------------------------------------------------------
    def backend_name(self, requested: str | None, options: SandboxOptions) -> str:
        """Resolve ``auto`` and check the backend can run; skips or raises with the reason."""
        name = requested or self.settings.backend
        if name == "auto":
            name = "e2b" if options.api_key is not None else "local"
        if name == "e2b" and options.api_key is None:
            reason = "backend 'e2b' needs an API key: set E2B_API_KEY (or use --sandbox-backend=local)"
            if self.settings.backend_explicit and self.settings.backend == "e2b":
                raise BackendUnavailableError(reason, backend="e2b")
            pytest.skip(reason)
        if name != "emulator":
            self.registry.load(name)  # unknown names fail here, with the list of known ones
        return name

    def _resolve(self, name: str, options: SandboxOptions) -> _Backend:
        if name == "emulator":
            emulator = self._start_emulator()
            return _Backend(
                name="e2b",
                cls=self.registry.load("e2b"),
                kwargs={"api_url": emulator.url, "sandbox_url": emulator.url},
                options=options.replace(api_key=emulator.api_key),
            )
        return _Backend(name=name, cls=self.registry.load(name), options=options)

    def _start_emulator(self) -> Any:
        with self._lock:
            if self._emulator is None:
                from pytest_kode.emulator import E2BEmulator

                self._emulator = E2BEmulator()
                self._emulator.start()
            return self._emulator

    # -- creating and disposing -------------------------------------------------------------
    def acquire(
        self,
        options: SandboxOptions,
        backend: str,
        *,
        item: pytest.Item | None,
        owner: str,
        prewarm: bool = False,
    ) -> Sandbox:
        """A ready sandbox for ``options`` on ``backend``, tagged with the run, worker and owner.

        ``owner`` is the node id the sandbox belongs to (the test, or the class/module sharing it).
        ``prewarm`` lets a function-scoped request take a sandbox made ahead of need.
        """
        resolved = self._resolve(backend, options)
        key = (backend, options.fingerprint())
        sandbox = self._take_prewarmed(key) if prewarm else None
        if sandbox is None:
            sandbox = self._create(resolved, owner)
        if prewarm and self.settings.prewarm and not options.sandbox_id:
            self._refill(key, resolved)
        try:
            self.config.hook.pytest_kode_sandbox_created(sandbox=sandbox, item=item)
        except BaseException:
            self.release(sandbox)
            raise
        return sandbox

    def _create(self, resolved: _Backend, owner: str) -> Sandbox:
        assert resolved.options is not None
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        tags = {
            "kode_run": self.run_id,
            "kode_worker": self.worker_id,
            "kode_test": owner,
            "kode_created": now,
            "kode_heartbeat": now,
        }
        options = resolved.options.replace(metadata={**resolved.options.metadata, **tags})
        started = time.perf_counter()
        sandbox = resolved.cls(options, **resolved.kwargs)
        try:
            sandbox.init()
        except BaseException:
            sandbox.dispose()
            raise
        with self._lock:
            self.stats.provision_s += time.perf_counter() - started
            if sandbox.resumed:
                self.stats.resumed += 1
            else:
                self.stats.created += 1
            self._live[id(sandbox)] = sandbox
        return sandbox

    def release(self, sandbox: Sandbox, *, keep_for: str | None = None) -> None:
        """Dispose ``sandbox`` (hook first), or keep it alive for an hour for ``keep_for``."""
        with self._lock:
            if self._live.pop(id(sandbox), None) is None:
                return
            self.stats.exec_s += sandbox.exec_time_ms / 1000
        if keep_for is not None:
            self._keep(sandbox, keep_for)
            return
        try:
            self.config.hook.pytest_kode_sandbox_disposing(sandbox=sandbox)
        finally:
            try:
                sandbox.dispose()
            except Exception:
                with self._lock:
                    self.stats.leaked += 1
                raise
            with self._lock:
                self.stats.disposed += 1

    def _keep(self, sandbox: Sandbox, nodeid: str) -> None:
        from pytest_kode.reports import access_hint

        try:
            sandbox.set_timeout(KEEP_LIFETIME_MS)
        except KodeError:
            pass  # kept as is; its own lifetime still applies
        self.kept.append(
            KeptSandbox(sandbox.sandbox_id, sandbox.backend, nodeid, access_hint(sandbox))
        )
        with self._lock:
            self.stats.kept += 1

    def sweep(self) -> list[BaseException]:
        """Dispose every sandbox still tracked (end of session, interrupt); collect failures."""
        for thread in self._prewarm_threads:
            thread.join()
        errors: list[BaseException] = []
        with self._lock:
            self._prewarmed.clear()  # spares are tracked in _live as well
            live = list(self._live.values())
        for sandbox in live:
            try:
                self.release(sandbox)
            except Exception as exc:  # one failure must not stop the others' disposal
                errors.append(exc)
        return errors

    def close(self) -> None:
        if self._emulator is not None:
            self._emulator.stop()
            self._emulator = None

    @property
    def live_count(self) -> int:
        return len(self._live)

    # -- prewarming -------------------------------------------------------------------------
    def _take_prewarmed(self, key: tuple[str, str]) -> Sandbox | None:
        with self._lock:
            spares = self._prewarmed.get(key)
            return spares.pop(0) if spares else None

    def _refill(self, key: tuple[str, str], resolved: _Backend) -> None:
        self._prewarm_threads = [t for t in self._prewarm_threads if t.is_alive()]
        if self._prewarm_threads:
            return  # one refill at a time; it tops the pool up to the target

        def refill() -> None:
            while True:
                with self._lock:
                    if len(self._prewarmed.get(key, ())) >= self.settings.prewarm:
                        return
                try:
                    spare = self._create(resolved, owner="prewarm")
                except Exception:
                    return  # the next real request creates synchronously and reports the error
                with self._lock:
                    self._prewarmed.setdefault(key, []).append(spare)

        thread = threading.Thread(target=refill, name="kode-prewarm", daemon=True)
        self._prewarm_threads.append(thread)
        thread.start()


class SandboxPool:
    """The sandboxes shared by the tests of one scope instance (a class, a module, a worker).

    Tests share a sandbox only when backend and resolved options are equal. Closing the pool
    disposes them, or keeps the ones a failed test used when keeping was asked for.
    """

    def __init__(self, provisioner: Provisioner, owner: str) -> None:
        self._provisioner = provisioner
        self._owner = owner
        self._entries: dict[tuple[str, str, str | None], Sandbox] = {}
        self._keep: dict[int, str] = {}

    def get(self, options: SandboxOptions, backend: str, item: pytest.Item) -> Sandbox:
        key = (backend, options.fingerprint(), options.sandbox_id)
        sandbox = self._entries.get(key)
        if sandbox is None or sandbox.disposed:
            sandbox = self._provisioner.acquire(options, backend, item=item, owner=self._owner)
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

