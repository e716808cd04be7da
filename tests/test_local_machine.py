"""A local sandbox is a small machine: one agent per sandbox runs every command, so processes
persist between commands and die together; ``start`` has a stdin; ``fs`` works in the sandbox's
own view and cannot be hung or blown up; faults end in a result or a ``KodeError``. Real
processes, real files, in both isolation modes."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from _local import needs_bwrap, procs_with, unique_sleep, wait_for_procs

from pytest_kode.backends.local import Isolation, LocalSandbox
from pytest_kode.errors import KodeError, SandboxNotFoundError, SandboxPathError

pytestmark = pytest.mark.usefixtures("no_leaked_children")

REPO = Path(__file__).resolve().parents[1]


def _make(isolation: str, root: Path, **fields: Any) -> LocalSandbox:
    return LocalSandbox(isolation=cast(Isolation, isolation), root_dir=root, **fields)


@pytest.fixture
def sb(isolation: str, root: Path) -> Iterator[LocalSandbox]:
    with _make(isolation, root) as sandbox:
        yield sandbox


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- processes persist ------------------------------------------------------------------------
def test_a_server_started_by_one_exec_serves_the_next(sb: LocalSandbox) -> None:
    port = _free_port()
    started = sb.exec(
        f"nohup python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & echo ok"
    )
    assert started.ok and started.stdout == "ok\n"
    fetch = (
        "import time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        print(urllib.request.urlopen('http://127.0.0.1:{port}/').status); break\n"
        "    except OSError: time.sleep(0.05)\n"
    )
    sb.fs.write("fetch.py", fetch)
    assert sb.exec("python3 fetch.py").stdout == "200\n"
    listed = [" ".join(entry["argv"]) for entry in sb.list_processes()]
    assert listed == []  # the server is the command's child, not a process start() made
    sb.dispose()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_background_processes_persist_and_die_at_dispose(sb: LocalSandbox) -> None:
    marker = unique_sleep()
    assert sb.exec(f"sleep {marker} &").ok
    handle = sb.start(f"sleep {marker}")
    assert handle.pid > 0 and handle.is_running()
    assert sb.exec(f"kill -0 {handle.pid}").ok  # the pid is the one inside the sandbox
    assert len(wait_for_procs(marker, 2)) == 2
    assert [entry["pid"] for entry in sb.list_processes()] == [handle.pid]
    if sb.isolation == "bwrap":
        # Only the sandbox's own processes: the agent, the two sleeps and ps itself.
        names = sb.exec("ps -e -o comm=").stdout.split()
        assert len(names) == 4 and names.count("sleep") == 2 and "ps" in names, names
    sb.dispose()
    assert procs_with(marker) == []
    assert handle.wait(5000).exit_code == 128 + 9


def test_start_feeds_stdin_and_start_without_stdin_reads_its_end(sb: LocalSandbox) -> None:
    reader = sb.start("while read line; do echo got $line; done; echo done")
    reader.send_stdin("one\n")
    reader.send_stdin(b"two\n")
    reader.close_stdin()
    result = reader.wait(10_000)
    assert result.stdout == "got one\ngot two\ndone\n" and result.exit_code == 0
    with pytest.raises(KodeError, match=r"start\(\.\.\., stdin=True\)"):
        reader.send_stdin("late\n")
    closed = sb.start("cat; echo eof", stdin=False)
    assert closed.wait(10_000).stdout == "eof\n"
    with pytest.raises(KodeError, match="no open stdin"):
        closed.send_stdin("x")


def test_connect_process_streams_output_from_now_on(sb: LocalSandbox) -> None:
    first = sb.start("read go; echo after; sleep 0.2; echo last")
    seen: list[bytes] = []
    other = sb.connect_process(first.pid, on_stdout=seen.append)
    other.send_stdin("go\n")
    result = other.wait(10_000)
    assert result.exit_code == 0 and b"".join(seen) == b"after\nlast\n"
    assert first.wait(10_000).stdout == "after\nlast\n"
    with pytest.raises(KodeError, match="no running process"):
        sb.connect_process(first.pid)


def test_a_pty_runs_an_interactive_shell(sb: LocalSandbox) -> None:
    seen: list[bytes] = []
    shell = sb.spawn(["bash", "--norc", "-i"], pty=(30, 100), on_stdout=seen.append)
    shell.send_stdin("stty size; echo $((6 * 7)); tty -s && echo is-a-tty\n")
    deadline = time.monotonic() + 20
    while b"\r\n42\r\n" not in b"".join(seen) and time.monotonic() < deadline:
        time.sleep(0.02)
    shell.resize(40, 120)
    shell.send_stdin("stty size; exit 3\n")
    result = shell.wait(10_000)
    text = b"".join(seen).decode()
    assert result.exit_code == 3
    assert "30 100" in text and "42" in text and "is-a-tty" in text and "40 120" in text


# -- fs reaches the sandbox's own view ------------------------------------------------------
@needs_bwrap
def test_fs_writes_the_sandboxs_own_tmp_as_on_e2b(root: Path) -> None:
    with _make("bwrap", root) as sandbox:
        sandbox.fs.write("/tmp/x.py", "print(6 * 7)\n")
        assert sandbox.exec("python3 /tmp/x.py").stdout == "42\n"
        assert sandbox.fs.read("/tmp/x.py") == "print(6 * 7)\n"
        assert not Path("/tmp/x.py").exists() or Path("/tmp/x.py").read_text() != "print(6 * 7)\n"
        assert [entry.name for entry in sandbox.fs.list("/tmp")] == ["x.py"]
        with pytest.raises(KodeError, match="read-only|Read-only|Permission"):
            sandbox.fs.write("/usr/kode-was-here", "x")
        assert not Path("/usr/kode-was-here").exists()


def test_special_files_are_refused_not_opened(sb: LocalSandbox) -> None:
    assert sb.exec(
        "mkfifo pipe && python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'"
    ).ok
    for name in ("pipe", "sock"):
        started = time.monotonic()
        with pytest.raises(SandboxPathError, match=f"{name}.*(FIFO|socket)") as info:
            sb.fs.read(name)
        assert "exec" in str(info.value)  # the fix: read it with a command
        assert time.monotonic() - started < 30
        with pytest.raises(SandboxPathError):
            sb.fs.write(name, "x")
    if sb.isolation == "bwrap":
        before = _max_rss_mb()
        with pytest.raises(SandboxPathError, match="/dev/zero.*character device"):
            sb.fs.read_bytes("/dev/zero")
        assert sb.exec("ln -s /dev/zero zero").ok
        with pytest.raises(SandboxPathError, match="character device"):
            sb.fs.read_bytes("zero")
        assert _max_rss_mb() - before < 50


def test_reads_above_the_limit_are_refused(isolation: str, root: Path) -> None:
    with _make(isolation, root, max_read_bytes=1000) as sandbox:
        sandbox.fs.write("small", b"x" * 1000)
        assert len(sandbox.fs.read_bytes("small")) == 1000
        sandbox.fs.write("big", b"x" * 1001)
        with pytest.raises(SandboxPathError, match=r"big.*1000 bytes") as info:
            sandbox.fs.read_bytes("big")
        assert "max_read_bytes" in str(info.value)


# -- lifetime -------------------------------------------------------------------------------
def test_the_agent_ends_the_sandbox_at_its_deadline_without_a_watchdog(
    isolation: str, root: Path
) -> None:
    marker = unique_sleep()
    sandbox = _make(isolation, root, timeout_ms=60_000).init()
    try:
        sandbox.start(f"sleep {marker}")
        assert wait_for_procs(marker)
        sandbox.set_timeout(300)
        deadline = time.monotonic() + 10
        while procs_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs_with(marker) == []
        with pytest.raises(SandboxNotFoundError, match="lifetime"):
            sandbox.exec("true")
    finally:
        sandbox.dispose()


_CREATOR = textwrap.dedent(
    """
    import sys
    from pytest_kode.backends.local import LocalSandbox
    sandbox = LocalSandbox(isolation=sys.argv[1], root_dir=sys.argv[2]).init()
    sandbox.start("sleep " + sys.argv[3])
    sandbox.exec("echo made-by-creator > note")
    sandbox.detach()
    print(sandbox.sandbox_id, flush=True)
    """
)


def test_a_sandbox_outlives_its_creator_and_resumes_from_another_process(
    isolation: str, root: Path
) -> None:
    marker = unique_sleep()
    made = subprocess.run(
        [sys.executable, "-c", _CREATOR, isolation, str(root), marker],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    sandbox_id = made.stdout.strip()
    assert wait_for_procs(marker)  # the creator is gone, its sandbox is not
    again = _make(isolation, root, sandbox_id=sandbox_id).init()
    assert again.exec("cat note").stdout == "made-by-creator\n"
    assert [" ".join(entry["argv"]) for entry in again.list_processes()] == [
        f"bash -c sleep {marker}"
    ]
    again.dispose()
    assert procs_with(marker) == []


def test_commands_inherit_no_file_descriptor_of_the_host_process(
    isolation: str, root: Path
) -> None:
    # An inheritable fd in the test process (a CI runner's pipe, say) exists when the sandbox
    # starts: neither its agent nor its commands keep it.
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    os.set_inheritable(write_end, True)
    try:
        with _make(isolation, root) as sandbox:
            listed = sandbox.exec("ls /proc/self/fd").stdout.split()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert sorted(listed) == ["0", "1", "2", "3"]  # stdio and ls's own directory


def test_without_isolation_daemons_that_leave_the_session_die_at_dispose(root: Path) -> None:
    marker = unique_sleep()
    with _make("none", root) as sandbox:
        assert sandbox.exec(
            f"cd / && env -i setsid sleep {marker} >/dev/null 2>&1 < /dev/null &"
        ).ok
        assert wait_for_procs(marker)
    assert procs_with(marker) == []


# -- faults -----------------------------------------------------------------------------------
def test_two_thousand_processes_start_and_all_die_at_dispose(sb: LocalSandbox) -> None:
    marker = unique_sleep()
    result = sb.exec(f"for i in $(seq 2000); do sleep {marker} & done; echo started")
    assert result.ok and result.stdout == "started\n"
    assert len(wait_for_procs(marker, 2000)) == 2000
    assert sb.exec("echo still responsive").stdout == "still responsive\n"
    sb.dispose()
    assert procs_with(marker) == []


def test_a_fork_bomb_under_a_short_timeout_is_killed_whole(sb: LocalSandbox) -> None:
    # Bounded (about 2,000 processes) so a shared machine survives it; it never ends by itself.
    marker = unique_sleep()
    bomb = (
        f"bomb() {{ if [ $1 -gt 0 ]; then bomb $(($1-1)) & bomb $(($1-1)) & fi; sleep {marker}; }}"
    )
    result = sb.exec(f"{bomb}; bomb 9", timeout_ms=1500)
    assert result.timed_out and result.exit_code == 124
    deadline = time.monotonic() + 10
    while procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs_with(marker) == []
    assert sb.exec("echo alive").stdout == "alive\n"


def test_a_daemon_that_closes_stdout_and_ignores_sigterm(sb: LocalSandbox) -> None:
    marker = unique_sleep()
    started = time.monotonic()
    result = sb.exec(
        f"(trap '' TERM; exec >&- 2>&- </dev/null; exec sleep {marker}) & echo started"
    )
    assert result.ok and result.stdout == "started\n"
    assert time.monotonic() - started < 10
    assert len(wait_for_procs(marker)) == 1
    os_pid = procs_with(marker)[0]
    os.kill(os_pid, 15)
    time.sleep(0.1)
    assert procs_with(marker) == [os_pid]  # SIGTERM ignored
    sb.dispose()
    assert procs_with(marker) == []


def test_two_hundred_megabytes_of_output_stay_bounded(sb: LocalSandbox) -> None:
    before = _max_rss_mb()
    result = sb.exec("head -c 200000000 /dev/zero | tr '\\0' x; echo tail-marker")
    assert result.ok and result.truncated
    assert len(result.stdout_bytes or b"") <= sb.options.max_output_bytes + 200
    assert result.stdout.endswith("tail-marker\n") and result.stdout.startswith("xxx")
    assert _max_rss_mb() - before < 120
    assert sb.exec("echo next").stdout == "next\n"


@needs_bwrap
def test_kill_9_of_pid_1_from_inside_changes_nothing(root: Path) -> None:
    with _make("bwrap", root) as sandbox:
        sandbox.exec("kill -9 1")
        assert sandbox.exec("echo alive").stdout == "alive\n"


def test_killing_the_agent_from_inside_is_a_clear_error(isolation: str, root: Path) -> None:
    marker = unique_sleep()
    sandbox = _make(isolation, root).init()
    try:
        sandbox.start(f"sleep {marker}")
        # The agent is the command's parent: the sandbox's init under bubblewrap.
        if isolation == "bwrap":
            # pid 1 cannot be killed from inside; its host pid is out of sight: kill it from
            # the host, as an OOM killer would.
            bwrap = sandbox._meta["agent"]["pid"]
            children = Path(f"/proc/{bwrap}/task/{bwrap}/children").read_text().split()
            os.kill(int(children[0]), 9)
            with pytest.raises(SandboxNotFoundError, match="agent"):
                sandbox.exec("true")
        else:
            with pytest.raises(SandboxNotFoundError, match="agent"):
                sandbox.exec("kill -9 $PPID; sleep 5")
        if isolation == "bwrap":  # (without isolation fs works on the host directory)
            with pytest.raises(SandboxNotFoundError, match="agent"):
                sandbox.fs.read("anything")
    finally:
        sandbox.dispose()
    assert procs_with(marker) == []


def test_any_client_can_speak_to_the_agent_socket(sb: LocalSandbox) -> None:
    from pytest_kode.backends.local._client import AgentClient

    sb.wait_ready()
    client = AgentClient(sb.agent_socket)
    try:
        answer, _ = client.call({"op": "ping"})
        assert answer["version"] == 1
        out: list[bytes] = []
        end = client.run(
            {"op": "run", "argv": ["bash", "-c", "echo $0"], "env": {}, "started": False},
            b"",
            out.append,
            lambda chunk: None,
        )
        assert end["exit_code"] == 0 and b"".join(out) == b"bash\n"
    finally:
        client.close()


def test_a_stream_connection_closes_its_socket_when_its_reader_ends(
    isolation: str, root: Path
) -> None:
    import gc

    from pytest_kode.backends.local._client import AgentClient

    sandbox = _make(isolation, root).init()
    sandbox.wait_ready()
    body = {"op": "run", "argv": ["sleep", "30"], "env": {}, "started": True}
    # The agent goes while a stream is open: its reader closes the socket, nobody else has to.
    gone = AgentClient(sandbox.agent_socket)
    gone.open_stream(body, b"", lambda kind, payload: None)
    stream = gone._stream
    assert stream is not None
    try:
        sandbox.dispose()
        stream.reader.join(10)
        assert not stream.reader.is_alive() and stream.sock.fileno() == -1
    finally:
        gone.close()
    # A client dropped without close() while its agent lives: its stream socket is closed too,
    # not left for the garbage collector to warn about.
    with _make(isolation, root) as live:
        live.wait_ready()
        dropped = AgentClient(live.agent_socket)
        dropped.open_stream(body, b"", lambda kind, payload: None)
        stream = dropped._stream
        assert stream is not None
        del dropped
        gc.collect()
        stream.reader.join(10)
        assert not stream.reader.is_alive() and stream.sock.fileno() == -1
