"""commands.* through the real e2b SDK against the emulator's process service."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from _local import needs_bwrap


def _eventually(check: Any, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


@needs_bwrap  # the /home/user paths are bwrap's view
def test_run_returns_stdout_stderr_and_runs_in_home(sbx: Any) -> None:
    result = sbx.commands.run("echo out; echo err >&2; pwd")
    assert (result.exit_code, result.error) == (0, None)
    assert result.stdout == "out\n/home/user\n"
    assert result.stderr == "err\n"


def test_nonzero_exit_raises_command_exit_exception_like_envd(sbx: Any) -> None:
    from e2b import CommandExitException

    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; echo boom >&2; exit 3")
    assert info.value.exit_code == 3
    assert info.value.error == "exit status 3"
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "boom\n"


def test_output_streams_while_the_command_runs(sbx: Any) -> None:
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    sbx.commands.run(
        "echo first; sleep 0.6; echo second",
        on_stdout=lambda line: seen.append((time.monotonic() - start, line)),
    )
    assert [line for _, line in seen] == ["first\n", "second\n"]
    # The first chunk arrived long before the process ended, not batched at exit.
    assert seen[1][0] - seen[0][0] > 0.4


def test_timeout_raises_and_kills_the_process(sbx: Any) -> None:
    from e2b import TimeoutException

    marker = "kode-timeout-marker"
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run(f"echo {marker}; sleep 30", timeout=1)
    assert time.monotonic() - started < 5
    assert _eventually(lambda: not any(marker in " ".join(p.args) for p in sbx.commands.list()))


def test_background_command_list_kill_and_wait(sbx: Any) -> None:
    from e2b import CommandExitException

    handle = sbx.commands.run("echo ready; touch said-ready; sleep 30", background=True)
    pids = [p.pid for p in sbx.commands.list()]
    assert handle.pid in pids
    listed = next(p for p in sbx.commands.list() if p.pid == handle.pid)
    assert listed.cmd == "/bin/bash" and listed.args[-1] == "echo ready; touch said-ready; sleep 30"
    # Killed only once it has spoken: a loopback round trip is quicker than bash's start-up.
    assert _eventually(lambda: sbx.files.exists("said-ready"))
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        handle.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    assert "ready\n" in info.value.stdout
    assert _eventually(lambda: handle.pid not in [p.pid for p in sbx.commands.list()])
    assert sbx.commands.kill(handle.pid) is False  # gone: NOT_FOUND maps to False


def test_connect_reattaches_to_a_running_process(sbx: Any) -> None:
    handle = sbx.commands.run("sleep 0.5; echo late", background=True)
    again = sbx.commands.connect(handle.pid)
    result = again.wait()
    assert result.stdout == "late\n"
    assert result.exit_code == 0


def test_stdin_send_and_close(sbx: Any) -> None:
    handle = sbx.commands.run("cat; echo done", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "hello ")
    sbx.commands.send_stdin(handle.pid, b"world\n")
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "hello world\ndone\n"


def test_without_stdin_the_process_reads_eof(sbx: Any) -> None:
    result = sbx.commands.run("cat; echo eof", timeout=5)
    assert result.stdout == "eof\n"


def test_envs_from_create_and_per_command(create: Any) -> None:
    sbx = create(envs={"WIDE": "sandbox", "BOTH": "create"})
    result = sbx.commands.run('echo "$WIDE $BOTH $ONLY"', envs={"BOTH": "command", "ONLY": "x"})
    assert result.stdout == "sandbox command x\n"
    # The sandbox-wide vars apply to every process, not only the first.
    assert sbx.commands.run("echo $WIDE").stdout == "sandbox\n"


def test_secrets_of_the_test_process_do_not_reach_the_sandbox(
    sbx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_KEY", "e2b_" + "1" * 40)
    result = sbx.commands.run("env")
    assert "E2B_API_KEY" not in result.stdout


@needs_bwrap  # the /home/user paths are bwrap's view
def test_cwd_relative_and_absolute(sbx: Any) -> None:
    sbx.files.make_dir("proj/sub")
    assert sbx.commands.run("pwd", cwd="proj").stdout == "/home/user/proj\n"
    assert sbx.commands.run("pwd", cwd="/home/user/proj/sub").stdout == "/home/user/proj/sub\n"


def test_missing_cwd_is_an_invalid_argument(sbx: Any) -> None:
    from e2b import InvalidArgumentException

    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sbx.commands.run("pwd", cwd="/home/user/nope")


def test_sandboxes_are_isolated_from_each_other(create: Any) -> None:
    first, second = create(), create()
    first.files.write("mine.txt", "first")
    assert second.files.exists("mine.txt") is False
    assert second.commands.run("ls -A").stdout == ""


def test_concurrent_commands_in_one_sandbox(sbx: Any) -> None:
    results: dict[int, str] = {}

    def run(n: int) -> None:
        results[n] = sbx.commands.run(f"sleep 0.5; echo {n}").stdout

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: f"{n}\n" for n in range(4)}
    assert time.monotonic() - started < 1.6  # side by side; one after another takes 2 s


def test_the_deadline_kills_a_background_process_even_after_disconnect(sbx: Any) -> None:
    handle = sbx.commands.run("sleep 30", background=True, timeout=1)
    handle.disconnect()
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    assert _eventually(lambda: handle.pid not in [p.pid for p in sbx.commands.list()])


def test_timeout_zero_means_no_deadline(sbx: Any) -> None:
    assert sbx.commands.run("sleep 0.2; echo fine", timeout=0).stdout == "fine\n"


def test_stream_input_feeds_stdin_in_order(sbx: Any) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(handle.pid, iter([b"a", "b", b"c\n"]))
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "abc\n"


def test_handle_kill_ends_the_process(sbx: Any) -> None:
    handle = sbx.commands.run("sleep 30", background=True)
    assert handle.kill() is True
    assert _eventually(lambda: handle.pid not in [p.pid for p in sbx.commands.list()])
