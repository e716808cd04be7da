"""The fixtures. They are thin: the provisioner decides, pytest's scoping drives the pools."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kode.lifecycle.provisioner import SandboxPool
from pytest_kode.lifecycle.run import RUN_KEY, KodeRun

if TYPE_CHECKING:
    from pytest_kode.aio import AsyncSandbox
    from pytest_kode.options import SandboxOptions
    from pytest_kode.sandbox import Sandbox

__all__ = [
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

# Shared sandboxes of the async fixtures are their own: a test that asks for `worker_sandbox`
# and `async_worker_sandbox` gets two sandboxes, never one seen through two APIs by accident.
_ASYNC = "async"
# The session-scoped fixtures, so the per-test bookkeeping knows which of a test's fixtures
# are sandboxes (transcripts in its report, keep-on-failure, the junitxml id).
_SHARED_FIXTURES = (
    "session_sandbox",
    "worker_sandbox",
    "async_session_sandbox",
    "async_worker_sandbox",
)
# The fixtures that hand out async sandboxes, so an `async def` test that no runner runs is
# refused before any of them is set up.
_ASYNC_FIXTURES = (
    "async_sandbox",
    "async_sandbox_factory",
    "async_worker_sandbox",
    "async_session_sandbox",
)

# Shared scopes map onto pytest fixture scopes (a worker process is one pytest session).
_POOL_FIXTURE = {
    "class": "_kode_pool_class",
    "module": "_kode_pool_module",
    "worker": "_kode_pool_worker",
    "session": "_kode_pool_session",
}


def _run(request: pytest.FixtureRequest) -> KodeRun:
    return request.config.stash[RUN_KEY]


def _make_pool_fixture(scope: str) -> Any:
    """One pool fixture per sandbox scope, from one definition: the pool lives as long as it."""

    pytest_scope: Any = "session" if scope in ("worker", "session") else scope

    @pytest.fixture(scope=pytest_scope)
    def pool(request: pytest.FixtureRequest) -> Iterator[SandboxPool]:
        shared = SandboxPool(_run(request).provisioner, owner=request.node.nodeid or "session")
        try:
            yield shared
        finally:
            shared.close()

    pool.__name__ = _POOL_FIXTURE[scope]
    return pool


_kode_pool_class = _make_pool_fixture("class")
_kode_pool_module = _make_pool_fixture("module")
_kode_pool_worker = _make_pool_fixture("worker")
_kode_pool_session = _make_pool_fixture("session")


def _provide(
    request: pytest.FixtureRequest, options: SandboxOptions, scope: str, variant: str = ""
) -> Iterator[Sandbox]:
    run = _run(request)
    item: pytest.Item = request.node
    settings, _ = run.marker(item)
    backend = run.provisioner.backend_name(settings.backend, options)
    pool: SandboxPool | None = None
    if scope == "worker" and not run.provisioner.distributed:
        scope = "session"  # without xdist the one worker is the whole run
    if scope == "function":
        box = run.provisioner.acquire(options, backend, item=item, owner=item.nodeid)
    else:
        reuse = settings.reuse or (run.settings.reuse and scope in ("worker", "session"))
        pool = request.getfixturevalue(_POOL_FIXTURE[scope])
        box = pool.get(options, backend, item, scope, reuse, variant)
    run.track(item, box)
    try:
        yield box
    finally:
        run.finish(item, box, settings, pool)


@pytest.fixture
def sandbox_options(request: pytest.FixtureRequest) -> SandboxOptions:
    """The resolved :class:`SandboxOptions` for this test (marker, ini, command line, hook).

    Override it in a ``conftest.py`` to customise every sandbox below that directory.
    """
    return _run(request).options_for(request.node)


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, sandbox_options: SandboxOptions) -> Iterator[Sandbox]:
    """A ready sandbox configured by the nearest ``sandbox`` marker.

    Its lifetime follows the marker's ``scope`` (``function`` by default, ``class``, ``module``,
    ``worker``, ``session``); tests share one only when scope and resolved options are equal.
    """
    settings, _ = _run(request).marker(request.node)
    yield from _provide(request, sandbox_options, settings.scope)


def _shared(request: pytest.FixtureRequest, scope: str, variant: str = "") -> Iterator[Sandbox]:
    """One definition for the session-scoped sandbox fixtures (and their async twins).

    They belong to no test, so they are configured by the command line, the ini file and the
    ``pytest_kode_sandbox_options(options, item=None)`` hook, never by a test's marker.
    """
    run = _run(request)
    options = run.options_for(None)
    backend = run.provisioner.backend_name(None, options)
    if scope == "worker" and not run.provisioner.distributed:
        scope = "session"  # without xdist the one worker is the whole run
    pool: SandboxPool = request.getfixturevalue(_POOL_FIXTURE[scope])
    box = pool.get(options, backend, None, scope, run.settings.reuse, variant)
    run.shared_pools[id(box)] = pool  # so a failed test can keep it (finish_shared)
    yield box


@pytest.fixture(scope="session")
def worker_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox per xdist worker (per run without xdist), a session-scoped fixture.

    Session- and module-scoped fixtures can use it. Configured by the command line, the ini file
    and the ``pytest_kode_sandbox_options`` hook (with ``item=None``), not by markers.
    """
    yield from _shared(request, "worker")


@pytest.fixture(scope="session")
def session_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox for the whole run, shared by every xdist worker, a session-scoped fixture.

    Session- and module-scoped fixtures can use it, e.g.
    ``@pytest.fixture(scope="session") def db(session_sandbox): ...``. Configured by the command
    line, the ini file and the ``pytest_kode_sandbox_options`` hook (with ``item=None``).
    """
    yield from _shared(request, "session")


def _shared_boxes(item: pytest.Item) -> list[Sandbox]:
    """The session-scoped sandboxes a test uses (an async fixture's: the sandbox it views)."""
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    values = [funcargs[name] for name in _SHARED_FIXTURES if name in funcargs]
    if not values:
        return []
    from pytest_kode.aio import AsyncSandbox

    return [value.sync if isinstance(value, AsyncSandbox) else value for value in values]


def track_shared(item: pytest.Item) -> None:
    """After a test's set-up: give the session-scoped sandboxes it uses the per-test care
    function-scoped ones get (its report's transcript section, the junitxml id).

    Hooks rather than an autouse fixture, so tests without sandboxes pay nothing."""
    boxes = _shared_boxes(item)
    if boxes:
        run = item.config.stash[RUN_KEY]
        for box in boxes:
            run.track(item, box)


def finish_shared(item: pytest.Item) -> None:
    """Before a test's fixtures are torn down: artifacts and keep-on-failure for the
    session-scoped sandboxes it used."""
    boxes = _shared_boxes(item)
    if not boxes:
        return
    run = item.config.stash[RUN_KEY]
    settings, _ = run.marker(item)
    for box in boxes:
        run.finish(item, box, settings, run.shared_pools.get(id(box)))


@pytest.fixture(scope="session")
def sandbox_maker(
    request: pytest.FixtureRequest,
) -> Callable[..., contextlib.AbstractContextManager[Sandbox]]:
    """``with sandbox_maker(**option_overrides) as sb:`` -- a sandbox from a fixture of any scope.

    The sandbox ends with the ``with`` block, so a module-scoped fixture that yields inside it
    disposes its sandbox when the module is done. Configured like ``session_sandbox``, plus the
    overrides (``backend=`` picks another backend).
    """
    run = _run(request)

    @contextlib.contextmanager
    def make(**overrides: Any) -> Iterator[Sandbox]:
        requested = overrides.pop("backend", None)
        base = run.options_for(None)
        options = base.replace(**overrides) if overrides else base
        backend = run.provisioner.backend_name(requested, options)
        box = run.provisioner.acquire(options, backend, item=None, owner="sandbox_maker")
        try:
            yield box
        finally:
            run.provisioner.release(box)

    return make


def _factory_fixture(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[Callable[..., Sandbox]]:
    """``factory(**option_overrides) -> Sandbox`` for both factory fixtures; all the sandboxes
    it made are settled when the test ends."""
    run = _run(request)
    item: pytest.Item = request.node
    settings, _ = run.marker(item)
    made: list[Sandbox] = []

    def factory(**overrides: Any) -> Sandbox:
        requested = overrides.pop("backend", settings.backend)
        options = sandbox_options.replace(**overrides) if overrides else sandbox_options
        backend = run.provisioner.backend_name(requested, options)
        box = run.provisioner.acquire(options, backend, item=item, owner=item.nodeid)
        made.append(box)
        run.track(item, box)
        return box

    try:
        yield factory
    finally:
        errors: list[Exception] = []
        for box in made:
            try:
                run.finish(item, box, settings, None)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def sandbox_factory(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[Callable[..., Sandbox]]:
    """``sandbox_factory(**option_overrides) -> Sandbox``: ready sandboxes, disposed after the test.

    Overrides are :class:`SandboxOptions` fields (``backend=`` picks another backend).
    """
    yield from _factory_fixture(request, sandbox_options)


# -- the async family -----------------------------------------------------------------------
# Plain (sync) fixtures that hand out async sandboxes: the sandbox is created before the test's
# event loop runs and settled after it, by the same provisioner as the sync fixtures, so they
# work under pytest-asyncio (strict or auto) and anyio's plugin alike, the shared ones are
# session-scoped like their sync twins whatever the loops' scope (a view keeps a connection
# per event loop), and a closed loop cannot strand a sandbox.


def check_async_runner(item: pytest.Item) -> None:
    """Before a test's set-up: refuse an ``async def`` test using an async sandbox fixture
    that nobody runs (no plugin, no marker), before any sandbox is made for it."""
    used = _async_fixture(item)
    if used is None or "anyio_backend" in getattr(item, "fixturenames", ()):
        return  # anyio's tests are checked once their backend is known (check_anyio_backend)
    if item.get_closest_marker("asyncio") is not None:
        return
    installed = item.config.pluginmanager.has_plugin("asyncio")
    how = (
        "mark it @pytest.mark.asyncio (or set `asyncio_mode = auto` in the pytest ini)"
        if installed
        else "install pytest-asyncio (pip install pytest-asyncio) and mark it "
        "@pytest.mark.asyncio (or set `asyncio_mode = auto`)"
    )
    pytest.fail(
        f"{item.nodeid} is an `async def` test using {used}, but no async test runner runs "
        f"it: {how}; with anyio's plugin (pip install anyio), mark it @pytest.mark.anyio "
        "instead",
        pytrace=False,
    )


def check_anyio_backend(item: pytest.Item) -> None:
    """After a test's set-up: an anyio test using async sandboxes must run on asyncio."""
    if _async_fixture(item) is None:
        return
    backend = getattr(item, "funcargs", {}).get("anyio_backend")
    if backend is None:
        return
    name = backend if isinstance(backend, str) else backend[0]
    if name != "asyncio":
        pytest.fail(
            f"{item.nodeid}: pytest-kode's async sandboxes run on asyncio, and this test runs "
            f"on anyio backend {name!r}; give it an `anyio_backend` fixture that returns "
            "'asyncio'",
            pytrace=False,
        )


def _async_fixture(item: pytest.Item) -> str | None:
    """The first async sandbox fixture an ``async def`` test uses, else None (a sync test may
    drive async sandboxes with ``asyncio.run()``)."""
    function = getattr(item, "function", None)
    if function is None or not inspect.iscoroutinefunction(function):
        return None
    names = getattr(item, "fixturenames", ())
    return next((name for name in names if name in _ASYNC_FIXTURES), None)


def _as_async(boxes: Iterator[Sandbox]) -> Iterator[AsyncSandbox]:
    from pytest_kode.aio import AsyncSandbox

    for box in boxes:
        view = AsyncSandbox.wrap(box)
        try:
            yield view
        finally:
            view.close()  # its connections; the sandbox is settled by the sync fixture code


@pytest.fixture
def async_sandbox(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[AsyncSandbox]:
    """The async twin of ``sandbox``: an :class:`~pytest_kode.aio.AsyncSandbox`, same marker,
    options and scopes (``await async_sandbox.exec(...)``)."""
    settings, _ = _run(request).marker(request.node)
    yield from _as_async(_provide(request, sandbox_options, settings.scope, _ASYNC))


@pytest.fixture(scope="session")
def async_worker_sandbox(request: pytest.FixtureRequest) -> Iterator[AsyncSandbox]:
    """The async twin of ``worker_sandbox``: one sandbox per xdist worker, session-scoped and
    configured the same way, but its own sandbox, never the one ``worker_sandbox`` gives."""
    yield from _as_async(_shared(request, "worker", _ASYNC))


@pytest.fixture(scope="session")
def async_session_sandbox(request: pytest.FixtureRequest) -> Iterator[AsyncSandbox]:
    """The async twin of ``session_sandbox``: one sandbox for the whole run, session-scoped and
    configured the same way, but its own sandbox, never the one ``session_sandbox`` gives."""
    yield from _as_async(_shared(request, "session", _ASYNC))


@pytest.fixture
def async_sandbox_factory(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[Callable[..., Awaitable[AsyncSandbox]]]:
    """``await async_sandbox_factory(**option_overrides) -> AsyncSandbox``: ready sandboxes,
    disposed after the test.

    Each call provisions on a thread of its own, so ``asyncio.gather`` of several calls creates
    them concurrently, still within ``--sandbox-max-concurrent``.
    """
    factories = _factory_fixture(request, sandbox_options)
    factory = next(factories)
    views: list[AsyncSandbox] = []

    async def make(**overrides: Any) -> AsyncSandbox:
        from pytest_kode.aio import AsyncSandbox, run_blocking

        # Wrapped on the thread too: a local view waits there for the sandbox's agent.
        view = await run_blocking(
            lambda: AsyncSandbox.wrap(factory(**overrides)), name="kode-aio-factory"
        )
        views.append(view)
        return view

    try:
        yield make
    finally:
        for view in views:
            view.close()
        next(factories, None)  # runs the factory's settling (and raises what it raised)
