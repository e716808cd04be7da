"""A network namespace of its own for every bubblewrap sandbox, and its ports reached from the host.

Each sandbox gets a *holder*: ``unshare --user --map-root-user --net`` running a few lines of
stdlib Python (:data:`_HOLDER`) that bring the namespace's loopback up, then hand out TCP sockets
created inside the namespace over a Unix socket pair, one per request. The sandbox's agent,
once, at start, enters the holder's user and network namespaces (``nsenter``,
:meth:`SandboxNetwork.enter_argv`) before bubblewrap builds the rest, so all processes of one
sandbox share one network and no two sandboxes (nor the host) share a port space.

With ``allow_internet_access=True``, ``slirp4netns`` gives the namespace a user-mode route out
(``10.0.2.100`` behind a NAT, DNS at :data:`SLIRP_DNS`), started with ``--disable-host-loopback``
so the gateway does not lead to the host's 127.0.0.1. pasta (passt) was measured too: as root it
only works with ``--runas 0`` and took ~100 ms to come up against slirp4netns' ~3 ms
(``benchmarks/network_stack.py``). With ``allow_internet_access=False`` there is no stack: loopback
only.

``host_url(port)`` listens on a free port of the host's 127.0.0.1 and relays each connection to
``127.0.0.1:port`` (or ``[::1]:port``) *inside* the namespace, through a socket the holder made,
so servers bound to loopback inside are reached as well as those bound to 0.0.0.0, with the
internet on or off. A port nothing listens on gives a connection that is reset at once.

Lifetimes: the holder exits when its end of the socket pair sees EOF and slirp4netns when its
``--exit-fd`` does, so both go with the test process even when it is killed with SIGKILL.
:meth:`SandboxNetwork.close` ends them (and every relay) at ``dispose()``. A helper that dies
ends what it serves, and nothing else: the agent entered the namespace once, at start, and keeps
it, so the sandbox and its commands run on; without the holder, relays reset their connections
and ``host_url`` says why; without slirp4netns, the route out is gone. The test process is
unharmed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import IO

from pytest_kode._threads import start_thread
from pytest_kode.errors import BackendUnavailableError, KodeError

__all__ = [
    "SLIRP_DNS",
    "SLIRP_INSTALL_HINT",
    "SandboxNetwork",
    "agent_python",
    "stack_problem",
]

SLIRP_DNS = "10.0.2.3"
SLIRP_INSTALL_HINT = (
    "install slirp4netns (Debian/Ubuntu: `apt-get install slirp4netns`; Fedora: `dnf install "
    "slirp4netns`), or create the sandbox with allow_internet_access=False"
)
_READY_TIMEOUT_S = 15.0
_RELAY_CHUNK = 65536

# Run inside the new namespaces with ``python -I -S``: only built-in modules (fast to import).
# SIOCSIFFLAGS on "lo" with IFF_UP | IFF_LOOPBACK | IFF_RUNNING; then one socket per request.
_HOLDER = r"""
import _socket, fcntl, sys
probe = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
flags = (0x1 | 0x8 | 0x40).to_bytes(2, sys.byteorder)
fcntl.ioctl(probe.fileno(), 0x8914, b"lo" + bytes(14) + flags + bytes(22))
probe.close()
control = _socket.socket(fileno=int(sys.argv[1]))
control.send(b"r")
while True:
    request = control.recv(8)
    if not request:
        break
    family = _socket.AF_INET6 if request == b"6" else _socket.AF_INET
    made = _socket.socket(family, _socket.SOCK_STREAM)
    fd = made.fileno().to_bytes(4, sys.byteorder)
    control.sendmsg([b"s"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)])
    made.close()
