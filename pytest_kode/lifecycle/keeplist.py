"""Sandboxes kept after a failed test (``--sandbox-keep-failed``), remembered on this machine.

A kept sandbox outlives its run on purpose, so "its run is dead" must not make ``pytest-kode gc``
remove it before someone had the chance to look: the provisioner records each one here with its
keep deadline, ``gc`` spares it until then and ``ls`` marks it. One small JSON file per sandbox
under ``<runs root>/kept/`` (written atomically; no lock needed), dropped once its deadline
passed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["kept_sandboxes", "remember_kept"]

_SUBDIR = "kept"


def _folder(runs_root: Path) -> Path:
    return runs_root / _SUBDIR


def remember_kept(
    runs_root: Path, backend: str, sandbox_id: str, until: float, nodeid: str
) -> None:
    """Record that ``sandbox_id`` is kept until ``until`` (Unix seconds) for test ``nodeid``."""
    folder = _folder(runs_root)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{backend}-{sandbox_id}.json"
    temp = target.with_suffix(".tmp")
    temp.write_text(
        json.dumps({"backend": backend, "sandbox_id": sandbox_id, "until": until, "test": nodeid}),
        encoding="utf-8",
    )
    os.replace(temp, target)


def kept_sandboxes(runs_root: Path, backend: str) -> dict[str, float]:
    """``sandbox id -> keep deadline`` of ``backend``'s kept sandboxes (expired ones dropped)."""
    found: dict[str, float] = {}
    now = time.time()
    for path in _folder(runs_root).glob(f"{backend}-*.json"):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            until = float(entry["until"])
            sandbox_id = str(entry["sandbox_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if until <= now:
            path.unlink(missing_ok=True)
            continue
        found[sandbox_id] = until
    return found
