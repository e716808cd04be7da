"""Local sandboxes end at their ``timeout_ms`` deadline (SPEC 2.1), as E2B sandboxes do: the
object refuses work past it, and under pytest the run's watchdog kills and removes the sandbox
while the run still lives. Short lifetimes (1-1.5 s) keep these tests fast."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_kode.backends.local import (
    Isolation,
    LocalSandbox,
    remove_local_sandbox,
)
from pytest_kode.errors import SandboxNotFoundError
from pytest_kode.lifecycle.watchdog import reap_expired

pytestmark = pytest.mark.usefixtures("no_leaked_children")


def _make(isolation: str, root: Path, **fields: Any) -> LocalSandbox:
    return LocalSandbox(isolation=cast(Isolation, isolation), root_dir=root, **fields).init()


def _sleep_past(deadline: float | None, margin: float = 0.05) -> None:
    assert deadline is not None
    time.sleep(max(0.0, deadline - time.time()) + margin)


def _unique_sleep() -> str:
    # A sleep duration no other process uses, so /proc can tell ours apart.
    return f"{600 + (time.monotonic_ns() % 100_000) / 1000:.3f}"


def _procs_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                if marker.encode() in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def _wait_until(condition: Any, within: float = 3.0) -> bool:
    give_up = time.monotonic() + within
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.02)
    return True


# -- the object itself (also without pytest: no watchdog) ------------------------------------
def test_operations_past_the_deadline_raise_not_found(isolation: str, root: Path) -> None:
    sb = _make(isolation, root, timeout_ms=1000)
    try:
        assert sb.exec("echo hi").stdout == "hi\n"
        assert sb.is_alive()
        _sleep_past(sb.deadline)
        assert not sb.is_alive()
        with pytest.raises(SandboxNotFoundError) as caught:
            sb.exec("true")
        message = str(caught.value)
        assert sb.sandbox_id in caught.value.message
        assert "timeout_ms lifetime (1000 ms) ended" in message
        assert "set_timeout" in message and "larger timeout_ms" in message
        with pytest.raises(SandboxNotFoundError):
            sb.start("sleep 1")
        with pytest.raises(SandboxNotFoundError):
            sb.fs.read("anything")
        with pytest.raises(SandboxNotFoundError):
            sb.set_timeout(60_000)  # an ended sandbox cannot be revived
        # Nobody removed it (no watchdog here): it waits for dispose().
        assert sb.directory.is_dir() and sb.metadata_path.is_file()
    finally:
        sb.dispose()


def test_set_timeout_moves_the_deadline_on(isolation: str, root: Path) -> None:
    with LocalSandbox(isolation=cast(Isolation, isolation), root_dir=root, timeout_ms=1000) as sb:
        first = sb.deadline
        assert first is not None
        sb.set_timeout(1600)
        assert sb.deadline is not None and sb.deadline >= first + 0.5
        # What the watchdog reads is the new deadline.
        assert json.loads(sb.metadata_path.read_text())["deadline"] == sb.deadline
        _sleep_past(first, margin=0.1)
        assert sb.is_alive()
        assert sb.exec("echo still").stdout == "still\n"
        _sleep_past(sb.deadline)
        with pytest.raises(SandboxNotFoundError, match=r"\(1600 ms\) ended"):
            sb.exec("true")


def test_an_extension_by_another_object_of_the_sandbox_counts(root: Path) -> None:
    """xdist workers share a session sandbox, each through its own object: one worker's
    set_timeout (here: a connect, which re-applies timeout_ms) keeps it alive for all."""
    with LocalSandbox(isolation="none", root_dir=root, timeout_ms=1000) as owner:
        other = LocalSandbox(
            isolation="none", root_dir=root, sandbox_id=owner.sandbox_id, timeout_ms=3000
        ).init()
        other.detach()
        first = owner.deadline
        _sleep_past(first)
        assert owner.exec("true").ok
        assert owner.deadline is not None and first is not None and owner.deadline > first + 1.5


# -- the watchdog's enforcement --------------------------------------------------------------
def test_reap_expired_ends_only_the_runs_expired_sandboxes(
    isolation: str, root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run-abc123"
    ours = {"kode_run": run_dir.name}
    marker = _unique_sleep()
    expiring = _make(isolation, root, timeout_ms=1000, metadata=ours)
    extended = _make(isolation, root, timeout_ms=1000, metadata=ours)
    foreign = _make(isolation, root, timeout_ms=1000, metadata={"kode_run": "run-other"})
    try:
        extended.set_timeout(30_000)
        background = expiring.start(f"sleep {marker}")
        assert _wait_until(lambda: _procs_with(marker))
        assert reap_expired(run_dir, [root]) == []  # nothing is due yet
        outcome: list[BaseException | str] = []

        def in_flight() -> None:
            try:
                outcome.append(expiring.exec("sleep 30").stdout)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        worker = threading.Thread(target=in_flight)
        worker.start()
        _sleep_past(expiring.deadline)
        assert reap_expired(run_dir, [root]) == [expiring.sandbox_id]
        assert not expiring.directory.exists() and not expiring.metadata_path.exists()
        assert not (root / f".{expiring.sandbox_id}.tmp").exists()
        assert _wait_until(lambda: not _procs_with(marker)), "the background process survived"
        assert _wait_until(lambda: not background.is_running())
        worker.join(timeout=5)
        assert len(outcome) == 1 and isinstance(outcome[0], SandboxNotFoundError), outcome
        # The extended one and another run's (expired) one are not this run's to reap.
        assert extended.exec("true").ok
        assert foreign.directory.is_dir()
    finally:
        for sandbox in (expiring, extended, foreign):
            sandbox.dispose()


# -- end to end: a pytest run whose sandbox outlives its timeout_ms --------------------------
INNER = """
import os, time
import pytest
from pytest_kode.errors import SandboxNotFoundError

