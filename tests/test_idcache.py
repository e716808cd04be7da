"""The reuse cache: atomic, locked, and forgiving of corruption."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from pytest_kode.lifecycle.idcache import IdCache, reuse_key


def _hammer(folder: str, writer: int, count: int) -> None:
    cache = IdCache(Path(folder))
    for n in range(count):
        cache.set(
            reuse_key("local", f"w{writer}", "worker", str(n)), {"sandbox_id": f"{writer}-{n}"}
        )


def test_eight_processes_hammering_the_cache_lose_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_hammer, args=(str(tmp_path), w, 25)) for w in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = IdCache(tmp_path).items()
    assert len(entries) == 200
    assert {entry["sandbox_id"] for entry in entries.values()} == {
        f"{w}-{n}" for w in range(8) for n in range(25)
    }


def test_corrupt_file_is_reported_and_read_as_empty(tmp_path: Path) -> None:
    notes: list[str] = []
    cache = IdCache(tmp_path, notes.append)
    cache.path.write_text("[1, 2")
    assert cache.get("k") is None
    assert notes and "is corrupt" in notes[0]
    cache.set("k", {"sandbox_id": "a"})
    assert json.loads(cache.path.read_text()) == {"k": {"sandbox_id": "a"}}


def test_delete_only_removes_the_named_sandbox(tmp_path: Path) -> None:
    cache = IdCache(tmp_path)
    cache.set("k", {"sandbox_id": "new"})
    cache.delete("k", "old")  # a stale id another worker already replaced
    assert cache.get("k") == {"sandbox_id": "new"}
    cache.delete("k", "new")
    assert cache.get("k") is None


def test_no_temp_files_are_left_behind(tmp_path: Path) -> None:
    cache = IdCache(tmp_path)
    for n in range(5):
        cache.set(str(n), {"sandbox_id": str(n)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reuse.json", "reuse.json.lock"]
