"""The async ``local`` backend: an asyncio client of the sandbox's agent.

The life-cycle (the agent's start and end, the deadline, the metadata) stays with the blocking
:class:`~pytest_kode.backends.local.LocalSandbox`; so do the ``run`` request a command becomes,
the result it gives and the errors. What this module adds is the transport: one non-blocking
connection to the agent's Unix socket per event loop, whose reader callback hands each frame to
the stream it belongs to (:mod:`._protocol`), so many commands are in flight on one connection
and none costs a thread or a task; requests go straight to the socket (the loop writes only
what a full socket buffer left over, in order). File operations go to the agent too (under bubblewrap, in the sandbox's own
view); without isolation they are the blocking ``LocalFS``'s short local system calls.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar, TypeVar

from pytest_kode.aio import AsyncProcessHandle, AsyncSandbox, AsyncSandboxFS, kill_on_cancel
from pytest_kode.backends.local._client import (
    K_GONE,
    AgentError,
    AgentGone,
    reply_of,
    socket_address,
)
from pytest_kode.backends.local._fs import AgentFS, LocalFS
from pytest_kode.backends.local._protocol import (
    FINAL_KINDS,
    K_ERROR,
    K_EXIT,
    K_REQUEST,
    K_STARTED,
    K_STDERR,
    K_STDOUT,
    Decoder,
    ProtocolError,
    message,
    unpack,
)
from pytest_kode.backends.local._sandbox import LocalSandbox
from pytest_kode.errors import KodeError
from pytest_kode.sandbox import BoundedOutput, ExecResult, FileEntry

__all__ = ["AsyncLocalSandbox"]

_KILLED = 128 + signal.SIGKILL
_TAGS = itertools.count(1)
_KILL_SETTLE_S = 5.0
_RECV = 1 << 20

Handler = Callable[[int, bytes], None]
_T = TypeVar("_T")


class _AsyncAgent:
    """The connections of one view to a sandbox's agent: one per event loop, many streams each.

    Per loop, because a connection is watched by its loop's selector: a view shared by fixtures
    on a wide loop and tests on their own loops keeps each loop's streams (a background process
    started on one) while another loop works. A closed loop's connection is dropped on the next
    use (its streams had nobody left to wake).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._connections: dict[asyncio.AbstractEventLoop, _Connection] = {}

    def connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = self._connections.get(loop)
        if connection is None or connection.closed:
            for old in [old for old in self._connections if old.is_closed()]:
                self._connections.pop(old).close()
            connection = self._connections[loop] = _Connection(self.path, loop)
        return connection

    async def call(
        self, body: dict[str, object], blob: bytes = b""
    ) -> tuple[dict[str, object], bytes]:
        """One request answered by ``K_REPLY``; raises AgentError on ``K_ERROR``."""
        connection = self.connection()
        answer: asyncio.Future[tuple[int, bytes]] = connection.loop.create_future()

        def handle(kind: int, payload: bytes) -> None:
            if not answer.done():
                answer.set_result((kind, payload))

        writing = connection.open(body, blob, handle)
        if writing is not None:
            await writing
        kind, payload = await answer
        if kind == K_GONE:
            raise AgentGone("the sandbox's agent closed the connection")
        return reply_of(body, kind, payload)

    def close(self) -> None:
        """Drop every connection; open streams get ``K_GONE`` (the agent kills owned commands)."""
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.close()


