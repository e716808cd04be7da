"""A network namespace of its own for every bubblewrap sandbox, its route out, and its ports
reached from the host.

bubblewrap makes each sandbox's network namespace together with the others (``--unshare-net``;
it brings the namespace's loopback up itself), so the sandbox's agent is its first resident and
the one that keeps it: no helper process holds it, and all processes of one sandbox share one
network while no two sandboxes (nor the host) share a port space.

With ``allow_internet_access=True``, ``slirp4netns`` gives the namespace a user-mode route out
(``10.0.2.100`` behind a NAT, DNS at :data:`SLIRP_DNS`), started with ``--disable-host-loopback``
so the gateway does not lead to the host's 127.0.0.1 (:class:`NetworkStack`). bwrap reports the
agent's host pid on its ``--info-fd``; the namespace is owned by bwrap's outer user namespace (the
sandbox's uid 1000 lives in one nested below it, which could not enter it), which the kernel
names for the namespace (``NS_GET_USERNS``): slirp4netns joins that one, by file descriptor, so
it works for an unprivileged pytest as for root and no pid can be recycled under it. Commands
never see the network half made: the sandbox's first use waits for slirp4netns' ready-fd
(:meth:`NetworkStack.ready`). pasta (passt) was measured too: as root it only works with
``--runas 0`` and took ~100 ms to come up against slirp4netns' ~3 ms
(``benchmarks/network_stack.py``). With ``allow_internet_access=False`` there is no stack:
loopback only.

:class:`PortRelays` give ``host_url(port)``: a listener on a free port of the host's 127.0.0.1
whose connections are relayed to ``127.0.0.1:port`` (or ``[::1]:port``) *inside*, through a
socket the agent made in the sandbox's namespace and handed over on its Unix socket (the
``socket`` operation, SCM_RIGHTS). So servers bound to loopback inside are reached as well as
those bound to 0.0.0.0, with the internet on or off, and any host process that reaches the agent
(the creator, or a resumed object in another process) can serve its own. A port nothing listens
on gives a connection that is reset at once.

Lifetimes: slirp4netns exits when its ``--exit-fd`` sees EOF, and the pipe's write end is held by
the agent (bwrap hands it in; the agent keeps it from every command) and by bwrap's monitor: the
route out lives exactly as long as the sandbox, so a kept sandbox keeps it after its creator
exits, and the sandbox's end (dispose, deadline, a killed run) ends it. The creator kills it at
``dispose()`` too, to reap it at once. A slirp4netns that dies takes the route out, nothing else.
Relays belong to the process that made them and close with it (or at ``dispose()``/``detach()``).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import signal
import socket
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
    "NetworkStack",
    "PortRelays",
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
_NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1): the user namespace that owns a namespace


def agent_python() -> str:
    """The interpreter that runs inside sandboxes: this one, resolved out of any venv.

    A venv's ``bin/python`` is a link into the base installation, which is what the sandbox's
    view shows; the venv itself (often inside the project checkout) stays invisible.
    """
    return os.path.realpath(sys.executable)


def stack_problem() -> str | None:
    """Why sandboxes with the internet on cannot get a network stack here, or None."""
    if _which("slirp4netns") is None:
        return "the `slirp4netns` executable is not on PATH"
    return None


@functools.lru_cache(maxsize=4)
def _which(name: str) -> str | None:
    # Once per process, not per sandbox: a PATH walk costs more than the rest of a spawn.
    return shutil.which(name)


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        raise FileNotFoundError(name)
    return path


class NetworkStack:
    """The route out of one sandbox's network namespace: slirp4netns attached to it.

    :meth:`prepare` before bwrap starts (the pipes bwrap and the agent get), :meth:`attach` once
    it runs (starts slirp4netns without waiting), :meth:`ready` before the first command.
    """

    def __init__(self, *, sandbox_id: str | None = None) -> None:
        self.sandbox_id = sandbox_id
        problem = stack_problem()
        if problem is not None:
            raise self._error(
                BackendUnavailableError,
                f"allow_internet_access=True needs a user-mode network stack: {problem}",
                SLIRP_INSTALL_HINT,
            )
        self._lock = threading.Lock()
        self._info_r: int | None = None
        self._exit_r: int | None = None
        self._ready_r: int | None = None
        self._slirp: _Helper | None = None
        self._ready = False
        self._failure: KodeError | None = None

    @property
    def dns(self) -> str:
        """The name server the sandbox's resolv.conf must name."""
        return SLIRP_DNS

    def prepare(self) -> tuple[int, int]:
        """``(info_w, exit_w)``: the write end of the pipe for bwrap's ``--info-fd`` and of
        slirp4netns' ``--exit-fd`` (for the agent to hold). Both are close-on-exec; the caller
        hands them to bwrap and closes its own copies once it ran."""
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        self._info_r, self._exit_r = info_r, exit_r
        return info_w, exit_w

    def attach(self) -> None:
        """Read the sandbox's host pid from bwrap and start slirp4netns in its namespace.

        Returns without waiting for the stack (:meth:`ready` does). When bwrap failed before
        reporting, nothing is started: the agent's own start reports why.
        """
        info_r, self._info_r = self._info_r, None
        exit_r, self._exit_r = self._exit_r, None
        assert info_r is not None and exit_r is not None, "prepare() first"
        net_fd = user_fd = -1
        try:
            pid, net_inode = _read_info(info_r)
            if pid is None:
                return
            try:
                net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                if os.fstat(net_fd).st_ino != net_inode:
                    return  # gone already (the pid names another process now)
                user_fd = fcntl.ioctl(net_fd, _NS_GET_USERNS)
            except OSError as exc:
                self._failure = self._broken(f"cannot open the sandbox's namespaces: {exc}")
                return
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            slirp = _tool("slirp4netns")

            def argv(fds: list[int]) -> list[str]:
                ready, exit_fd, net, user = fds
                return [
                    slirp,
                    "--configure",
                    "--mtu=65520",
                    # The gateway must not lead to the host's 127.0.0.1: that is the host.
                    "--disable-host-loopback",
                    f"--ready-fd={ready}",
                    f"--exit-fd={exit_fd}",
                    "--netns-type=path",
                    f"--userns-path=/proc/self/fd/{user}",
                    f"/proc/self/fd/{net}",
                    "tap0",
                ]

            try:
                self._slirp = _spawn(argv, (ready_w, exit_r, net_fd, user_fd))
            except OSError as exc:
                os.close(ready_r)
                self._failure = self._error(
                    BackendUnavailableError, f"cannot start slirp4netns: {exc}", SLIRP_INSTALL_HINT
                )
                return
            finally:
                os.close(ready_w)
            self._ready_r = ready_r
        finally:
            for fd in (info_r, exit_r, net_fd, user_fd):
                if fd >= 0:
                    os.close(fd)

    def ready(self) -> None:
        """Wait until the sandbox has its route out (raises when it cannot get one)."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            if self._failure is not None:
                raise self._failure
            ready_r, self._ready_r = self._ready_r, None
            if ready_r is None:
                raise self._broken("slirp4netns was not started (the sandbox did not start)")
            try:
                # slirp4netns writes "1" once tap0 is configured, or exits (EOF) if it cannot.
                ok = _read_within(ready_r, _READY_TIMEOUT_S) == b"1"
            finally:
                os.close(ready_r)
            if not ok:
                assert self._slirp is not None
                self._slirp.signal()
                self._failure = self._broken(self._slirp.error_output() or "no output")
                raise self._failure
            self._ready = True

    def stop(self) -> None:
        """Signal slirp4netns to end without waiting; :meth:`close` finishes.

        It takes ~25 ms to exit (the kernel tears its tap device down): a caller with other
        teardown to do starts that first and overlaps the wait with it.
        """
        if self._slirp is not None:
            self._slirp.signal()

    def close(self) -> None:
        """End slirp4netns and reap it (idempotent)."""
        self._close_fds()
        slirp, self._slirp = self._slirp, None
        if slirp is not None:
            slirp.stop()

    def release(self) -> None:
        """Let go of slirp4netns without ending it: a kept sandbox keeps its route out, which
        ends with the sandbox (its agent holds the exit pipe). Not reaped by us any more: the
        subprocess module reaps it once it exits."""
        try:
            self.ready()  # it reports readiness once; never on a pipe nobody reads
        except KodeError:
            pass
        self._close_fds()
        slirp, self._slirp = self._slirp, None
        if slirp is not None:
            slirp.forget()

    def _close_fds(self) -> None:
        for name in ("_info_r", "_exit_r", "_ready_r"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    def _broken(self, detail: str) -> KodeError:
        return self._error(
            KodeError,
            f"slirp4netns could not give the sandbox a network: {detail}",
            "run it by hand to see why, or create the sandbox with allow_internet_access=False",
        )

    def _error(self, cls: type[KodeError], message: str, hint: str) -> KodeError:
        return cls(message, backend="local", sandbox_id=self.sandbox_id, hint=hint)


def _read_info(fd: int) -> tuple[int | None, int]:
    """bwrap's ``--info-fd`` report: the sandbox's host pid and its network namespace's inode
    (None when bwrap closed the pipe without one: it failed)."""
    data = b""
    while True:
        try:
            info = json.loads(data)
        except ValueError:
            chunk = _read_within(fd, _READY_TIMEOUT_S, 4096)
            if not chunk:
                return None, 0
            data += chunk
            continue
        pid, inode = info.get("child-pid"), info.get("net-namespace")
        if isinstance(pid, int) and isinstance(inode, int):
            return pid, inode
        return None, 0


def _read_within(fd: int, timeout_s: float, size: int = 1) -> bytes:
    """Up to ``size`` bytes of ``fd``, or b"" at EOF or after ``timeout_s``."""
    import select

    if not select.select([fd], [], [], timeout_s)[0]:
        return b""
    return os.read(fd, size)


class PortRelays:
    """The host's way into one sandbox's network: ``url(port)`` relays a free port of the
    host's 127.0.0.1 to ``port`` inside, through sockets ``make`` gets from the agent."""

    def __init__(
        self, make: Callable[[socket.AddressFamily], socket.socket], *, sandbox_id: str | None
    ) -> None:
        self._make = make
        self.sandbox_id = sandbox_id
        self._lock = threading.Lock()
        self._relays: dict[int, _Relay] = {}
        self._closed = False

    def url(self, port: int) -> str:
        """``http://127.0.0.1:<free port>``, relayed to ``port`` inside (set up on first ask)."""
        with self._lock:
            if self._closed:
                raise KodeError(
                    "the sandbox's network was closed",
                    backend="local",
                    sandbox_id=self.sandbox_id,
                    hint="the sandbox was disposed; create a new one",
                )
            relay = self._relays.get(port)
            if relay is None:
                relay = self._relays[port] = _Relay(port, self._make)
        return f"http://127.0.0.1:{relay.host_port}"

    def close(self) -> None:
        """Stop every relay and its connections (idempotent)."""
        with self._lock:
            self._closed = True
            relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            relay.close()


