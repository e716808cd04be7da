"""PTYs and the persistent process model through the real SDK: create, input, resize,
reconnect, list, signals by pid."""

from __future__ import annotations

from typing import Any

import pytest


def _size(cols: int, rows: int) -> Any:
    from e2b.sandbox.commands.command_handle import PtySize

    return PtySize(cols=cols, rows=rows)


def _output(sbx: Any, terminal: Any, text: bytes) -> str:
    sbx.pty.send_stdin(terminal.pid, text)
    chunks: list[bytes] = []
    try:
        terminal.wait(on_pty=chunks.append)
    except Exception:  # noqa: BLE001 - a non-zero exit: the output is what matters here
        pass
    return b"".join(chunks).decode()


def test_pty_runs_an_interactive_shell_with_its_size(sbx: Any) -> None:
    from e2b import CommandExitException

    terminal = sbx.pty.create(_size(80, 24), envs={"ABC": "123"}, cwd="/home/user")
    text = _output(sbx, terminal, b"echo $ABC; tty; stty size; exit\n")
    assert "123" in text and "/dev/pts/" in text and "24 80" in text
    resized = sbx.pty.create(_size(80, 24))
    sbx.pty.resize(resized.pid, _size(100, 30))
    assert "30 100" in _output(sbx, resized, b"stty size; exit\n")
    failing = sbx.pty.create(_size(80, 24))
    sbx.pty.send_stdin(failing.pid, b"exit 3\n")
    with pytest.raises(CommandExitException) as caught:
        failing.wait()
    assert caught.value.exit_code == 3


def test_pty_reconnect_and_kill(sbx: Any) -> None:
    from e2b import CommandExitException

    terminal = sbx.pty.create(_size(80, 24))
    terminal.disconnect()
    again = sbx.pty.connect(terminal.pid)
    assert again.pid == terminal.pid
    assert "back-42" in _output(sbx, again, b"echo back-$((40+2)); exit\n")

    doomed = sbx.pty.create(_size(80, 24))
    assert doomed.pid in {process.pid for process in sbx.commands.list()}
    assert sbx.pty.kill(doomed.pid) is True
    with pytest.raises(CommandExitException) as caught:
        doomed.wait()
    assert caught.value.exit_code == -1 and "killed" in (caught.value.error or "")
    assert sbx.pty.kill(doomed.pid) is False


def test_pty_input_goes_only_to_terminals(sbx: Any) -> None:
    from e2b import SandboxException

    handle = sbx.commands.run("cat", background=True, stdin=True)
    with pytest.raises(SandboxException):
        sbx.pty.send_stdin(handle.pid, b"x")
    with pytest.raises(SandboxException):
        sbx.pty.resize(handle.pid, _size(10, 10))
    handle.kill()


def test_processes_persist_and_are_reachable_by_pid(sbx: Any) -> None:
    from e2b import CommandExitException

    reader = sbx.commands.run("read line; echo got-$line", background=True, stdin=True)
    listed = {process.pid: process for process in sbx.commands.list()}
    assert "read line" in " ".join(listed[reader.pid].args)
    attached = sbx.commands.connect(reader.pid)
    sbx.commands.send_stdin(reader.pid, "hello\n")
    assert attached.wait().stdout == "got-hello\n"

    sleeper = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sleeper.pid not in {process.pid for process in sbx.commands.list()}
    assert sbx.commands.kill(sleeper.pid) is False
