"""Each bubblewrap sandbox's own network: loopback of its own, no way to the host's services, a
user-mode route out when the internet is on, and ports reached from the host via get_host_url.

No test sends traffic anywhere but to the host's loopback or to namespaces made here: "the route
out works" is shown by the stack's routing table and name server, "the host is out of reach" by
real servers on the host's 127.0.0.1.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _local import needs_bwrap

from pytest_kode.backends.local import LocalSandbox
from pytest_kode.backends.local._network import SLIRP_DNS
from pytest_kode.errors import ConfigError, KodeError
from pytest_kode.sandbox import ProcessHandle

pytestmark = pytest.mark.usefixtures("no_leaked_children")

REPO = Path(__file__).resolve().parents[1]

INTERNET = pytest.mark.parametrize("internet", [True, False], ids=["internet-on", "internet-off"])


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on the host's 127.0.0.1 that answers every connection with a line."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    yield server.getsockname()[1]
    server.close()


def _fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def _serve(sb: LocalSandbox, port: int, text: str, bind: str = "127.0.0.1") -> ProcessHandle:
    """Serve ``text`` at ``/`` on ``bind:port`` inside ``sb``; return once it answers."""
    folder = f"site{port}"
    sb.fs.write(f"{folder}/index.html", text)
    server = sb.start(f"exec python3 -m http.server {port} --bind {bind} --directory {folder}")
    url = sb.get_host_url(port)
    deadline = time.monotonic() + 15
    while True:
        try:
            _fetch(url, timeout=2)
            return server
        except (OSError, http.client.HTTPException):
            assert server.is_running(), f"the server died:\n{server.stderr}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{server.stderr}"
            time.sleep(0.05)


# -- own loopback, own ports --------------------------------------------------------------
@needs_bwrap
@INTERNET
@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_two_sandboxes_serve_the_same_port_each_through_its_own_url(
    root: Path, internet: bool, bind: str
) -> None:
    options = {"isolation": "bwrap", "root_dir": root, "allow_internet_access": internet}
    with LocalSandbox(**options) as first, LocalSandbox(**options) as second:  # type: ignore[arg-type]
        _serve(first, 8000, "first\n", bind)
        _serve(second, 8000, "second\n", bind)
        one, two = first.get_host_url(8000), second.get_host_url(8000)
        assert one != two and one.startswith("http://127.0.0.1:")
        assert (_fetch(one), _fetch(two)) == ("first\n", "second\n")
        assert first.get_host_url(8000) == one  # one forward per sandbox and port


@needs_bwrap
def test_a_port_the_host_uses_is_free_inside(root: Path, host_server: int) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root) as sb:
        _serve(sb, host_server, "inside\n")
        assert _fetch(sb.get_host_url(host_server)) == "inside\n"


# -- the host is out of reach -------------------------------------------------------------
@needs_bwrap
@INTERNET
def test_host_loopback_services_are_out_of_reach(
    root: Path, host_server: int, internet: bool
) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root, allow_internet_access=internet) as sb:
        targets = ["127.0.0.1", "10.0.2.2"] if internet else ["127.0.0.1"]
        for target in targets:
            result = sb.exec(f"timeout 5 bash -c 'echo hi > /dev/tcp/{target}/{host_server}'")
            assert result.exit_code == 1, (target, result)
            assert "refused" in result.stderr or "unreachable" in result.stderr, result.stderr


@needs_bwrap
@INTERNET
def test_host_abstract_unix_sockets_are_out_of_reach(root: Path, internet: bool) -> None:
    name = f"kode-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("\0" + name)
        server.listen(1)
        with LocalSandbox(isolation="bwrap", root_dir=root, allow_internet_access=internet) as sb:
            code = (
                "import socket; s = socket.socket(socket.AF_UNIX); "
                f"s.connect('\\0{name}'); print('reached')"
            )
            result = sb.exec(f'python3 -c "{code}"')
            assert result.exit_code != 0 and "reached" not in result.stdout
            assert "ConnectionRefusedError" in result.stderr


# -- the route out -------------------------------------------------------------------------
def _interfaces(sb: LocalSandbox) -> set[str]:
    lines = sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


def _default_route(sb: LocalSandbox) -> list[str]:
    rows = [line.split() for line in sb.exec("cat /proc/net/route").stdout.splitlines()[1:]]
    return [row[0] for row in rows if row[1] == "00000000"]


@needs_bwrap
def test_internet_on_routes_out_through_the_user_mode_stack(root: Path) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root) as sb:
        assert _interfaces(sb) == {"lo", "tap0"}
        assert _default_route(sb) == ["tap0"]
        assert sb.exec("cat /etc/resolv.conf").stdout.split() == ["nameserver", SLIRP_DNS]
        # The stack is live: its gateway answers (ARP, then an ICMP error for the port: it
        # maps nothing to the host), without any traffic leaving the machine.
        sb.exec("timeout 5 bash -c 'echo > /dev/tcp/10.0.2.2/9'")
        arp = [line.split() for line in sb.exec("cat /proc/net/arp").stdout.splitlines()[1:]]
        assert ["10.0.2.2", "0x2", "tap0"] in [[row[0], row[2], row[5]] for row in arp]


@needs_bwrap
def test_internet_off_is_loopback_only(root: Path) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root, allow_internet_access=False) as sb:
        assert _interfaces(sb) == {"lo"}
        assert _default_route(sb) == []
        result = sb.exec("timeout 5 bash -c 'echo > /dev/tcp/10.0.2.2/9'")
        assert "unreachable" in result.stderr, result


# -- get_host_url --------------------------------------------------------------------------
@pytest.mark.parametrize("port", [0, -1, 65536, "8000", True, 8000.0, None])
def test_get_host_url_rejects_what_is_not_a_port(isolation: str, root: Path, port: object) -> None:
    with LocalSandbox(isolation=isolation, root_dir=root) as sb:  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="1-65535"):
            sb.get_host_url(port)  # type: ignore[arg-type]


@needs_bwrap
@INTERNET
def test_a_port_nothing_listens_on_gives_a_url_that_resets_at_once(
    root: Path, internet: bool
) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root, allow_internet_access=internet) as sb:
        url = sb.get_host_url(8123)
        started = time.monotonic()
        with pytest.raises(
            (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError)
        ):
            _fetch(url, timeout=30)
        assert time.monotonic() - started < 10  # a reset, not a client timeout


@needs_bwrap
def test_dispose_closes_the_forwarded_ports(root: Path) -> None:
    sb = LocalSandbox(isolation="bwrap", root_dir=root).init()
    try:
        _serve(sb, 8000, "up\n")
        url = sb.get_host_url(8000)
    finally:
        sb.dispose()
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(KodeError):
        sb.get_host_url(8000)


def test_without_isolation_the_host_url_is_the_port_itself(root: Path) -> None:
    with LocalSandbox(isolation="none", root_dir=root) as sb:
        assert sb.get_host_url(8000) == "http://127.0.0.1:8000"


# -- faults --------------------------------------------------------------------------------
def _pipes(pid: int) -> set[str]:
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


def _slirps_of(sb: LocalSandbox) -> list[int]:
    """The host pids of the slirp4netns serving ``sb``: found by the exit pipe it shares with
    the sandbox's agent (whichever process started it, and without asking the sandbox)."""
    bwrap_pid = sb._meta["agent"]["pid"]
    held: set[str] = set()
    for task in os.listdir(f"/proc/{bwrap_pid}/task"):
        with open(f"/proc/{bwrap_pid}/task/{task}/children") as handle:
            for agent in handle.read().split():
                held |= _pipes(int(agent))
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm") as handle:
                if handle.read().strip() != "slirp4netns":
                    continue
        except OSError:
            continue
        if held & _pipes(int(name)):
            found.append(int(name))
    return found


