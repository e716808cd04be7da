"""The host's blocking client of a local sandbox's agent (the wire format is :mod:`._protocol`).

Two ways to talk, both over the agent's Unix socket:

- :meth:`AgentClient.call` and :meth:`AgentClient.run` take an idle connection from a small
  pool, send one request and read its answer in the calling thread: no thread hand-off, so an
  ``exec`` costs one round trip. A thread interrupted mid-command (Ctrl-C) closes its
  connection, and the agent kills a command sent with ``own`` when its connection goes.
- :meth:`AgentClient.open_stream` sends a request on one shared connection whose reader thread
  hands every frame of that stream to a callback: background processes (``start``/``spawn``)
  and ``attach`` stream their output this way, many at once.

Any host process that knows the socket's path can connect (a resumed sandbox, the emulator).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import sys
import threading
from collections.abc import Callable

from pytest_kode._threads import start_thread
from pytest_kode.backends.local._protocol import (
    FINAL_KINDS,
    K_ERROR,
    K_EXIT,
    K_REPLY,
    K_REQUEST,
    K_STDERR,
    K_STDOUT,
    Decoder,
    ProtocolError,
    frame,
    message,
    unpack,
)

__all__ = ["AgentClient", "AgentError", "AgentGone", "K_GONE", "reply_of", "socket_address"]

K_GONE = -1
"""The kind a stream callback gets when the agent went away before the stream ended."""

_RECV = 1 << 20
_FD_SIZE = 4  # an fd in SCM_RIGHTS data: a C int
_POOL_MAX = 8
# AF_UNIX paths are limited to 108 bytes; a longer one is reached through a directory fd.
_SUN_PATH_MAX = 100


class AgentGone(Exception):
    """The agent is not there (never started, exited at the deadline, killed) or hung up."""


class AgentError(Exception):
    """The agent refused or failed an operation (a ``K_ERROR`` answer)."""

    def __init__(self, body: dict[str, object]) -> None:
        super().__init__(str(body.get("message") or body))
        self.type = str(body.get("type") or "")
        code = body.get("errno")
        self.errno = code if isinstance(code, int) else None
        path = body.get("path")
        self.path = path if isinstance(path, str) else None


def socket_address(path: str) -> tuple[str, int | None]:
    """The address to connect to for socket ``path``, and a directory fd to keep open meanwhile
    (None when the path is short enough to use as it is)."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


def _connect(path: str) -> socket.socket:
    try:
        address, dir_fd = socket_address(path)
    except OSError as exc:
        raise AgentGone(f"the sandbox's agent directory is gone ({exc})") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise AgentGone(f"cannot connect to the sandbox's agent at {path!r}: {exc}") from exc
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock


class _Connection:
    """One blocking connection used by one thread at a time."""

    def __init__(self, path: str) -> None:
        self.sock = _connect(path)
        self.decoder = Decoder()
        self.streams = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def exchange(
        self,
        body: dict[str, object],
        blob: bytes,
        on_frame: Callable[[int, bytes], None] | None,
        fds: list[int] | None = None,
    ) -> tuple[int, bytes]:
        """Send a request; pass its non-final frames to ``on_frame``; return the final one.
        With ``fds``, file descriptors that arrive with the answer are added to it (the caller
        owns them)."""
        stream = next(self.streams)
        sock = self.sock
        try:
            sock.sendall(message(stream, K_REQUEST, body, blob))
            while True:
                if fds is None:
                    data = sock.recv(_RECV)
                else:
                    data, ancillary, _, _ = sock.recvmsg(
                        _RECV, socket.CMSG_SPACE(_FD_SIZE), socket.MSG_CMSG_CLOEXEC
                    )
                    fds += _received_fds(ancillary)
                if not data:
                    raise AgentGone("the sandbox's agent closed the connection")
                for got, kind, payload in self.decoder.feed(data):
                    if got != stream:
                        continue
                    if kind in FINAL_KINDS:
                        return kind, payload
                    if on_frame is not None:
                        on_frame(kind, payload)
        except OSError as exc:
            raise AgentGone(f"lost the connection to the sandbox's agent: {exc}") from exc
        except ProtocolError as exc:
            raise AgentGone(f"the sandbox's agent sent garbage: {exc}") from exc


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    found = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            found += [
                int.from_bytes(data[at : at + _FD_SIZE], sys.byteorder)
                for at in range(0, usable, _FD_SIZE)
            ]
    return found


class _StreamConnection:
    """The shared connection of background streams, read by one thread."""

    def __init__(self, path: str) -> None:
        self.sock = _connect(path)
        self.lock = threading.Lock()
        self.streams = itertools.count(1)
        self.handlers: dict[int, Callable[[int, bytes], None]] = {}
        self.closed = False
        self.reader = start_thread(self._read, name="pytest-kode-agent-reader")

    def open(
        self, body: dict[str, object], blob: bytes, handler: Callable[[int, bytes], None]
    ) -> int:
        with self.lock:
            if self.closed:
                raise AgentGone("the connection to the sandbox's agent is closed")
            stream = next(self.streams)
            self.handlers[stream] = handler
            try:
                self.sock.sendall(message(stream, K_REQUEST, body, blob))
            except OSError as exc:
                del self.handlers[stream]
                raise AgentGone(f"lost the connection to the sandbox's agent: {exc}") from exc
        return stream

    def send(self, stream: int, kind: int, payload: bytes) -> None:
        with self.lock:
            try:
                self.sock.sendall(frame(stream, kind, payload))
            except OSError as exc:
                raise AgentGone(f"lost the connection to the sandbox's agent: {exc}") from exc

    def _read(self) -> None:
        decoder = Decoder()
        try:
            while True:
                try:
                    data = self.sock.recv(_RECV)
                except OSError:
                    data = b""
                if not data:
                    return
                for stream, kind, payload in decoder.feed(data):
                    handler = self.handlers.get(stream)
                    if handler is None:
                        continue
                    if kind in FINAL_KINDS:
                        with self.lock:
                            self.handlers.pop(stream, None)
                    handler(kind, payload)
        except ProtocolError:
            return
        finally:
            # Nothing can be read from here on: the socket goes with its reader (under the lock,
            # so that no send is using it), also when nobody calls close() (a dropped client).
            with self.lock:
                self.closed = True
                handlers, self.handlers = self.handlers, {}
                self.sock.close()
            for handler in handlers.values():
                handler(K_GONE, b"")

    def close(self) -> None:
        with self.lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self.reader:
            self.reader.join(5.0)
        self.sock.close()


