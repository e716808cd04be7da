"""The async fixtures as a user runs them: pytest-asyncio (strict, auto), anyio's plugin, none.

Each inner run uses the local backend under a private root (``kode_root``) that must be empty
when it ends: the async fixtures keep the sync ones' disposal guarantees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.usefixtures("kode_root"), pytest.mark.slow]

# One suite body, run under each async test runner: every async fixture, the factory gathered,
# a command cancelled in flight, and a sync fixture beside an async one.
SUITE = """
import asyncio, os
import pytest
from pytest_kode import assert_exec
from pytest_kode.aio import AsyncSandbox

{mark}
async def test_async_sandbox(async_sandbox):
    assert isinstance(async_sandbox, AsyncSandbox)
    assert_exec(await async_sandbox.exec("echo hi")).succeeded().stdout_equals("hi\\n")
    await async_sandbox.fs.write("f.txt", "x")
    assert await async_sandbox.fs.read("f.txt") == "x"

{mark}
async def test_factory_gathers(async_sandbox_factory):
    boxes = await asyncio.gather(*(async_sandbox_factory() for _ in range(3)))
    assert len({{box.sandbox_id for box in boxes}}) == 3
    results = await asyncio.gather(*(box.exec("echo $HOME") for box in boxes))
    assert all(r.ok for r in results)

{mark}
async def test_shared_scopes(async_worker_sandbox, async_session_sandbox):
    await async_worker_sandbox.exec("touch worker-mark")
    await async_session_sandbox.exec("touch session-mark")

{mark}
async def test_shared_scopes_again(async_worker_sandbox, async_session_sandbox):
    assert (await async_worker_sandbox.exec("ls worker-mark")).ok
    assert (await async_session_sandbox.exec("ls session-mark")).ok

{mark}
async def test_cancelled_exec_leaves_the_sandbox_usable(async_sandbox):
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(async_sandbox.exec("sleep 30"), 0.5)
    assert (await async_sandbox.exec("echo ok")).stdout == "ok\\n"

{mark}
async def test_sync_and_async_share_nothing(
    sandbox, async_sandbox, worker_sandbox, async_worker_sandbox
):
    assert sandbox.sandbox_id != async_sandbox.sandbox_id
    assert worker_sandbox.sandbox_id != async_worker_sandbox.sandbox_id
"""


def _leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def _run_suite(
    pytester: pytest.Pytester, kode_root: Path, mark: str, *args: str
) -> pytest.RunResult:
    pytester.makepyfile(test_suite=SUITE.format(mark=mark))
    result = pytester.runpytest_subprocess("--sandbox-backend=local", "--sandbox-prewarm=0", *args)
    result.assert_outcomes(passed=6)
    assert _leftovers(kode_root) == []
    return result


def test_under_pytest_asyncio_strict_mode(pytester: pytest.Pytester, kode_root: Path) -> None:
    result = _run_suite(pytester, kode_root, "@pytest.mark.asyncio", "-p", "no:anyio")
    # 4 function sandboxes (one sync), 3 from the factory, 1 sync worker sandbox and 1 async
    # one (without xdist the worker is the session, as for the sync fixtures): all disposed.
    result.stdout.fnmatch_lines(["*sandboxes: 9 created, * 9 disposed, 0 kept, 0 leaked*"])


def test_under_pytest_asyncio_auto_mode(pytester: pytest.Pytester, kode_root: Path) -> None:
    _run_suite(pytester, kode_root, "", "-o", "asyncio_mode=auto", "-p", "no:anyio")


def test_under_xdist(pytester: pytest.Pytester, kode_root: Path) -> None:
    # The session sandbox is created once for both workers; every sandbox is disposed.
    _run_suite(pytester, kode_root, "@pytest.mark.asyncio", "-n", "2", "-p", "no:anyio")


def test_under_anyio(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "asyncio"
        """
    )
    _run_suite(pytester, kode_root, "@pytest.mark.anyio", "-p", "no:asyncio")


