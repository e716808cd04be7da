"""Cloud latency off the critical path: background disposal, prewarm, and their faults.

The E2B cases run real inner pytest runs with ``--sandbox-backend=e2b`` against a standalone
emulator in this process (so faults can be injected while they run and what is left can be
counted afterwards), and end by asking ``pytest-kode ls`` whether anything of theirs is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _local import have_bwrap

from pytest_kode.emulator import E2BEmulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _sdk_loaded_once() -> None:
    # Before pytester's per-test snapshot of sys.modules, which would unload the SDK after the
    # first test; protobuf's native part cannot be imported a second time.
    import e2b  # noqa: F401

    import pytest_kode.emulator._app  # noqa: F401


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[E2BEmulator]:
    with E2BEmulator(root_dir=tmp_path / "emulated") as emu:
        yield emu


@pytest.fixture
def e2b_env(
    emulator: E2BEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kode_root: Path
) -> dict[str, str]:
    """The inner runs talk to ``emulator`` as if it were E2B, with their own runs folder."""
    for name, value in emulator.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KODE_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.delenv("KODE_SANDBOX_LEASE", raising=False)
    return dict(os.environ)


def _ls(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from pytest_kode.cli import main; sys.exit(main())"]
        + ["ls", "--backend", "e2b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _nothing_left(emulator: E2BEmulator, env: dict[str, str], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while emulator.sandbox_ids() and time.monotonic() < deadline:
        emulator.expire()  # what the cloud does when a lease runs out
        time.sleep(0.1)
    assert emulator.sandbox_ids() == []
    assert "no sandboxes of pytest-kode" in _ls(env)
    assert not list(Path(env["KODE_RUNS_ROOT"]).glob("*")), "run folders left"


def _popen(pytester: pytest.Pytester, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, _ = proc.communicate(timeout=30)
            raise AssertionError(f"the inner run never got to {path.name}:\n{out}")
        time.sleep(0.02)


# -- background disposal ------------------------------------------------------------------------
def test_the_next_test_starts_while_the_last_sandbox_is_being_disposed(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # The first sandbox's disposal blocks until the second test lets it go: were disposal on
    # the critical path, the second test could never start.
    pytester.makeconftest(
        """
        import threading
        import pytest
        from pytest_kode.backends.local import LocalSandbox

        started, gate, where = threading.Event(), threading.Event(), []
        _dispose = LocalSandbox._dispose

        def held_dispose(self):
            if not started.is_set():
                where.append(threading.current_thread().name)
                started.set()
                gate.wait(60)
            _dispose(self)

        LocalSandbox._dispose = held_dispose

        @pytest.fixture
        def first_disposal():
            return started, gate, where
        """
    )
    pytester.makepyfile(
        """
        def test_first(sandbox):
            assert sandbox.exec("true").ok

        def test_second(sandbox, first_disposal):
            started, gate, where = first_disposal
            assert started.wait(30)
            assert where[0].startswith("kode-disposer"), where
            assert sandbox.exec("true").ok
            gate.set()
        """
    )
    # Without recycling: the first sandbox is disposed, not made as new for the second test.
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--no-sandbox-recycle")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "sandboxes: 2 created, 0 resumed, 0 reused, 2 disposed, 0 kept, 0 leaked*",
            "sandbox-seconds (creation to disposal, summed): local *s",
        ]
    )
    assert list(kode_root.iterdir()) == []


def test_a_capped_run_waits_for_its_own_disposals_instead_of_failing(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # With a cap of 1, each test's sandbox holds the only slot until its kill is confirmed.
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_one_at_a_time(sandbox, n):
            assert sandbox.exec("true").ok
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-max-concurrent=1", "--sandbox-prewarm=2")
    result.assert_outcomes(passed=4)
    # The one slot passes from each test's sandbox to itself made as new for the next test
    # (under bubblewrap; without it each test's sandbox is disposed and a new one created).
    made = "1 created, 3 recycled" if have_bwrap() else "4 created"
    result.stdout.fnmatch_lines(
        [f"sandboxes: {made}, 0 resumed, 0 reused, 4 disposed, 0 kept, 0 leaked*"]
    )
    assert list(kode_root.iterdir()) == []


def test_taking_a_free_slot_is_not_reported_as_waiting_for_one(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # A cap far above what the run uses: every slot is free when asked for, so the summary has
    # no wait to report (the time to take a slot used to be added up as waiting).
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(20))
        def test_uses(sandbox, n):
            assert sandbox.exec("true").ok
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-max-concurrent=100")
    result.assert_outcomes(passed=20)
    result.stdout.fnmatch_lines(["sandboxes: 20 created, *, 20 disposed, 0 kept, 0 leaked*"])
    result.stdout.no_fnmatch_line("*waiting for a free slot*")


def test_a_spare_of_another_kind_gives_its_slot_up_to_a_test(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_default(sandbox):
            assert sandbox.exec("true").ok

        @pytest.mark.sandbox(envs={"KIND": "other"})
        def test_two_of_another_kind(sandbox_factory):
            first, second = sandbox_factory(), sandbox_factory()
            assert first.exec("echo $KIND").stdout == second.exec("echo $KIND").stdout == "other\\n"
        """
    )
    # Cap 2: the first test's sandbox and its spare; the second test needs both slots.
    result = pytester.runpytest_subprocess(
        "--sandbox-max-concurrent=2", "--sandbox-prewarm=1", "-p", "no:randomly"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            # Under bubblewrap the first test's sandbox comes back made as new, a spare of the
            # default kind that holds a slot: it gives it up too.
            (
                "sandboxes: 4 created, 1 recycled, 0 resumed, 0 reused, 5 disposed, 0 kept*"
                if have_bwrap()
                else "sandboxes: 4 created, 0 resumed, 0 reused, 4 disposed, 0 kept*"
            ),
            "prewarm 1: 0 of 3 function-scope sandboxes were made ahead of need, *; "
            f"{2 if have_bwrap() else 1} spare(s) disposed unused",
        ]
    )
    assert list(kode_root.iterdir()) == []


