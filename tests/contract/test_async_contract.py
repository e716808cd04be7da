"""The async contract (issue 13): ``AsyncSandbox`` on every backend of the contract suite.

Written against the abstract async API only. The processes of every backend here (the local
ones and the emulator's sandboxes) are processes of this machine, so "killed in the sandbox" is
checked in the host's process table, by a unique ``sleep`` argument.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from pytest_kode import assert_exec
from pytest_kode.aio import AsyncProcessHandle, AsyncSandbox, OutputChunk
from pytest_kode.errors import KodeError, SandboxFileNotFoundError
from pytest_kode.sandbox import ExecResult, Sandbox

pytestmark = pytest.mark.asyncio


@pytest.fixture
def async_box(contract_sandbox: Sandbox) -> Iterator[AsyncSandbox]:
    """The async view of the contract suite's sandbox (which disposes it)."""
    view = AsyncSandbox.wrap(contract_sandbox)
    yield view
    view.close()


def _unique_sleep() -> str:
    """A ``sleep`` argument no other process on this machine has: its trace in /proc."""
    return f"{300 + uuid.uuid4().int % 10_000}.{uuid.uuid4().int % 10**6:06d}"


def _host_processes_with(arg: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"sleep") and arg.encode() in argv:
            found.append(int(name))
    return found