class _Connection:
    """One connection to the agent, watched by one loop: a reader callback that hands each
    frame to its stream's handler, and writes straight to the socket.

    A plain non-blocking socket with ``loop.add_reader`` rather than asyncio streams: a frame
    reaches its waiter in the selector's callback, with no reader task to wake in between, and
    there is nothing to tear down on the loop, so a view whose loop is already closed (a
    test's, at fixture teardown) is released by closing the socket, without "unclosed
    transport" warnings.
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.closed = False
        self._sock = self._connect(path)
        self._decoder = Decoder()
        self._handlers: dict[int, Handler] = {}
        self._streams = itertools.count(1)
        # What the socket did not take yet, in order: frames never interleave.
        self._outbox = bytearray()
        self._drained: asyncio.Future[None] | None = None
        loop.add_reader(self._sock.fileno(), self._on_readable)

    @staticmethod
    def _connect(path: str) -> socket.socket:
        # Connecting to a local socket that listens does not block (the backlog takes it).
        try:
            address, dir_fd = socket_address(path)
        except OSError as exc:
            raise AgentGone(f"the sandbox's agent directory is gone ({exc})") from exc
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise AgentGone(f"cannot connect to the sandbox's agent at {path!r}") from exc
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        sock.setblocking(False)
        return sock

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            frames = self._decoder.feed(data) if data else None
        except ProtocolError:
            frames = None
        if frames is None:
            self.close()
            return
        handlers = self._handlers
        for stream, kind, payload in frames:
            handler = handlers.get(stream)
            if handler is None:
                continue
            if kind in FINAL_KINDS:
                del handlers[stream]
            handler(kind, payload)

    def open(
        self, body: dict[str, object], blob: bytes, handler: Handler
    ) -> Awaitable[None] | None:
        """Send a request on a new stream whose frames (and ``K_GONE``) go to ``handler``.

        None when the socket took the whole request at once (the usual case: nothing to await,
        no write callback), else what to await until the loop has written the rest.
        """
        if self.closed:
            raise AgentGone("the connection to the sandbox's agent is closed")
        stream = next(self._streams)
        self._handlers[stream] = handler
        try:
            return self._send(message(stream, K_REQUEST, body, blob))
        except OSError as exc:
            self._handlers.pop(stream, None)
            raise AgentGone(f"lost the connection to the sandbox's agent: {exc}") from exc

    def _send(self, data: bytes) -> Awaitable[None] | None:
        if not self._outbox:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return None
            data = data[sent:]
            self.loop.add_writer(self._sock.fileno(), self._on_writable)
            self._drained = self.loop.create_future()
        self._outbox += data
        assert self._drained is not None
        return asyncio.shield(self._drained)  # one waiter's cancellation spares the others

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self._outbox[:sent]
        if not self._outbox:
            self.loop.remove_writer(self._sock.fileno())
            drained, self._drained = self._drained, None
            if drained is not None and not drained.done():
                drained.set_result(None)

    def close(self) -> None:
        """Drop the connection; open streams get ``K_GONE`` (the agent kills owned commands)."""
        if self.closed:
            return
        self.closed = True
        if not self.loop.is_closed():
            for remove in (self.loop.remove_reader, self.loop.remove_writer):
                with contextlib.suppress(Exception):
                    remove(self._sock.fileno())
        self._sock.close()
        self._outbox.clear()
        handlers, self._handlers = self._handlers, {}
        drained, self._drained = self._drained, None
        # After the loop closed (some runners close it before fixture teardown) nobody can be
        # woken, and waking raises: there is nothing left to tell.
        with contextlib.suppress(RuntimeError):
            if drained is not None and not drained.done():
                drained.set_exception(AgentGone("the connection to the sandbox's agent closed"))
        for handler in handlers.values():
            with contextlib.suppress(RuntimeError):
                handler(K_GONE, b"")


async def _after(first: Awaitable[None], then: Awaitable[_T]) -> _T:
    await first
    return await then


class _Run:
    """One ``exec``'s stream: output into bounded buffers, the final frame into a future."""

    __slots__ = ("out", "err", "end", "final")

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.out = BoundedOutput(limit)
        self.err = BoundedOutput(limit)
        self.end: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self.final: tuple[int, bytes] | None = None

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == K_STDOUT:
            self.out.write(payload)
        elif kind == K_STDERR:
            self.err.write(payload)
        elif kind in FINAL_KINDS or kind == K_GONE:
            self.final = (kind, payload)
            if not self.end.done():
                self.end.set_result(self.final)