def test_without_an_async_runner_the_error_says_what_to_install(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        async def test_needs_a_runner(async_sandbox):
            await async_sandbox.exec("true")
        """
    )
    result = pytester.runpytest_subprocess(
        "--sandbox-backend=local", "--sandbox-prewarm=0", "-p", "no:asyncio"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_needs_a_runner is an `async def` test using async_sandbox, but no async test "
            "runner runs it: install pytest-asyncio (pip install pytest-asyncio)*"
            "@pytest.mark.anyio*"
        ]
    )
    assert _leftovers(kode_root) == []


def test_anyio_on_trio_is_refused_clearly(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.mark.anyio
        async def test_on_trio(async_sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--sandbox-backend=local", "--sandbox-prewarm=0", "-p", "no:asyncio"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*run on asyncio*anyio backend 'trio'*return*'asyncio'*"])


def test_failed_async_test_reports_its_transcript(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_kode import assert_exec

        @pytest.mark.asyncio
        async def test_fails(async_sandbox):
            result = await async_sandbox.exec("echo from-async-exec; exit 7")
            assert_exec(result).succeeded()
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=local", "--sandbox-prewarm=0")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*exit code 7*", "*from-async-exec*"])
    assert "echo from-async-exec; exit 7" in result.stdout.str()


def test_marker_configures_async_fixtures(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.sandbox(envs={"FROM_MARKER": "yes"}, work_dir="/home/user/proj")
        async def test_marked(async_sandbox, async_sandbox_factory):
            assert (await async_sandbox.exec("echo $FROM_MARKER")).stdout == "yes\\n"
            assert async_sandbox.options.work_dir == "/home/user/proj"
            other = await async_sandbox_factory(envs={"FROM_MARKER": "override"})
            assert (await other.exec("echo $FROM_MARKER")).stdout == "override\\n"
        """
    )
    pytester.runpytest_subprocess("--sandbox-backend=local", "--sandbox-prewarm=0").assert_outcomes(
        passed=1
    )
    assert _leftovers(kode_root) == []


def test_gathered_creations_stay_within_max_concurrent(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # Every creation records how many sandboxes were alive at that moment. Two xdist workers
    # run tests that each gather two creations under a cap of three, so a worker often waits
    # for the other's slots (a cap of three never lets both wait: no deadlock).
    pytester.makeconftest(
        """
        import os

        def pytest_kode_sandbox_created(sandbox, item):
            root = os.environ["KODE_LOCAL_ROOT"]
            live = [n for n in os.listdir(root) if n.startswith("local-") and "." not in n]
            with open(os.path.join(root, "..", "live-counts.txt"), "a") as handle:
                handle.write(f"{len(live)}\\n")
        """
    )
    test = """
        import asyncio, pytest

        @pytest.mark.asyncio
        @pytest.mark.parametrize("n", range(4))
        async def test_{name}(async_sandbox_factory, n):
            boxes = await asyncio.gather(*(async_sandbox_factory() for _ in range(2)))
            await asyncio.gather(*(box.exec("sleep 0.2") for box in boxes))
        """
    pytester.makepyfile(test_a=test.format(name="a"), test_b=test.format(name="b"))
    result = pytester.runpytest_subprocess(
        "--sandbox-backend=local", "--sandbox-prewarm=0", "--sandbox-max-concurrent=3", "-n", "2"
    )
    result.assert_outcomes(passed=8)
    counts = [int(line) for line in (kode_root.parent / "live-counts.txt").read_text().split()]
    assert len(counts) == 16 and max(counts) <= 3, counts
    assert _leftovers(kode_root) == []


def test_asking_for_more_than_the_cap_at_once_is_a_clear_error(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import asyncio, pytest

        @pytest.mark.asyncio
        async def test_too_many(async_sandbox_factory):
            await asyncio.gather(*(async_sandbox_factory() for _ in range(3)))
        """
    )
    result = pytester.runpytest_subprocess(
        "--sandbox-backend=local", "--sandbox-prewarm=0", "--sandbox-max-concurrent=2"
    )
    result.assert_outcomes(failed=1)
    # Two of the gathered creations hold both slots while the third asks: depending on timing
    # it is refused at once or found deadlocked, and either way the error names the option.
    result.stdout.fnmatch_lines(["*SandboxCreateError*--sandbox-max-concurrent*"])
    assert _leftovers(kode_root) == []


def test_loop_closed_with_sandboxes_open_does_not_leak(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # The test's loop ends while a command and a background process still run in sandboxes
    # the test never disposed: the run disposes them all the same.
    pytester.makepyfile(
        """
        import asyncio, pytest

        @pytest.mark.asyncio
        async def test_leaves_things_running(async_sandbox_factory, async_sandbox):
            box = await async_sandbox_factory()
            await box.start("sleep 60")
            asyncio.ensure_future(async_sandbox.exec("sleep 60"))
            await asyncio.sleep(0.2)
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=local", "--sandbox-prewarm=0")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*sandboxes: 2 created, * 2 disposed, 0 kept, 0 leaked*"])
    assert _leftovers(kode_root) == []


