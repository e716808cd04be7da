"""Across workers and runs: session sandboxes under xdist, resume from cached ids, the live cap.

Real ``-n`` runs in subprocesses; creations are counted by the run's own summary (which the
controller sums over its workers) and leaks by the local backend's folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_kode import LocalSandbox

pytestmark = pytest.mark.slow


def _counts(result: pytest.RunResult) -> dict[str, int]:
    line = next(ln for ln in result.stdout.lines if ln.startswith("sandboxes: "))
    return {
        name: int(n)
        for n, name in re.findall(r"(\d+) (created|resumed|reused|disposed|kept|leaked)", line)
    }


def _dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


MANY_TESTS = """
import os
import pytest

@pytest.mark.parametrize("n", range(12))
def test_session(session_sandbox, worker_sandbox, n):
    session_sandbox.fs.write(f"seen/{os.environ['PYTEST_XDIST_WORKER']}-{n}", "")
    worker_sandbox.fs.write(f"mine/{n}", "")
    assert session_sandbox is not worker_sandbox
"""


def test_session_sandbox_is_created_once_and_worker_sandboxes_once_per_worker(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(MANY_TESTS)
    pytester.makepyfile(
        test_zlast="""
        def test_everyone_wrote_into_the_one_session_sandbox(session_sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "4", "-p", "no:randomly")
    result.assert_outcomes(passed=13)
    counts = _counts(result)
    # 1 session sandbox + 1 worker sandbox per worker (4); the other workers connect by id.
    assert counts["created"] == 5, result.stdout.str()
    # Connecting to a sandbox of this very run is not a resume (that is for --sandbox-reuse).
    assert counts["resumed"] == 0
    assert counts["leaked"] == 0
    assert _dirs(kode_root) == []


def test_session_sandbox_sees_every_workers_writes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_write="""
        import os, pytest

        @pytest.mark.parametrize("n", range(8))
        def test_write(session_sandbox, n):
            session_sandbox.fs.write(f"from/{os.environ['PYTEST_XDIST_WORKER']}", "")
        """,
        test_zz_read="""
        import time

        def test_read(session_sandbox):
            # Both workers had tests, so both wrote into the same (one) sandbox.
            deadline = time.monotonic() + 10
            while len(session_sandbox.fs.list("from")) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        """,
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=9)
    assert _counts(result)["created"] == 1


def test_session_sandbox_on_the_emulator_is_created_once(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MANY_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "--sandbox-backend=emulator")
    result.assert_outcomes(passed=12)
    counts = _counts(result)
    assert counts["created"] == 3 and counts["resumed"] == 0 and counts["disposed"] == 3


