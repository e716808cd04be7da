"""The backend contract suite's set-up: one parametrised ``contract_sandbox`` over ``BACKENDS``.

A backend joins the suite with one entry in ``BACKENDS``: a name and a factory
``factory(request, **option_fields) -> Sandbox`` that returns an *un-initialised* sandbox built
with those ``SandboxOptions`` fields (the suite passes ``sandbox_id=...`` to test resuming).
The factory may call ``request.getfixturevalue(...)`` for session-scoped helpers (an emulator)
and ``pytest.skip(...)`` when the backend cannot run here. The fixture inits, yields and disposes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kode.backends.local import LocalSandbox, _process, detect_isolation
from pytest_kode.sandbox import Sandbox

Factory = Callable[..., Sandbox]


@pytest.fixture(scope="session")
def contract_local_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the local backends' contract sandboxes live; must be empty when the run ends."""
    root = tmp_path_factory.mktemp("contract-local-root")
    yield root
    leftovers = sorted(os.listdir(root))
    assert not leftovers, f"contract sandboxes were not disposed: {leftovers}"


def _children() -> set[tuple[int, int, str]]:
    return set(_process.descendants(os.getpid()))


def _local(isolation: str) -> Factory:
    def make(request: pytest.FixtureRequest, **fields: Any) -> Sandbox:
        if isolation == "bwrap" and detect_isolation() != "bwrap":
            pytest.skip("bubblewrap does not work on this machine")
        root = request.getfixturevalue("contract_local_root")
        return LocalSandbox(isolation=isolation, root_dir=root, **fields)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def contract_e2b_emulator() -> Iterator[Any]:
    """One loopback E2B emulator for the run; the e2b backend reaches it through the real SDK."""
    from pytest_kode.emulator import E2BEmulator

    with E2BEmulator(port=0) as emulator:
        yield emulator


def _e2b_emulator(request: pytest.FixtureRequest, **fields: Any) -> Sandbox:
    from pytest_kode.backends.e2b import E2BSandbox

    emulator = request.getfixturevalue("contract_e2b_emulator")
    fields.setdefault("api_key", emulator.api_key)
    return E2BSandbox(
        api_url=emulator.env["E2B_API_URL"], sandbox_url=emulator.env["E2B_SANDBOX_URL"], **fields
    )


BACKENDS: dict[str, Factory] = {
    "local-bwrap": _local("bwrap"),
    "local-none": _local("none"),
    "e2b-emulator": _e2b_emulator,
}


@pytest.fixture(params=list(BACKENDS))
def contract_backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test (a key of ``BACKENDS``)."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_leaked_local_processes(contract_backend: str) -> Iterator[None]:
    # Autouse fixtures are torn down last: by then every sandbox of the test is disposed.
    # Only processes new since the test began count: a run's watchdog or helpers started by
    # other tests are not this test's.
    before = _children()
    yield
    # The emulator's sandboxes are LocalSandboxes of this process too, so the same check holds.
    deadline = time.monotonic() + 2.0
    while (left := _children() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"processes outlived their sandbox: {left}"


@pytest.fixture
def contract_factory(
    request: pytest.FixtureRequest, contract_backend: str
) -> Iterator[Callable[..., Sandbox]]:
    """``make(**option_fields) -> Sandbox``: more initialised sandboxes of the same backend."""
    made: list[Sandbox] = []

    def make(**fields: Any) -> Sandbox:
        sandbox = BACKENDS[contract_backend](request, **fields)
        made.append(sandbox)
        return sandbox.init()

    yield make
    for sandbox in reversed(made):
        sandbox.dispose()


@pytest.fixture
def contract_sandbox(request: pytest.FixtureRequest, contract_backend: str) -> Iterator[Sandbox]:
    """A ready sandbox of each backend in ``BACKENDS``, disposed after the test."""
    sandbox = BACKENDS[contract_backend](request)
    try:
        sandbox.init()
        yield sandbox
    finally:
        sandbox.dispose()
