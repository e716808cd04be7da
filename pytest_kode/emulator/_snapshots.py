"""Snapshots of emulated sandboxes: a copy of the sandbox's files and settings.

``POST /sandboxes/{id}/snapshots`` copies the sandbox's home into the store; the snapshot's id
then works as a template id in create, which starts a sandbox from a copy of those files with
the snapshot's settings (template, env vars, internet access). A fork is a snapshot nobody
keeps. Memory is not kept (nothing is, offline): processes do not carry over, as with E2B's
filesystem-only snapshots.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
import tempfile
import threading
from pathlib import Path

__all__ = ["Snapshot", "SnapshotFailed", "SnapshotStore", "copy_tree"]


class SnapshotFailed(Exception):
    """The snapshot could not be taken (the sandbox went away meanwhile, or the copy failed)."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    names: tuple[str, ...]
    sandbox_id: str
    template_id: str
    env_vars: dict[str, str]
    allow_internet_access: bool
    files: Path
    created_at: datetime.datetime


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a sandbox's files: symlinks stay links, modes, times and metadata xattrs are kept."""
    shutil.copytree(source, destination, symlinks=True, dirs_exist_ok=True)


class SnapshotStore:
    """The snapshots one emulator keeps, each a directory under a private temporary root."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._snapshots: dict[str, Snapshot] = {}

    def directory(self) -> Path:
        """A fresh directory to copy a snapshot's files into."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="kode-emulator-snapshots-"))
            root = self._root
        return Path(tempfile.mkdtemp(dir=root))

    def add(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots[snapshot.snapshot_id] = snapshot

    def get(self, snapshot_id: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(snapshot_id)

    def list(self, *, sandbox_id: str | None = None, name: str | None = None) -> list[Snapshot]:
        """Matching snapshots, newest first."""
        with self._lock:
            found = [
                snapshot
                for snapshot in self._snapshots.values()
                if (sandbox_id is None or snapshot.sandbox_id == sandbox_id)
                and (name is None or name in snapshot.names)
            ]
        return sorted(found, key=lambda s: (s.created_at, s.snapshot_id), reverse=True)

    def delete(self, snapshot_id: str) -> bool:
        with self._lock:
            snapshot = self._snapshots.pop(snapshot_id, None)
        if snapshot is None:
            return False
        shutil.rmtree(snapshot.files, ignore_errors=True)
        return True

    def close(self) -> None:
        with self._lock:
            root, self._root = self._root, None
            self._snapshots.clear()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
