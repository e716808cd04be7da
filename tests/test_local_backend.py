"""The local backend: LocalSandbox in both isolation modes, with real processes and real files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from _local import MODES, needs_bwrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_kode.backends.local import (
    Isolation,
    LocalSandbox,
    detect_isolation,
    list_local_sandboxes,
    remove_local_sandbox,
)
from pytest_kode.errors import (
    BackendUnavailableError,
    ConfigError,
    KodeError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
    SandboxPathError,
)

pytestmark = pytest.mark.usefixtures("no_leaked_children")


def _make(isolation: str, root: Path, **fields: Any) -> LocalSandbox:
    return LocalSandbox(isolation=cast(Isolation, isolation), root_dir=root, **fields)


@pytest.fixture
def sb(isolation: str, root: Path) -> Iterator[LocalSandbox]:
    with _make(isolation, root) as sandbox:
        yield sandbox


def _procs_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(name))
    return found


def _gone(marker: str, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while _procs_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _unique_sleep() -> str:
    # A sleep duration no other process uses, so /proc can tell ours apart.
    return f"{1000 + (time.monotonic_ns() % 100_000) / 1000:.3f}"


# -- creation, identity, metadata ---------------------------------------------------------
def test_sandbox_is_a_fresh_directory_with_metadata_beside_it(sb: LocalSandbox, root: Path) -> None:
    assert sb.sandbox_id.startswith("local-")
    assert sb.directory == root / sb.sandbox_id
    assert sb.directory.is_dir() and not any(sb.directory.iterdir())
    meta = json.loads(sb.metadata_path.read_text())
    assert sb.metadata_path.parent == root
    assert meta["sandbox_id"] == sb.sandbox_id
    assert meta["isolation"] == sb.isolation
    assert meta["work_dir"] == "/home/user"
    assert meta["deadline"] == pytest.approx(meta["created"] + 300.0)
    assert [entry["sandbox_id"] for entry in list_local_sandboxes(root)] == [sb.sandbox_id]


def test_metadata_records_env_names_but_never_values(root: Path) -> None:
    with LocalSandbox(
        isolation="none", root_dir=root, envs={"TOKEN": "s3cr3t"}, metadata={"team": "a"}
    ) as sb:
        text = sb.metadata_path.read_text()
        meta = json.loads(text)
        assert meta["env_names"] == ["TOKEN"]
        assert meta["metadata"] == {"team": "a"}
        assert "s3cr3t" not in text


def test_root_defaults_to_kode_local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(tmp_path / "elsewhere"))
    with LocalSandbox(isolation="none") as sb:
        assert sb.directory.parent == tmp_path / "elsewhere"
    assert os.listdir(tmp_path / "elsewhere") == []


def test_two_sandboxes_are_separate(isolation: str, root: Path) -> None:
    with (
        _make(isolation, root) as a,
        _make(isolation, root) as b,
    ):
        assert a.sandbox_id != b.sandbox_id
        a.exec("echo from-a > mine.txt")
        assert b.exec("cat mine.txt").exit_code != 0
        assert not b.fs.exists("mine.txt")


def test_isolation_property_says_what_is_used(root: Path) -> None:
    with LocalSandbox(isolation="auto", root_dir=root) as sb:
        assert sb.isolation == detect_isolation()
    with LocalSandbox(isolation="none", root_dir=root) as sb:
        assert sb.isolation == "none"


def test_set_timeout_moves_the_recorded_deadline(sb: LocalSandbox) -> None:
    sb.set_timeout(3_600_000)
    meta = json.loads(sb.metadata_path.read_text())
    assert meta["deadline"] == pytest.approx(time.time() + 3600, abs=5)
    assert sb.deadline == meta["deadline"]
    with pytest.raises(ConfigError, match="-1"):
        sb.set_timeout(-1)


# -- resume -------------------------------------------------------------------------------
def test_resume_reconnects_to_a_sandbox_left_on_disk(isolation: str, root: Path) -> None:
    first = _make(isolation, root).init()
    try:
        first.fs.write("state.txt", "kept")
        again = _make(isolation, root, sandbox_id=first.sandbox_id).init()
        assert again.resumed and not first.resumed
        assert again.sandbox_id == first.sandbox_id
        assert again.exec("cat state.txt").stdout == "kept"
        again.dispose()
        assert not first.is_alive()
    finally:
        first.dispose()
    with pytest.raises(SandboxNotFoundError) as info:
        _make(isolation, root, sandbox_id=first.sandbox_id).init()
    assert first.sandbox_id in str(info.value) and str(root) in str(info.value)


@pytest.mark.parametrize("bad_id", ["local-000000000000", "../etc", "local-x/../../etc"])
def test_resume_of_a_missing_id_raises_not_found(root: Path, bad_id: str) -> None:
    with pytest.raises(SandboxNotFoundError, match="no local sandbox") as info:
        LocalSandbox(isolation="none", root_dir=root, sandbox_id=bad_id).init()
    assert "sandbox_id" in str(info.value)  # the hint says how to get a fresh one


def test_resume_of_an_expired_sandbox_raises_not_found(root: Path) -> None:
    sb = LocalSandbox(isolation="none", root_dir=root, timeout_ms=1).init()
    try:
        time.sleep(0.01)
        with pytest.raises(SandboxNotFoundError, match="expired"):
            LocalSandbox(isolation="none", root_dir=root, sandbox_id=sb.sandbox_id).init()
    finally:
        sb.dispose()


# -- exec ---------------------------------------------------------------------------------
def test_exec_reports_exit_code_stdout_and_stderr(sb: LocalSandbox) -> None:
    result = sb.exec("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok and not result.timed_out and result.duration_ms > 0
    assert sb.exec("true").ok
    assert [entry.command for entry in sb.transcript] == ["echo out; echo err >&2; exit 3", "true"]


def test_exec_runs_bash_not_a_login_shell(sb: LocalSandbox) -> None:
    result = sb.exec('shopt -q login_shell && echo login || echo plain; echo "$BASH_VERSION"')
    assert result.stdout.splitlines()[0] == "plain"
    assert result.stdout.splitlines()[1]


def test_exec_runs_in_work_dir_and_relative_cwd(sb: LocalSandbox) -> None:
    sb.fs.mkdir("sub/dir")
    here = sb.exec("pwd").stdout.strip()
    expected_root = "/home/user" if sb.isolation == "bwrap" else str(sb.directory)
    assert here == expected_root
    assert sb.exec("pwd", cwd="sub/dir").stdout.strip() == expected_root + "/sub/dir"
    assert sb.exec("pwd", cwd="/home/user/sub").stdout.strip() == expected_root + "/sub"
    with pytest.raises(SandboxFileNotFoundError, match="nope"):
        sb.exec("pwd", cwd="nope")


def test_exec_sees_a_clean_environment(
    isolation: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_KEY", "e2b_leak_me")
    monkeypatch.setenv("CI_SECRET_TOKEN", "ci_leak_me")
    monkeypatch.setenv("LC_TIME", "C")
    with _make(isolation, root) as sb:
        env_lines = sb.exec("env").stdout.splitlines()
        home = "/home/user" if sb.isolation == "bwrap" else str(sb.directory)
    env = dict(line.split("=", 1) for line in env_lines if "=" in line)
    assert "leak_me" not in "\n".join(env_lines)
    # bash itself adds PWD, SHLVL and _; nothing else beyond PATH, locale and HOME.
    assert set(env) - {"PWD", "SHLVL", "_"} <= {"PATH", "HOME", "LANG", "LANGUAGE"} | {
        key for key in env if key.startswith("LC_")
    }
    assert env["PATH"] == os.environ["PATH"]
    assert env.get("LC_TIME") == "C"
    assert env["HOME"] == home


def test_options_envs_and_exec_envs_are_passed_with_exec_winning(
    root: Path, isolation: str
) -> None:
    with _make(isolation, root, envs={"A": "from-options", "B": "b"}) as sb:
        result = sb.exec('echo "$A $B $C"', envs={"A": "from-exec", "C": "c d"})
        assert result.stdout == "from-exec b c d\n"
        assert sb.exec('echo "$A"').stdout == "from-options\n"


def test_exec_rejects_non_string_envs(sb: LocalSandbox) -> None:
    with pytest.raises(ConfigError, match="'N'=1"):
        sb.exec("true", envs={"N": 1})  # type: ignore[dict-item]
    with pytest.raises(ConfigError):
        LocalSandbox(envs={"N": 1})


def test_exec_feeds_stdin_or_dev_null(sb: LocalSandbox) -> None:
    assert sb.exec("cat", stdin="text in\n").stdout == "text in\n"
    assert sb.exec("od -An -tx1", stdin=b"\x00\xff").stdout.split() == ["00", "ff"]
    assert sb.exec("cat", stdin="").stdout == ""
    # Without stdin the command reads /dev/null instead of hanging on the test's terminal.
    result = sb.exec("cat; readlink /proc/self/fd/0", timeout_ms=5000)
    assert not result.timed_out and result.stdout.strip() == "/dev/null"


def test_exec_streams_large_stdin_and_stdout_without_deadlock(sb: LocalSandbox) -> None:
    data = os.urandom(3 * 1024 * 1024)
    result = sb.exec("cat", stdin=data, timeout_ms=20_000)
    assert result.stdout_bytes == data


def test_exec_keeps_non_utf8_output_raw_and_decodes_with_replacement(sb: LocalSandbox) -> None:
    result = sb.exec(r"printf 'ok\xff\xfe!'")
    assert result.stdout_bytes == b"ok\xff\xfe!"
    assert result.stdout == "ok\ufffd\ufffd!"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_exit_by_signal_is_128_plus_signum(sb: LocalSandbox, signum: int) -> None:
    assert sb.exec(f"kill -{signum} $$").exit_code == 128 + signum


def test_timeout_kills_the_whole_tree_and_keeps_earlier_output(sb: LocalSandbox) -> None:
    marker = _unique_sleep()
    started = time.monotonic()
    result = sb.exec(f"echo before; (sleep {marker} &); sleep {marker}", timeout_ms=400)
    assert time.monotonic() - started < 3
    assert result.timed_out and result.exit_code == 124 and not result.ok
    assert result.stdout == "before\n"
    assert _gone(marker), "a process of the timed-out command survived"


def test_command_that_never_ends_is_bounded_by_exec_timeout_ms(root: Path, isolation: str) -> None:
    with _make(isolation, root, exec_timeout_ms=300) as sb:
        result = sb.exec("while :; do :; done")
        assert result.timed_out and result.exit_code == 124
        assert 250 <= result.duration_ms < 3000


def test_a_forked_daemon_neither_hangs_exec_nor_survives_dispose(
    isolation: str, root: Path
) -> None:
    marker = _unique_sleep()
    escaped = _unique_sleep() + "1"
    sb = _make(isolation, root).init()
    try:
        started = time.monotonic()
        # Both keep stdout/stderr open; the second also leaves the process group.
        result = sb.exec(f"sleep {marker} & setsid sleep {escaped} & echo started")
        assert time.monotonic() - started < 2, "exec waited for the daemon's pipes"
        assert result.stdout == "started\n" and result.exit_code == 0
    finally:
        sb.dispose()
    assert _gone(marker) and _gone(escaped), "a daemon survived dispose()"


def test_output_is_bounded_with_head_tail_and_marker(root: Path, isolation: str) -> None:
    with _make(isolation, root, max_output_bytes=1000) as sb:
        result = sb.exec("seq 1 100000; seq 1 3 >&2")
    assert result.truncated
    assert result.stdout.startswith("1\n2\n3\n")
    assert result.stdout.endswith("99999\n100000\n")
    assert "bytes elided" in result.stdout
    assert result.stderr == "1\n2\n3\n"
    assert result.stdout_bytes is not None and len(result.stdout_bytes) < 1100


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


def test_100_mb_of_output_does_not_grow_the_test_process(root: Path, isolation: str) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    except OSError:
        pytest.skip("cannot reset the peak RSS mark here")
    limit = 1024 * 1024
    with _make(isolation, root, max_output_bytes=limit) as sb:
        before = _peak_rss_kib()
        result = sb.exec("head -c 100000000 /dev/zero; echo tail", timeout_ms=30_000)
        grown_mib = (_peak_rss_kib() - before) / 1024
    assert result.ok and result.truncated and result.stdout.endswith("\0tail\n")
    assert len(result.stdout_bytes or b"") < limit + 100
    # The result holds the kept 1 MiB as bytes and as str, plus transient copies.
    assert grown_mib < 12, f"exec of 100 MB grew the test process by {grown_mib:.0f} MiB"


def test_exec_rejects_bad_timeouts_and_types(sb: LocalSandbox) -> None:
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ConfigError, match="timeout_ms"):
            sb.exec("true", timeout_ms=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        sb.exec("cat", stdin=123)  # type: ignore[arg-type]


# -- background processes -----------------------------------------------------------------
def test_start_runs_in_background_and_wait_collects(sb: LocalSandbox) -> None:
    handle = sb.start("echo one; sleep 0.2; echo two >&2; exit 4")
    assert handle.is_running() and handle.returncode is None
    result = handle.wait(timeout_ms=5000)
    assert (result.exit_code, result.stdout, result.stderr) == (4, "one\n", "two\n")
    assert handle.returncode == 4 and not handle.is_running()
    assert result.command == "echo one; sleep 0.2; echo two >&2; exit 4"


def test_background_process_is_not_bound_by_exec_timeout(root: Path, isolation: str) -> None:
    with _make(isolation, root, exec_timeout_ms=100) as sb:
        result = sb.start("sleep 0.4; echo done").wait()
        assert result.ok and result.stdout == "done\n"


def test_wait_past_its_timeout_kills_and_reports_timed_out(sb: LocalSandbox) -> None:
    marker = _unique_sleep()
    handle = sb.start(f"echo hi; sleep {marker}")
    result = handle.wait(timeout_ms=300)
    assert result.timed_out and result.exit_code == 124 and result.stdout == "hi\n"
    assert _gone(marker)


def test_spawn_streams_chunks_to_callbacks(sb: LocalSandbox) -> None:
    chunks: list[bytes] = []
    errors: list[bytes] = []
    handle = sb.spawn(
        ["bash", "-c", "for i in 1 2 3; do echo $i; sleep 0.05; done; echo e >&2"],
        on_stdout=chunks.append,
        on_stderr=errors.append,
    )
    result = handle.wait(timeout_ms=5000)
    assert b"".join(chunks) == b"1\n2\n3\n" and len(chunks) >= 2
    assert b"".join(errors) == b"e\n"
    assert result.stdout == "1\n2\n3\n"


def test_spawn_stdin_signal_and_kill(sb: LocalSandbox) -> None:
    cat = sb.spawn(["cat"], stdin=True)
    cat.send_stdin("abc")
    cat.send_stdin(b"\x00def")
    cat.close_stdin()
    assert cat.wait(timeout_ms=5000).stdout_bytes == b"abc\x00def"
    with pytest.raises(KodeError, match="stdin"):
        cat.send_stdin("late")

    trap = sb.start("trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.05; done")
    _wait_for(lambda: "ready" in trap.stdout)
    trap.signal(signal.SIGTERM)
    result = trap.wait(timeout_ms=5000)
    assert result.exit_code == 5 and "got-term" in result.stdout

    sleeper = sb.start("sleep 60")
    sleeper.kill()
    assert not sleeper.is_running() and sleeper.returncode == 128 + signal.SIGKILL
    sleeper.kill()  # quiet when already gone


def test_background_process_survives_the_thread_that_started_it(sb: LocalSandbox) -> None:
    # bwrap --die-with-parent is tied to the forking *thread*; the emulator spawns from workers.
    handles = []
    worker = threading.Thread(target=lambda: handles.append(sb.start("sleep 30")))
    worker.start()
    worker.join()
    time.sleep(0.3)
    assert handles[0].is_running()


def test_dispose_kills_background_processes_and_removes_everything(
    isolation: str, root: Path
) -> None:
    marker = _unique_sleep()
    sb = _make(isolation, root).init()
    handle = sb.start(f"sleep {marker} & sleep {marker}")
    _wait_for(lambda: len(_procs_with(marker)) >= 2)
    directory, meta = sb.directory, sb.metadata_path
    sb.dispose()
    assert _gone(marker) and not handle.is_running()
    assert not directory.exists() and not meta.exists()
    assert not sb.is_alive()
    sb.dispose()  # idempotent
    with pytest.raises(KodeError, match="disposed"):
        sb.exec("true")


def test_dispose_is_quiet_when_the_directory_is_already_gone(root: Path) -> None:
    sb = LocalSandbox(isolation="none", root_dir=root).init()
    subprocess.run(["rm", "-rf", str(sb.directory), str(sb.metadata_path)], check=True)
    assert not sb.is_alive()
    sb.dispose()


def test_dispose_removes_read_only_trees(sb: LocalSandbox) -> None:
    assert sb.exec("mkdir -p ro/inner && touch ro/inner/f && chmod -R a-w ro").ok


def _wait_for(predicate: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# -- network (the bwrap sandbox's own network: tests/test_local_network.py) ----------------
def test_no_internet_without_bwrap_is_refused(root: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="allow_internet_access=False") as info:
        LocalSandbox(isolation="none", root_dir=root, allow_internet_access=False).init()
    assert "bubblewrap" in str(info.value)
    assert not root.exists() or os.listdir(root) == []


def test_requiring_bwrap_where_it_is_missing_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "from pytest_kode.backends.local import LocalSandbox\n"
        "from pytest_kode.errors import BackendUnavailableError\n"
        "try:\n"
        f"    LocalSandbox(isolation='bwrap', root_dir={str(tmp_path)!r}).init()\n"
        "except BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "isolation='bwrap'" in out and "apt-get install bubblewrap" in out


# -- bwrap isolation ----------------------------------------------------------------------
@needs_bwrap
def test_bwrap_mounts_the_sandbox_at_work_dir_and_keeps_the_host_read_only(
    root: Path,
) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root) as sb:
        assert sb.exec("echo hi > /home/user/x.txt").ok
        assert (sb.directory / "x.txt").read_text() == "hi\n"
        assert sb.exec("touch /usr/kode-write-test").exit_code != 0
        assert sb.exec("touch /kode-write-test").exit_code != 0
        assert not Path("/usr/kode-write-test").exists()
        # /tmp is the sandbox's own: kept across its commands, invisible to host and others.
        assert sb.exec("echo t > /tmp/kode-private").ok
        assert sb.exec("cat /tmp/kode-private").stdout == "t\n"
        assert not Path("/tmp/kode-private").exists()
        with LocalSandbox(isolation="bwrap", root_dir=root) as other:
            assert other.exec("test -e /tmp/kode-private").exit_code == 1
        # Its own pid namespace: the host's processes are invisible.
        assert int(sb.exec("ls /proc | grep -c '^[0-9]'").stdout) < 10


@needs_bwrap
@pytest.mark.parametrize("work_dir", ["/usr/src/kode-app", "/tmp/kode-work", "/opt/a/b"])
def test_bwrap_supports_other_work_dirs(root: Path, work_dir: str) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root, work_dir=work_dir) as sb:
        result = sb.exec("pwd; echo $HOME; ls /usr/bin/env && echo x > f")
        assert result.stdout.splitlines()[:3] == [work_dir, work_dir, "/usr/bin/env"]
        assert sb.fs.read(f"{work_dir}/f") == "x\n"
        assert not Path(work_dir, "f").exists()


@pytest.mark.parametrize("work_dir", ["/", "/proc/x"])
def test_unusable_work_dirs_are_config_errors(root: Path, work_dir: str) -> None:
    with pytest.raises(ConfigError, match="work_dir"):
        LocalSandbox(isolation="none", root_dir=root, work_dir=work_dir).init()


def test_bad_constructor_input_is_a_config_error(root: Path) -> None:
    with pytest.raises(ConfigError, match="isolation"):
        LocalSandbox(isolation="docker", root_dir=root)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="work_dir"):
        LocalSandbox(root_dir=root, work_dir="home/user")
    with pytest.raises(ConfigError, match="timeout_ms"):
        LocalSandbox(root_dir=root, timeout_ms=-1)


# -- fs -----------------------------------------------------------------------------------
def test_fs_round_trips_bytes_exactly(sb: LocalSandbox) -> None:
    every_byte = bytes(range(256)) * 4
    sb.fs.write("bin/all.bin", every_byte)
    sb.fs.write("empty", b"")
    big = os.urandom(5 * 1024 * 1024)
    sb.fs.write("big.bin", big)
    assert sb.fs.read_bytes("bin/all.bin") == every_byte
    assert sb.fs.read_bytes("/home/user/empty") == b""
    assert sb.fs.read_bytes("big.bin") == big
    assert sb.exec("sha256sum big.bin").stdout.split()[0] == hashlib.sha256(big).hexdigest()


def test_fs_sees_what_commands_write_and_vice_versa(sb: LocalSandbox) -> None:
    sb.exec("mkdir -p 'd e' && printf 'ü\\n' > 'd e/ñame.txt'")
    assert sb.fs.read("d e/ñame.txt") == "ü\n"
    sb.fs.write("/home/user/from fs/ß.txt", "straße")
    assert sb.exec("cat 'from fs/ß.txt'").stdout == "straße"


def test_fs_write_overwrites_and_makes_parents(sb: LocalSandbox) -> None:
    sb.fs.write("a/b/c.txt", "long content")
    sb.fs.write("a/b/c.txt", "short")
    assert sb.fs.read("a/b/c.txt") == "short"
    assert sb.fs.stat("a/b").type == "dir"


def test_fs_list_stat_mkdir_remove_rename_glob(sb: LocalSandbox) -> None:
    fs = sb.fs
    fs.mkdir("p/q")
    fs.mkdir("p/q")  # fine if present
    fs.write("p/q/r.txt", "12345")
    fs.write("p/s.py", "")
    sb.exec("ln -s q/r.txt p/link")
    top = fs.list("p")
    assert [(e.name, e.type, e.path) for e in top] == [
        ("link", "symlink", "/home/user/p/link"),
        ("q", "dir", "/home/user/p/q"),
        ("s.py", "file", "/home/user/p/s.py"),
    ]
    assert top[0].symlink_target == "q/r.txt"
    deep = [e.path for e in fs.list("/home/user/p", depth=2)]
    assert "/home/user/p/q/r.txt" in deep
    entry = fs.stat("p/q/r.txt")
    assert (entry.name, entry.size, entry.type) == ("r.txt", 5, "file")
    assert entry.path == "/home/user/p/q/r.txt"
    assert entry.mode == 0o644 and entry.modified_time is not None
    assert fs.read("p/link") == "12345"
    assert fs.glob("p/**/*.txt") == ["p/q/r.txt"]
    assert fs.glob("/home/user/p/*.py") == ["/home/user/p/s.py"]
    fs.rename("p/s.py", "moved/t.py")
    assert fs.exists("moved/t.py") and not fs.exists("p/s.py")
    fs.remove("p")
    assert not fs.exists("p") and fs.exists("moved/t.py")
    with pytest.raises(ConfigError):
        fs.list(".", depth=0)


def test_fs_missing_paths_raise_file_not_found(sb: LocalSandbox) -> None:
    fs = sb.fs
    for call in (
        lambda: fs.read("nope.txt"),
        lambda: fs.stat("no/such"),
        lambda: fs.list("nodir"),
        lambda: fs.remove("gone"),
        lambda: fs.rename("gone", "there"),
    ):
        with pytest.raises(SandboxFileNotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert sb.sandbox_id in str(info.value)
    assert not fs.exists("nope.txt")
    fs.write("file", "x")
    assert not fs.exists("file/below")


@pytest.mark.parametrize(
    "path", ["../escape", "../../etc/passwd", "a/../../x", "/etc/passwd", "/home/other"]
)
def test_fs_refuses_paths_outside_the_sandbox(sb: LocalSandbox, path: str) -> None:
    for call in (
        lambda: sb.fs.read(path),
        lambda: sb.fs.write(path, "x"),
        lambda: sb.fs.exists(path),
        lambda: sb.fs.list(path),
        lambda: sb.fs.remove(path),
        lambda: sb.host_path(path),
    ):
        with pytest.raises(SandboxPathError, match="outside the sandbox"):
            call()


def test_fs_refuses_symlinks_made_inside_that_point_out(sb: LocalSandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    assert sb.exec(
        f"ln -s {outside} outdir && ln -s {outside}/secret outfile && ln -s ../../.. up "
        "&& mkdir real && ln -s /home/user/real inlink"
    ).ok
    for path in ("outdir/secret", "outfile", "up/etc/passwd", "outdir/new.txt"):
        with pytest.raises(SandboxPathError):
            sb.fs.read(path)
        with pytest.raises(SandboxPathError):
            sb.fs.write(path, "overwritten")
    with pytest.raises(SandboxPathError):
        sb.fs.list("outdir")
    assert (outside / "secret").read_text() == "host secret"
    assert not (outside / "new.txt").exists()
    # The links themselves can be inspected and removed without touching their targets.
    assert sb.fs.stat("outfile").type == "symlink"
    sb.fs.remove("outdir")
    assert (outside / "secret").exists()
    # Absolute links inside the sandbox's own view are followed.
    sb.fs.write("inlink/x.txt", "via link")
    assert sb.fs.read("real/x.txt") == "via link"
    assert sb.host_path("inlink/x.txt") == sb.directory / "real" / "x.txt"


def test_fs_refuses_to_remove_the_root(sb: LocalSandbox) -> None:
    with pytest.raises(SandboxPathError):
        sb.fs.remove("/home/user")
    assert sb.directory.is_dir()


# -- properties ---------------------------------------------------------------------------
# The module-scoped sandbox is deliberately shared by all examples (one sandbox per test).
_PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", params=MODES)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalSandbox]:
    root = tmp_path_factory.mktemp("shared-root")
    with _make(request.param, root) as sandbox:
        sandbox.exec("mkdir -p a/b && ln -s /etc link_out && ln -s /home/user/a link_in")
        yield sandbox


@_PROPERTY
@given(data=st.binary(max_size=4096))
def test_property_any_bytes_round_trip(shared: LocalSandbox, data: bytes) -> None:
    shared.fs.write("prop/blob.bin", data)
    assert shared.fs.read_bytes("prop/blob.bin") == data


_names = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0"),
    min_size=1,
    max_size=40,
).filter(lambda name: name not in (".", ".."))


@_PROPERTY
@given(name=_names, content=st.text(max_size=100))
def test_property_any_valid_name_round_trips(shared: LocalSandbox, name: str, content: str) -> None:
    shared.fs.write(f"names/{name}", content)
    try:
        assert shared.fs.read(f"names/{name}") == content
        assert [entry.name for entry in shared.fs.list("names")] == [name]
        assert shared.fs.stat(f"/home/user/names/{name}").path == f"/home/user/names/{name}"
    finally:
        shared.fs.remove("names")


_components = st.lists(
    st.sampled_from(["..", ".", "a", "b", "link_out", "link_in", "x"]), min_size=1, max_size=8
)


@settings(_PROPERTY, max_examples=80)
@given(parts=_components, absolute=st.booleans())
def test_property_paths_never_resolve_outside(
    shared: LocalSandbox, parts: list[str], absolute: bool
) -> None:
    path = ("/home/user/" if absolute else "") + "/".join(parts)
    root = shared.directory.resolve()
    try:
        host = shared.host_path(path)
    except (SandboxPathError, SandboxFileNotFoundError):
        return
    assert host.resolve() == root or root in host.resolve().parents
    assert shared.fs.exists(path) == host.exists() or host.is_symlink()


@needs_bwrap
def test_a_vanished_directory_is_a_sandbox_error_not_a_result(root: Path) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root) as sb:
        subprocess.run(["rm", "-rf", str(sb.directory)], check=True)
        with pytest.raises(SandboxNotFoundError, match="directory is gone"):
            sb.exec("true")


def test_vanished_directory_without_bwrap_is_a_sandbox_error(root: Path) -> None:
    with LocalSandbox(isolation="none", root_dir=root) as sb:
        subprocess.run(["rm", "-rf", str(sb.directory)], check=True)
        with pytest.raises(SandboxNotFoundError, match="directory is gone"):
            sb.exec("true")


def test_concurrent_execs_from_threads_do_not_mix_output(sb: LocalSandbox) -> None:
    results: dict[int, str] = {}

    def work(index: int) -> None:
        for round_ in range(5):
            result = sb.exec(f"echo {index}-{round_}; echo err-{index} >&2")
            assert result.stderr == f"err-{index}\n"
            results[index * 10 + round_] = result.stdout

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i * 10 + r: f"{i}-{r}\n" for i in range(4) for r in range(5)}
    assert len(sb.transcript) == 20


def test_list_local_sandboxes_reads_metadata_and_bare_directories(root: Path) -> None:
    with LocalSandbox(isolation="none", root_dir=root, metadata={"kode_run": "r1"}) as sb:
        (root / "local-orphan").mkdir()
        try:
            listed = {entry["sandbox_id"]: entry for entry in list_local_sandboxes(root)}
            assert listed[sb.sandbox_id]["metadata"] == {"kode_run": "r1"}
            assert listed[sb.sandbox_id]["pid"] == os.getpid()
            assert listed["local-orphan"]["directory"] == str(root / "local-orphan")
        finally:
            (root / "local-orphan").rmdir()


def test_dispose_spares_outside_processes_that_merely_sit_in_the_directory(
    isolation: str, root: Path
) -> None:
    sb = _make(isolation, root).init()
    # e.g. a developer's shell cd'ed into a kept sandbox while `pytest-kode gc` runs.
    visitor = subprocess.Popen(["sleep", "30"], cwd=sb.directory)
    try:
        resumed = _make(isolation, root, sandbox_id=sb.sandbox_id).init()
        resumed.dispose()
        sb.dispose()
        assert visitor.poll() is None, "dispose killed a process that is not the sandbox's"
    finally:
        visitor.kill()
        visitor.wait()


def test_remove_local_sandbox_clears_an_abandoned_sandbox(isolation: str, root: Path) -> None:
    marker = _unique_sleep()
    sb = _make(isolation, root).init()
    sb.exec("echo scratch > /tmp/kode-scratch-file")
    handle = sb.start(f"sleep {marker}")
    _wait_for(lambda: bool(_procs_with(marker)))
    # As a gc would: by id only, from outside the object that made it.
    assert remove_local_sandbox(sb.sandbox_id, root)
    assert _gone(marker)
    assert os.listdir(root) == []
    assert not remove_local_sandbox(sb.sandbox_id, root)
    assert not remove_local_sandbox("../etc", root)
    handle.wait(timeout_ms=5000)
    sb.dispose()
