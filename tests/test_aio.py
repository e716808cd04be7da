"""The async layer's own pieces: the retry twin, blocking calls off the loop, the library API."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _local import needs_bwrap

from pytest_kode.aio import AsyncSandbox, kill_on_cancel, run_blocking
from pytest_kode.backends._retry import RetryExhausted, RetryPolicy, acall_with_retries
from pytest_kode.errors import ConfigError, KodeError


class Flaky(Exception):
    pass


@pytest.mark.asyncio
async def test_retry_twin_retries_then_succeeds() -> None:
    calls: list[int] = []
    slept: list[float] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Flaky()
        return "ok"

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(attempts=4, base_delay_s=0.2, max_delay_s=5.0)
    result = await acall_with_retries(
        call, policy=policy, retryable=lambda e: isinstance(e, Flaky), sleep=sleep
    )
    assert result == "ok" and len(calls) == 3
    assert len(slept) == 2 and 0.1 <= slept[0] <= 0.2 and 0.2 <= slept[1] <= 0.4


@pytest.mark.asyncio
async def test_retry_twin_gives_up_and_passes_other_errors_through() -> None:
    async def flaky() -> None:
        raise Flaky()

    async def broken() -> None:
        raise ValueError("not retryable")

    async def no_sleep(seconds: float) -> None:
        pass

    policy = RetryPolicy(attempts=3)
    with pytest.raises(RetryExhausted) as info:
        await acall_with_retries(flaky, policy=policy, retryable=lambda e: True, sleep=no_sleep)
    assert info.value.attempts == 3 and isinstance(info.value.last, Flaky)
    with pytest.raises(ValueError, match="not retryable"):
        await acall_with_retries(
            broken, policy=policy, retryable=lambda e: isinstance(e, Flaky), sleep=no_sleep
        )


@pytest.mark.asyncio
async def test_run_blocking_runs_calls_side_by_side_off_the_loop() -> None:
    # Ten calls that each wait for all ten: only side by side can they all pass the barrier
    # (more than the loop's default executor runs at once on a small machine).
    barrier = threading.Barrier(10, timeout=30)
    loop_thread = threading.get_ident()
    threads = await asyncio.gather(
        *(run_blocking(lambda: (barrier.wait(), threading.get_ident())[1]) for _ in range(10))
    )
    assert loop_thread not in threads and len(set(threads)) == 10


@pytest.mark.asyncio
async def test_run_blocking_passes_exceptions_on() -> None:
    def fail() -> None:
        raise KodeError("boom")

    with pytest.raises(KodeError, match="boom"):
        await run_blocking(fail)
    with pytest.raises(pytest.skip.Exception):
        await run_blocking(lambda: pytest.skip("skipped on the thread"))


@pytest.mark.parametrize("answer", ["a result", "an error"])
def test_a_cancellation_swallowed_below_is_still_honoured(answer: str) -> None:
    """A library under ``exec`` that catches the cancellation and answers otherwise (a result,
    or an error of its own) must not turn ``task.cancel()`` into a normal return: the command
    is killed and the caller gets its CancelledError."""
    killed: list[bool] = []

    async def swallowing() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if answer == "an error":
                raise ConnectionError("stream closed") from None
            return "exit 124"
        return "done"

    async def kill() -> None:
        killed.append(True)

    async def main() -> None:
        task = asyncio.ensure_future(kill_on_cancel(swallowing(), kill))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert killed == [True]


def test_wrapping_a_backend_without_async_twin_says_so() -> None:
    from pytest_kode.backends.local import LocalSandbox

    class Custom(LocalSandbox):  # a plugin's backend, registered under its own name
        backend = "custom"

    with pytest.raises(ConfigError, match="backend 'custom' .*has no async twin"):
        AsyncSandbox.wrap(Custom())


@pytest.fixture
def library_sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """What a library user passes to the async class of each backend."""
    from pytest_kode.backends.local import detect_isolation

    yield {"isolation": detect_isolation(), "root_dir": tmp_path / "root"}
    assert not list((tmp_path / "root").iterdir()), "the sandbox was not removed"


@pytest.mark.asyncio
async def test_async_with_creates_and_disposes_a_local_sandbox(
    library_sandbox: dict[str, Any],
) -> None:
    from pytest_kode import AsyncLocalSandbox

    before = threading.active_count()
    async with AsyncLocalSandbox(**library_sandbox, envs={"WHO": "lib"}) as sandbox:
        assert not sandbox.resumed and sandbox.sandbox_id.startswith("local-")
        results = await asyncio.gather(*(sandbox.exec("sleep 0.3; echo $WHO") for _ in range(8)))
        assert {r.stdout for r in results} == {"lib\n"}
        # No thread per command: the commands in flight are the loop's, not threads'.
        assert threading.active_count() <= before + 2
    assert sandbox.disposed
    with pytest.raises(KodeError):
        await sandbox.exec("true")


@needs_bwrap  # work_dir is /home/user only inside bubblewrap
@pytest.mark.asyncio
async def test_async_with_on_the_emulator() -> None:
    from pytest_kode import AsyncE2BSandbox
    from pytest_kode.emulator import E2BEmulator

    with E2BEmulator(port=0) as emulator:
        async with AsyncE2BSandbox(
            api_key=emulator.api_key,
            api_url=emulator.env["E2B_API_URL"],
            sandbox_url=emulator.env["E2B_SANDBOX_URL"],
        ) as sandbox:
            assert (await sandbox.exec("echo $HOME")).stdout == "/home/user\n"
            assert await sandbox.is_alive()
            sandbox_id = sandbox.sandbox_id
        assert not await sandbox.is_alive()
        # Reconnecting to a disposed sandbox fails like the blocking API.
        with pytest.raises(KodeError):
            await AsyncE2BSandbox(
                api_key=emulator.api_key,
                api_url=emulator.env["E2B_API_URL"],
                sandbox_url=emulator.env["E2B_SANDBOX_URL"],
                sandbox_id=sandbox_id,
            ).init()


def test_one_view_on_two_loops_keeps_each_loops_streams(library_sandbox: dict[str, Any]) -> None:
    # A shared async sandbox serves fixtures on a wide loop and tests on loops of their own: a
    # command on a test's loop must not cut off a background process followed on the wide one.
    from pytest_kode import AsyncLocalSandbox

    wide = asyncio.new_event_loop()
    try:
        sandbox = wide.run_until_complete(AsyncLocalSandbox(**library_sandbox).init())
        handle = wide.run_until_complete(sandbox.start("read line; echo got $line"))
        assert asyncio.run(sandbox.exec("echo on a loop of its own")).ok
        assert asyncio.run(sandbox.exec("echo and on another")).ok  # the closed loop's is let go

        async def finish() -> str:
            await handle.send_stdin("x\n")
            result = await handle.wait(10_000)
            assert result.exit_code == 0
            return result.stdout

        assert wide.run_until_complete(finish()) == "got x\n"
        wide.run_until_complete(sandbox.dispose())
    finally:
        wide.close()