class AgentClient:
    """Talks to one sandbox's agent at the Unix socket ``path``; safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._stream: _StreamConnection | None = None
        self._closed = False

    def _take(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise AgentGone("the client of the sandbox's agent is closed")
            if self._idle:
                return self._idle.pop()
        return _Connection(self.path)

    def _give_back(self, connection: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _POOL_MAX:
                self._idle.append(connection)
                return
        connection.close()

    def warm(self) -> None:
        """Open an idle connection ahead of the first request (off its critical path)."""
        self._give_back(_Connection(self.path))

    def _exchange(
        self,
        body: dict[str, object],
        blob: bytes = b"",
        on_frame: Callable[[int, bytes], None] | None = None,
        fds: list[int] | None = None,
    ) -> tuple[int, bytes]:
        connection = self._take()
        try:
            kind, payload = connection.exchange(body, blob, on_frame, fds)
        except BaseException:
            # Interrupted or broken mid-answer: the connection's state is unknown, drop it (the
            # agent then kills a command sent with ``own``).
            connection.close()
            raise
        self._give_back(connection)
        return kind, payload

    def call(self, body: dict[str, object], blob: bytes = b"") -> tuple[dict[str, object], bytes]:
        """One request answered by ``K_REPLY``; raises :class:`AgentError` on ``K_ERROR``."""
        kind, payload = self._exchange(body, blob)
        return reply_of(body, kind, payload)

    def inner_socket(self, family: socket.AddressFamily) -> socket.socket:
        """A new TCP socket made by the agent in the sandbox's network namespace."""
        fds: list[int] = []
        try:
            kind, payload = self._exchange(
                {"op": "socket", "family": 6 if family == socket.AF_INET6 else 4}, fds=fds
            )
            answer, _ = unpack(payload)
            if kind == K_ERROR:
                raise AgentError(answer)
            if kind != K_REPLY or len(fds) != 1:
                raise AgentGone("the sandbox's agent answered a socket request without one")
            made = socket.socket(fileno=fds.pop())
        finally:
            for fd in fds:
                os.close(fd)
        return made

    def run(
        self,
        body: dict[str, object],
        blob: bytes,
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
    ) -> dict[str, object]:
        """Run a command to its end in this thread; returns the ``K_EXIT`` body."""

        def on_frame(kind: int, payload: bytes) -> None:
            if kind == K_STDOUT:
                on_stdout(payload)
            elif kind == K_STDERR:
                on_stderr(payload)

        kind, payload = self._exchange(body, blob, on_frame)
        answer, _ = unpack(payload)
        if kind == K_ERROR:
            raise AgentError(answer)
        if kind != K_EXIT:
            raise AgentGone(f"the sandbox's agent answered a command with kind {kind}")
        return answer

    def open_stream(
        self, body: dict[str, object], blob: bytes, handler: Callable[[int, bytes], None]
    ) -> tuple[int, Callable[[int, bytes], None]]:
        """Send ``body`` on the shared streaming connection; every frame of the answer (and
        ``K_GONE`` if the agent goes first) reaches ``handler`` from the reader thread. Returns
        the stream id and a function that sends a frame on that stream (stdin)."""
        with self._lock:
            if self._closed:
                raise AgentGone("the client of the sandbox's agent is closed")
            if self._stream is None or self._stream.closed:
                self._stream = _StreamConnection(self.path)
            connection = self._stream
        stream = connection.open(body, blob, handler)
        return stream, lambda kind, payload: connection.send(stream, kind, payload)

    def __del__(self) -> None:
        # Dropped without close() (a kept sandbox's object): close the idle sockets quietly, and
        # end the stream connection's reader, which then closes its socket.
        for connection in getattr(self, "_idle", ()):
            connection.close()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close every connection (background streams get ``K_GONE``)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            stream, self._stream = self._stream, None
        for connection in idle:
            connection.close()
        if stream is not None:
            stream.close()


def reply_of(body: dict[str, object], kind: int, payload: bytes) -> tuple[dict[str, object], bytes]:
    """The answer to ``body`` (sync and async clients alike): ``K_REPLY``'s body and data;
    :class:`AgentError` for ``K_ERROR``, :class:`AgentGone` for anything else."""
    answer, data = unpack(payload)
    if kind == K_ERROR:
        raise AgentError(answer)
    if kind != K_REPLY:
        raise AgentGone(f"the sandbox's agent answered {body.get('op')!r} with kind {kind}")
    return answer, data


def is_missing(error: AgentError) -> bool:
    """Whether an agent error means "no such file or directory"."""
    return error.type == "os" and error.errno in (errno.ENOENT, errno.ENOTDIR)
