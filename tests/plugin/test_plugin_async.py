"""The async fixtures as a user runs them: pytest-asyncio (strict, auto), anyio's plugin, none.

Each inner run uses the local backend under a private root (``kode_root``) that must be empty
when it ends: the async fixtures keep the sync ones' disposal guarantees.
"""

from __future__ import annotations

from pathlib import Path

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