async def _gone(arg: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _host_processes_with(arg):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_exec_results_match_the_blocking_api(async_box: AsyncSandbox) -> None:
    result = await async_box.exec("echo to-out; echo to-err >&2; exit 3")
    assert isinstance(result, ExecResult)
    assert (result.exit_code, result.stdout, result.stderr) == (3, "to-out\n", "to-err\n")
    assert_exec(result).failed(3).stdout_equals("to-out\n").stderr_contains("to-err")
    same = async_box.sync.exec("echo to-out; echo to-err >&2; exit 3")
    assert (same.exit_code, same.stdout, same.stderr) == (3, "to-out\n", "to-err\n")


async def test_commands_and_sync_twin_share_one_transcript(async_box: AsyncSandbox) -> None:
    await async_box.exec("echo one")
    async_box.sync.exec("echo two")
    await async_box.exec("echo three")
    assert [entry.stdout for entry in async_box.transcript] == ["one\n", "two\n", "three\n"]
    assert async_box.transcript is async_box.sync.transcript


async def test_stdin_cwd_and_envs(async_box: AsyncSandbox) -> None:
    await async_box.fs.mkdir("sub")
    result = await async_box.exec(
        'cat; echo "$GREETING"; basename "$PWD"',
        stdin="piped\n",
        cwd="sub",
        envs={"GREETING": "hi"},
    )
    assert result.stdout.splitlines() == ["piped", "hi", "sub"]


async def test_timeout_is_data_and_kills_the_tree(async_box: AsyncSandbox) -> None:
    arg = _unique_sleep()
    result = await async_box.exec(f"sleep {arg} & sleep {arg}; wait", timeout_ms=500)
    assert result.timed_out and result.exit_code == 124
    assert await _gone(arg), "the timed-out command's processes are still running"


async def test_cancelled_exec_kills_its_tree_and_leaves_the_sandbox_usable(
    async_box: AsyncSandbox,
) -> None:
    arg = _unique_sleep()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(async_box.exec(f"sleep {arg} & sleep {arg}; wait"), 1.0)
    assert await _gone(arg), "the cancelled command's processes are still running"
    assert (await async_box.exec("echo still here")).stdout == "still here\n"


async def test_task_cancel_kills_the_command(async_box: AsyncSandbox) -> None:
    arg = _unique_sleep()
    task = asyncio.ensure_future(async_box.exec(f"sleep {arg}"))
    deadline = time.monotonic() + 10
    while not _host_processes_with(arg):
        assert time.monotonic() < deadline, "the command never started"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _gone(arg)


async def test_many_commands_in_flight_at_once(async_box: AsyncSandbox) -> None:
    # Each command waits until all ten have started: run one after another, the first would
    # wait in vain (and give up after 30 s with exit 1).
    await async_box.fs.mkdir("rendezvous")
    script = (
        "touch rendezvous/{n}; i=0; "
        'while [ "$(ls rendezvous | wc -l)" -lt 10 ]; do '
        "i=$((i+1)); [ $i -gt 600 ] && exit 1; sleep 0.05; done; echo {n}"
    )
    results = await asyncio.gather(*(async_box.exec(script.format(n=n)) for n in range(10)))
    assert [r.stdout for r in results] == [f"{n}\n" for n in range(10)]


async def test_large_requests_and_small_ones_in_flight_together_arrive_intact(
    async_box: AsyncSandbox,
) -> None:
    # Requests larger than a socket buffer go out in pieces while small ones are sent: each
    # must reach the sandbox whole and in one piece.
    blobs = [os.urandom(3 * 1024 * 1024 + n) for n in range(3)]
    stdin = os.urandom(2 * 1024 * 1024)
    outcome = await asyncio.gather(
        *(async_box.fs.write(f"blob{n}", blob) for n, blob in enumerate(blobs)),
        async_box.exec("wc -c", stdin=stdin),
        *(async_box.exec(f"echo {n}") for n in range(5)),
    )
    assert outcome[3].stdout.strip() == str(len(stdin))
    assert [r.stdout for r in outcome[4:]] == [f"{n}\n" for n in range(5)]
    for n, blob in enumerate(blobs):
        assert await async_box.fs.read_bytes(f"blob{n}") == blob


async def test_exec_cancelled_while_its_stdin_is_sent_is_killed(async_box: AsyncSandbox) -> None:
    arg = _unique_sleep()
    # The sleep does not read its stdin: it runs as soon as the request has arrived.
    task = asyncio.ensure_future(async_box.exec(f"sleep {arg}", stdin=os.urandom(8 << 20)))
    await asyncio.sleep(0)  # the request is on its way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Answered once the sandbox has the whole of the earlier request (and so started it).
    assert (await async_box.exec("echo still here")).stdout == "still here\n"
    assert await _gone(arg, within=10.0), "the cancelled command is still running"


async def test_background_process_streams_its_output(async_box: AsyncSandbox) -> None:
    handle = await async_box.start("for i in 1 2 3; do echo line$i; sleep 0.1; done; echo e >&2")
    assert isinstance(handle, AsyncProcessHandle) and handle.pid > 0
    chunks: list[OutputChunk] = [chunk async for chunk in handle]
    assert "".join(c.text for c in chunks if c.stream == "stdout") == "line1\nline2\nline3\n"
    assert "".join(c.text for c in chunks if c.stream == "stderr") == "e\n"
    result = await handle.wait()
    assert result.ok and result.stdout == "line1\nline2\nline3\n" and not handle.is_running()
    # A second iteration replays what was kept.
    assert [c.text async for c in handle][0] == "line1\n"


async def test_background_process_output_so_far_kill_and_stdin(async_box: AsyncSandbox) -> None:
    handle = await async_box.start("echo ready; exec sleep 60")
    deadline = time.monotonic() + 10
    while "ready" not in handle.stdout:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert handle.is_running()
    await handle.kill()
    assert not handle.is_running()
    cat = await async_box.start("cat")
    await cat.send_stdin("echoed")
    await cat.close_stdin()
    assert (await cat.wait(10_000)).stdout == "echoed"


async def test_wait_with_timeout_kills(async_box: AsyncSandbox) -> None:
    handle = await async_box.start("sleep 60")
    result = await handle.wait(timeout_ms=300)
    assert result.timed_out and result.exit_code == 124 and not handle.is_running()


async def test_fs_round_trip(async_box: AsyncSandbox) -> None:
    fs = async_box.fs
    await fs.write("dir/a.txt", "alpha")
    await fs.write("dir/deeper/b.bin", b"\x00\xff")
    assert await fs.read("dir/a.txt") == "alpha"
    assert await fs.read_bytes("dir/deeper/b.bin") == b"\x00\xff"
    assert await fs.exists("dir/a.txt") and not await fs.exists("dir/nope")
    assert (await fs.stat("dir")).type == "dir"
    assert sorted(e.name for e in await fs.list("dir")) == ["a.txt", "deeper"]
    assert await fs.glob("dir/**/*.bin") == ["dir/deeper/b.bin"]
    await fs.rename("dir/a.txt", "dir/c.txt")
    await fs.remove("dir/deeper")
    assert await fs.glob("dir/*") == ["dir/c.txt"]
    with pytest.raises(SandboxFileNotFoundError):
        await fs.read("dir/a.txt")
    assert (await async_box.exec("cat dir/c.txt")).stdout == "alpha"


async def test_disposed_sandbox_refuses_work(async_box: AsyncSandbox) -> None:
    await async_box.dispose()
    await async_box.dispose()  # idempotent
    assert async_box.disposed and not await async_box.is_alive()
    with pytest.raises(KodeError):
        await async_box.exec("true")
