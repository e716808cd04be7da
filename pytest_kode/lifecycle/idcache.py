"""The cross-run cache of reusable sandbox ids (``--sandbox-reuse``).

One JSON file in the pytest cache folder, read-modify-written under a file lock and replaced
atomically, so concurrent xdist workers never lose each other's entries and a crash mid-write
never leaves half a file. A corrupt file is reported once and treated as empty.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["IdCache", "reuse_key"]

CACHE_SUBDIR = "kode"
CACHE_FILE = "reuse.json"


def reuse_key(backend: str, fingerprint: str, scope: str, slot: str) -> str:
    """The cache key: backend, resolved options (secrets excluded), scope and worker slot."""
    return f"{backend}|{fingerprint}|{scope}|{slot}"


class IdCache:
    """``key -> {"sandbox_id": ..., "backend": ..., "options": {...}}`` kept across runs."""

    def __init__(self, folder: Path, on_corrupt: Callable[[str], None] | None = None) -> None:
        self.path = folder / CACHE_FILE
        self._lock_path = folder / (CACHE_FILE + ".lock")
        self._on_corrupt = on_corrupt

    def _lock(self) -> Any:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self._lock_path))

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
                raise ValueError("expected an object of objects")
        except ValueError as exc:
            if self._on_corrupt is not None:
                self._on_corrupt(
                    f"the sandbox id cache {self.path} is corrupt ({exc}); starting from an "
                    "empty cache (the sandboxes it listed are left to their own lifetime)"
                )
            return {}
        return data

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".reuse-", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(temp, self.path)
        except BaseException:
            os.unlink(temp)
            raise

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock():
            return self._read().get(key)

    def items(self) -> dict[str, dict[str, Any]]:
        with self._lock():
            return self._read()

    def set(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock():
            data = self._read()
            data[key] = entry
            self._write(data)

    def delete(self, key: str, sandbox_id: str | None = None) -> None:
        """Drop ``key`` (only if it still names ``sandbox_id``, when given)."""
        with self._lock():
            data = self._read()
            entry = data.get(key)
            if entry is None or (sandbox_id and entry.get("sandbox_id") != sandbox_id):
                return
            del data[key]
            self._write(data)