def test_a_kill_that_fails_is_reported_and_the_lease_ends_the_sandbox(
    pytester: pytest.Pytester, emulator: E2BEmulator, e2b_env: dict[str, str]
) -> None:
    pytester.makepyfile(
        """
        def test_uses(sandbox):
            assert sandbox.exec("true").ok
        """
    )
    emulator.fail_next_kills(100)
    result = pytester.runpytest_subprocess("--sandbox-backend=e2b", "--sandbox-lease=1")
    emulator.clear_faults()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "sandboxes: 1 created, 0 resumed, 0 reused, 0 disposed, 0 kept, 1 leaked*",
            "could not dispose sandbox * (e2b): *; it ends by itself within its 1s lease, or "
            "`pytest-kode gc` disposes it now",
        ]
    )
    _nothing_left(emulator, e2b_env)


# -- prewarm ------------------------------------------------------------------------------------
SUITE = """
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_uses(sandbox, n):
    assert not sandbox.fs.exists("previous")
    sandbox.fs.write("previous", str(n))
    assert sandbox.exec("true").ok
"""


def test_creates_refused_while_prewarming_leave_the_suite_green(
    pytester: pytest.Pytester, emulator: E2BEmulator, e2b_env: dict[str, str]
) -> None:
    pytester.makepyfile(SUITE.format(n=6))
    emulator.fail_next_creates(3, status=503)
    result = pytester.runpytest_subprocess("--sandbox-backend=e2b", "--sandbox-prewarm=3")
    result.assert_outcomes(passed=6)
    assert emulator.calls["create"] >= 6 + 3
    result.stdout.fnmatch_lines(
        ["sandboxes: 6 created, 0 resumed, 0 reused, 6 disposed, 0 kept, 0 leaked*"]
    )
    _nothing_left(emulator, e2b_env)


