"""The run's shared folder: how the processes of one run (xdist controller and workers) agree.

- ``session.json`` (under ``run.lock``): the session-scoped sandboxes, so the first worker that
  needs one creates it and the others connect to it by id;
- ``journal-<worker>.jsonl``: every sandbox a process created and what became of it, so the
  controller can dispose what a crashed worker left behind, and a watchdog what a killed run left.

The folder lives in the system temp dir, named by run id, and is removed when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "SandboxRecord", "runs_root"]


def runs_root() -> Path:
    return Path(
        os.environ.get("KODE_RUNS_ROOT") or Path(tempfile.gettempdir()) / "pytest-kode-runs"
    )


@dataclass(frozen=True)
class SandboxRecord:
    """Enough to reconnect to a sandbox from another process: backend, id and options."""

    backend: str
    sandbox_id: str
    options: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "sandbox_id": self.sandbox_id, "options": self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxRecord:
        return cls(str(data["backend"]), str(data["sandbox_id"]), dict(data.get("options", {})))


class RunDir:
    """The folder shared by every process of one run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_run(cls, run_id: str) -> RunDir:
        return cls(runs_root() / run_id)

    def ensure(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held while deciding who creates a shared sandbox (a file lock: crash-safe)."""
        from filelock import FileLock

        self.ensure()
        with FileLock(str(self.path / "run.lock")):
            yield

    # -- session sandboxes (call with the lock held) ----------------------------------------
    def _session_file(self) -> Path:
        return self.path / "session.json"

    def sessions(self) -> dict[str, SandboxRecord]:
        try:
            data = json.loads(self._session_file().read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return {key: SandboxRecord.from_dict(value) for key, value in data.items()}

    def set_session(self, key: str, record: SandboxRecord) -> None:
        data = {k: v.as_dict() for k, v in self.sessions().items()}
        data[key] = record.as_dict()
        temp = self._session_file().with_suffix(".tmp")
        temp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(temp, self._session_file())

    # -- reused session sandboxes a worker of this run already announced (lock held) ---------
    def _announced_file(self, key: str) -> Path:
        return self.path / f"announced-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def announced(self, key: str) -> bool:
        return self._announced_file(key).exists()

    def mark_announced(self, key: str) -> None:
        self._announced_file(key).touch()

    # -- the journal ------------------------------------------------------------------------
    def record(self, worker: str, event: str, record: SandboxRecord, **extra: Any) -> None:
        """Append one event (``created``, ``released``) to this worker's journal."""
        self.ensure()
        line = json.dumps({"event": event, **record.as_dict(), **extra})
        with open(self.path / f"journal-{worker}.jsonl", "a", encoding="utf-8") as out:
            out.write(line + "\n")

    def unreleased(self) -> list[SandboxRecord]:
        """Sandboxes some process created and never released (it crashed or was killed)."""
        open_records: dict[str, SandboxRecord] = {}
        for journal in sorted(self.path.glob("journal-*.jsonl")):
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                record = SandboxRecord.from_dict(entry)
                if entry["event"] == "created":
                    open_records[record.sandbox_id] = record
                else:
                    open_records.pop(record.sandbox_id, None)
        return list(open_records.values())

    def silent_workers(self, skip: set[str]) -> list[str]:
        """The workers not in ``skip`` that kept a journal (their summary never arrived)."""
        names = (journal.stem.removeprefix("journal-") for journal in self.path.glob("journal-*"))
        return sorted(name for name in names if name not in skip)

    def journal_counts(self, skip: set[str]) -> dict[str, int]:
        """What the journals of the workers not in ``skip`` say they did: sandboxes created,
        recycled, disposed, kept and reused. For workers whose own summary never arrived (an
        interrupt stops the controller listening), so the run's summary still counts their
        sandboxes."""
        counts = {"created": 0, "recycled": 0, "disposed": 0, "kept": 0, "reused": 0}
        fates = {"dispose": "disposed", "kept": "kept", "reuse": "reused"}
        for journal in sorted(self.path.glob("journal-*.jsonl")):
            if journal.stem.removeprefix("journal-") in skip:
                continue
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "created":
                    counts["recycled" if entry.get("recycled") else "created"] += 1
                elif entry.get("fate") in fates:
                    counts[fates[entry["fate"]]] += 1
        return counts

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