class AsyncLocalSandbox(AsyncSandbox):
    """A local sandbox driven from an event loop; takes what ``LocalSandbox`` takes."""

    backend: ClassVar[str] = "local"
    sync_class: ClassVar[type[LocalSandbox]] = LocalSandbox
    _sync: LocalSandbox

    def _attached(self) -> None:
        # Blocking (on init's thread, or in a sync fixture): waits until the agent is ready.
        self._sync.wait_ready()
        self._async_agent = _AsyncAgent(self._sync.agent_socket)

    def close(self) -> None:
        agent = getattr(self, "_async_agent", None)
        if agent is not None:
            agent.close()

    def _agent(self) -> _AsyncAgent:
        self._sync._require_live()
        return self._async_agent

    def _gone(self, exc: AgentGone) -> KodeError:
        self._sync._require_directory()
        return self._sync._agent_gone()

    async def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        sync = self._sync
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        body, where = sync._run_body(
            ["bash", "-c", command], cwd=cwd, envs=envs, stdin="none" if data is None else "data"
        )
        # No K_STARTED frame (one wake-up less per command): a cancelled command is found by
        # its tag to be killed. own: the agent kills it if this connection goes.
        tag = f"kode-aio-{os.getpid()}-{next(_TAGS)}"
        body.update(timeout_ms=timeout_ms, started=False, own=True, tag=tag)
        connection = self._async_agent.connection()  # exec() checked that the sandbox is live
        run = _Run(self.options.max_output_bytes, connection.loop)
        started = time.monotonic()
        try:
            writing = connection.open(body, data or b"", run.on_frame)
            # ``end`` awaited as it is (no shield: that costs a loop iteration per command); a
            # cancellation cancels it, and the kill waits for the final frame by other means.
            # The kill's requests queue behind this one on the connection, so the agent has
            # started the command by the time it lists its processes.
            work = run.end if writing is None else _after(writing, run.end)
            kind, payload = await kill_on_cancel(work, lambda: self._kill_run(tag, run))
        except AgentGone as exc:
            raise self._gone(exc) from exc
        duration_ms = (time.monotonic() - started) * 1000.0
        if kind == K_GONE:
            raise self._gone(AgentGone("the sandbox's agent closed the connection"))
        answer, _ = unpack(payload)
        if kind == K_ERROR:
            sync._require_directory()
            raise sync._run_error(command, where, AgentError(answer))
        return sync._exec_result(command, answer, run.out, run.err, duration_ms)

    async def _kill_run(self, tag: str, run: _Run) -> None:
        """Kill a cancelled command's process tree (found by its tag) and wait for its end."""
        if run.final is not None:
            return  # it ended before the cancellation reached it
        run.end = asyncio.get_running_loop().create_future()  # the cancelled one is done
        with contextlib.suppress(AgentError, AgentGone):
            agent = self._agent()
            listing, _ = await agent.call({"op": "ps"})
            processes = listing.get("processes")
            for process in processes if isinstance(processes, builtins.list) else []:
                if process.get("tag") == tag:
                    body = {
                        "op": "signal",
                        "pid": process.get("pid"),
                        "signum": int(signal.SIGKILL),
                    }
                    await agent.call(body)
        if run.final is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.end), _KILL_SETTLE_S)

    async def _start(
        self, command: str, *, cwd: str | None, envs: dict[str, str]
    ) -> AsyncProcessHandle:
        sync = self._sync
        body, where = sync._run_body(["bash", "-c", command], cwd=cwd, envs=envs, stdin="pipe")
        process = _AsyncAgentProcess(self, command)
        try:
            writing = self._agent().connection().open(body, b"", process._on_frame)
            if writing is not None:
                await writing
            await process._started_pid
        except AgentGone as exc:
            raise self._gone(exc) from exc
        except AgentError as exc:
            sync._require_directory()
            raise sync._run_error(command, where, exc) from exc
        return process

    def _fs(self) -> AsyncSandboxFS:
        fs = self._sync.fs
        if isinstance(fs, AgentFS):
            return _AsyncAgentFS(self, fs)
        return _AsyncHostFS(fs)


class _AsyncAgentProcess(AsyncProcessHandle):
    """A background command of the agent, its frames fed in by the connection's reader."""

    def __init__(self, owner: AsyncLocalSandbox, command: str) -> None:
        super().__init__(command, limit=owner.options.max_output_bytes)
        self._owner = owner
        self._pid = -1
        self._started_pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._stdin_open = True

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == K_STDOUT:
            self._feed_bytes("stdout", payload)
        elif kind == K_STDERR:
            self._feed_bytes("stderr", payload)
        elif kind == K_STARTED:
            pid = unpack(payload)[0].get("pid")
            self._pid = pid if isinstance(pid, int) else -1
            if not self._started_pid.done():
                self._started_pid.set_result(self._pid)
        elif kind == K_EXIT:
            code = unpack(payload)[0].get("exit_code")
            self._finish(code if isinstance(code, int) else _KILLED)
        elif kind == K_ERROR:
            if not self._started_pid.done():
                self._started_pid.set_exception(AgentError(unpack(payload)[0]))
            self._finish(_KILLED)
        elif kind == K_GONE:
            # The agent (so the whole sandbox) ended: its processes were killed with it.
            if not self._started_pid.done():
                self._started_pid.set_exception(AgentGone("the sandbox's agent went away"))
            self._finish(_KILLED)

    @property
    def pid(self) -> int:
        """The process's pid inside the sandbox."""
        return self._pid

    async def _kill(self) -> None:
        with contextlib.suppress(AgentError, AgentGone):
            await self._owner._agent().call(
                {"op": "signal", "pid": self._pid, "signum": signal.SIGKILL}
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._done.wait(), _KILL_SETTLE_S)

    async def _input(self, data: bytes, eof: bool) -> None:
        try:
            await self._owner._agent().call({"op": "input", "pid": self._pid, "eof": eof}, data)
        except AgentError as exc:
            raise KodeError(
                f"process {self._pid} ({self.command!r}) "
                + ("has ended" if exc.type == "not_found" else "has no open stdin"),
                backend="local",
                sandbox_id=self._owner.sandbox_id,
                hint="stdin is open until close_stdin() while the process runs",
            ) from exc
        except AgentGone as exc:
            raise self._owner._gone(exc) from exc

    async def send_stdin(self, data: str | bytes) -> None:
        if not self._stdin_open:
            raise KodeError(
                f"process {self._pid} ({self.command!r}) has no open stdin",
                backend="local",
                sandbox_id=self._owner.sandbox_id,
                hint="do not call close_stdin() before writing",
            )
        await self._input(data.encode("utf-8") if isinstance(data, str) else bytes(data), False)

    async def close_stdin(self) -> None:
        if self._stdin_open:
            self._stdin_open = False
            if self.is_running():
                with contextlib.suppress(KodeError):  # ended meanwhile: closed all the same
                    await self._input(b"", True)


