"""The backend contract (SPEC 1.2, 1.3): what every backend must do, written against the
abstract Sandbox API only, so the backends cannot drift apart.

Commands use paths relative to work_dir (or ``$HOME``): without isolation the local backend's
commands see the host directory, while ``fs`` maps ``/home/user/...`` on every backend.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest

from pytest_kode.errors import KodeError, SandboxFileNotFoundError, SandboxNotFoundError
from pytest_kode.sandbox import ExecResult, FileEntry, ProcessHandle, Sandbox


def _wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- exec ---------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes_are_data(contract_sandbox: Sandbox, code: int) -> None:
    result = contract_sandbox.exec(f"exit {code}")
    assert isinstance(result, ExecResult)
    assert result.exit_code == code and result.ok is (code == 0) and not result.timed_out


def test_stdout_and_stderr_are_separate(contract_sandbox: Sandbox) -> None:
    result = contract_sandbox.exec("echo to-out; echo to-err >&2; printf 'no newline'")
    assert result.stdout == "to-out\nno newline"
    assert result.stderr == "to-err\n"
    assert result.command == "echo to-out; echo to-err >&2; printf 'no newline'"
    assert result.duration_ms >= 0


def test_stdin_is_fed_to_the_command(contract_sandbox: Sandbox) -> None:
    assert contract_sandbox.exec("tr a-z A-Z", stdin="hello\n").stdout == "HELLO\n"
    assert contract_sandbox.exec("wc -c", stdin=b"\x00\x01\x02").stdout.strip() == "3"


def test_commands_run_in_work_dir_or_cwd(contract_sandbox: Sandbox) -> None:
    contract_sandbox.fs.mkdir("deeper/still")
    contract_sandbox.exec("echo marker > here.txt")
    assert contract_sandbox.fs.read("/home/user/here.txt") == "marker\n"
    assert contract_sandbox.exec("cat ../../here.txt", cwd="deeper/still").stdout == "marker\n"
    assert contract_sandbox.exec("basename $PWD", cwd="/home/user/deeper").stdout == "deeper\n"


def test_envs_from_options_and_per_exec(contract_factory: Callable[..., Sandbox]) -> None:
    sandbox = contract_factory(envs={"FROM_OPTIONS": "o", "SHARED": "options"})
    result = sandbox.exec(
        'echo "$FROM_OPTIONS|$SHARED|$FROM_EXEC"', envs={"SHARED": "exec", "FROM_EXEC": "e x"}
    )
    assert result.stdout == "o|exec|e x\n"
    assert sandbox.exec('echo "$SHARED|${FROM_EXEC:-unset}"').stdout == "options|unset\n"


def test_home_is_the_sandbox(contract_sandbox: Sandbox) -> None:
    contract_sandbox.exec('echo home > "$HOME/from-home.txt"')
    assert contract_sandbox.fs.read("from-home.txt") == "home\n"


def test_timeout_is_data_with_partial_output(contract_sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = contract_sandbox.exec("echo before; sleep 30; echo after", timeout_ms=500)
    assert time.monotonic() - started < 10
    assert result.timed_out and result.exit_code == 124 and not result.ok
    assert "before" in result.stdout and "after" not in result.stdout
    # The sandbox is still usable after a timeout.
    assert contract_sandbox.exec("echo alive").stdout == "alive\n"


def test_tmp_is_kept_across_commands(contract_sandbox: Sandbox) -> None:
    name = f"/tmp/kode-contract-{time.monotonic_ns()}"
    assert contract_sandbox.exec(f"echo kept > {name}").ok
    try:
        assert contract_sandbox.exec(f"cat {name}").stdout == "kept\n"
    finally:
        contract_sandbox.exec(f"rm -f {name}")


def test_transcript_records_execs_in_order(contract_sandbox: Sandbox) -> None:
    contract_sandbox.exec("echo one")
    contract_sandbox.exec("exit 3")
    entries = list(contract_sandbox.transcript)[-2:]
    assert [(e.command, e.exit_code) for e in entries] == [("echo one", 0), ("exit 3", 3)]
    assert entries[0].stdout == "one\n"


# -- background processes -----------------------------------------------------------------
def test_background_start_wait(contract_sandbox: Sandbox) -> None:
    handle = contract_sandbox.start("echo started; sleep 0.3; echo finished; exit 7")
    assert isinstance(handle, ProcessHandle) and handle.pid > 0
    result = handle.wait(timeout_ms=10_000)
    assert result.exit_code == 7
    assert result.stdout == "started\nfinished\n"
    assert not handle.is_running()


def test_background_output_so_far_and_kill(contract_sandbox: Sandbox) -> None:
    handle = contract_sandbox.start("echo ready; sleep 60")
    _wait_until(lambda: "ready" in handle.stdout)
    assert handle.is_running()
    handle.kill()
    _wait_until(lambda: not handle.is_running())
    handle.kill()  # quiet when already gone


# -- files --------------------------------------------------------------------------------
def test_fs_round_trip_text_and_bytes(contract_sandbox: Sandbox) -> None:
    fs = contract_sandbox.fs
    fs.write("notes/hello.txt", "hëllo wörld\n")
    fs.write("/home/user/notes/raw.bin", bytes(range(256)))
    fs.write("notes/empty", b"")
    assert fs.read("notes/hello.txt") == "hëllo wörld\n"
    assert fs.read_bytes("notes/raw.bin") == bytes(range(256))
    assert fs.read_bytes("/home/user/notes/empty") == b""
    assert contract_sandbox.exec("wc -c < notes/raw.bin").stdout.strip() == "256"


def test_fs_write_overwrites_and_creates_parents(contract_sandbox: Sandbox) -> None:
    contract_sandbox.fs.write("a/b/c/file.txt", "first, longer")
    contract_sandbox.fs.write("a/b/c/file.txt", "second")
    assert contract_sandbox.fs.read("a/b/c/file.txt") == "second"
    assert contract_sandbox.exec("cat a/b/c/file.txt").stdout == "second"


def test_relative_and_work_dir_absolute_paths_are_the_same_file(contract_sandbox: Sandbox) -> None:
    contract_sandbox.fs.write("same.txt", "1")
    assert contract_sandbox.fs.read("/home/user/same.txt") == "1"
    assert contract_sandbox.fs.exists("./same.txt")
    assert contract_sandbox.fs.exists("/home/user/same.txt")


def test_fs_list_and_stat(contract_sandbox: Sandbox) -> None:
    fs = contract_sandbox.fs
    fs.write("tree/one.txt", "1")
    fs.write("tree/sub/two.txt", "22")
    top = fs.list("tree")
    assert all(isinstance(entry, FileEntry) for entry in top)
    assert sorted((e.name, e.type, e.path) for e in top) == [
        ("one.txt", "file", "/home/user/tree/one.txt"),
        ("sub", "dir", "/home/user/tree/sub"),
    ]
    deep = {e.path for e in fs.list("/home/user/tree", depth=2)}
    assert "/home/user/tree/sub/two.txt" in deep
    entry = fs.stat("tree/sub/two.txt")
    assert (entry.name, entry.type, entry.size, entry.path) == (
        "two.txt",
        "file",
        2,
        "/home/user/tree/sub/two.txt",
    )
    assert fs.stat("tree").type == "dir"


def test_fs_mkdir_remove_rename_exists(contract_sandbox: Sandbox) -> None:
    fs = contract_sandbox.fs
    fs.mkdir("made/deep/dirs")
    fs.mkdir("made/deep/dirs")  # fine if present
    assert fs.stat("made/deep/dirs").type == "dir"
    fs.write("made/deep/dirs/f.txt", "x")
    fs.rename("made/deep/dirs/f.txt", "made/g.txt")
    assert fs.exists("made/g.txt") and not fs.exists("made/deep/dirs/f.txt")
    fs.remove("made/g.txt")
    assert not fs.exists("made/g.txt")
    fs.remove("made")
    assert not fs.exists("made")
    assert contract_sandbox.exec("test -e made").exit_code == 1


def test_fs_glob(contract_sandbox: Sandbox) -> None:
    fs = contract_sandbox.fs
    for path in ("g/a.py", "g/b.txt", "g/sub/c.py", "g/sub/deeper/d.py"):
        fs.write(path, "")
    assert fs.glob("g/*.py") == ["g/a.py"]
    assert fs.glob("g/**/*.py") == ["g/a.py", "g/sub/c.py", "g/sub/deeper/d.py"]
    assert fs.glob("/home/user/g/sub/*.py") == ["/home/user/g/sub/c.py"]
    assert fs.glob("g/*.none") == []


def test_fs_missing_paths_raise_file_not_found(contract_sandbox: Sandbox) -> None:
    fs = contract_sandbox.fs
    assert not fs.exists("missing.txt")
    for call in (
        lambda: fs.read("missing.txt"),
        lambda: fs.read_bytes("/home/user/missing.bin"),
        lambda: fs.stat("missing.txt"),
        lambda: fs.list("missing-dir"),
        lambda: fs.remove("missing.txt"),
    ):
        with pytest.raises(SandboxFileNotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, KodeError)


# -- network ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_get_host_url_reaches_a_server_started_inside(contract_sandbox: Sandbox) -> None:
    contract_sandbox.fs.write("www/page.txt", "served from the sandbox")
    port = _free_port()
    server = contract_sandbox.start(f"python3 -m http.server {port} --bind 127.0.0.1", cwd="www")
    url = contract_sandbox.get_host_url(port).rstrip("/") + "/page.txt"
    body: list[bytes] = []

    def fetched() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body.append(response.read())
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert server.is_running(), f"server died: {server.stderr}"
            return False

    try:
        _wait_until(fetched)
        assert body[0] == b"served from the sandbox"
    finally:
        server.kill()


# -- life-cycle ---------------------------------------------------------------------------
def test_dispose_is_idempotent_and_ends_the_sandbox(
    contract_factory: Callable[..., Sandbox],
) -> None:
    sandbox = contract_factory()
    assert sandbox.is_alive()
    sandbox.dispose()
    assert not sandbox.is_alive()
    sandbox.dispose()
    with pytest.raises(KodeError):
        sandbox.exec("true")


def test_resume_by_sandbox_id(contract_factory: Callable[..., Sandbox]) -> None:
    first = contract_factory()
    assert not first.resumed
    first.fs.write("kept.txt", "still here")
    second = contract_factory(sandbox_id=first.sandbox_id)
    assert second.resumed and second.sandbox_id == first.sandbox_id
    assert second.exec("cat kept.txt").stdout == "still here"
    second.dispose()
    with pytest.raises(SandboxNotFoundError) as info:
        contract_factory(sandbox_id=first.sandbox_id)
    assert first.sandbox_id in str(info.value)
