"""E2BSandbox through the real ``e2b`` SDK, against the loopback emulator on 127.0.0.1.

Nothing is mocked: the SDK speaks its REST and Connect-RPC protocols to
``pytest_kode.emulator.E2BEmulator``, whose sandboxes run real processes on this machine.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _local import needs_bwrap

from pytest_kode.backends.e2b import E2BSandbox
from pytest_kode.errors import (
    BackendUnavailableError,
    KodeError,
    RateLimitError,
    SandboxConnectionError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)

if TYPE_CHECKING:
    from pytest_kode.emulator import E2BEmulator

Factory = Callable[..., E2BSandbox]
_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BEmulator]:
    from pytest_kode.emulator import E2BEmulator

    root = tmp_path_factory.mktemp("e2b-emulator-root")
    with E2BEmulator(port=0, root_dir=root) as emu:
        yield emu
        # Every sandbox these tests made was disposed (or vanished) through the SDK.
        assert emu.sandbox_ids() == []
    assert os.listdir(root) == [], "emulated sandboxes left files behind"


def _urls(emu: E2BEmulator) -> dict[str, str]:
    return {"api_url": emu.env["E2B_API_URL"], "sandbox_url": emu.env["E2B_SANDBOX_URL"]}


class Quick(E2BSandbox):
    """Retries without the production backoff, so fault tests stay fast."""

    retry_base_delay_s = 0.01
    retry_max_delay_s = 0.05


@pytest.fixture
def make(emulator: E2BEmulator) -> Iterator[Factory]:
    made: list[E2BSandbox] = []

    def factory(cls: type[E2BSandbox] = Quick, **fields: Any) -> E2BSandbox:
        fields.setdefault("api_key", emulator.api_key)
        sandbox = cls(**_urls(emulator), **fields)
        made.append(sandbox)
        return sandbox.init()

    yield factory
    for sandbox in made:
        sandbox.dispose()


@pytest.fixture
def sb(make: Factory) -> E2BSandbox:
    return make()


def _info(emulator: E2BEmulator, sandbox_id: str) -> Any:
    import e2b

    return e2b.Sandbox.get_info(sandbox_id, api_key=emulator.api_key, **_urls(emulator))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@needs_bwrap  # the /home/user paths are bwrap's view
# -- create / connect ---------------------------------------------------------------------------
def test_options_reach_create(make: Factory, emulator: E2BEmulator) -> None:
    sandbox = make(
        metadata={"suite": "e2b-backend", "case": "options"},
        envs={"KODE_GREETING": "hello from create"},
        timeout_ms=42_000,
        allow_internet_access=False,
        work_dir="/home/user/project",
    )
    info = _info(emulator, sandbox.sandbox_id)
    assert info.metadata["suite"] == "e2b-backend" and info.metadata["case"] == "options"
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 40 <= lifetime <= 43
    assert info.allow_internet_access is False
    result = sandbox.exec("echo $KODE_GREETING; pwd")
    assert result.stdout == "hello from create\n/home/user/project\n"
    assert sandbox.fs.stat("/home/user/project").type == "dir"
    assert sandbox.resumed is False and sandbox.backend == "e2b"


def test_resume_connects_and_reapplies_the_lifetime(make: Factory, emulator: E2BEmulator) -> None:
    first = make(timeout_ms=120_000)
    first.fs.write("note.txt", "kept")
    # A bare connect would only ever extend; asking for less proves set_timeout re-applied it.
    second = make(sandbox_id=first.sandbox_id, timeout_ms=20_000)
    assert second.resumed is True and second.sandbox_id == first.sandbox_id
    assert second.fs.read("note.txt") == "kept"
    left = _info(emulator, first.sandbox_id).end_at - datetime.datetime.now(datetime.UTC)
    assert 15 <= left.total_seconds() <= 21


def test_resume_of_a_killed_sandbox_is_not_found(make: Factory, emulator: E2BEmulator) -> None:
    first = make()
    sandbox_id = first.sandbox_id
    first.dispose()
    gone = Quick(**_urls(emulator), api_key=emulator.api_key, sandbox_id=sandbox_id)
    with pytest.raises(SandboxNotFoundError) as info:
        gone.init()
    assert sandbox_id in str(info.value) and info.value.hint
    assert not isinstance(info.value.__cause__, KodeError)
    gone.dispose()


def test_no_api_key_is_backend_unavailable(emulator: E2BEmulator) -> None:
    sandbox = Quick(**_urls(emulator), api_key=None)
    with pytest.raises(BackendUnavailableError, match="E2B_API_KEY"):
        sandbox.init()
    sandbox.dispose()


def test_wrong_key_is_backend_unavailable_and_never_shown(emulator: E2BEmulator) -> None:
    wrong = "e2b_" + "7" * 40
    before = emulator.created_count
    sandbox = Quick(**_urls(emulator), api_key=wrong)
    with pytest.raises(BackendUnavailableError) as info:
        sandbox.init()
    assert wrong not in str(info.value) and wrong not in repr(sandbox)
    assert "E2B_API_KEY" in str(info.value)
    assert emulator.created_count == before
    sandbox.dispose()


# -- exec ---------------------------------------------------------------------------------------
def test_exec_results_and_exit_codes(sb: E2BSandbox) -> None:
    ok = sb.exec("echo out; echo err >&2")
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, "out\n", "err\n")
    assert ok.ok and not ok.timed_out
    failed = sb.exec("echo partial; exit 3")
    assert (failed.exit_code, failed.stdout, failed.ok) == (3, "partial\n", False)
    assert failed.duration_ms > 0
    assert [entry.command for entry in sb.transcript] == [ok.command, failed.command]


def test_exec_timeout_keeps_partial_output_and_kills_the_tree(sb: E2BSandbox) -> None:
    started = time.monotonic()
    result = sb.exec("echo before; (sleep 1; touch late.txt) & sleep 30", timeout_ms=400)
    elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code == 124 and not result.ok
    assert result.stdout == "before\n"
    assert elapsed < 5
    time.sleep(1.3)
    assert not sb.fs.exists("late.txt"), "the background child outlived the timeout"


@needs_bwrap  # the /home/user paths are bwrap's view
def test_exec_stdin_cwd_and_envs(sb: E2BSandbox) -> None:
    assert sb.exec("cat", stdin="line one\nline two\n").stdout == "line one\nline two\n"
    assert sb.exec("od -An -tx1 | tr -d ' \\n'", stdin=b"\x00\xff\n").stdout == "00ff0a"
    assert sb.exec("wc -c", stdin=b"").stdout.strip() == "0"
    # A command that never reads its stdin still finishes normally.
    assert sb.exec("echo ignored", stdin="unused").stdout == "ignored\n"
    sb.fs.mkdir("sub/dir")
    assert sb.exec("pwd", cwd="sub/dir").stdout == f"{sb.options.work_dir}/sub/dir\n"
    absolute = f"{sb.options.work_dir}/sub"
    assert sb.exec("pwd", cwd=absolute).stdout == f"{absolute}\n"
    with pytest.raises(SandboxFileNotFoundError, match="no-such-dir"):
        sb.exec("pwd", cwd="no-such-dir")
    assert sb.exec("pwd").stdout == f"{sb.options.work_dir}\n"
    assert sb.exec('echo "$A-$B"', envs={"A": "1", "B": "two"}).stdout == "1-two\n"


def test_exec_output_is_bounded(make: Factory) -> None:
    sandbox = make(max_output_bytes=1000)
    result = sandbox.exec("head -c 100000 /dev/zero | tr '\\0' a; echo; echo tail-end")
    assert result.truncated
    assert result.stdout.startswith("a" * 400) and result.stdout.endswith("tail-end\n")
    assert "elided" in result.stdout
    assert len(result.stdout) < 1200


# -- background processes -----------------------------------------------------------------------
def test_background_start_kill_and_wait(make: Factory) -> None:
    sandbox = make(exec_timeout_ms=300)
    # A duration of its own: without isolation `ps` also lists other tests' sleeps.
    sleep = f"sleep 30.{os.getpid()}"
    server = sandbox.start(f"echo ready; {sleep}")
    assert server.pid > 0 and server.is_running()
    assert _eventually(lambda: server.stdout == "ready\n")
    server.kill()
    assert not server.is_running()
    assert sleep not in sandbox.exec("ps -eo args").stdout
    # Not bound by exec_timeout_ms (300 ms here).
    slow = sandbox.start("sleep 0.8; echo done >&2; exit 5")
    result = slow.wait()
    assert (result.exit_code, result.stderr, result.timed_out) == (5, "done\n", False)
    assert result.duration_ms >= 700


def test_background_wait_timeout_and_stdin(sb: E2BSandbox) -> None:
    stuck = sb.start("sleep 30")
    result = stuck.wait(timeout_ms=300)
    assert result.timed_out and result.exit_code == 124 and not stuck.is_running()
    reader = sb.start("read a; read b; echo got $a $b")
    reader.send_stdin("one\n")
    reader.send_stdin(b"two\n")
    assert reader.wait(timeout_ms=5000).stdout == "got one two\n"
    cat = sb.start("cat")
    cat.send_stdin("to the end")
    cat.close_stdin()
    assert cat.wait(timeout_ms=5000).stdout == "to the end"


def test_get_host_url_reaches_a_server_in_the_sandbox(sb: E2BSandbox) -> None:
    port = _free_port()
    sb.fs.write("www/index.html", "served from the sandbox")
    server = sb.start(f"exec python3 -m http.server {port} --bind 127.0.0.1", cwd="www")
    url = sb.get_host_url(port)
    assert url.startswith("http://127.0.0.1:")  # a port forwarded into the emulated sandbox

    def fetch() -> bool:
        try:
            with urllib.request.urlopen(url + "/index.html", timeout=2) as response:
                return bool(response.read() == b"served from the sandbox")
        except OSError:
            return False

    assert _eventually(fetch)
    server.kill()


# -- files --------------------------------------------------------------------------------------
def test_fs_round_trip_is_byte_exact(sb: E2BSandbox) -> None:
    blob = bytes(range(256)) * 64
    sb.fs.write("deep/nested/blob.bin", blob)
    data = sb.fs.read_bytes("deep/nested/blob.bin")
    assert type(data) is bytes and data == blob
    sb.fs.write("text.txt", "héllo\n")
    assert sb.fs.read("text.txt") == "héllo\n"
    sb.fs.write("text.txt", "over")
    assert sb.fs.read(f"{sb.options.work_dir}/text.txt") == "over"
    assert sb.exec("cat text.txt").stdout == "over"


def test_fs_stat_list_glob_rename_remove(sb: E2BSandbox) -> None:
    sb.fs.write("src/a.py", "a")
    sb.fs.write("src/pkg/b.py", "bb")
    sb.fs.write("src/pkg/c.txt", "c")
    sb.exec("chmod 640 src/a.py; ln -s a.py src/link")
    entry = sb.fs.stat("src/a.py")
    assert (entry.name, entry.type, entry.size, entry.mode) == ("a.py", "file", 1, 0o640)
    assert entry.path == f"{sb.options.work_dir}/src/a.py"
    assert entry.modified_time is not None
    link = sb.fs.stat("src/link")
    assert link.type == "symlink" and link.symlink_target is not None
    assert link.symlink_target.endswith("a.py")
    names = {e.name: e.type for e in sb.fs.list("src")}
    assert names == {"a.py": "file", "pkg": "dir", "link": "symlink"}
    assert len(sb.fs.list("src", depth=2)) == 5
    assert sb.fs.glob("src/**/*.py") == ["src/a.py", "src/pkg/b.py"]
    assert sb.fs.glob(f"{sb.options.work_dir}/src/*.py") == [f"{sb.options.work_dir}/src/a.py"]
    sb.fs.mkdir("src/pkg")  # already there: fine
    sb.fs.rename("src/pkg", "src/moved")
    assert sb.fs.exists("src/moved/b.py") and not sb.fs.exists("src/pkg")
    sb.fs.remove("src/moved")
    assert not sb.fs.exists("src/moved")


def test_missing_paths_raise_file_not_found(sb: E2BSandbox) -> None:
    for call in (
        lambda: sb.fs.read("missing.txt"),
        lambda: sb.fs.stat("missing.txt"),
        lambda: sb.fs.list("missing-dir"),
        lambda: sb.fs.remove("missing.txt"),
    ):
        with pytest.raises(SandboxFileNotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert "missing" in str(info.value) and sb.sandbox_id in str(info.value)
    assert sb.fs.exists("missing.txt") is False
    assert sb.fs.glob("missing-dir/*") == []


# -- faults -------------------------------------------------------------------------------------
def test_create_retries_through_fewer_429s_than_attempts(
    make: Factory, emulator: E2BEmulator
) -> None:
    before, limited = emulator.calls["create"], emulator.limited_count
    emulator.fail_next_creates(2, status=429)
    sandbox = make()
    assert sandbox.exec("echo up").stdout == "up\n"
    # Besides any the plan's own rate limit turned away (the suite shares this emulator).
    assert emulator.calls["create"] - before - (emulator.limited_count - limited) == 3


@pytest.mark.parametrize(
    ("status", "error"), [(429, RateLimitError), (503, SandboxConnectionError)]
)
def test_create_gives_up_when_its_retry_window_is_spent(
    emulator: E2BEmulator, status: int, error: type[KodeError]
) -> None:
    class Short(Quick):
        create_window_s = 2.5

    before_calls, before_created = emulator.calls["create"], emulator.created_count
    emulator.fail_next_creates(50, status=status)
    sandbox = Short(**_urls(emulator), api_key=emulator.api_key)
    try:
        with pytest.raises(error, match=r"after \d+ attempts") as info:
            sandbox.init()
    finally:
        emulator.clear_faults()
    assert type(info.value) is error
    # Retry-After (1 s here) is honoured: a 2.5 s window holds two or three attempts.
    assert 2 <= emulator.calls["create"] - before_calls <= 3
    assert emulator.created_count == before_created
    sandbox.dispose()


def test_create_waits_out_an_idempotent_request_in_flight(emulator: E2BEmulator) -> None:
    # The gateway answers 504 at once while the create goes on for another second: the retry
    # (same Idempotency-Key) gets 409 "in progress", then the very sandbox the first made.
    before_calls, before_created = emulator.calls["create"], emulator.created_count
    emulator.lose_create_answers(1, 504, hold_s=1.0)
    with Quick(**_urls(emulator), api_key=emulator.api_key) as sandbox:
        assert sandbox.exec("echo once").stdout == "once\n"
        assert emulator.created_count == before_created + 1
        assert emulator.calls["create"] - before_calls >= 3  # 504, 409..., 201
        tagged = [
            item
            for item in emulator.sandboxes()
            if item["metadata"].get("kode_create") and item["sandbox_id"] == sandbox.sandbox_id
        ]
        assert len(tagged) == 1


def test_an_orphan_of_a_failed_create_is_found_and_killed(emulator: E2BEmulator) -> None:
    class NoTime(Quick):
        create_window_s = 0.05  # no time for a retry: the create fails at its first answer

    before_created = emulator.created_count
    strict, emulator.profile = emulator.profile, "unlimited"  # its one create must not be paced
    try:
        emulator.lose_create_answers(1, 502)
        sandbox = NoTime(**_urls(emulator), api_key=emulator.api_key)
        with pytest.raises(
            SandboxConnectionError, match="made by an attempt whose answer was lost"
        ):
            sandbox.init()
        sandbox.dispose()
    finally:
        emulator.profile = strict
    assert emulator.created_count == before_created + 1
    assert not [item for item in emulator.sandboxes() if "kode_create" in item["metadata"]]


def test_latency_slows_but_does_not_break(sb: E2BSandbox, emulator: E2BEmulator) -> None:
    emulator.latency_ms = 150
    try:
        started = time.monotonic()
        assert sb.exec("echo slow").stdout == "slow\n"
        sb.fs.write("lag.txt", "x")
        assert sb.fs.read("lag.txt") == "x"
        assert time.monotonic() - started >= 0.3
    finally:
        emulator.latency_ms = 0


def test_vanished_sandbox_is_not_found_everywhere(sb: E2BSandbox, emulator: E2BEmulator) -> None:
    assert sb.is_alive()
    emulator.vanish(sb.sandbox_id)
    for call in (
        lambda: sb.exec("echo hi"),
        lambda: sb.fs.read("anything"),
        lambda: sb.start("sleep 1"),
        lambda: sb.set_timeout(10_000),
    ):
        with pytest.raises(SandboxNotFoundError) as info:
            call()
        assert not isinstance(info.value.__cause__, KodeError)
    assert sb.is_alive() is False
    sb.dispose()
    sb.dispose()


def test_killed_behind_our_back_is_not_found(sb: E2BSandbox, emulator: E2BEmulator) -> None:
    import e2b

    e2b.Sandbox.kill(sb.sandbox_id, api_key=emulator.api_key, **_urls(emulator))
    with pytest.raises(SandboxNotFoundError):
        sb.exec("true")
    assert not sb.is_alive()


def test_dispose_kills_the_sandbox_and_is_idempotent(make: Factory, emulator: E2BEmulator) -> None:
    sandbox = make()
    sandbox_id = sandbox.sandbox_id
    sandbox.start("sleep 30")
    assert sandbox_id in set(emulator.sandbox_ids())
    sandbox.dispose()
    sandbox.dispose()
    assert sandbox_id not in set(emulator.sandbox_ids())
    assert sandbox.is_alive() is False
    with pytest.raises(KodeError, match="disposed"):
        sandbox.exec("true")


def test_background_process_of_a_vanished_sandbox(sb: E2BSandbox, emulator: E2BEmulator) -> None:
    process = sb.start("echo hi; sleep 30")
    assert _eventually(lambda: process.stdout == "hi\n")
    emulator.vanish(sb.sandbox_id)
    with pytest.raises(SandboxNotFoundError):
        process.send_stdin("x")
    process.kill()  # quiet: the process died with its sandbox
    assert _eventually(lambda: not process.is_running())
    # The stream may end with the process's end event or break with the sandbox; either way
    # the outcome is a failed result or a SandboxNotFoundError, never a raw SDK error.
    try:
        result = process.wait(timeout_ms=2000)
    except SandboxNotFoundError as exc:
        assert not isinstance(exc.__cause__, KodeError)
    else:
        assert not result.ok and not result.timed_out and result.stdout == "hi\n"
    assert process.stdout == "hi\n"


def test_api_key_from_the_environment_never_reaches_the_sandbox(
    emulator: E2BEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_API_KEY", emulator.api_key)
    with Quick(**_urls(emulator)) as sandbox:
        env = sandbox.exec("env").stdout
        assert emulator.api_key not in env and "E2B_API_KEY" not in env
        assert emulator.api_key not in repr(sandbox)
        assert emulator.api_key not in repr(sandbox.options)


def test_unreachable_emulator_is_a_connection_error_and_dispose_stays_quiet() -> None:
    # In a subprocess: the SDK's connection retries are configured by environment at import.
    code = textwrap.dedent(
        """
        import pytest
        from pytest_kode.backends.e2b import E2BSandbox
        from pytest_kode.emulator import E2BEmulator
        from pytest_kode.errors import KodeError, SandboxConnectionError

        class One(E2BSandbox):
            retry_attempts = 2
            retry_base_delay_s = 0.01

        emulator = E2BEmulator().start()
        urls = {"api_url": emulator.url, "sandbox_url": emulator.url}
        sandbox = One(api_key=emulator.api_key, **urls).init()
        emulator.stop()
        for call in (lambda: sandbox.exec("true"), sandbox.is_alive, lambda: sandbox.fs.read("x"),
                     lambda: sandbox.set_timeout(1000)):
            with pytest.raises(SandboxConnectionError) as info:
                call()
            assert not isinstance(info.value.__cause__, KodeError), info.value.__cause__
        sandbox.dispose()
        # Quiet, but not silent: the provisioner counts it as leaked.
        assert isinstance(sandbox.kill_error, SandboxConnectionError), sandbox.kill_error
        """
    )
    env = {**os.environ, "E2B_CONNECTION_RETRIES": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env, cwd=_ROOT)


# -- round trips --------------------------------------------------------------------------------
@needs_bwrap  # work_dir is /home/user only inside bubblewrap
def test_create_is_one_round_trip_when_the_template_has_work_dir(
    make: Factory, emulator: E2BEmulator
) -> None:
    before = dict(emulator.calls)
    sandbox = make()
    made = {k: v - before.get(k, 0) for k, v in emulator.calls.items() if v != before.get(k, 0)}
    assert made == {"create": 1}, made
    assert sandbox.exec("pwd").stdout == "/home/user\n"


@needs_bwrap  # work_dir is /home/user only inside bubblewrap
def test_a_work_dir_the_template_lacks_is_made_when_a_command_first_needs_it(
    make: Factory, emulator: E2BEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pytest_kode.backends.e2b as e2b_backend

    # A template whose home is elsewhere: the work_dir assumed present is in fact missing.
    monkeypatch.setattr(e2b_backend, "_TEMPLATE_HOME", "/home/user/proj")
    before = emulator.calls["filesystem.MakeDir"]
    sandbox = make(work_dir="/home/user/proj")
    assert emulator.calls["filesystem.MakeDir"] == before  # not made at create
    assert not sandbox.fs.exists("/home/user/proj")
    assert sandbox.exec("pwd").stdout == "/home/user/proj\n"
    assert emulator.calls["filesystem.MakeDir"] - before == 1
    assert sandbox.exec("pwd").stdout == "/home/user/proj\n"
    assert emulator.calls["filesystem.MakeDir"] - before == 1
    # A cwd that does not exist is still the caller's error, not made for them.
    with pytest.raises(SandboxFileNotFoundError, match="nowhere"):
        sandbox.exec("true", cwd="/home/user/nowhere")


def test_a_failed_kill_is_kept_for_the_report_and_dispose_stays_quiet(
    make: Factory, emulator: E2BEmulator
) -> None:
    sandbox = make()
    emulator.fail_next_kills(100)  # more than the kill's own retries
    sandbox.dispose()
    emulator.clear_faults()
    assert sandbox.kill_error is not None
    assert sandbox.sandbox_id in str(sandbox.kill_error)
    assert sandbox.sandbox_id in emulator.sandbox_ids()  # it still runs: the report must say so
    emulator.vanish(sandbox.sandbox_id)
