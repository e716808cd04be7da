"""The pytest entry point: options, the marker, configuration, reporting.

Loading this module must stay cheap (it runs for every pytest invocation where the plugin is
installed): it imports neither pydantic, nor the ``e2b`` SDK, nor the emulator's server. Those
load on first use of a sandbox.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kode import hookspecs
from pytest_kode.errors import ConfigError
from pytest_kode.fixtures import (
    _kode_pool_class,
    _kode_pool_module,
    _kode_pool_session,
    sandbox,
    sandbox_factory,
    sandbox_options,
    session_sandbox,
    worker_sandbox,
)
from pytest_kode.lifecycle.provisioner import KeptSandbox, RunSettings, SandboxStats
from pytest_kode.lifecycle.run import ITEM_FAILED, ITEM_SANDBOXES, RUN_KEY, KodeRun, artifacts_dir

if TYPE_CHECKING:
    from pytest_kode.backends.registry import BackendRegistry

__all__ = [
    "_kode_pool_class",
    "_kode_pool_module",
    "_kode_pool_session",
    "sandbox",
    "sandbox_factory",
    "sandbox_options",
    "session_sandbox",
    "worker_sandbox",
]

BACKEND_ENV = "KODE_SANDBOX_BACKEND"

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
        "--sandbox-prewarm",
        dest="sandbox_prewarm",
        default=None,
        metavar="N",
        help="keep N function-scope sandboxes ready ahead of need [ini: sandbox_prewarm, "
        "default: 0]",
    )
    parser.addini("sandbox_backend", "default sandbox backend (see --sandbox-backend)", default="")
    parser.addini("sandbox_template", "default sandbox template", default="")
    parser.addini("sandbox_keep_failed", "keep failed tests' sandboxes", type="bool", default=False)
    parser.addini("sandbox_artifacts", "folder for failed tests' sandbox files", default="")
    parser.addini("sandbox_prewarm", "function-scope sandboxes kept ready", default="")


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
    prewarm_raw, _ = _setting(config, "sandbox_prewarm")
    try:
        prewarm = int(prewarm_raw) if prewarm_raw is not None else 0
        if prewarm < 0:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(
            f"--sandbox-prewarm: expected a whole number >= 0, got {prewarm_raw!r}"
        ) from None
    template, _ = _setting(config, "sandbox_template")
    keep_failed, _ = _setting(config, "sandbox_keep_failed")
    artifacts, _ = _setting(config, "sandbox_artifacts")
    return RunSettings(
        backend=backend,
        backend_explicit=explicit,
        template=str(template) if template else None,
        keep_failed=bool(keep_failed),
        artifacts_dir=artifacts_dir(artifacts, config.rootpath),
        prewarm=prewarm,
    )


def pytest_configure(config: pytest.Config) -> None:
    from pytest_kode.backends.registry import BackendRegistry

    config.addinivalue_line("markers", _MARKER_HELP)
    registry = BackendRegistry()
    config.hook.pytest_kode_register_backends(registry=registry)
    settings = _read_settings(config, registry)
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        run_id = str(workerinput.get("kode_run") or workerinput["testrunuid"][:12])
        worker_id = str(workerinput["workerid"])
    else:
        run_id, worker_id = uuid.uuid4().hex[:12], "main"
    config.stash[RUN_KEY] = KodeRun(config, settings, registry, run_id, worker_id)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistController(config), "kode-xdist")


class _XdistController:
    """Controller side under xdist: hands the run id to workers, gathers their summaries."""

    def __init__(self, config: pytest.Config) -> None:
        self._run = config.stash[RUN_KEY]

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["kode_run"] = self._run.run_id

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", {}).get("kode")
        if not output:
            return
        self._run.provisioner.stats.add(output["stats"])
        self._run.provisioner.kept.extend(KeptSandbox(**kept) for kept in output["kept"])
        self._run.notes.extend(output["notes"])


def pytest_report_header(config: pytest.Config) -> str:
    run = config.stash[RUN_KEY]
    backend = run.settings.backend
    if backend == "auto":
        backend = f"auto ({'e2b' if os.environ.get('E2B_API_KEY') else 'local'})"
    from pytest_kode.backends._bwrap import probe

    works, why = probe()
    isolation = "bwrap" if works else f"none ({why})"
    return f"kode: backend={backend}, isolation={isolation}, run={run.run_id}"


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
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["kode"] = {
            "stats": run.provisioner.stats.as_dict(),
            "kept": [kept.__dict__ for kept in run.provisioner.kept],
            "notes": run.notes,
        }


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RUN_KEY, None)
    if run is not None:
        run.provisioner.sweep()
        run.provisioner.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash[RUN_KEY]
    stats: SandboxStats = run.provisioner.stats
    if not any(stats.as_dict().values()) and not run.notes:
        return
    from pytest_kode.reports import stats_line

    terminalreporter.write_sep("-", "sandboxes")
    terminalreporter.write_line(f"sandboxes: {stats_line(stats)}")
    for kept in run.provisioner.kept:
        terminalreporter.write_line(
            f"kept sandbox {kept.sandbox_id} ({kept.backend}) of {kept.nodeid}: {kept.access}"
        )
    for note in run.notes:
        terminalreporter.write_line(note)