MARKER = {marker!r}


def _sleepers():
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{{name}}/cmdline", "rb") as handle:
                if MARKER.encode() in handle.read().split(b"\\0"):
                    found.append(name)
        except OSError:
            continue
    return found


@pytest.mark.sandbox(timeout_ms=1500)
def test_a_kept_sandbox_gets_its_long_lifetime(sandbox):
    assert False, "fails, so --sandbox-keep-failed keeps the sandbox"


def test_reaped_at_the_deadline_while_the_run_lives(sandbox_factory):
    doomed = sandbox_factory(timeout_ms=1500)
    extended = sandbox_factory(timeout_ms=1500)
    extended.set_timeout(10_000)
    doomed.start("sleep " + MARKER)
    give_up = time.time() + 3
    while not _sleepers() and time.time() < give_up:
        time.sleep(0.02)
    assert _sleepers()
    directory, deadline = doomed.directory, doomed.deadline
    give_up = deadline + 4
    while (directory.exists() or _sleepers()) and time.time() < give_up:
        time.sleep(0.02)
    assert time.time() >= deadline
    assert not directory.exists(), "the watchdog left the expired sandbox"
    assert not _sleepers(), "its background process outlived it"
    assert not doomed.is_alive()
    with pytest.raises(SandboxNotFoundError, match="timeout_ms lifetime"):
        doomed.exec("true")
    assert extended.exec("true").ok and extended.directory.is_dir()
"""


@pytest.mark.slow
def test_the_watchdog_reaps_an_expired_sandbox_while_the_run_lives(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kode_root = tmp_path / "kode-root"
    runs_root = tmp_path / "runs"
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(kode_root))
    monkeypatch.setenv("KODE_RUNS_ROOT", str(runs_root))
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.delenv("KODE_SANDBOX_BACKEND", raising=False)
    marker = _unique_sleep()
    pytester.makepyfile(INNER.format(marker=marker))
    result = pytester.runpytest_subprocess("--sandbox-keep-failed", "--sandbox-prewarm=0")
    try:
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*3 created, 0 resumed, 0 reused, 2 disposed, 1 kept*"])
        # The kept sandbox outlived its 1.5 s by the other test's ~2 s: its deadline was moved.
        kept = [path for path in kode_root.iterdir() if path.is_dir() and path.name[0] != "."]
        assert len(kept) == 1
        meta = json.loads(kept[0].with_name(f"{kept[0].name}.json").read_text())
        assert meta["deadline"] > time.time() + 3000
    finally:
        for path in kode_root.glob("local-*.json"):
            remove_local_sandbox(path.stem, kode_root)
    assert not _procs_with(marker)
    assert list(kode_root.iterdir()) == []
