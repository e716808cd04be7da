"""Snapshots, forks and the list's order and filters, through the real SDK."""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

import pytest


def test_snapshot_starts_new_sandboxes_with_its_files(
    sbx: Any, create: Any, api: dict[str, Any]
) -> None:
    from e2b import Sandbox

    sbx.files.write("app/data.txt", "before")
    sbx.files.write("app/meta.txt", "m", metadata={"k": "v"})
    snapshot = sbx.create_snapshot(name="my-snap")
    assert snapshot.names == ["my-snap"]
    sbx.files.write("app/data.txt", "after")  # later changes are not in the snapshot
    try:
        first, second = create(template=snapshot.snapshot_id), create(template=snapshot.snapshot_id)
        assert first.files.read("app/data.txt") == "before"
        assert first.files.get_info("app/meta.txt").metadata == {"k": "v"}
        first.files.write("app/data.txt", "changed")
        assert second.files.read("app/data.txt") == "before"
        listed = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id, **api).next_items()
        assert [s.snapshot_id for s in listed] == [snapshot.snapshot_id]
        assert Sandbox.list_snapshots(name="my-snap", **api).next_items()[0].names == ["my-snap"]
        assert Sandbox.list_snapshots(name="other", **api).next_items() == []
    finally:
        assert Sandbox.delete_snapshot(snapshot.snapshot_id, **api) is True
    assert Sandbox.delete_snapshot(snapshot.snapshot_id, **api) is False
    from e2b import NotFoundException, SandboxException

    with pytest.raises((NotFoundException, SandboxException)):
        create(template=snapshot.snapshot_id)


def test_fork_copies_files_and_keeps_the_original(sbx: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox, SandboxNotFoundException

    sbx.files.write("state.txt", "s")
    forks = sbx.fork(count=2, timeout=60)
    try:
        assert len({fork.sandbox_id for fork in forks} | {sbx.sandbox_id}) == 3
        for fork in forks:
            assert fork.files.read("state.txt") == "s"
        forks[0].files.write("state.txt", "f")
        assert sbx.files.read("state.txt") == "s"
    finally:
        for fork in forks:
            fork.kill()
    sbx.kill()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.fork(sbx.sandbox_id, **api)


def test_fork_count_is_validated_by_the_server(sbx: Any, emulator: Any) -> None:
    import httpx

    response = httpx.post(
        f"{emulator.url}/sandboxes/{sbx.sandbox_id}/fork",
        json={"count": 0},
        headers={"X-API-KEY": emulator.api_key},
    )
    assert response.status_code == 400 and "count" in response.json()["message"]


def test_snapshot_of_a_sandbox_being_killed_fails_clearly(sbx: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox, SandboxException

    sbx.commands.run("mkdir -p many && cd many && seq 1 3000 | xargs touch")
    killer = threading.Thread(target=Sandbox.kill, args=(sbx.sandbox_id,), kwargs=api)
    outcome: list[Any] = []
    killer.start()
    try:
        outcome.append(sbx.create_snapshot())
    except SandboxException as exc:
        outcome.append(exc)
    killer.join()
    # Either the snapshot finished before the kill, or it failed saying why: never half a copy.
    result = outcome[0]
    if isinstance(result, Exception):
        assert "killed" in str(result) or "not found" in str(result)
    else:
        Sandbox.delete_snapshot(result.snapshot_id, **api)


def test_list_is_newest_first_and_started_after_is_inclusive(
    create: Any, api: dict[str, Any]
) -> None:
    from e2b import Sandbox, SandboxQuery

    tag = {"suite": "order"}
    older, newer = create(metadata=tag), create(metadata=tag)
    default = Sandbox.list(query=SandboxQuery(metadata=tag), **api).next_items()
    assert [s.sandbox_id for s in default] == [newer.sandbox_id, older.sandbox_id]
    ascending = Sandbox.list(query=SandboxQuery(metadata=tag), order="asc", **api).next_items()
    assert [s.sandbox_id for s in ascending] == [older.sandbox_id, newer.sandbox_id]
    started = older.get_info().started_at
    since = Sandbox.list(query=SandboxQuery(metadata=tag, started_after=started), **api)
    assert older.sandbox_id in {s.sandbox_id for s in since.next_items()}
    later = started + datetime.timedelta(hours=1)
    none = Sandbox.list(query=SandboxQuery(metadata=tag, started_after=later), **api)
    assert none.next_items() == []


@pytest.mark.slow
def test_metrics_measure_the_sandboxs_own_usage(sbx: Any) -> None:
    import time

    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    first = sbx.get_metrics()
    assert first and first[0].cpu_count == 2 and first[0].mem_total == 512 << 20
    sbx.files.write("big.bin", b"\0" * (3 << 20))
    sbx.commands.run("sleep 60", background=True)
    deadline = time.monotonic() + 30
    metrics = first
    while time.monotonic() < deadline:
        metrics = sbx.get_metrics(start=start)
        if len(metrics) > 1:
            break
        time.sleep(0.5)
    latest = metrics[-1]
    assert latest.disk_used >= 3 << 20
    assert latest.mem_used > 0  # the sleep's resident memory
    before = start - datetime.timedelta(hours=1)
    assert sbx.get_metrics(start=before, end=before + datetime.timedelta(minutes=5)) == []


def test_pause_modes_and_auto_resume_on_traffic(create: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox

    waking = create(lifecycle={"on_timeout": "pause", "auto_resume": True})
    waking.files.write("kept.txt", "k")
    assert waking.pause() is True
    assert waking.get_info().state.value == "paused"
    # Its own traffic wakes it, files intact.
    assert waking.files.read("kept.txt") == "k"
    info = waking.get_info()
    assert info.state.value == "running" and info.lifecycle["auto_resume"] is True

    sleeping = create(lifecycle={"on_timeout": "pause", "auto_resume": False})
    assert sleeping.pause(keep_memory=False) is True
    from e2b import SandboxException

    with pytest.raises(SandboxException):
        sleeping.files.read("anything")
    assert Sandbox.get_info(sleeping.sandbox_id, **api).state.value == "paused"


def test_filesystem_only_auto_pause_cannot_auto_resume(lenient: Any) -> None:
    import httpx

    response = httpx.post(
        f"{lenient.url}/v2/sandboxes",
        json={
            "templateID": "base",
            "autoPause": True,
            "autoPauseMemory": False,
            "autoResume": {"enabled": True},
        },
        headers={"X-API-KEY": lenient.api_key},
    )
    assert response.status_code == 400 and "auto-resume" in response.json()["message"]


def test_a_full_pause_keeps_processes_a_filesystem_pause_ends_them(create: Any) -> None:
    kept = create()
    counter = kept.commands.run(
        "i=0; while true; do i=$((i+1)); echo $i > n; sleep 0.05; done", background=True
    )
    deadline = time.monotonic() + 10
    while not kept.files.exists("n") and time.monotonic() < deadline:
        time.sleep(0.02)  # started is not yet counting: on a loaded machine it takes a while
    kept.pause()
    frozen_at = kept.connect().files.read("n")
    assert counter.pid in {process.pid for process in kept.commands.list()}
    kept.commands.run("sleep 0.5")
    assert int(kept.files.read("n")) > int(frozen_at)  # it goes on after the resume
    kept.commands.kill(counter.pid)

    ended = create()
    sleeper = ended.commands.run("sleep 300", background=True)
    ended.pause(keep_memory=False)
    assert sleeper.pid not in {process.pid for process in ended.connect().commands.list()}
