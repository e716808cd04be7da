"""``https://{sandbox.get_host(port)}`` offline: the emulator's CONNECT proxy and certificates."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_kode.emulator import E2BEmulator


@pytest.fixture(scope="module")
def hosts_emulator() -> Iterator[E2BEmulator]:
    with E2BEmulator(profile="unlimited", https_hosts=True) as emu:
        yield emu


@pytest.fixture
def hosts_api(hosts_emulator: E2BEmulator) -> dict[str, Any]:
    emu = hosts_emulator
    return {"api_key": emu.api_key, "api_url": emu.url, "sandbox_url": emu.url}


@pytest.fixture
def client(hosts_emulator: E2BEmulator) -> Iterator[Any]:
    """An httpx client configured as the emulator's env configures one: through its proxy,
    verifying certificates against its trust bundle (nothing is left unverified)."""
    import httpx

    env = hosts_emulator.env
    verify = ssl.create_default_context(cafile=env["SSL_CERT_FILE"])
    with httpx.Client(proxy=env["HTTPS_PROXY"], verify=verify, timeout=10) as http:
        yield http


def _serve(sandbox: Any, port: int) -> Any:
    sandbox.files.write("www/index.html", "hello from the sandbox")
    return sandbox.commands.run(
        f"python -m http.server {port}", cwd="/home/user/www", background=True
    )


def _get_until_served(client: Any, url: str) -> Any:
    deadline = time.monotonic() + 15
    while True:
        response = client.get(url)
        if response.status_code != 502 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)  # the server in the sandbox is still starting


def test_a_sandbox_port_is_served_over_verified_https(
    hosts_api: dict[str, Any], client: Any
) -> None:
    from e2b import Sandbox

    sandbox = Sandbox.create(**hosts_api)
    try:
        server = _serve(sandbox, 8001)
        response = _get_until_served(client, f"https://{sandbox.get_host(8001)}/index.html")
        assert response.status_code == 200
        assert response.text == "hello from the sandbox"
        server.kill()
    finally:
        sandbox.kill()


def test_a_closed_port_and_a_missing_sandbox_get_the_edges_502(
    hosts_api: dict[str, Any], client: Any
) -> None:
    from e2b import Sandbox

    sandbox = Sandbox.create(**hosts_api)
    host = sandbox.get_host(8009)
    try:
        closed = client.get(f"https://{host}/")
        assert closed.status_code == 502
        assert "port is not open" in closed.json()["message"]
    finally:
        sandbox.kill()
    gone = client.get(f"https://{host}/")
    assert gone.status_code == 502
    assert "was not found" in gone.json()["message"]


def test_a_request_to_its_host_wakes_an_auto_resume_sandbox(
    hosts_api: dict[str, Any], client: Any
) -> None:
    from e2b import Sandbox

    sandbox = Sandbox.create(**hosts_api, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        _serve(sandbox, 8002)
        url = f"https://{sandbox.get_host(8002)}/index.html"
        assert _get_until_served(client, url).status_code == 200
        sandbox.pause()
        assert Sandbox.get_info(sandbox.sandbox_id, **hosts_api).state.value == "paused"
        response = client.get(url)
        assert response.status_code == 200
        assert Sandbox.get_info(sandbox.sandbox_id, **hosts_api).state.value == "running"
    finally:
        Sandbox.kill(sandbox.sandbox_id, **hosts_api)


def test_a_request_just_after_the_end_time_wakes_the_sandbox_and_is_answered(
    hosts_emulator: E2BEmulator, hosts_api: dict[str, Any], client: Any
) -> None:
    from e2b import Sandbox

    sandbox = Sandbox.create(
        **hosts_api, timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True}
    )
    try:
        _serve(sandbox, 8004)
        url = f"https://{sandbox.get_host(8004)}/index.html"
        assert _get_until_served(client, url).status_code == 200
        for _ in range(3):
            # Past its end before the reaper came by: the request itself finds it due for
            # its auto-pause, and the pause, deferred to a worker, must not land on the
            # sandbox the request has just woken.
            hosts_emulator.clock_offset_s += 120
            assert client.get(url).status_code == 200
            time.sleep(0.3)  # a late pause would show now
            info = Sandbox.get_info(sandbox.sandbox_id, **hosts_api)
            assert info.state.value == "running"
    finally:
        hosts_emulator.clock_offset_s = 0.0
        Sandbox.kill(sandbox.sandbox_id, **hosts_api)


def test_the_emulators_env_is_all_a_client_process_needs(
    hosts_emulator: E2BEmulator, hosts_api: dict[str, Any], client: Any
) -> None:
    from e2b import Sandbox

    sandbox = Sandbox.create(**hosts_api)
    try:
        _serve(sandbox, 8003)
        _get_until_served(client, f"https://{sandbox.get_host(8003)}/")
        code = (
            "import sys, httpx\n"
            "from e2b import Sandbox\n"
            "sandbox = Sandbox.connect(sys.argv[1])\n"
            "print(httpx.get(f'https://{sandbox.get_host(8003)}/index.html').text)\n"
        )
        clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        completed = subprocess.run(
            [sys.executable, "-c", code, sandbox.sandbox_id],
            env={**clean, **hosts_emulator.env, "E2B_VALIDATE_API_KEY": "false"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout == "hello from the sandbox\n"
    finally:
        sandbox.kill()


def test_other_tunnels_pass_through_untouched(hosts_emulator: E2BEmulator) -> None:
    env = hosts_emulator.env
    proxy_port = int(env["HTTPS_PROXY"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as conn:
        target = f"127.0.0.1:{hosts_emulator.port}"
        conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        # Plain HTTP inside the tunnel reaches the emulator itself, not a TLS endpoint.
        conn.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404")
    assert b"no such API endpoint: GET /nowhere" in answer


def test_the_proxy_refuses_what_is_not_a_tunnel(hosts_emulator: E2BEmulator) -> None:
    proxy_port = int(hosts_emulator.env["HTTPS_PROXY"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as conn:
        conn.sendall(b"GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 405")


def test_without_https_hosts_the_env_names_only_the_sdks_variables(emulator: E2BEmulator) -> None:
    assert set(emulator.env) == {"E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"}


def test_standalone_command_exports_the_https_host_variables(tmp_path: Any) -> None:
    import signal
    from pathlib import Path

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_kode.emulator", "--port", "0", "--https-hosts"],
        env={**os.environ, "KODE_LOCAL_ROOT": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        exports = dict(
            proc.stdout.readline().removeprefix("export ").strip().split("=", 1) for _ in range(8)
        )
        assert {"HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "E2B_API_URL"} <= set(exports)
        bundle = Path(exports["SSL_CERT_FILE"])
        assert b"BEGIN CERTIFICATE" in bundle.read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not bundle.exists()  # stopping removed the authority's files
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # closes the pipes


def test_without_cryptography_https_hosts_fail_clearly_and_nothing_starts() -> None:
    code = (
        "import sys\n"
        "sys.modules['cryptography'] = None  # as if it were not installed\n"
        "from pytest_kode.emulator import E2BEmulator\n"
        "from pytest_kode.errors import BackendUnavailableError\n"
        "emulator = E2BEmulator(https_hosts=True)\n"
        "try:\n"
        "    emulator.start()\n"
        "except BackendUnavailableError as exc:\n"
        "    print(exc)\n"
        "print('running:', emulator.running)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "needs the `cryptography` package" in completed.stdout
    assert "pip install 'pytest-kode[emulator]'" in completed.stdout
    assert "running: False" in completed.stdout
