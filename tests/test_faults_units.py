"""The pieces behind the fault guarantees: process identity, the run registry, the journal's
spared sandboxes, the lease arithmetic, the heartbeat (against the emulator) and the option."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kode.backends.e2b import E2BSandbox
from pytest_kode.emulator import E2BEmulator
from pytest_kode.errors import SandboxNotFoundError
from pytest_kode.lifecycle.lease import Heartbeat, lease_state, parse_lease
from pytest_kode.lifecycle.rundir import RunDir, SandboxRecord
from pytest_kode.lifecycle.watchdog import (
    process_alive,
    process_id,
    register_process,
    run_alive,
    spared_sandboxes,
)


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def test_process_identity_survives_pid_reuse() -> None:
    pid, start = process_id()
    assert process_alive(pid, start)
    assert not process_alive(pid, start + 1)  # same pid, another process: not ours
    assert not process_alive(_dead_pid())


def test_run_registry(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_alive(run_dir) is None  # nothing to decide from
    (run_dir).mkdir()
    (run_dir / "proc-gw0.json").write_text(json.dumps({"pid": _dead_pid(), "start": 5}))
    assert run_alive(run_dir) is False
    register_process(run_dir, "main")
    assert run_alive(run_dir) is True


def test_spared_sandboxes_are_the_kept_and_reused(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    for sandbox_id, fate in (("a", "dispose"), ("b", "kept"), ("c", "reuse"), ("d", "detach")):
        record = SandboxRecord("local", sandbox_id, {})
        run_dir.record("gw0", "created", record)
        run_dir.record("gw0", "released", record, fate=fate)
    run_dir.record("gw1", "created", SandboxRecord("local", "e", {}))
    with open(run_dir.path / "journal-gw1.jsonl", "a") as journal:
        journal.write('{"event": "released", "sandbox_id": "e", "fa')  # cut short by a kill
    assert spared_sandboxes(run_dir.path) == {"b", "c"}


def test_journal_counts_tell_recycled_sandboxes_from_created_ones(tmp_path: Path) -> None:
    """What an interrupted controller counts for workers whose summary never came."""
    run_dir = RunDir(tmp_path / "run")
    first, second = SandboxRecord("local", "a", {}), SandboxRecord("local", "b", {})
    run_dir.record("gw0", "created", first)
    run_dir.record("gw0", "created", second, recycled=True)  # a made as new, as b
    run_dir.record("gw0", "released", first, fate="dispose")
    run_dir.record("gw0", "released", second, fate="dispose")
    counts = run_dir.journal_counts(skip=set())
    assert counts == {"created": 1, "recycled": 1, "disposed": 2, "kept": 0, "reused": 0}
    assert run_dir.unreleased() == []


def test_lease_state() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    soon, later = now + datetime.timedelta(seconds=50), now + datetime.timedelta(hours=1)
    assert lease_state({"kode_lease": "60"}, soon, now) == "leased"
    assert lease_state({"kode_lease": "60"}, later, now) == "released"
    assert lease_state({}, later, now) == "unknown"
    assert lease_state({"kode_lease": "x"}, later, now) == "unknown"


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "nan", "inf"])
def test_parse_lease_rejects(raw: str) -> None:
    with pytest.raises(
        ValueError, match=f"--sandbox-lease: expected a number of seconds > 0, got '{raw}'"
    ):
        parse_lease(raw, "--sandbox-lease")


def test_bad_lease_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--sandbox-lease=never")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--sandbox-lease: expected a number of seconds > 0, got 'never'*"]
    )


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BEmulator]:
    with E2BEmulator(root_dir=tmp_path_factory.mktemp("lease-emulator")) as emu:
        yield emu
        assert emu.sandbox_ids() == []


def _end_at(emu: E2BEmulator, sandbox_id: str) -> datetime.datetime:
    (info,) = [s for s in emu.sandboxes() if s["sandbox_id"] == sandbox_id]
    end_at: datetime.datetime = info["end_at"]
    return end_at


def test_heartbeat_renews_until_discarded(emulator: E2BEmulator) -> None:
    sandbox = E2BSandbox(
        api_key=emulator.api_key, api_url=emulator.url, sandbox_url=emulator.url, lease_ms=1000
    ).init()
    heartbeat = Heartbeat(1.0)
    try:
        first_end = _end_at(emulator, sandbox.sandbox_id)
        assert (first_end - datetime.datetime.now(datetime.UTC)).total_seconds() < 1.5
        heartbeat.add(sandbox)
        time.sleep(1.6)  # past the first lease: alive only because it was renewed
        assert sandbox.is_alive()
        assert heartbeat.renewals >= 3
        heartbeat.discard(sandbox)
        time.sleep(1.5)
        emulator.expire()
        assert sandbox.sandbox_id not in emulator.sandbox_ids()
    finally:
        heartbeat.stop()
        sandbox.dispose()


def test_heartbeat_never_renews_past_the_sandbox_lifetime(emulator: E2BEmulator) -> None:
    # timeout_ms stays the lifetime on every backend: the lease only bounds a dead run's window.
    sandbox = E2BSandbox(
        api_key=emulator.api_key,
        api_url=emulator.url,
        sandbox_url=emulator.url,
        lease_ms=1000,
        timeout_ms=1800,
    ).init()
    heartbeat = Heartbeat(1.0)
    try:
        heartbeat.add(sandbox)
        time.sleep(1.2)
        assert sandbox.is_alive()  # renewed past its first lease
        time.sleep(1.8)  # past 1.8 s, give or take E2B's whole seconds
        emulator.expire()
        assert sandbox.sandbox_id not in emulator.sandbox_ids()  # not renewed past it
        assert sandbox not in heartbeat
        with pytest.raises(SandboxNotFoundError):
            sandbox.set_timeout(60_000)  # gone: a lifetime cannot be given back
    finally:
        heartbeat.stop()
        sandbox.dispose()


def test_set_timeout_moves_the_deadline_the_heartbeat_honours(emulator: E2BEmulator) -> None:
    sandbox = E2BSandbox(
        api_key=emulator.api_key,
        api_url=emulator.url,
        sandbox_url=emulator.url,
        lease_ms=1000,
        timeout_ms=1500,
    ).init()
    heartbeat = Heartbeat(1.0)
    try:
        sandbox.set_timeout(4000)
        heartbeat.add(sandbox)
        time.sleep(2.2)
        emulator.expire()
        assert sandbox.is_alive()  # past the original 1.5 s: the new lifetime counts
        assert sandbox.deadline is not None and sandbox.deadline - time.time() < 2.0
    finally:
        heartbeat.stop()
        sandbox.dispose()


def test_heartbeat_drops_a_vanished_sandbox_without_a_note(
    emulator: E2BEmulator,
) -> None:
    notes: list[str] = []
    sandbox = E2BSandbox(
        api_key=emulator.api_key, api_url=emulator.url, sandbox_url=emulator.url
    ).init()
    heartbeat = Heartbeat(60.0, notes.append)
    try:
        heartbeat.add(sandbox)
        emulator.vanish(sandbox.sandbox_id)
        heartbeat.beat()
        heartbeat.beat()
        assert sandbox not in heartbeat  # gone: nothing left to renew
        assert notes == []  # a vanished sandbox is not a heartbeat failure
    finally:
        heartbeat.stop()
        sandbox.dispose()


class _Stub:
    """A Leasable whose renewal can be made to stall (a hung request)."""

    backend = "e2b"
    deadline = None
    disposed = False

    def __init__(self, name: str, stall: threading.Event | None = None) -> None:
        self.sandbox_id = name
        self.renewed = threading.Event()
        self._stall = stall

    def lease(self, lease_ms: int) -> None:
        if self._stall is not None:
            self._stall.wait(30)
        self.renewed.set()


def test_one_stalled_renewal_holds_up_no_other() -> None:
    stall = threading.Event()
    stuck = _Stub("stuck", stall)
    others = [_Stub(f"ok{n}") for n in range(5)]
    heartbeat = Heartbeat(60.0)
    for sandbox in [stuck, *others]:
        heartbeat.add(sandbox)
    beat = threading.Thread(target=heartbeat.beat)
    beat.start()
    try:
        for sandbox in others:
            assert sandbox.renewed.wait(10), f"{sandbox.sandbox_id} waited for the stalled one"
        assert not stuck.renewed.is_set()
        done = threading.Event()
        # Releasing another sandbox does not wait for the stalled renewal either.
        threading.Thread(target=lambda: (heartbeat.discard(others[0]), done.set())).start()
        assert done.wait(10)
    finally:
        stall.set()
        beat.join(10)
        heartbeat.stop()
    assert stuck.renewed.is_set()