def _spawn(argv: Callable[[list[int]], list[str]], fds: tuple[int, ...]) -> _Helper:
    """Start ``argv(numbers)`` in a session of its own with ``fds`` at ``numbers`` in it.

    posix_spawn, not subprocess: cheaper per sandbox, and each fd reaches this child only
    (they stay close-on-exec here, so a sandbox started meanwhile on another thread cannot
    inherit them). stderr goes to an unlinked file, not a pipe: a long-lived helper must never
    block on a full pipe nobody reads; the file is read only when the helper failed.
    """
    reap_exited(_forgotten)
    errors = tempfile.TemporaryFile()
    try:
        first = max(*fds, errors.fileno()) + 1  # above every source: no dup2 overwrites one
        numbers = list(range(first, first + len(fds)))
        args = argv(numbers)
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, errors.fileno(), 2),
            *((os.POSIX_SPAWN_DUP2, fd, number) for fd, number in zip(fds, numbers, strict=True)),
        ]
        # No environment: the helpers need none (and encoding ours costs ~0.5 ms per spawn).
        pid = os.posix_spawn(args[0], args, {}, file_actions=actions, setsid=True)
    except BaseException:
        errors.close()
        raise
    return _Helper(pid, errors)


# Helpers let go of while running (a kept sandbox's slirp4netns): reaped once they exit.
_forgotten: set[int] = set()


def reap_exited(pids: set[int]) -> None:
    """Reap those of our children ``pids`` that have exited (no zombies), and drop them."""
    for pid in list(pids):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            pids.discard(pid)


class _Helper:
    """A helper process (our child) and the file its stderr goes to."""

    def __init__(self, pid: int, errors: IO[bytes]) -> None:
        self.pid = pid
        self._errors = errors
        self._status: int | None = None

    def _wait(self) -> int:
        if self._status is None:
            try:
                self._status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:
                self._status = 0
        return self._status

    def error_output(self) -> str:
        status = self._wait()
        self._errors.seek(0)
        text = self._errors.read(4096).decode("utf-8", "replace").strip()
        return text or f"exit status {os.waitstatus_to_exitcode(status)}"

    def signal(self) -> None:
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def stop(self) -> None:
        self.signal()
        self._wait()
        self._errors.close()

    def forget(self) -> None:
        self._errors.close()
        if self._status is None:
            _forgotten.add(self.pid)
            reap_exited(_forgotten)


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
                return None  # the agent is gone: the sandbox went with it
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
