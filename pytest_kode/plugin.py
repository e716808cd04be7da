"""The pytest entry point: options, the marker, configuration, reporting.

Loading this module must stay cheap (it runs for every pytest invocation where the plugin is
installed): it imports neither pydantic, nor the ``e2b`` SDK, nor the emulator's server. Those
load on first use of a sandbox.
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kode import hookspecs
from pytest_kode.errors import ConfigError
from pytest_kode.fixtures import (
    _kode_pool_class,
    _kode_pool_module,
    _kode_pool_session,
    _kode_pool_worker,
    async_sandbox,
    async_sandbox_factory,
    async_session_sandbox,
    async_worker_sandbox,
    check_anyio_backend,
    check_async_runner,
    finish_shared,
    sandbox,
    sandbox_factory,
    sandbox_maker,
    sandbox_options,
    session_sandbox,
    track_shared,
    worker_sandbox,
)
from pytest_kode.lifecycle.provisioner import (
    EmulatorEndpoint,
    KeptSandbox,
    RunSettings,
    SandboxStats,
)
from pytest_kode.lifecycle.run import ITEM_FAILED, ITEM_SANDBOXES, RUN_KEY, KodeRun, artifacts_dir

if TYPE_CHECKING:
    from pytest_kode.backends.registry import BackendRegistry
    from pytest_kode.lifecycle.rundir import RunDir

__all__ = [
    "_kode_pool_class",
    "_kode_pool_module",
    "_kode_pool_session",
    "_kode_pool_worker",
    "async_sandbox",
    "async_sandbox_factory",
    "async_session_sandbox",
    "async_worker_sandbox",
    "sandbox",
    "sandbox_factory",
    "sandbox_maker",
    "sandbox_options",
    "session_sandbox",
    "worker_sandbox",
]

BACKEND_ENV = "KODE_SANDBOX_BACKEND"
PLAN_ENV = "KODE_SANDBOX_PLAN"
# Kept in step with pytest_kode.backends.local._bwrap.ISOLATION_ENV (not imported: this module
# must stay cheap to load).
ISOLATION_ENV = "KODE_SANDBOX_ISOLATION"
_ISOLATIONS = ("auto", "bwrap", "none")
_ISOLATION_KEY = pytest.StashKey[tuple[str | None, str | None]]()
LOCAL_PREWARM_DEFAULT = 2
"""Function-scope local sandboxes started ahead of need unless --sandbox-prewarm says otherwise."""

_MARKER_HELP = (
    "sandbox(*, backend=None, template='base', scope='function', reuse=False, "
    "keep_on_failure=False, artifacts=(), timeout_ms=300000, work_dir='/home/user', envs={}, "
    "metadata={}, allow_internet_access=True, exec_timeout_ms=120000, sandbox_id=None, "
    "domain=None, max_output_bytes=8388608): configure the test's `sandbox` fixture. scope is "
    "function, class, module, worker or session; the closest marker wins key by key."
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "pytest-kode sandboxes")
    group.addoption(
        "--sandbox-backend",
        dest="sandbox_backend",
        default=None,
        help="auto (e2b when E2B_API_KEY is set, else local), local, e2b, emulator, or a "
        f"plugin's backend [ini: sandbox_backend, env: {BACKEND_ENV}, default: auto]",
    )
    group.addoption(
        "--sandbox-template",
        dest="sandbox_template",
        default=None,
        help="default template of every sandbox [ini: sandbox_template, default: base]",
    )
    group.addoption(
        "--sandbox-keep-failed",
        dest="sandbox_keep_failed",
        action="store_true",
        default=None,
        help="keep the sandbox of a failed test alive for an hour and print how to reach it "
        "[ini: sandbox_keep_failed]",
    )
    group.addoption(
        "--sandbox-artifacts",
        dest="sandbox_artifacts",
        default=None,
        metavar="DIR",
        help="folder for files collected from failed tests' sandboxes (marker artifacts=[...]) "
        "[ini: sandbox_artifacts, default: sandbox-artifacts]",
    )
    group.addoption(
        "--sandbox-reuse",
        dest="sandbox_reuse",
        action="store_true",
        default=None,
        help="keep worker and session sandboxes alive after the run and resume them next run "
        "(ids cached in the pytest cache; `pytest-kode gc --cached` disposes them) "
        "[ini: sandbox_reuse]",
    )
    group.addoption(
        "--sandbox-max-concurrent",
        dest="sandbox_max_concurrent",
        default=None,
        metavar="N",
        help="never more than N live sandboxes across all xdist workers of the run "
        "[ini: sandbox_max_concurrent, default for E2B sandboxes: the plan's limit]",
    )
    group.addoption(
        "--sandbox-plan",
        dest="sandbox_plan",
        default=None,
        metavar="PLAN",
        help="your E2B plan (hobby or pro): E2B sandboxes are created at its rate and capped at "
        "its concurrency limit across all workers; the plugin's emulator enforces it "
        f"[ini: sandbox_plan, env: {PLAN_ENV}, default: hobby]",
    )
    group.addoption(
        "--sandbox-prewarm",
        dest="sandbox_prewarm",
        default=None,
        metavar="N",
        help="keep N function-scope sandboxes ready ahead of need [ini: sandbox_prewarm, "
        f"default: {LOCAL_PREWARM_DEFAULT} for the local backend, else 0]",
    )
    group.addoption(
        "--sandbox-recycle",
        dest="sandbox_recycle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make a done function-scope local sandbox as new (every process killed, its files "
        "emptied, a new id) and hand it to the next test instead of disposing it and creating "
        "another; --no-sandbox-recycle gives every test a new namespace set [ini: "
        "sandbox_recycle, default: on]",
    )
    group.addoption(
        "--sandbox-lease",
        dest="sandbox_lease",
        default=None,
        metavar="SECONDS",
        help="E2B sandboxes live on a lease of this many seconds that a heartbeat renews while "
        "the run lives, so a killed run's sandboxes end by themselves [ini: sandbox_lease, "
        "env: KODE_SANDBOX_LEASE, default: 60]",
    )
    group.addoption(
        "--sandbox-isolation",
        dest="sandbox_isolation",
        default=None,
        metavar="MODE",
        help="how local sandboxes are isolated: auto (bubblewrap when it works here), bwrap "
        "(required), none (plain processes sharing the host, even where bubblewrap works) "
        f"[ini: sandbox_isolation, env: {ISOLATION_ENV}, default: auto]",
    )
    parser.addini("sandbox_backend", "default sandbox backend (see --sandbox-backend)", default="")
    parser.addini(
        "sandbox_isolation", "local sandbox isolation (see --sandbox-isolation)", default=""
    )
    parser.addini("sandbox_template", "default sandbox template", default="")
    parser.addini("sandbox_keep_failed", "keep failed tests' sandboxes", type="bool", default=False)
    parser.addini("sandbox_artifacts", "folder for failed tests' sandbox files", default="")
    parser.addini("sandbox_prewarm", "function-scope sandboxes kept ready", default="")
    parser.addini(
        "sandbox_recycle",
        "make done local sandboxes as new for the next test",
        type="bool",
        default=True,
    )
    parser.addini(
        "sandbox_reuse", "reuse worker/session sandboxes across runs", type="bool", default=False
    )
    parser.addini("sandbox_max_concurrent", "cap on live sandboxes across workers", default="")
    parser.addini("sandbox_plan", "E2B plan: hobby or pro (see --sandbox-plan)", default="")
    parser.addini("sandbox_lease", "E2B sandbox lease in seconds (see --sandbox-lease)", default="")


def _setting(config: pytest.Config, name: str, env: str | None = None) -> tuple[Any, bool]:
    """The value of ``name`` by precedence command line > ini > environment, and whether set."""
    value = config.getoption(name)
    if value is not None:
        return value, True
    ini = config.getini(name)
    if ini not in ("", None, False):
        return ini, True
    if env and os.environ.get(env):
        return os.environ[env], True
    return None, False


def _read_settings(config: pytest.Config, registry: BackendRegistry) -> RunSettings:
    backend, explicit = _setting(config, "sandbox_backend", BACKEND_ENV)
    backend = str(backend).strip() if backend is not None else "auto"
    if backend not in registry.names():
        raise pytest.UsageError(
            f"--sandbox-backend: unknown backend {backend!r}; choose one of: "
            f"{', '.join(registry.names())} (plugins add more via pytest_kode_register_backends)"
        )
    prewarm = _whole_number(config, "sandbox_prewarm", minimum=0)
    max_concurrent = _whole_number(config, "sandbox_max_concurrent", minimum=1)
    if prewarm is None:
        # A local sandbox is a process that takes ~20 ms to start: by default keep a couple
        # started ahead (idle, they cost a small process each); elsewhere create on demand.
        # Not under a concurrency cap, where idle spares would hold the slots tests wait for.
        local = backend == "local" or (backend == "auto" and not os.environ.get("E2B_API_KEY"))
        prewarm = LOCAL_PREWARM_DEFAULT if local and max_concurrent is None else 0
    recycle = config.getoption("sandbox_recycle")
    if recycle is None:
        recycle = config.getini("sandbox_recycle")
    template, _ = _setting(config, "sandbox_template")
    keep_failed, _ = _setting(config, "sandbox_keep_failed")
    reuse, _ = _setting(config, "sandbox_reuse")
    if reuse and getattr(config, "cache", None) is None:
        raise pytest.UsageError(
            "--sandbox-reuse keeps sandbox ids in the pytest cache, which is disabled "
            "(-p no:cacheprovider); enable it or drop --sandbox-reuse"
        )
    artifacts, _ = _setting(config, "sandbox_artifacts")
    from pytest_kode.plans import plan_named

    plan, _ = _setting(config, "sandbox_plan", PLAN_ENV)
    try:
        plan_name = plan_named(str(plan) if plan is not None else "hobby").name
    except ValueError as exc:
        raise pytest.UsageError(f"--sandbox-plan: {exc}") from None
    from pytest_kode.lifecycle.lease import DEFAULT_LEASE_S, LEASE_ENV, parse_lease

    lease, _ = _setting(config, "sandbox_lease", LEASE_ENV)
    try:
        lease_s = DEFAULT_LEASE_S if lease is None else parse_lease(lease, "--sandbox-lease")
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    return RunSettings(
        backend=backend,
        backend_explicit=explicit,
        template=str(template) if template else None,
        keep_failed=bool(keep_failed),
        artifacts_dir=artifacts_dir(artifacts, config.rootpath),
        prewarm=prewarm,
        reuse=bool(reuse),
        max_concurrent=max_concurrent,
        plan=plan_name,
        lease_s=lease_s,
        recycle=bool(recycle),
    )


def _whole_number(config: pytest.Config, name: str, minimum: int) -> int | None:
    raw, _ = _setting(config, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        flag = "--" + name.replace("_", "-")
        raise pytest.UsageError(f"{flag}: expected a whole number >= {minimum}, got {raw!r}")
    return value


def _apply_isolation(config: pytest.Config) -> None:
    """Validate the isolation switch and hand it to every layer through the environment.

    The backend, the template layer, xdist workers and the emulator's sandboxes all read
    ``$KODE_SANDBOX_ISOLATION``; the previous value comes back at unconfigure.
    """
    previous = os.environ.get(ISOLATION_ENV)
    value = config.getoption("sandbox_isolation")
    source = f"--sandbox-isolation={value}"
    if value is None and config.getini("sandbox_isolation"):
        value = config.getini("sandbox_isolation")
        source = f"ini sandbox_isolation={value}"
    if value is None and previous:
        value, source = previous, f"{ISOLATION_ENV}={previous}"
    if value is None:
        config.stash[_ISOLATION_KEY] = (previous, None)
        return
    value = str(value).strip().lower()
    if value not in _ISOLATIONS:
        raise pytest.UsageError(
            f"{source}: unknown isolation; choose one of: {', '.join(_ISOLATIONS)}"
        )
    os.environ[ISOLATION_ENV] = value
    config.stash[_ISOLATION_KEY] = (previous, None if value == "auto" else source)


def pytest_configure(config: pytest.Config) -> None:
    from pytest_kode.backends.registry import BackendRegistry
    from pytest_kode.lifecycle.idcache import CACHE_SUBDIR, IdCache

    config.addinivalue_line("markers", _MARKER_HELP)
    _apply_isolation(config)
    registry = BackendRegistry()
    config.hook.pytest_kode_register_backends(registry=registry)
    settings = _read_settings(config, registry)
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    run_id, worker_id, run_dir, emulator = _identity(workerinput)
    controller = workerinput is None and config.getoption("dist", "no") != "no"
    run = KodeRun(
        config,
        settings,
        registry,
        run_id,
        worker_id,
        controller=controller,
        run_dir=run_dir,
        distributed=workerinput is not None,
        emulator=emulator,
    )
    cache = getattr(config, "cache", None)
    if cache is not None:
        run.provisioner.id_cache = IdCache(cache.mkdir(CACHE_SUBDIR), run.notes.append)
    config.stash[RUN_KEY] = run
    _install_stop_guard(config, run)
    if not any(
        getattr(config.option, name, False)
        for name in ("collectonly", "help", "markers", "showfixtures", "show_fixtures_per_test")
    ) and not (controller and settings.backend != "emulator"):
        run.provisioner.guard_early()
    if controller:
        config.pluginmanager.register(_XdistController(config), "kode-xdist")


def _identity(
    workerinput: dict[str, Any] | None,
) -> tuple[str, str, RunDir, EmulatorEndpoint | None]:
    """Run id, worker id, run folder and emulator: the controller's under xdist, else new."""
    from pytest_kode.lifecycle.rundir import RunDir

    if workerinput is None:
        run_id = uuid.uuid4().hex[:12]
        return run_id, "main", RunDir.for_run(run_id), None
    run_id = str(workerinput.get("kode_run") or workerinput["testrunuid"][:12])
    run_dir = RunDir(Path(workerinput.get("kode_run_dir") or RunDir.for_run(run_id).path))
    endpoint = workerinput.get("kode_emulator")
    emulator = EmulatorEndpoint(**endpoint) if endpoint else None
    return run_id, str(workerinput["workerid"]), run_dir, emulator


def _install_stop_guard(config: pytest.Config, run: KodeRun) -> None:
    """SIGTERM becomes an orderly stop; a controller passes it on to its workers."""
    from pytest_kode.lifecycle.signals import TerminateGuard

    run_dir = run.provisioner.run_dir
    guard = TerminateGuard(_worker_pids(run_dir) if run.controller else None)
    guard.install()
    if run.provisioner.distributed:
        from pytest_kode.lifecycle.watchdog import register_process

        register_process(run_dir.path, run.worker_id)  # so the controller can pass a stop on
        guard.watch_parent()
    config.pluginmanager.register(guard, "kode-sigterm")


def _worker_pids(run_dir: RunDir) -> Callable[[], list[int]]:
    def pids() -> list[int]:
        from pytest_kode.lifecycle.watchdog import process_alive, registered_processes

        return [
            pid for pid, start in registered_processes(run_dir.path) if process_alive(pid, start)
        ]

    return pids


class _XdistController:
    """Controller side under xdist: hands the run to workers, gathers their summaries, and
    settles what they share (session sandboxes) or left behind (a crashed worker's)."""

    def __init__(self, config: pytest.Config) -> None:
        self._run = config.stash[RUN_KEY]
        self._config = config
        self._slot_watch: Any = None
        self.reported: set[str] = set()  # workers whose summary arrived

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        provisioner = self._run.provisioner
        node.workerinput["kode_run"] = self._run.run_id
        node.workerinput["kode_run_dir"] = str(provisioner.run_dir.ensure().path)
        from pytest_kode.lifecycle.watchdog import register_process

        # The run lives as long as the controller does, whatever becomes of the workers.
        register_process(provisioner.run_dir.path, "controller")
        if self._run.settings.backend == "emulator":
            # One emulator for the whole run, so workers can share session sandboxes and the
            # controller can still reach a crashed worker's sandboxes.
            endpoint = provisioner.emulator_endpoint()
            node.workerinput["kode_emulator"] = {"url": endpoint.url, "api_key": endpoint.api_key}
        limit = self._run.settings.max_concurrent
        if limit and self._slot_watch is None:
            from pytest_kode.lifecycle.limiter import watch_waits

            # Workers have no terminal: the controller tells about their long waits for a slot.
            self._slot_watch = watch_waits(provisioner.slots_folder, limit, self._write_line)

    def _write_line(self, line: str) -> None:
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)

    def pytest_sessionfinish(self) -> None:
        if self._slot_watch is not None:
            self._slot_watch.set()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", {}).get("kode")
        if not output:
            return
        self.reported.add(str(node.workerinput["workerid"]))
        self._run.provisioner.stats.add(output["stats"])
        self._run.provisioner.kept.extend(KeptSandbox(**kept) for kept in output["kept"])
        self._run.notes.extend(output["notes"])


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = config.stash[RUN_KEY]
    backend = run.settings.backend
    if backend == "auto":
        backend = f"auto ({'e2b' if os.environ.get('E2B_API_KEY') else 'local'})"
    from pytest_kode.backends.local._bwrap import isolation_report

    isolation, details = isolation_report(config.stash[_ISOLATION_KEY][1])
    first = f"kode: backend={backend}, isolation={isolation}, run={run.run_id}"
    return [first, *(f"kode: {line}" for line in details)]


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Collector, name: str, obj: object
) -> Generator[None, Any, Any]:
    """Reject a bad ``sandbox`` marker at collection, naming the test and the key."""
    result = yield
    items = result if isinstance(result, list) else [result]
    run = collector.config.stash[RUN_KEY]
    for item in items:
        if isinstance(item, pytest.Item) and item.get_closest_marker("sandbox") is not None:
            try:
                run.marker(item)
            except ConfigError as exc:
                raise collector.CollectError(str(exc)) from None
    return result


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[RUN_KEY].plan(session.items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    check_async_runner(item)
    yield
    check_anyio_backend(item)
    track_shared(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    finish_shared(item)  # before pytest tears the fixtures down


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        from pytest_kode.reports import transcript_section

        item.stash[ITEM_FAILED] = True
        for used, since in item.stash.get(ITEM_SANDBOXES, []):
            report.sections.append(transcript_section(used, since))
    return report


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Dispose whatever fixture finalizers did not (interrupts, -x); report to the controller."""
    run = session.config.stash[RUN_KEY]
    for error in run.provisioner.sweep():
        run.notes.append(f"could not dispose a sandbox: {error}")
    if run.controller:
        controller = session.config.pluginmanager.get_plugin("kode-xdist")
        _settle_workers(run, controller.reported if controller is not None else set())
    run.provisioner.stats.waited_s += run.provisioner.waited_s
    run.provisioner.stats.paced_s += run.provisioner.paced_s
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["kode"] = {
            "stats": run.provisioner.stats.as_dict(),
            "kept": [kept.__dict__ for kept in run.provisioner.kept],
            "notes": run.notes,
        }


def _settle_workers(run: KodeRun, reported: set[str]) -> None:
    """After every worker is done: dispose the run's session sandboxes (unless reused) and
    whatever a crashed worker created and never released, and count from their journals the
    sandboxes of workers whose summary never arrived (Ctrl-C, a crash)."""
    provisioner = run.provisioner
    provisioner.stats.add(provisioner.run_dir.journal_counts(skip={*reported, "main"}))
    # Reused session sandboxes stay for the next run (not on the plugin's emulator, which ends).
    kept = run.settings.reuse and run.settings.backend != "emulator"
    records = [] if kept else list(provisioner.run_dir.sessions().values())
    records += provisioner.run_dir.unreleased()
    done: set[str] = set()
    for record in records:
        if record.sandbox_id in done:
            continue
        done.add(record.sandbox_id)
        try:
            provisioner.dispose_record(record)
        except Exception as exc:
            provisioner.stats.leaked += 1
            run.notes.append(f"could not dispose sandbox {record.sandbox_id}: {exc}")
    if provisioner.run_dir.silent_workers(skip={*reported, "main"}):
        # A worker that died may have been half-way through making a local sandbox (created,
        # or recycled under a new id) that its journal does not name yet: its metadata file
        # does, tagged with the run.
        from pytest_kode.backends.local import default_root
        from pytest_kode.lifecycle.watchdog import reap_unjournaled

        reap_unjournaled(provisioner.run_dir.path, [default_root()])


def pytest_unconfigure(config: pytest.Config) -> None:
    isolation = config.stash.get(_ISOLATION_KEY, None)
    if isolation is not None:
        previous = isolation[0]
        if previous is None:
            os.environ.pop(ISOLATION_ENV, None)
        else:
            os.environ[ISOLATION_ENV] = previous
    run = config.stash.get(RUN_KEY, None)
    if run is not None:
        run.provisioner.sweep()
        run.provisioner.close()
        if getattr(config, "workerinput", None) is None:
            run.provisioner.run_dir.remove()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash[RUN_KEY]
    stats: SandboxStats = run.provisioner.stats
    if not any(stats.as_dict().values()) and not run.notes:
        return
    from pytest_kode.reports import cost_line, prewarm_lines, stats_line

    terminalreporter.write_sep("-", "sandboxes")
    terminalreporter.write_line(f"sandboxes: {stats_line(stats)}")
    prewarm = prewarm_lines(stats, run.settings.prewarm, run.provisioner.plan)
    for line in [cost_line(stats), *prewarm]:
        if line:
            terminalreporter.write_line(line)
    for kept in run.provisioner.kept:
        terminalreporter.write_line(
            f"kept sandbox {kept.sandbox_id} ({kept.backend}) of {kept.nodeid}: {kept.access}"
        )
    for note in dict.fromkeys(run.notes):  # each worker may have said the same
        terminalreporter.write_line(note)
