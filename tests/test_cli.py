"""``pytest-kode ls / gc / emulator``: real local sandboxes, real dead processes, the real SDK
against the loopback emulator. A dead run is made by a real subprocess that creates sandboxes and
exits without disposing them; a live run is this test process, registered in the run registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kode.backends.e2b import E2BSandbox
from pytest_kode.backends.local import LocalSandbox
from pytest_kode.cli import main, parse_duration
from pytest_kode.emulator import E2BEmulator
from pytest_kode.lifecycle.idcache import CACHE_SUBDIR, IdCache
from pytest_kode.lifecycle.watchdog import register_process

_REPO = Path(__file__).resolve().parents[1]


def _tags(run: str, test: str, **extra: str) -> dict[str, str]:
    return {
        "kode_run": run,
        "kode_worker": "main",
        "kode_test": test,
        "kode_created": "2020-01-01T00:00:00+00:00",
        "kode_heartbeat": "2020-01-01T00:00:00+00:00",
        **extra,
    }


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    local_root, runs_root = tmp_path / "local", tmp_path / "runs"
    local_root.mkdir()
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(local_root))
    monkeypatch.setenv("KODE_RUNS_ROOT", str(runs_root))
    for name in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL"):
        monkeypatch.delenv(name, raising=False)
    return local_root, runs_root


def _dead_run_leaves(root: Path, sandboxes: list[dict[str, Any]]) -> list[str]:
    """A real process creates local sandboxes with ``metadata`` and dies without disposing."""
    script = textwrap.dedent(
        f"""
        import json, os, sys
        from pytest_kode.backends.local import LocalSandbox
        ids = [LocalSandbox(root_dir={str(root)!r}, **spec).init().sandbox_id
               for spec in json.loads(sys.argv[1])]
        print(json.dumps(ids), flush=True)
        os._exit(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sandboxes)],
        capture_output=True,
        text=True,
        check=True,
        cwd=_REPO,
        timeout=60,
    )
    ids: list[str] = json.loads(done.stdout)
    return ids


@pytest.fixture
def live(roots: tuple[Path, Path]) -> Iterator[list[LocalSandbox]]:
    """Sandboxes of a live run: this process, registered under run ``liverun``."""
    made: list[LocalSandbox] = []
    register_process(roots[1] / "liverun", "main")
    yield made
    for sandbox in made:
        sandbox.dispose()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def test_parse_duration() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("1.5m") == 90
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    with pytest.raises(ValueError, match="invalid duration '2 weeks'"):
        parse_duration("2 weeks")


def test_bad_older_than_is_a_usage_error(
    roots: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["gc", "--older-than", "soon"])
    assert exit_info.value.code == 2
    assert "invalid duration 'soon'" in capsys.readouterr().err


