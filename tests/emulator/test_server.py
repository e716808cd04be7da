"""The emulator as a server: clean start/stop without leaks, and the standalone command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from pytest_kode.backends.local import _process, list_local_sandboxes
from pytest_kode.emulator import E2BEmulator

ROOT = Path(__file__).resolve().parents[2]


def _emulator_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kode-")]


def test_stop_kills_sandboxes_and_leaves_no_threads_sockets_or_dirs(tmp_path: Path) -> None:
    from e2b import Sandbox

    threads_before = _emulator_threads()
    emu = E2BEmulator(root_dir=tmp_path).start()
    port = emu.port
    api: dict[str, Any] = {"api_key": emu.api_key, "api_url": emu.url, "sandbox_url": emu.url}
    first = Sandbox.create(**api)
    Sandbox.create(**api)
    handle = first.commands.run("sleep 60", background=True)
    assert len(list_local_sandboxes(tmp_path)) == 2
    emu.stop()
    emu.stop()  # idempotent
    assert not emu.running
    assert list_local_sandboxes(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    assert _emulator_threads() == threads_before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # handle.pid is the pid inside the sandbox; on this machine, the sandbox's processes are
    # descendants of this process (the emulator runs here): none is left.
    assert handle.pid > 0
    assert not [entry for entry in _process.descendants(os.getpid()) if entry[2] == "sleep"]


def test_env_points_the_sdk_at_the_emulator_and_the_key_has_the_sdk_shape() -> None:
    with E2BEmulator(api_key=None) as emu:
        assert emu.env == {
            "E2B_API_URL": emu.url,
            "E2B_SANDBOX_URL": emu.url,
            "E2B_API_KEY": emu.api_key,
        }
        assert emu.url.startswith("http://127.0.0.1:") and emu.port > 0
        assert emu.api_key.startswith("e2b_") and len(emu.api_key) == 44
        int(emu.api_key[4:], 16)
    with E2BEmulator(api_key="e2b_" + "ab" * 20) as emu:
        assert emu.env["E2B_API_KEY"] == "e2b_" + "ab" * 20


def test_a_taken_port_is_a_clear_error() -> None:
    from pytest_kode.errors import BackendUnavailableError

    with E2BEmulator() as emu:
        with pytest.raises(BackendUnavailableError, match=str(emu.port)):
            E2BEmulator(port=emu.port).start()


def test_importing_the_package_stays_cheap() -> None:
    code = (
        "import sys, pytest_kode.emulator; print(any(m in sys.modules for m in ('e2b', 'uvicorn')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_standalone_command_prints_exports_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    from e2b import Sandbox

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_kode.emulator", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "KODE_LOCAL_ROOT": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        exports = dict(
            proc.stdout.readline().removeprefix("export ").strip().split("=", 1) for _ in range(3)
        )
        assert set(exports) == {"E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"}
        sandbox = Sandbox.create(
            api_key=exports["E2B_API_KEY"],
            api_url=exports["E2B_API_URL"],
            sandbox_url=exports["E2B_SANDBOX_URL"],
        )
        assert sandbox.commands.run("echo served").stdout == "served\n"
        assert len(list_local_sandboxes(tmp_path)) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert list_local_sandboxes(tmp_path) == []  # stopping killed the sandbox
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _server_side_nodelay(port: int) -> list[int]:
    """TCP_NODELAY of every accepted connection of the server on ``port`` in this process."""
    flags = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            try:
                if sock.family != socket.AF_INET or sock.getsockname()[1] != port:
                    continue
                sock.getpeername()  # accepted connections only, not the listening socket
            except OSError:
                continue
            flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return flags


def test_kept_alive_connections_send_without_nagle_delay(sbx: Any, emulator: E2BEmulator) -> None:
    # A response goes out as two writes (headers, then body); with Nagle on, the second waits
    # for the client's delayed ACK (~40 ms) on every request of a kept-alive connection.
    assert sbx.files.exists("/home/user")
    flags = _server_side_nodelay(emulator.port)
    assert flags and all(flags), flags


def test_an_unexpected_failure_is_an_error_answer_not_a_traceback_on_the_terminal(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from pytest_kode.emulator import _control

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the emulator")

    with E2BEmulator() as emu:
        monkeypatch.setattr(_control, "handle", broken)  # a bug anywhere in a handler
        response = httpx.get(f"{emu.url}/sandboxes", headers={"X-API-KEY": emu.api_key})
    assert response.status_code == 500
    assert "RuntimeError: a bug in the emulator" in response.text
    err = capfd.readouterr().err
    assert "Exception in ASGI application" not in err and "Traceback" not in err, err


@pytest.mark.slow
def test_an_idle_kept_alive_connection_stays_open_for_the_client_to_retire(
    emulator: E2BEmulator,
) -> None:
    import time

    # The SDK's pools keep idle connections for minutes; a server that closes them sooner
    # races the client's next request on them (a write error in the middle of a test).
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += conn.recv(4096)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += conn.recv(4096)
        time.sleep(6)  # beyond uvicorn's default keep-alive of 5 s
        conn.setblocking(False)
        try:
            closed = conn.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            closed = False  # nothing to read and not closed: still open
        assert not closed