def test_a_crashed_worker_leaves_nothing_alive(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.parametrize("n", range(6))
        def test_work(session_sandbox, worker_sandbox, sandbox, n):
            sandbox.start("sleep 600")
            if n == 3:
                os._exit(1)  # the worker dies mid-test, its sandboxes still open
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.stdout.fnmatch_lines(["*worker*crashed*"])
    assert _dirs(kode_root) == []


CACHED_RUN = """
import pytest

@pytest.mark.parametrize("n", range(3))
def test_reused(session_sandbox, worker_sandbox, n):
    print("RESUMED", session_sandbox.resumed, worker_sandbox.resumed)
    if not session_sandbox.fs.exists("expensive-setup-done"):
        session_sandbox.fs.write("expensive-setup-done", "yes")
"""


def _cache(pytester: pytest.Pytester) -> dict[str, dict[str, object]]:
    path = pytester.path / ".pytest_cache" / "d" / "kode" / "reuse.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _dispose_cached(pytester: pytest.Pytester) -> None:
    for entry in _cache(pytester).values():
        try:
            LocalSandbox(sandbox_id=str(entry["sandbox_id"])).init().dispose()
        except Exception:
            pass


def test_reuse_creates_once_and_resumes_next_run(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(CACHED_RUN)
    try:
        first = pytester.runpytest_subprocess("--sandbox-reuse", "-s")
        first.assert_outcomes(passed=3)
        # without xdist the worker is the session: one sandbox, kept for the next run
        assert _counts(first) | {} == {**_counts(first), "created": 1, "reused": 1, "disposed": 0}
        assert len(_dirs(kode_root)) > 0
        cached = _cache(pytester)
        assert len(cached) == 1 and "|session|session" in next(iter(cached))

        second = pytester.runpytest_subprocess("--sandbox-reuse", "-s")
        second.assert_outcomes(passed=3)
        assert _counts(second)["created"] == 0 and _counts(second)["resumed"] == 1
        second.stdout.fnmatch_lines(["*RESUMED True True*"])
        assert _cache(pytester) == cached
    finally:
        _dispose_cached(pytester)
    assert _dirs(kode_root) == []


def test_reuse_replaces_a_stale_cached_id(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(CACHED_RUN)
    try:
        pytester.runpytest_subprocess("--sandbox-reuse").assert_outcomes(passed=3)
        _dispose_cached(pytester)  # the sandbox dies between runs
        stale = _cache(pytester)
        second = pytester.runpytest_subprocess("--sandbox-reuse", "-s")
        second.assert_outcomes(passed=3)
        assert _counts(second)["created"] == 1 and _counts(second)["resumed"] == 0
        second.stdout.fnmatch_lines(["*RESUMED False False*"])
        fresh = _cache(pytester)
        assert fresh.keys() == stale.keys() and fresh != stale
    finally:
        _dispose_cached(pytester)
    assert _dirs(kode_root) == []


def test_reuse_under_xdist_keeps_one_session_and_one_per_worker(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(MANY_TESTS)
    try:
        first = pytester.runpytest_subprocess("-n", "2", "--sandbox-reuse")
        first.assert_outcomes(passed=12)
        assert _counts(first)["created"] == 3
        assert len(_cache(pytester)) == 3
        second = pytester.runpytest_subprocess("-n", "2", "--sandbox-reuse")
        second.assert_outcomes(passed=12)
        assert _counts(second)["created"] == 0
    finally:
        _dispose_cached(pytester)
    assert _dirs(kode_root) == []


def test_a_corrupt_cache_is_a_note_not_a_crash(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(CACHED_RUN)
    cache = pytester.path / ".pytest_cache" / "d" / "kode"
    cache.mkdir(parents=True)
    (cache / "reuse.json").write_text("{not json")
    try:
        result = pytester.runpytest_subprocess("--sandbox-reuse")
        result.assert_outcomes(passed=3)
        result.stdout.fnmatch_lines(["*the sandbox id cache *reuse.json is corrupt*"])
        assert len(_cache(pytester)) == 1
    finally:
        _dispose_cached(pytester)


def test_reuse_needs_a_shared_scope(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(reuse=True)
        def test_x(sandbox):
            pass
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        ["*test_x: @pytest.mark.sandbox(reuse=True) keeps a shared sandbox*scope='function'*"]
    )


def test_max_concurrent_caps_live_sandboxes_across_workers(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        f"""
        import os, time, pytest

        @pytest.mark.parametrize("n", range(8))
        def test_hold(sandbox, n):
            live = [p for p in os.listdir({str(kode_root)!r}) if p.startswith("local-") and not p.endswith(".json")]
            time.sleep(0.3)
            assert len(live) <= 2, live
        """
    )
    result = pytester.runpytest_subprocess("-n", "4", "--sandbox-max-concurrent=2")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(
        ["*waiting for a free slot *s (--sandbox-max-concurrent / --sandbox-plan)*"]
    )
    assert _dirs(kode_root) == []


def test_max_concurrent_below_what_one_test_needs_is_a_clear_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        def test_two(sandbox, worker_sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-max-concurrent=1")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*already holds all 1 sandbox slots*raise --sandbox-max-concurrent above 1*"]
    )


def test_session_setup_in_the_created_hook_runs_once_before_other_workers_connect(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(
        """
        import time

        def pytest_kode_sandbox_created(sandbox, item):
            time.sleep(0.5)  # slow set-up: the other worker must wait for it
            sandbox.exec("echo x >> setups; echo ready > ready")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_ready(session_sandbox, n):
            assert session_sandbox.fs.read("ready") == "ready\\n"
            assert session_sandbox.fs.read("setups") == "x\\n"
        """
    )
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(passed=6)
    assert _counts(result)["created"] == 1


SHARED_THEN_FUNCTION = """
import time, pytest

def test_a_shared(session_sandbox, worker_sandbox):
    time.sleep(1)  # so both workers hold their shared sandboxes before the next test

@pytest.mark.parametrize("n", range(3))
def test_b_function(sandbox, n):
    pass
"""


def test_max_concurrent_held_by_shared_sandboxes_fails_fast_instead_of_hanging(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # One session sandbox and one worker sandbox per worker hold all 3 slots; every worker then
    # waits for a function-scope slot that no one can free (--dist each: both run every test).
    pytester.makepyfile(SHARED_THEN_FUNCTION)
    args = ("-n", "2", "--dist", "each", "-p", "no:randomly")
    result = pytester.runpytest_subprocess(*args, "--sandbox-max-concurrent", "3", timeout=300)
    # Once one worker has given up on all its tests, its shared sandboxes end and the other's
    # last tests may pass: how many error depends on timing, that some do does not.
    assert result.parseoutcomes().get("errors", 0) >= 2, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*--sandbox-max-concurrent 3 can never give this function sandbox (for *test_b_*) a "
            "slot: all 3 are held by*'s session sandbox, *'s worker sandbox, *'s worker sandbox, "
            "and every process*use --sandbox-max-concurrent 5 or more*"
        ]
    )
    assert _dirs(kode_root) == []
    # The value it names works.
    result = pytester.runpytest_subprocess(*args, "--sandbox-max-concurrent", "5", timeout=300)
    result.assert_outcomes(passed=8)


def test_a_long_wait_for_a_slot_is_reported_while_it_happens(
    pytester: pytest.Pytester, kode_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KODE_RUNS_ROOT", str(tmp_path / "runs"))
    pytester.makepyfile(
        """
        import glob, json, os, time, pytest

        def _longest_wait():
            pattern = os.path.join(os.environ["KODE_RUNS_ROOT"], "*", "slots", "wait-*")
            longest = 0.0
            for path in glob.glob(pattern):
                try:
                    with open(path) as handle:
                        longest = max(longest, time.time() - json.load(handle)["since"])
                except (OSError, ValueError, KeyError):
                    pass  # gone, or a temporary file
            return longest

        @pytest.mark.parametrize("n", range(2))
        def test_hold(sandbox, n):
            first = not os.path.exists("first")  # the second runs once the first let go
            open("first", "a").close()
            deadline = time.time() + 60
            while first and _longest_wait() < 5 and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(2 if first else 0)  # the controller looks once a second
        """
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--sandbox-max-concurrent", "1", "-p", "no:randomly", timeout=300
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "[[]sandbox slots[]] gw? waiting *s for a free slot (--sandbox-max-concurrent 1); "
            "held by gw?'s function sandbox (of *test_hold*)"
        ]
    )


def test_reuse_and_keep_failed_on_the_plugins_emulator_say_plainly_they_cannot(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        MANY_TESTS
        + """
def test_fails(sandbox):
    assert False
"""
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--sandbox-backend=emulator", "--sandbox-reuse", "--sandbox-keep-failed"
    )
    result.assert_outcomes(passed=12, failed=1)
    counts = _counts(result)
    # Nothing claimed kept or reused, and every sandbox accounted for as disposed.
    assert counts["reused"] == 0 and counts["kept"] == 0, result.stdout.str()
    assert counts["disposed"] == counts["created"] == 4
    result.stdout.fnmatch_lines(
        [
            "--sandbox-reuse / reuse=True keeps nothing on --sandbox-backend=emulator: the "
            "plugin's emulator stops when the run ends*",
            "--sandbox-keep-failed / keep_on_failure=True keeps nothing on*",
        ],
        consecutive=False,
    )
    assert "e2b sandbox connect" not in result.stdout.str()
    assert len([ln for ln in result.stdout.lines if "keeps nothing on" in ln]) == 2