def test_ls_and_gc_local(
    roots: tuple[Path, Path], live: list[LocalSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    local_root, runs_root = roots
    dead, untagged, reused = _dead_run_leaves(
        local_root,
        [
            {"metadata": _tags("deadrun", "t.py::test_dead")},
            {"metadata": {"owner": "someone else"}},
            {"metadata": _tags("deadrun", "t.py::test_reused", kode_reuse="1")},
        ],
    )
    mine = LocalSandbox(root_dir=local_root, metadata=_tags("liverun", "t.py::test_live")).init()
    live.append(mine)
    # Another checkout's live run, whose registry is elsewhere: its creating process (us) lives.
    other = LocalSandbox(root_dir=local_root, metadata=_tags("otherrun", "o.py::test")).init()
    live.append(other)

    code, out = _run(["ls", "--backend", "local"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("local isolation: ")  # which isolation new sandboxes get here
    lines = [line for line in lines[1:] if not line.startswith("  ")]
    assert lines[0].split() == [
        "BACKEND",
        "SANDBOX",
        "RUN",
        "WORKER",
        "TEST",
        "AGE",
        "RUN",
        "ALIVE",
    ]
    rows = {line.split()[1]: line for line in lines[1:]}
    assert set(rows) == {dead, reused, mine.sandbox_id, other.sandbox_id}  # untagged: not listed
    assert rows[dead].split()[2:5] == ["deadrun", "main", "t.py::test_dead"]
    assert rows[dead].rstrip().endswith(" no")
    assert rows[reused].rstrip().endswith("no (reused)")
    assert rows[mine.sandbox_id].rstrip().endswith(" yes")
    assert rows[other.sandbox_id].rstrip().endswith(" yes")

    code, out = _run(["gc", "--backend", "local", "--dry-run"], capsys)
    assert code == 0
    assert f"would dispose local sandbox {dead} (run deadrun" in out
    assert "1 would dispose, 2 left alone" in out
    assert (local_root / dead).is_dir()

    # Just made: younger than an hour, so spared; the run's death alone does not date it.
    _run(["gc", "--backend", "local", "--older-than", "1h"], capsys)
    assert (local_root / dead).is_dir()

    code, out = _run(["gc", "--backend", "local"], capsys)
    assert code == 0
    assert f"disposed local sandbox {dead}" in out
    left = sorted(os.listdir(local_root))
    assert dead not in left and f"{dead}.json" not in left
    for kept in (untagged, reused, mine.sandbox_id, other.sandbox_id):
        assert kept in left
    assert mine.exec("echo still here").stdout == "still here\n"

    _run(["gc", "--backend", "local", "--include-reused"], capsys)
    assert reused not in os.listdir(local_root)
    assert untagged in os.listdir(local_root)
    LocalSandbox(root_dir=local_root, sandbox_id=untagged).init().dispose()


def test_gc_prunes_dead_run_folders_only(
    roots: tuple[Path, Path], live: list[LocalSandbox], capsys: pytest.CaptureFixture[str]
) -> None:
    _, runs_root = roots
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (runs_root / "deadrun").mkdir(parents=True)
    (runs_root / "deadrun" / "proc-main.json").write_text(
        json.dumps({"pid": int(gone.stdout), "start": 1})
    )
    _run(["gc", "--backend", "local"], capsys)
    assert sorted(os.listdir(runs_root)) == ["liverun"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BEmulator]:
    root = tmp_path_factory.mktemp("cli-emulator")
    with E2BEmulator(root_dir=root) as emu:
        yield emu
    assert os.listdir(root) == []


def _e2b(emu: E2BEmulator, metadata: dict[str, str], lease_ms: int | None = None) -> E2BSandbox:
    sandbox = E2BSandbox(
        api_key=emu.api_key,
        api_url=emu.url,
        sandbox_url=emu.url,
        metadata=metadata,
        timeout_ms=300_000,
        lease_ms=lease_ms,
    )
    return sandbox.init()


def test_ls_and_gc_e2b_through_the_emulator(
    roots: tuple[Path, Path],
    live: list[LocalSandbox],
    emulator: E2BEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("E2B_API_KEY", emulator.api_key)
    _, runs_root = roots
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (runs_root / "deadrun").mkdir(parents=True)
    (runs_root / "deadrun" / "proc-main.json").write_text(
        json.dumps({"pid": int(gone.stdout), "start": 1})
    )
    # The cloud's clock runs 10 minutes ahead of this machine's: times must be read on its.
    emulator.clock_offset_s = 600
    leased = _e2b(emulator, _tags("otherrun", "a::on_lease", kode_lease="60"), lease_ms=120_000)
    dead = _e2b(emulator, _tags("deadrun", "a::dead", kode_lease="60"), lease_ms=120_000)
    # Given 300 s on a 2 s lease and not for reuse: kept after a failure.
    kept = _e2b(emulator, _tags("otherrun", "a::kept", kode_lease="2"))
    reused = _e2b(emulator, _tags("otherrun", "a::reused", kode_lease="2", kode_reuse="1"))
    untagged = _e2b(emulator, {"owner": "not the plugin"})
    # Beyond its lease, but its run is alive on this machine (the registry says so).
    kept_live = _e2b(emulator, _tags("liverun", "a::kept_live", kode_lease="2"))
    made = [leased, dead, kept, reused, untagged, kept_live]
    argv = ["--backend", "e2b", "--api-url", emulator.url, "--sandbox-url", emulator.url]
    try:
        # Just made: younger than a lease, so nothing is disposed, whatever its run.
        code, out = _run(["gc", "--dry-run", "--include-reused", *argv], capsys)
        assert code == 0 and "0 would dispose" in out, out
        emulator.clock_offset_s = 690  # 90 s on, by the cloud's clock only
        code, out = _run(["ls", *argv], capsys)
        assert code == 0
        rows = {line.split()[1]: line.rstrip() for line in out.splitlines()[1:]}
        assert set(rows) == {s.sandbox_id for s in made if s is not untagged}
        assert rows[leased.sandbox_id].endswith(" yes")  # 30 s left of a 60 s lease
        assert rows[dead.sandbox_id].endswith(" no")
        assert "no (kept until " in rows[kept.sandbox_id]
        assert rows[reused.sandbox_id].endswith("no (reused)")
        assert rows[kept_live.sandbox_id].endswith(" yes")

        code, out = _run(["gc", "--dry-run", *argv], capsys)
        assert "1 would dispose" in out and dead.sandbox_id in out, out
        assert len(emulator.sandbox_ids()) == 6

        code, out = _run(["gc", *argv], capsys)
        assert code == 0, out
        assert sorted(emulator.sandbox_ids()) == sorted(s.sandbox_id for s in made if s is not dead)
        _run(["gc", "--include-reused", *argv], capsys)
        assert reused.sandbox_id not in emulator.sandbox_ids()
        assert kept.sandbox_id in emulator.sandbox_ids()
    finally:
        emulator.clock_offset_s = 0
        for sandbox in made:
            sandbox.dispose()


def test_paused_sandboxes_are_released_only_when_their_run_is_dead(
    roots: tuple[Path, Path],
    live: list[LocalSandbox],
    emulator: E2BEmulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from e2b import Sandbox

    monkeypatch.setenv("E2B_API_KEY", emulator.api_key)
    api = {"api_key": emulator.api_key, "api_url": emulator.url, "sandbox_url": emulator.url}
    live_one = Sandbox.create(metadata=_tags("liverun", "a::paused_live", kode_lease="60"), **api)
    elsewhere = Sandbox.create(metadata=_tags("farrun", "a::paused_far", kode_lease="60"), **api)
    for sandbox in (live_one, elsewhere):
        sandbox.beta_pause()
    argv = ["--backend", "e2b", "--api-url", emulator.url, "--sandbox-url", emulator.url]
    try:
        emulator.clock_offset_s = 120
        code, out = _run(["gc", *argv], capsys)
        assert code == 0 and "0 disposed" in out, out
        assert {live_one.sandbox_id, elsewhere.sandbox_id} <= set(emulator.sandbox_ids())
        # Its run (this process) ends: now it is released, and gc kills it by id, unresumed.
        (roots[1] / "liverun" / "proc-main.json").write_text(json.dumps({"pid": 1, "start": 1}))
        resumes = emulator.calls["connect"] + emulator.calls["resume"]
        code, out = _run(["gc", *argv], capsys)
        assert f"disposed e2b sandbox {live_one.sandbox_id}" in out, out
        assert live_one.sandbox_id not in emulator.sandbox_ids()
        assert elsewhere.sandbox_id in emulator.sandbox_ids()
        assert emulator.calls["connect"] + emulator.calls["resume"] == resumes
    finally:
        emulator.clock_offset_s = 0
        for sandbox in (live_one, elsewhere):
            Sandbox.kill(sandbox.sandbox_id, **api)


def test_e2b_without_a_key_is_skipped_with_a_note(
    roots: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _run(["ls", "--backend", "e2b"], capsys)
    assert code == 0
    assert "e2b: skipped (E2B_API_KEY is not set)" in out


def test_gc_cached_disposes_the_reuse_cache_and_empties_it(
    roots: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local_root, _ = roots
    project = tmp_path / "project"
    cache = IdCache(project / ".pytest_cache" / "d" / CACHE_SUBDIR)
    (cached,) = _dead_run_leaves(local_root, [{"metadata": _tags("r1", "w", kode_reuse="1")}])
    cache.set("local|abc|worker|gw0", {"backend": "local", "sandbox_id": cached, "options": {}})
    cache.set(
        "emulator|abc|session|session", {"backend": "emulator", "sandbox_id": "x", "options": {}}
    )

    code, out = _run(["gc", "--cached", "--dry-run", "--rootdir", str(project)], capsys)
    assert code == 0
    assert f"would dispose local sandbox {cached}" in out
    assert (local_root / cached).is_dir() and len(cache.items()) == 2

    code, out = _run(["gc", "--cached", "--rootdir", str(project)], capsys)
    assert code == 0, out
    assert f"disposed local sandbox {cached}" in out
    assert not (local_root / cached).exists()
    assert cache.items() == {}
    code, out = _run(["gc", "--cached", "--rootdir", str(project)], capsys)
    assert "is empty" in out


def test_emulator_command_serves_until_sigterm(roots: tuple[Path, Path]) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pytest_kode.cli import main; sys.exit(main())",
            "emulator",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=_REPO,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("export E2B_API_URL=http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        if proc.stdout is not None:
            proc.stdout.close()