def test_a_spare_that_vanished_while_waiting_is_replaced(
    pytester: pytest.Pytester, emulator: E2BEmulator, e2b_env: dict[str, str], tmp_path: Path
) -> None:
    signals = tmp_path / "signals"
    signals.mkdir()
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import pathlib, time
            import pytest

            SIGNALS = pathlib.Path({str(signals)!r})

            @pytest.mark.parametrize("n", range(4))
            def test_uses(sandbox, n):
                if n == 0:
                    (SIGNALS / "holding").touch()
                    while not (SIGNALS / "vanished").exists():
                        time.sleep(0.02)
                    time.sleep(2.5)  # the spares have waited long enough to be checked
                assert sandbox.exec("true").ok
            """
        )
    )
    proc = _popen(pytester, "--sandbox-backend=e2b", "--sandbox-prewarm=2")
    _wait_for(signals / "holding", proc)
    deadline = time.monotonic() + 30
    spares: list[str] = []
    while len(spares) < 2 and time.monotonic() < deadline:
        spares = [
            s["sandbox_id"]
            for s in emulator.sandboxes()
            if s["metadata"].get("kode_test") == "prewarm"
        ]
        time.sleep(0.05)
    assert len(spares) == 2, emulator.sandboxes()
    for sandbox_id in spares:
        emulator.vanish(sandbox_id)
    (signals / "vanished").touch()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "4 passed" in out
    assert "2 spare(s) lost" in out, out
    _nothing_left(emulator, e2b_env)


def test_ctrl_c_while_spares_are_being_created_leaves_nothing(
    pytester: pytest.Pytester, emulator: E2BEmulator, e2b_env: dict[str, str], tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import pathlib, time
            import pytest

            @pytest.mark.parametrize("n", range(6))
            def test_uses(sandbox, n):
                if n == 1:  # its spare was ready; the one that replaces it is on its way
                    pathlib.Path({str(ready)!r}).touch()
                    time.sleep(60)
            """
        )
    )
    emulator.create_latency_ms = 1500  # spares still being created when the signal comes
    proc = _popen(pytester, "--sandbox-backend=e2b", "--sandbox-prewarm=3")
    try:
        _wait_for(ready, proc)
        # The first test's own, three spares, and the one that tops the pool up again (its
        # request may still be on its way).
        deadline = time.monotonic() + 10
        while emulator.calls["create"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emulator.calls["create"] == 5
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "KeyboardInterrupt" in out, out
    assert "0 leaked" in out, out
    _nothing_left(emulator, e2b_env)


def test_the_summary_suggests_prewarm_when_tests_mostly_wait_for_sandboxes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, kode_root: Path
) -> None:
    monkeypatch.setenv("KODE_EMULATOR_CREATE_LATENCY_MS", "400")
    pytester.makepyfile(SUITE.format(n=6))
    # On pro, six creates fit the plan's burst: the wait is the creates' own, which prewarm hides.
    pytester.makeini("[pytest]\nsandbox_plan = pro\n")
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        [
            "sandbox-seconds (creation to disposal, summed): emulator *s",
            "tests waited *s (*% of the run) for new sandboxes (about *s to create each); try "
            "--sandbox-prewarm * to create them ahead of need",
        ]
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator", "--sandbox-prewarm=3")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        [
            "prewarm 3: 5 of 6 function-scope sandboxes were made ahead of need, hiding *s of "
            "provisioning; 0 spare(s) disposed unused"
        ]
    )


def test_the_summary_says_when_the_plans_create_rate_bounds_the_run(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # Hobby creates 1 sandbox/s (burst 2): eight function-scope tests take 6 s or more whatever
    # the prewarm, so the summary says what does help instead of suggesting more prewarm.
    pytester.makepyfile(SUITE.format(n=8))
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator", "--sandbox-prewarm=2")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(
        [
            "tests waited *s for new sandboxes, paced to the E2B hobby plan's create rate (1/s): 8 "
            "sandboxes take at least 6.3s to create however many are prewarmed; share sandboxes "
            'between tests (@pytest.mark.sandbox(scope="module"), worker_sandbox), or '
            "--sandbox-plan pro if your team is on E2B's pro plan (5/s)"
        ]
    )
    result.stdout.no_fnmatch_line("*try --sandbox-prewarm*")


def test_a_plan_capped_suite_of_more_tests_than_the_cap_gives_each_slot_back(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # E2B sandboxes count against the plan's concurrency limit even without
    # --sandbox-max-concurrent; each function-scope sandbox's slot must come back once its kill
    # is confirmed, or the run refuses the test after the cap's worth. A plan of 2 at once
    # (and no create rate, to keep the run short) stands in for hobby's 20.
    pytester.makeconftest(
        """
        import pytest_kode.plans as plans

        plans.PLANS["hobby"] = plans.PLANS["hobby"].replace(max_concurrent=2, create_rate=None)
        """
    )
    pytester.makepyfile(SUITE.format(n=5))
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator", "--sandbox-prewarm=1")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        ["sandboxes: * created, 0 resumed, 0 reused, * disposed, 0 kept, 0 leaked*"]
    )


def test_an_emulator_run_has_its_watchdog_before_its_first_sandbox(
    pytester: pytest.Pytester, kode_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started in the background at configure (starting it costs a new interpreter), so the first
    # test does not wait for it; the run still removes everything at its end, and a run that
    # only collects starts nothing.
    runs = tmp_path / "runs"
    monkeypatch.setenv("KODE_RUNS_ROOT", str(runs))
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import os, pathlib, time

            def test_before_any_sandbox():
                deadline = time.monotonic() + float(os.environ.get("WATCHDOG_WITHIN_S", "30"))
                while not list(pathlib.Path({str(runs)!r}).glob("*/watchdog.json")):
                    assert time.monotonic() < deadline, "no watchdog for the run"
                    time.sleep(0.02)

            def test_uses(sandbox):
                assert sandbox.exec("true").ok
            """
        )
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["sandboxes: 1 created, *, 1 disposed, 0 kept, 0 leaked*"])
    assert list(runs.iterdir()) == []
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator", "--collect-only")
    assert result.ret == pytest.ExitCode.OK
    assert list(runs.iterdir()) == []
    # A local run starts its watchdog with its first sandbox: none here.
    monkeypatch.setenv("WATCHDOG_WITHIN_S", "2")
    result = pytester.runpytest_subprocess("-k", "before_any", "-p", "no:randomly")
    result.assert_outcomes(failed=1)