# The shared async fixtures as the sync ones: session-scoped (a session-scoped sync fixture can
# build on them), one sandbox per worker and one per run whatever the event loops' scope, every
# test's view of it the same sandbox, disposed at the end. Each test writes what it saw to a
# file of its own process; the created hook counts the sandboxes.
SHARED_CONFTEST = """
import json, os, pytest

def pytest_kode_sandbox_created(sandbox, item, scope):
    with open(os.environ["EVENTS_FILE"], "a") as out:
        out.write(json.dumps({"id": sandbox.sandbox_id, "scope": scope}) + "\\n")

@pytest.fixture(scope="session")
def tool(async_session_sandbox):
    async_session_sandbox.sync.exec("echo ready >> tool.txt")  # once per run and process
    return async_session_sandbox

def record(**seen):
    with open(os.environ["EVENTS_FILE"], "a") as out:
        out.write(json.dumps({"pid": os.getpid(), **seen}) + "\\n")
"""

SHARED_TESTS = """
import os, pytest
from conftest import record

{mark}
@pytest.mark.parametrize("n", range(4))
async def test_shared(async_worker_sandbox, async_session_sandbox, tool, n):
    assert tool is async_session_sandbox
    assert (await tool.fs.read("tool.txt")).startswith("ready")
    await async_worker_sandbox.exec(f"echo {{n}} >> worker.txt")
    await async_session_sandbox.exec(f"echo {{n}} >> session.txt")
    record(worker=async_worker_sandbox.sandbox_id, session=async_session_sandbox.sandbox_id)

{mark}
async def test_beside_the_sync_twins(async_worker_sandbox, worker_sandbox, session_sandbox):
    assert worker_sandbox.sandbox_id != async_worker_sandbox.sandbox_id
    assert not await async_worker_sandbox.fs.exists("sync-mark")
    worker_sandbox.exec("touch sync-mark")
    record(sync_worker=worker_sandbox.sandbox_id, sync_session=session_sandbox.sandbox_id)
"""

# Wider event loops (pytest-asyncio only): a module-scoped async fixture on a module-wide loop
# follows a background process in the worker sandbox while tests on loops of their own use the
# same sandbox; the process is still followed when the module ends.
WIDE_LOOP_TESTS = """
import asyncio, pytest, pytest_asyncio
from conftest import record

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def follower(async_worker_sandbox):
    handle = await async_worker_sandbox.start("read line; echo got $line")
    yield handle
    await handle.send_stdin("x\\n")
    result = await handle.wait(10_000)
    assert (result.exit_code, result.stdout) == (0, "got x\\n")

@pytest.mark.asyncio
@pytest.mark.parametrize("n", range(2))
async def test_own_loop(follower, async_worker_sandbox, n):
    assert follower.is_running()
    assert (await async_worker_sandbox.exec("echo $((6 * 7))")).stdout == "42\\n"
    record(worker=async_worker_sandbox.sandbox_id)

@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop(follower, async_worker_sandbox, async_session_sandbox):
    assert follower.is_running()
    results = await asyncio.gather(*(async_session_sandbox.exec("true") for _ in range(3)))
    assert all(r.ok for r in results)
    record(worker=async_worker_sandbox.sandbox_id, session=async_session_sandbox.sandbox_id)
"""


