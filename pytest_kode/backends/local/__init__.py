"""The ``local`` backend: a small machine of its own on this computer.

The host side is :mod:`._sandbox` (the sandbox object and its lifetime), :mod:`._fs` (file
operations confined to the sandbox), :mod:`._process` (commands and their output) and
:mod:`._bwrap` (the bubblewrap isolation); this package re-exports the public names lazily, so
that the plugin can probe the isolation in its header without loading the sandbox layer.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_kode.backends.local._sandbox import (
        Isolation,
        LocalFS,
        LocalProcess,
        LocalSandbox,
        detect_isolation,
        list_local_sandboxes,
        remove_local_sandbox,
    )

__all__ = [
    "Isolation",
    "LocalFS",
    "LocalProcess",
    "LocalSandbox",
    "default_root",
    "detect_isolation",
    "list_local_sandboxes",
    "remove_local_sandbox",
]


def default_root() -> Path:
    """Where local sandboxes live: ``$KODE_LOCAL_ROOT`` or ``<tmp>/pytest-kode``.

    Here rather than in the sandbox layer: the run's watchdog needs it before (and E2B runs
    without) that layer is loaded.
    """
    configured = os.environ.get("KODE_LOCAL_ROOT")
    return Path(configured) if configured else Path(tempfile.gettempdir(), "pytest-kode")


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pytest_kode.backends.local._sandbox"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