"""


def agent_python() -> str:
    """The interpreter that runs inside sandboxes: this one, resolved out of any venv.

    A venv's ``bin/python`` is a link into the base installation, which is what the sandbox's
    view shows; the venv itself (often inside the project checkout) stays invisible.
    """
    return os.path.realpath(sys.executable)


def stack_problem() -> str | None:
    """Why sandboxes with the internet on cannot get a network stack here, or None."""
    if shutil.which("slirp4netns") is None:
        return "the `slirp4netns` executable is not on PATH"
    return None


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(name)
    return path


class SandboxNetwork:
    """One sandbox's network namespace, its optional user-mode stack, and its port relays.

    :meth:`start` spawns the helpers without waiting; :meth:`ready` waits for them (call it before
    the first launch: until then the holder may not have left the host's namespaces yet).
    """

    def __init__(self, *, internet: bool, sandbox_id: str | None = None) -> None:
        self.internet = internet
        self.sandbox_id = sandbox_id
        self._lock = threading.Lock()
        self._holder: _Helper | None = None
        self._control: socket.socket | None = None
        self._slirp: _Helper | None = None
        self._slirp_exit: int | None = None  # write end of slirp4netns' --exit-fd pipe
        self._ready = False
        self._closed = False
        self._relays: dict[int, _Relay] = {}

    # -- set-up -----------------------------------------------------------------------------
    @property
    def dns(self) -> str | None:
        """The name server the sandbox's resolv.conf must name (None: keep the host's)."""
        return SLIRP_DNS if self.internet else None

    def start(self) -> SandboxNetwork:
        """Spawn the holder (and nothing else yet); :meth:`ready` finishes the set-up."""
        if self.internet and stack_problem() is not None:
            raise self._error(
                BackendUnavailableError,
                f"allow_internet_access=True needs a user-mode network stack: {stack_problem()}",
                SLIRP_INSTALL_HINT,
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._holder = _spawn(
                [
                    *(_tool("unshare"), "--user", "--map-root-user", "--net", "--"),
                    *(agent_python(), "-I", "-S", "-c", _HOLDER, str(theirs.fileno())),
                ],
                (theirs.fileno(),),
            )
        except OSError as exc:
            ours.close()
            raise self._error(
                BackendUnavailableError,
                f"cannot start the sandbox's network namespace holder: {exc}",
                "install util-linux (`unshare`, `nsenter`)",
            ) from exc
        finally:
            theirs.close()
        self._control = ours
        return self

    def ready(self) -> None:
        """Wait until the namespace exists (and, with the internet on, has its route out)."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            if self._closed or self._holder is None or self._control is None:
                raise self._gone("the sandbox's network was closed")
            try:
                self._wait_holder(self._holder, self._control)
                if self.internet:
                    self._start_slirp(self._holder.pid)
            except BaseException:
                self._stop_helpers()
                raise
            self._ready = True

    def _wait_holder(self, holder: _Helper, control: socket.socket) -> None:
        control.settimeout(_READY_TIMEOUT_S)
        try:
            answer = control.recv(1)
        except OSError as exc:
            answer = b""
            detail = f"no answer within {_READY_TIMEOUT_S:.0f}s ({exc})"
        else:
            detail = ""
        control.settimeout(None)
        if answer == b"r":
            return
        if not detail:
            detail = holder.error_output()
        raise self._error(
            BackendUnavailableError,
            f"cannot create the sandbox's network namespace (`unshare --user --net`): {detail}",
            "allow unprivileged user namespaces (Ubuntu: sudo sysctl "
            "kernel.apparmor_restrict_unprivileged_userns=0), or use isolation='none'",
        )

    def _start_slirp(self, holder_pid: int) -> None:
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            self._slirp = _spawn(
                [
                    _tool("slirp4netns"),
                    "--configure",
                    "--mtu=65520",
                    # The gateway must not lead to the host's 127.0.0.1: that is the host.
                    "--disable-host-loopback",
                    f"--ready-fd={ready_w}",
                    f"--exit-fd={exit_r}",
                    f"--userns-path=/proc/{holder_pid}/ns/user",
                    str(holder_pid),
                    "tap0",
                ],
                (ready_w, exit_r),
            )
        except OSError as exc:
            os.close(exit_w)
            raise self._error(
                BackendUnavailableError, f"cannot start slirp4netns: {exc}", SLIRP_INSTALL_HINT
            ) from exc
        finally:
            os.close(ready_w)
            os.close(exit_r)
        self._slirp_exit = exit_w
        try:
            # slirp4netns writes "1" once tap0 is configured, or exits (EOF) if it cannot.
            ok = os.read(ready_r, 1) == b"1"
        finally:
            os.close(ready_r)
        if not ok:
            detail = self._slirp.error_output()
            raise self._error(
                KodeError,
                f"slirp4netns could not give the sandbox a network: {detail or 'no output'}",
                "run it by hand to see why, or create the sandbox with allow_internet_access=False",
            )

    # -- use --------------------------------------------------------------------------------
    def enter_argv(self) -> list[str]:
        """The prefix that runs a command inside this network (and its user namespace)."""
        self.ready()
        assert self._holder is not None
        pid = self._holder.pid
        # The holder stays our unreaped child until close(), so its pid cannot be recycled:
        # once it is gone these paths fail instead of naming somebody else's namespaces.
        return [
            _tool("nsenter"),
            "--preserve-credentials",
            f"--user=/proc/{pid}/ns/user",
            f"--net=/proc/{pid}/ns/net",
            "--",
        ]

    def alive(self) -> bool:
        """Whether every helper of this network still runs."""
        helpers = [self._holder, self._slirp] if self.internet else [self._holder]
        return not self._closed and all(
            helper is not None and _running(helper.pid) for helper in helpers
        )

    def host_url(self, port: int) -> str:
        """``http://127.0.0.1:<free port>``, relayed to ``port`` inside (set up on first ask)."""
        self.ready()
        with self._lock:
            if self._closed:
                raise self._gone("the sandbox's network was closed")
            if self._holder is None or not _running(self._holder.pid):
                # Only the holder makes sockets inside: a relay now would reset every
                # connection without saying why.
                raise self._error(
                    KodeError,
                    f"cannot reach port {port} from the host: the sandbox's network holder "
                    "has exited, and with it the way into the sandbox's network",
                    "the sandbox and its commands still run; create a new sandbox to reach "
                    "its ports (was the holder process killed?)",
                )
            relay = self._relays.get(port)
            if relay is None:
                relay = self._relays[port] = _Relay(port, self._inner_socket)
        return f"http://127.0.0.1:{relay.host_port}"

    def _inner_socket(self, family: socket.AddressFamily) -> socket.socket:
        """A fresh TCP socket that lives in the sandbox's network namespace."""
        control = self._control
        if control is None:
            raise OSError("the sandbox's network is closed")
        with self._lock:
            control.send(b"6" if family == socket.AF_INET6 else b"4")
            _, ancillary, _, _ = control.recvmsg(1, socket.CMSG_SPACE(4))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
                return socket.socket(fileno=int.from_bytes(data[:4], sys.byteorder))
        raise OSError("the sandbox's network holder is gone")

    # -- teardown ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Signal the helpers to end without waiting for them; :meth:`close` finishes.

        slirp4netns takes ~25 ms to exit (the kernel tears its tap device down): a caller with
        other teardown to do starts that first and overlaps the wait with it.
        """
        for helper in (self._slirp, self._holder):
            if helper is not None:
                helper.signal()

    def close(self) -> None:
        """Stop every relay and helper and wait for them to exit (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            relay.close()
        self._stop_helpers()

    def _stop_helpers(self) -> None:
        if self._control is not None:
            self._control.close()  # the holder's EOF
            self._control = None
        if self._slirp_exit is not None:
            os.close(self._slirp_exit)  # slirp4netns' --exit-fd
            self._slirp_exit = None
        for helper in (self._slirp, self._holder):
            if helper is not None:
                helper.stop()

    def _error(self, cls: type[KodeError], message: str, hint: str) -> KodeError:
        return cls(message, backend="local", sandbox_id=self.sandbox_id, hint=hint)

    def _gone(self, why: str) -> KodeError:
        return self._error(KodeError, why, "the sandbox was disposed; create a new one")


def _spawn(argv: list[str], pass_fds: tuple[int, ...]) -> _Helper:
    # stderr goes to an unlinked file, not a pipe: a long-lived helper must never block on a
    # full pipe nobody reads; the file is read only when the helper failed.
    errors = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            pass_fds=pass_fds,
            start_new_session=True,
        )
    except BaseException:
        errors.close()
        raise
    return _Helper(proc, errors)