def _shared_run(
    pytester: pytest.Pytester,
    kode_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    mark: str,
    *args: str,
    wide_loops: bool = False,
) -> tuple[list[dict[str, Any]], pytest.RunResult]:
    events = kode_root.parent / "events.jsonl"
    monkeypatch.setenv("EVENTS_FILE", str(events))
    anyio_backend = (
        '\n@pytest.fixture(scope="session")\ndef anyio_backend():\n    return "asyncio"\n'
    )
    pytester.makeconftest(SHARED_CONFTEST + (anyio_backend if "anyio" in mark else ""))
    files = {"test_shared": SHARED_TESTS.format(mark=mark)}
    if wide_loops:
        files["test_wide"] = WIDE_LOOP_TESTS
    pytester.makepyfile(**files)
    backend = (
        () if any(a.startswith("--sandbox-backend") for a in args) else ("--sandbox-backend=local",)
    )
    result = pytester.runpytest_subprocess(*backend, "--sandbox-prewarm=0", *args)
    result.assert_outcomes(passed=5 + (3 if wide_loops else 0))
    assert _leftovers(kode_root) == []
    return [json.loads(line) for line in events.read_text().splitlines()], result


def _check_sharing(seen: list[dict[str, Any]], workers: int) -> None:
    created = [e for e in seen if "scope" in e]
    saw = [e for e in seen if "pid" in e]
    assert len({e["pid"] for e in saw}) == workers, saw
    # Per process: one async worker sandbox for all its tests; one async session sandbox for
    # the whole run; the sync twins are other sandboxes.
    for pid in {e["pid"] for e in saw}:
        mine = [e for e in saw if e["pid"] == pid]
        assert len({e["worker"] for e in mine if "worker" in e}) == 1, mine
    async_sessions = {e["session"] for e in saw if "session" in e}
    async_workers = {e["worker"] for e in saw if "worker" in e}
    sync_boxes = {e[k] for e in saw for k in ("sync_worker", "sync_session") if k in e}
    assert len(async_sessions) == 1 and not sync_boxes & (async_sessions | async_workers)
    if workers == 1:  # without xdist the worker sandbox is the session sandbox, as for sync
        assert async_workers == async_sessions
        assert sorted(e["scope"] for e in created) == ["session", "session"]  # async, sync
    else:
        assert len(async_workers) == workers and not async_workers & async_sessions
        # One session sandbox per family; a worker sandbox per worker that asked for one.
        sync_workers = {e["sync_worker"] for e in saw if "sync_worker" in e}
        scopes = sorted(e["scope"] for e in created)
        assert scopes == ["session"] * 2 + ["worker"] * (workers + len(sync_workers)), created
    assert {e["id"] for e in created} == async_sessions | async_workers | sync_boxes


def test_shared_async_fixtures_under_pytest_asyncio_with_wide_loops(
    pytester: pytest.Pytester, kode_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, result = _shared_run(
        pytester, kode_root, monkeypatch, "@pytest.mark.asyncio", "-p", "no:anyio", wide_loops=True
    )
    _check_sharing(seen, workers=1)
    result.stdout.fnmatch_lines(["*sandboxes: 2 created, * 2 disposed, 0 kept, 0 leaked*"])


def test_shared_async_fixtures_in_auto_mode_under_xdist(
    pytester: pytest.Pytester, kode_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, _ = _shared_run(
        pytester,
        kode_root,
        monkeypatch,
        "",
        "-o",
        "asyncio_mode=auto",
        "-p",
        "no:anyio",
        "-n",
        "2",
        "--dist=load",
        wide_loops=True,
    )
    _check_sharing(seen, workers=2)


def test_shared_async_fixtures_under_anyio(
    pytester: pytest.Pytester, kode_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, _ = _shared_run(
        pytester, kode_root, monkeypatch, "@pytest.mark.anyio", "-p", "no:asyncio"
    )
    _check_sharing(seen, workers=1)


def test_a_failed_async_test_reports_and_keeps_the_shared_sandbox_it_used(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_fails(async_session_sandbox):
            await async_session_sandbox.exec("echo from-the-failing-async-test")
            assert False
        """
    )
    result = pytester.runpytest_subprocess(
        "--sandbox-backend=local", "--sandbox-prewarm=0", "--sandbox-keep-failed"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*sandbox local-* (local) transcript*",
            "*$ echo from-the-failing-async-test*",
            "*kept sandbox local-* (local) of test_a_failed_async_test*::test_fails*",
        ]
    )
    from pytest_kode import LocalSandbox

    kept = [entry.name for entry in kode_root.iterdir() if entry.name.startswith("local-")]
    kept = [name for name in kept if "." not in name]
    assert len(kept) == 1, kept
    LocalSandbox(sandbox_id=kept[0], root_dir=kode_root).init().dispose()


def test_shared_async_fixtures_on_the_emulator_with_wide_loops(
    pytester: pytest.Pytester, kode_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The e2b backend's views too serve tests on loops of their own and fixtures on wide ones.
    seen, _ = _shared_run(
        pytester,
        kode_root,
        monkeypatch,
        "@pytest.mark.asyncio",
        "-p",
        "no:anyio",
        "--sandbox-backend=emulator",
        wide_loops=True,
    )
    _check_sharing(seen, workers=1)


def test_reuse_keeps_the_shared_async_sandboxes_for_the_next_run(
    pytester: pytest.Pytester, kode_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the sync ones under --sandbox-reuse: the next run connects to the same sandboxes
    # (their files are still there), and the async ones stay apart from the sync ones.
    events = kode_root.parent / "events.jsonl"
    monkeypatch.setenv("EVENTS_FILE", str(events))
    pytester.makeconftest(SHARED_CONFTEST)
    pytester.makepyfile(
        """
        import pytest
        from conftest import record

        @pytest.mark.asyncio
        @pytest.mark.parametrize("n", range(4))
        async def test_reused(async_session_sandbox, async_worker_sandbox, session_sandbox, n):
            await async_session_sandbox.exec(f"echo {n} >> runs.txt")
            assert not session_sandbox.fs.exists("runs.txt")
            record(session=async_session_sandbox.sandbox_id, worker=async_worker_sandbox.sandbox_id)
        """
    )
    try:
        seen_ids = []
        for _ in ("first", "second"):
            events.write_text("")
            pytester.runpytest_subprocess(
                "--sandbox-backend=local", "--sandbox-prewarm=0", "-n", "2", "--sandbox-reuse"
            ).assert_outcomes(passed=4)
            seen = [json.loads(line) for line in events.read_text().splitlines()]
            seen_ids.append(
                {(k, e[k]) for e in seen for k in ("session", "worker") if k in e and "pid" in e}
            )
        assert seen_ids[0] == seen_ids[1]  # the same async sandboxes, connected to again
        [session] = {value for key, value in seen_ids[0] if key == "session"}
        from pytest_kode import LocalSandbox

        kept = LocalSandbox(sandbox_id=session, root_dir=kode_root).init()
        assert len(kept.fs.read("runs.txt").split()) == 8  # both runs wrote to it
    finally:
        from pytest_kode import LocalSandbox

        cache = pytester.path / ".pytest_cache" / "d" / "kode" / "reuse.json"
        for entry in json.loads(cache.read_text()).values():
            LocalSandbox(sandbox_id=str(entry["sandbox_id"]), root_dir=kode_root).init().dispose()
    assert _leftovers(kode_root) == []
