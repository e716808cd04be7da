"""The fixtures. They are thin: the provisioner decides, pytest's scoping drives the pools."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kode.lifecycle.provisioner import SandboxPool
from pytest_kode.lifecycle.run import RUN_KEY, KodeRun

if TYPE_CHECKING:
    from pytest_kode.options import SandboxOptions
    from pytest_kode.sandbox import Sandbox

__all__ = ["sandbox", "sandbox_factory", "sandbox_options", "session_sandbox", "worker_sandbox"]

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
    request: pytest.FixtureRequest, options: SandboxOptions, scope: str
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
        box = pool.get(options, backend, item, scope, reuse)
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


@pytest.fixture
def worker_sandbox(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[Sandbox]:
    """One sandbox per xdist worker (per run without xdist), for tests with equal options."""
    yield from _provide(request, sandbox_options, "worker")


@pytest.fixture
def session_sandbox(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[Sandbox]:
    """One sandbox for the whole run, for tests with equal options."""
    yield from _provide(request, sandbox_options, "session")


@pytest.fixture
def sandbox_factory(
    request: pytest.FixtureRequest, sandbox_options: SandboxOptions
) -> Iterator[Callable[..., Sandbox]]:
    """``sandbox_factory(**option_overrides) -> Sandbox``: ready sandboxes, disposed after the test.

    Overrides are :class:`SandboxOptions` fields (``backend=`` picks another backend).
    """
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