class _Helper:
    """A helper process and the file its stderr goes to."""

    def __init__(self, proc: subprocess.Popen[bytes], errors: IO[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._errors = errors

    def error_output(self) -> str:
        self.proc.wait()
        self._errors.seek(0)
        text = self._errors.read(4096).decode("utf-8", "replace").strip()
        return text or f"exit code {self.proc.returncode}"

    def signal(self) -> None:
        try:
            self.proc.send_signal(signal.SIGKILL)
        except OSError:
            pass

    def stop(self) -> None:
        self.signal()
        self.proc.wait()
        self._errors.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


class _Relay:
    """A listener on the host's 127.0.0.1 whose connections are relayed to one port inside."""

    def __init__(self, port: int, make: Callable[[socket.AddressFamily], socket.socket]) -> None:
        self._port = port
        self._make = make
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.host_port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        start_thread(self._accept, name=f"kode-relay-{self.host_port}->{port}")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            start_thread(self._serve, name=f"kode-relay-{self._port}", args=(client,))

    def _connect_inside(self) -> socket.socket | None:
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            try:
                inner = self._make(family)
            except OSError:
                return None  # the holder is gone: the network went with it
            try:
                inner.connect((address, self._port))
            except OSError:
                inner.close()
                continue
            return inner
        return None

    def _serve(self, client: socket.socket) -> None:
        inner = self._connect_inside()
        if inner is None:
            # Nothing listens inside: reset at once, as a refused connection would, not a hang.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            client.close()
            return
        with self._lock:
            if self._closed:
                client.close()
                inner.close()
                return
            self._open.update((client, inner))
        pump = start_thread(_copy, name=f"kode-relay-{self._port}-in", args=(client, inner))
        _copy(inner, client)
        pump.join()
        with self._lock:
            self._open.difference_update((client, inner))
        client.close()
        inner.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._open = list(self._open), set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(_RELAY_CHUNK):
            target.sendall(data)
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass
