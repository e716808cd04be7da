"""The async ``local`` backend: commands as non-blocking pipes on the event loop.

The life-cycle, the environment, the cwd placement and the isolation argv are the blocking
:class:`~pytest_kode.backends.local.LocalSandbox`'s. A command is spawned as there (its own
session, bubblewrap around it) and then watched by the running loop: its stdout and stderr
pipes and a pidfd for its exit are registered with ``loop.add_reader``, so a command costs no
thread and many run at once. File operations are the blocking ``LocalFS``'s: short local
system calls on the sandbox's directory.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import signal
import subprocess
import time
from typing import IO, TYPE_CHECKING, ClassVar, Literal

from pytest_kode.aio import AsyncProcessHandle, AsyncSandbox, AsyncSandboxFS, kill_on_cancel
from pytest_kode.backends.local import _process
from pytest_kode.backends.local._sandbox import _KILLED, LocalSandbox
from pytest_kode.errors import KodeError
from pytest_kode.sandbox import TIMEOUT_EXIT_CODE, ExecResult, FileEntry

if TYPE_CHECKING:
    from pytest_kode.backends.local._fs import LocalFS

__all__ = ["AsyncLocalSandbox"]

_CHUNK = 65536
# As the blocking pump: after the main process exited, a daemon it forked may hold the pipes
# open; read what is there for this long, then end instead of waiting for an EOF.
_DRAIN_S = 0.05
_KILL_SETTLE_S = 5.0


class AsyncLocalSandbox(AsyncSandbox):
    """A local sandbox driven from an event loop; takes what ``LocalSandbox`` takes."""

    backend: ClassVar[str] = "local"
    sync_class: ClassVar[type[LocalSandbox]] = LocalSandbox
    _sync: LocalSandbox

    def _spawn(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        stdin: bool,
    ) -> tuple[subprocess.Popen[bytes], list[str]]:
        sync = self._sync
        env = sync._command_env(envs)
        prefix, host_cwd = sync._placement(cwd)
        try:
            proc = _process.popen(
                [*prefix, "bash", "-c", command],
                cwd=host_cwd,
                env=env,
                stdin=stdin,
                pin_parent=bool(prefix),
            )
        except OSError as exc:
            raise sync._spawn_error(command, exc) from exc
        return proc, prefix

    async def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        proc, prefix = self._spawn(command, cwd=cwd, envs=envs, stdin=data is not None)
        process = _LocalAsyncProcess(self, proc, command, data)
        timed_out = False

        async def run() -> None:
            nonlocal timed_out
            try:
                await asyncio.wait_for(process._done.wait(), timeout_ms / 1000)
            except TimeoutError:
                timed_out = True
                await process.kill()

        await kill_on_cancel(run(), process.kill)
        result = process.result(timed_out=timed_out)
        sync = self._sync
        if time.time() >= sync._deadline and (
            result.exit_code == _KILLED or not sync.directory.is_dir()
        ):
            sync._require_unexpired()  # the watchdog ended the sandbox under the command
        if result.exit_code == 1 and prefix:
            sync._check_bwrap_failure(command, result.stderr.encode())
        return result

    async def _start(
        self, command: str, *, cwd: str | None, envs: dict[str, str]
    ) -> AsyncProcessHandle:
        proc, _ = self._spawn(command, cwd=cwd, envs=envs, stdin=True)
        return _LocalAsyncProcess(self, proc, command, None, keep_stdin=True)

    def _fs(self) -> AsyncSandboxFS:
        return _AsyncLocalFS(self._sync)


class _LocalAsyncProcess(AsyncProcessHandle):
    """A local process whose pipes and exit the running loop watches (no thread)."""

    def __init__(
        self,
        owner: AsyncLocalSandbox,
        proc: subprocess.Popen[bytes],
        command: str,
        data: bytes | None,
        *,
        keep_stdin: bool = False,
    ) -> None:
        super().__init__(command, limit=owner.options.max_output_bytes)
        self._owner = owner
        self._proc = proc
        self._bwrap = owner._sync.isolation == "bwrap"
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, tuple[Literal["stdout", "stderr"], IO[bytes]]] = {}
        self._returncode: int | None = None
        self._drain: asyncio.TimerHandle | None = None
        assert proc.stdout is not None and proc.stderr is not None
        self._watch(proc.stdout, "stdout")
        self._watch(proc.stderr, "stderr")
        self._pending = memoryview(data or b"")
        if proc.stdin is not None and not keep_stdin:
            if self._pending:
                os.set_blocking(proc.stdin.fileno(), False)
                self._loop.add_writer(proc.stdin.fileno(), self._on_writable)
            else:
                proc.stdin.close()
        self._pidfd = os.pidfd_open(proc.pid)
        self._loop.add_reader(self._pidfd, self._on_exit)

    def _watch(self, pipe: IO[bytes], name: Literal["stdout", "stderr"]) -> None:
        fd = pipe.fileno()
        os.set_blocking(fd, False)
        self._streams[fd] = (name, pipe)
        self._loop.add_reader(fd, self._on_output, fd)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _on_output(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._feed_bytes(self._streams[fd][0], chunk)
            return
        self._close_stream(fd)
        if not self._streams and self._returncode is not None:
            self._end()

    def _close_stream(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        _, pipe = self._streams.pop(fd)
        pipe.close()

    def _on_writable(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            written = os.write(stdin.fileno(), self._pending[:_CHUNK])
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin early
            written = len(self._pending)
        self._pending = self._pending[written:]
        if not self._pending:
            self._loop.remove_writer(stdin.fileno())
            stdin.close()

    def _on_exit(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._returncode = self._proc.wait()  # exited: reaps at once
        stdin = self._proc.stdin
        if stdin is not None and not stdin.closed:
            if self._pending:
                self._loop.remove_writer(stdin.fileno())
            stdin.close()
        if self._streams:
            self._drain = self._loop.call_later(_DRAIN_S, self._end)
        else:
            self._end()

    def _end(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        for fd in list(self._streams):
            # A daemon still holds the pipe: take what is already there, then let go.
            self._on_output(fd)
            if fd in self._streams:
                self._close_stream(fd)
        if _process.group_alive(self._proc.pid):
            sync = self._owner._sync
            with sync._lock:  # dispose() kills the daemon's group, as for blocking commands
                sync._groups = {pgid for pgid in sync._groups if _process.group_alive(pgid)}
                sync._groups.add(self._proc.pid)
        assert self._returncode is not None
        code = TIMEOUT_EXIT_CODE if self._killed else _process.exit_code(self._returncode)
        self._finish(code)

    async def _kill(self) -> None:
        _process.signal_tree(self._proc.pid, signal.SIGKILL, bwrap=self._bwrap)
        try:
            await asyncio.wait_for(self._done.wait(), _KILL_SETTLE_S)
        except TimeoutError:
            pass

    async def send_stdin(self, data: str | bytes) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            raise KodeError(
                f"process {self.pid} ({self.command!r}) has no open stdin",
                backend="local",
                sandbox_id=self._owner.sandbox_id,
                hint="do not call close_stdin() before writing",
            )
        payload = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
        fd = stdin.fileno()
        os.set_blocking(fd, False)
        while payload:
            try:
                written = os.write(fd, payload[:_CHUNK])
            except BlockingIOError:
                await _writable(self._loop, fd)
                continue
            except (BrokenPipeError, OSError) as exc:
                raise KodeError(
                    f"process {self.pid} ({self.command!r}) closed its stdin",
                    backend="local",
                    sandbox_id=self._owner.sandbox_id,
                    hint="the process exited or closed its input",
                ) from exc
            payload = payload[written:]

    async def close_stdin(self) -> None:
        stdin = self._proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


class _AsyncLocalFS(AsyncSandboxFS):
    """The blocking ``LocalFS`` behind coroutines: its calls are short local system calls."""

    def __init__(self, owner: LocalSandbox) -> None:
        super().__init__(owner.options.work_dir)
        self._owner = owner

    def _local(self) -> LocalFS:
        return self._owner.fs

    async def read_bytes(self, path: str) -> bytes:
        return self._local().read_bytes(path)

    async def write(self, path: str, data: str | bytes) -> None:
        self._local().write(path, data)

    async def exists(self, path: str) -> bool:
        return self._local().exists(path)

    async def stat(self, path: str) -> FileEntry:
        return self._local().stat(path)

    async def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]:
        return self._local().list(path, depth)

    async def mkdir(self, path: str) -> None:
        self._local().mkdir(path)

    async def remove(self, path: str) -> None:
        self._local().remove(path)

    async def rename(self, src: str, dst: str) -> None:
        self._local().rename(src, dst)