@needs_bwrap
def test_a_dead_network_stack_takes_the_route_out_not_the_sandbox(root: Path) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=root) as sb:
        _serve(sb, 8000, "up\n")
        url = sb.get_host_url(8000)
        (slirp,) = _slirps_of(sb)
        os.kill(slirp, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while "tap0" in _interfaces(sb):  # the route out is gone with the stack
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _default_route(sb) == []
        # The way in is the agent's, not the stack's: ports are still reached.
        assert _fetch(url) == "up\n"
        assert sb.exec("echo still-running").stdout == "still-running\n"
    # The `with` disposed of it: no_leaked_children and the root fixture check nothing is left.


_RESUMER = textwrap.dedent(
    """
    import sys, urllib.request
    from pytest_kode.backends.local import LocalSandbox
    sandbox = LocalSandbox(sandbox_id=sys.argv[1], root_dir=sys.argv[2]).init()
    url = sandbox.get_host_url(8000)
    with urllib.request.urlopen(url, timeout=10) as response:
        print(url, response.read().decode().strip(), flush=True)
    sandbox.detach()
    """
)


@needs_bwrap
@INTERNET
def test_a_resumed_sandbox_reaches_its_ports_from_another_process(
    root: Path, internet: bool
) -> None:
    """The way in is the sandbox's agent: any process that resumes the sandbox gets its own."""
    with LocalSandbox(isolation="bwrap", root_dir=root, allow_internet_access=internet) as sb:
        _serve(sb, 8000, "served-inside\n")
        resumed = subprocess.run(
            [sys.executable, "-c", _RESUMER, sb.sandbox_id, str(root)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
        assert resumed.returncode == 0, resumed.stderr
        url, text = resumed.stdout.split()
        assert text == "served-inside"
        assert url != sb.get_host_url(8000)  # its own relay, gone with that process
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 5).close()
        assert _fetch(sb.get_host_url(8000)) == "served-inside\n"


_KEEPER = textwrap.dedent(
    """
    import sys
    from pytest_kode.backends.local import LocalSandbox
    sandbox = LocalSandbox(isolation="bwrap", root_dir=sys.argv[1]).init()
    sandbox.exec("true")
    sandbox.detach()
    print(sandbox.sandbox_id, flush=True)
    """
)


@needs_bwrap
def test_a_kept_sandbox_keeps_its_route_out_after_its_creator_exits(root: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-c", _KEEPER, str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    sb = LocalSandbox(sandbox_id=made.stdout.strip(), root_dir=root).init()
    try:
        assert _interfaces(sb) == {"lo", "tap0"}
        assert _default_route(sb) == ["tap0"]
        assert len(_slirps_of(sb)) == 1
        # A server inside is reached from this process too.
        _serve(sb, 8000, "kept\n")
    except BaseException:
        sb.dispose()
        raise
    slirps = _slirps_of(sb)
    sb.dispose()
    # The stack goes with the sandbox (its exit pipe was held by the sandbox's processes).
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in slirps):
        assert time.monotonic() < deadline, "slirp4netns outlived its sandbox"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except OSError:
        return False
