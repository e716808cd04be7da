"""Hook specifications of pytest-kode (registered through ``pytest_addhooks``).

Implement them in a ``conftest.py`` or a plugin like any pytest hook.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_kode.options import SandboxOptions
    from pytest_kode.sandbox import Sandbox


def pytest_kode_register_backends(registry: MutableMapping[str, Any]) -> None:
    """Add backends: ``registry["name"] = SandboxSubclass``.

    Called once per process in ``pytest_configure``, before the command-line backend is
    validated, so ``--sandbox-backend=name`` and ``@pytest.mark.sandbox(backend="name")`` can pick
    the new backend. The class is built as ``SandboxSubclass(options)`` and then ``init()``-ed.
    """


@pytest.hookspec(firstresult=True)
def pytest_kode_sandbox_options(
    options: SandboxOptions, item: pytest.Item | None
) -> SandboxOptions | None:
    """Adjust the resolved options of a test's sandbox; return changed options or ``None``.

    Called for every test that asks for a sandbox, after the marker, the command line and the ini
    file have been merged and before the sandbox is created or looked up for sharing (so changing
    options also changes which tests share a sandbox). The first non-``None`` result wins.
    """


def pytest_kode_sandbox_created(sandbox: Sandbox, item: pytest.Item | None, scope: str) -> None:
    """Called right after a sandbox was created or resumed, before any test uses it.

    ``item`` is the test that caused the creation (for shared scopes, the first one; ``None`` for
    the session-scoped fixtures and ``sandbox_maker``, which belong to no test). ``scope`` is the
    sandbox's scope: ``"function"``, ``"class"``, ``"module"``, ``"worker"`` or ``"session"``
    (without xdist the one worker is the whole run, so a worker sandbox reports ``"session"``).
    An implementation may leave out ``scope`` (or ``item``): pluggy passes only what it names.

    This is the place for set-up every sandbox needs: it runs once per sandbox, and for a
    ``session`` sandbox under xdist only in the worker that created (or, with
    ``--sandbox-reuse``, resumed) it, while the other workers wait to connect, so they find the
    set-up done. For once-per-run set-up, check ``scope == "session"``. ``sandbox.resumed`` is
    True when the sandbox was resumed from a previous run (``--sandbox-reuse``): skip set-up
    that survived.
    """


def pytest_kode_sandbox_disposing(sandbox: Sandbox) -> None:
    """Called just before a sandbox is disposed by the plugin (not for kept/reused sandboxes).

    The sandbox is still alive: a plugin can copy files out of it or log its state.
    """
