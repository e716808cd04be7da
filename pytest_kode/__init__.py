"""pytest-kode: run commands and files inside isolated sandboxes from pytest.

The public API is listed in ``__all__``. Names are imported on first use, so that loading the
pytest plugin (which imports this package) stays cheap: pydantic, the ``e2b`` SDK and the
backends load only when a test needs a sandbox.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncE2BSandbox",
    "AsyncLocalSandbox",
    "AsyncProcessHandle",
    "AsyncSandbox",
    "E2BSandbox",
    "E2BTemplateBuilder",
    "ExecResult",
    "FileEntry",
    "LocalSandbox",
    "ProcessHandle",
    "Sandbox",
    "SandboxOptions",
    "TemplateSpec",
    "assert_exec",
    "assert_file",
    "assert_tree",
]

_WHERE = {
    "AsyncE2BSandbox": "pytest_kode.backends.e2b_async",
    "AsyncLocalSandbox": "pytest_kode.backends.local._aio",
    "AsyncProcessHandle": "pytest_kode.aio",
    "AsyncSandbox": "pytest_kode.aio",
    "E2BSandbox": "pytest_kode.backends.e2b",
    "E2BTemplateBuilder": "pytest_kode.templates",
    "ExecResult": "pytest_kode.sandbox",
    "FileEntry": "pytest_kode.sandbox",
    "LocalSandbox": "pytest_kode.backends.local",
    "ProcessHandle": "pytest_kode.sandbox",
    "Sandbox": "pytest_kode.sandbox",
    "SandboxOptions": "pytest_kode.options",
    "TemplateSpec": "pytest_kode.options",
    "assert_exec": "pytest_kode.assertions",
    "assert_file": "pytest_kode.assertions",
    "assert_tree": "pytest_kode.assertions",
}

if TYPE_CHECKING:
    from pytest_kode.aio import AsyncProcessHandle, AsyncSandbox
    from pytest_kode.assertions import assert_exec, assert_file, assert_tree
    from pytest_kode.backends.e2b import E2BSandbox
    from pytest_kode.backends.e2b_async import AsyncE2BSandbox
    from pytest_kode.backends.local import LocalSandbox
    from pytest_kode.backends.local._aio import AsyncLocalSandbox
    from pytest_kode.options import SandboxOptions, TemplateSpec
    from pytest_kode.sandbox import ExecResult, FileEntry, ProcessHandle, Sandbox
    from pytest_kode.templates import E2BTemplateBuilder


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_kode' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