class _AsyncAgentFS(AsyncSandboxFS):
    """``fs`` done by the agent, as :class:`AgentFS` (whose paths, entries and errors these
    are), over the async connection."""

    def __init__(self, owner: AsyncLocalSandbox, fs: AgentFS) -> None:
        super().__init__(fs.work_dir)
        self._owner = owner
        self._sync_fs = fs

    async def _call(
        self, what: str, path: str, body: dict[str, object], blob: bytes = b""
    ) -> tuple[dict[str, object], bytes]:
        try:
            return await self._owner._agent().call(body, blob)
        except AgentGone as exc:
            raise self._owner._gone(exc) from exc
        except AgentError as exc:
            raise self._sync_fs._translate(what, path, exc) from exc

    async def read_bytes(self, path: str) -> bytes:
        fs = self._sync_fs
        body: dict[str, object] = {"op": "read", "path": fs._path(path), "limit": fs._read_limit}
        return (await self._call("reading", path, body))[1]

    async def write(self, path: str, data: str | bytes) -> None:
        payload = AgentFS._payload(path, data)
        body: dict[str, object] = {"op": "write", "path": self._sync_fs._path(path)}
        await self._call("writing", path, body, payload)

    async def exists(self, path: str) -> bool:
        from pytest_kode.errors import SandboxFileNotFoundError

        try:
            await self._call("checking", path, {"op": "lstat", "path": self._sync_fs._path(path)})
        except SandboxFileNotFoundError:
            return False
        return True

    async def stat(self, path: str) -> FileEntry:
        body: dict[str, object] = {"op": "lstat", "path": self._sync_fs._path(path)}
        return self._sync_fs._entry((await self._call("inspecting", path, body))[0])

    async def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]:
        AgentFS._check_depth(depth)
        body: dict[str, object] = {"op": "list", "path": self._sync_fs._path(path), "depth": depth}
        entries = (await self._call("listing", path, body))[0].get("entries")
        assert isinstance(entries, builtins.list)
        return [self._sync_fs._entry(entry) for entry in entries]

    async def mkdir(self, path: str) -> None:
        body: dict[str, object] = {"op": "mkdir", "path": self._sync_fs._path(path)}
        await self._call("creating directory", path, body)

    async def remove(self, path: str) -> None:
        body: dict[str, object] = {"op": "remove", "path": self._sync_fs._not_root(path, "removed")}
        await self._call("removing", path, body)

    async def rename(self, src: str, dst: str) -> None:
        fs = self._sync_fs
        body: dict[str, object] = {
            "op": "rename",
            "src": fs._not_root(src, "renamed"),
            "dst": fs._not_root(dst, "replaced"),
        }
        await self._call(f"renaming to {fs.abspath(dst)!r}:", src, body)


class _AsyncHostFS(AsyncSandboxFS):
    """Without isolation: the blocking ``LocalFS``, whose calls are short local system calls."""

    def __init__(self, fs: LocalFS) -> None:
        super().__init__(fs.work_dir)
        self._local = fs

    async def read_bytes(self, path: str) -> bytes:
        return self._local.read_bytes(path)

    async def write(self, path: str, data: str | bytes) -> None:
        self._local.write(path, data)

    async def exists(self, path: str) -> bool:
        return self._local.exists(path)

    async def stat(self, path: str) -> FileEntry:
        return self._local.stat(path)

    async def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]:
        return self._local.list(path, depth)

    async def mkdir(self, path: str) -> None:
        self._local.mkdir(path)

    async def remove(self, path: str) -> None:
        self._local.remove(path)

    async def rename(self, src: str, dst: str) -> None:
        self._local.rename(src, dst)
