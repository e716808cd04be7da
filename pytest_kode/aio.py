"""The async twin of the sandbox API, for asyncio test suites and the agent code they test.

An :class:`AsyncSandbox` is the same sandbox as its blocking twin (:attr:`AsyncSandbox.sync`):
one identity, one options object, one transcript, so the reports and the assertion helpers see
async commands exactly as they see blocking ones. The life-cycle (create, connect, lifetime,
dispose) goes through the twin, each call on a thread of its own, which keeps one create/retry/
disposal path for both APIs; commands, background processes and file operations are native
coroutines of the backend (no thread per command).

Backends: ``local`` (:mod:`pytest_kode.backends.local._aio`) and ``e2b`` (and so the emulator;
:mod:`pytest_kode.backends.e2b_async`). A plugin backend offers an async twin by giving its
``Sandbox`` subclass an ``async_twin`` attribute: the ``AsyncSandbox`` subclass or its
``"module:Class"`` path.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import codecs
import collections
import contextlib
import importlib
import posixpath
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Self, TypeVar

from pytest_kode._threads import start_thread
from pytest_kode.errors import ConfigError, KodeError
from pytest_kode.sandbox import (
    TIMEOUT_EXIT_CODE,
    BoundedOutput,
    ExecResult,
    FileEntry,
    GlobPlan,
    Sandbox,
    Transcript,
)

if TYPE_CHECKING:
    from pytest_kode.options import SandboxOptions

__all__ = [
    "AsyncProcessHandle",
    "AsyncSandbox",
    "AsyncSandboxFS",
    "OutputChunk",
    "run_blocking",
]

_T = TypeVar("_T")

# The async twins of the built-in backends, by the sync class's ``backend`` name; imported on use.
_BUILTIN_TWINS = {
    "local": "pytest_kode.backends.local._aio:AsyncLocalSandbox",
    "e2b": "pytest_kode.backends.e2b_async:AsyncE2BSandbox",
}


class OutputChunk(NamedTuple):
    """A piece of a background process's output, as :class:`AsyncProcessHandle` yields it."""

    stream: Literal["stdout", "stderr"]
    text: str


async def run_blocking(fn: Callable[[], _T], *, name: str = "kode-aio") -> _T:
    """Run a blocking life-cycle call (create, connect, dispose) without blocking the loop.

    A thread of its own per call rather than the loop's default executor: that one has
    ``cpu_count + 4`` threads, which would queue ten concurrent creations on a small machine.
    When the caller is cancelled the call still finishes on its thread (a half-created sandbox
    is then disposed by whoever tracks it); its result is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    start_thread(target, name=name)
    return await future


async def kill_on_cancel(work: Awaitable[_T], kill: Callable[[], Coroutine[Any, Any, None]]) -> _T:
    """Await ``work``; if the caller is cancelled (``wait_for`` timeout, ``task.cancel()``),
    run ``kill`` to its end before passing the cancellation on.

    Shielded, so a second cancellation cannot leave the process running in the sandbox. A
    cancellation that ``work`` swallowed (a library below caught it and answered otherwise, as
    the ``e2b`` SDK's stream may under load) is honoured all the same: the caller asked for it.
    """
    try:
        result = await work
    except asyncio.CancelledError:
        await _kill_shielded(kill)
        raise
    except Exception as exc:
        if not _being_cancelled():
            raise
        await _kill_shielded(kill)
        raise asyncio.CancelledError from exc
    if _being_cancelled():
        await _kill_shielded(kill)
        raise asyncio.CancelledError
    return result


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _kill_shielded(kill: Callable[[], Coroutine[Any, Any, None]]) -> None:
    killer = asyncio.ensure_future(kill())
    with contextlib.suppress(Exception):
        await asyncio.shield(killer)


class _Sink:
    """One output stream of a process: bounded text for results, chunks for iterators."""

    def __init__(self, limit: int) -> None:
        self._buffer = BoundedOutput(limit)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._lossy = False

    def write_bytes(self, data: bytes) -> str:
        self._buffer.write(data)
        return self._decoder.decode(data)

    def write_text(self, text: str) -> str:
        if "\ufffd" in text:
            self._lossy = True
        self._buffer.write(text.encode("utf-8", "replace"))
        return text

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    @property
    def truncated(self) -> bool:
        return self._buffer.truncated

    def text(self) -> str:
        return self._buffer.text()

    def raw(self) -> bytes | None:
        return None if self._lossy else self._buffer.getvalue()


class AsyncProcessHandle(abc.ABC):
    """A background process started with :meth:`AsyncSandbox.start`.

    ``await wait()``, ``await kill()``, the output so far (:attr:`stdout`, :attr:`stderr`), and
    ``async for chunk in handle`` over :class:`OutputChunk` s as they arrive (each iteration
    starts from the first chunk still kept; the kept chunks are bounded like the output).

    Backends feed it with :meth:`_feed_bytes` / :meth:`_feed_text` and end it with
    :meth:`_finish`; it belongs to the event loop it was started on.
    """

    command: str

    def __init__(self, command: str, *, limit: int) -> None:
        self.command = command
        self._limit = limit
        self._out = _Sink(limit)
        self._err = _Sink(limit)
        self._chunks: collections.deque[tuple[int, OutputChunk]] = collections.deque()
        self._kept = 0
        self._next = 0
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._exit_code: int | None = None
        self._failure: BaseException | None = None
        self._started = time.monotonic()
        self._ended: float | None = None

    # -- fed by the backend -----------------------------------------------------------------
    def _sink(self, stream: Literal["stdout", "stderr"]) -> _Sink:
        return self._out if stream == "stdout" else self._err

    def _feed_bytes(self, stream: Literal["stdout", "stderr"], data: bytes) -> None:
        self._emit(stream, self._sink(stream).write_bytes(data))

    def _feed_text(self, stream: Literal["stdout", "stderr"], text: str) -> None:
        self._emit(stream, self._sink(stream).write_text(text))

    def _emit(self, stream: Literal["stdout", "stderr"], text: str) -> None:
        if not text:
            return
        self._chunks.append((self._next, OutputChunk(stream, text)))
        self._next += 1
        self._kept += len(text)
        while self._kept > self._limit and len(self._chunks) > 1:
            self._kept -= len(self._chunks.popleft()[1].text)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _finish(self, exit_code: int | None, failure: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        for stream in ("stdout", "stderr"):
            self._emit(stream, self._sink(stream).flush())
        self._exit_code = exit_code
        self._failure = failure
        self._ended = time.monotonic()
        self._done.set()
        self._wake()

    # -- what a backend provides ------------------------------------------------------------
    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @abc.abstractmethod
    async def _kill(self) -> None:
        """Kill the process and everything it started (the handle ends when its stream does)."""

    @abc.abstractmethod
    async def send_stdin(self, data: str | bytes) -> None: ...

    @abc.abstractmethod
    async def close_stdin(self) -> None: ...

    def _failed(self, failure: BaseException) -> KodeError:
        """The error for a stream that broke (the sandbox went away): a KodeError."""
        if isinstance(failure, KodeError):
            return failure
        return KodeError(f"lost background command {self.command!r}: {failure!r}")

    # -- the public surface -----------------------------------------------------------------
    def is_running(self) -> bool:
        return not self._done.is_set()

    async def wait(self, timeout_ms: int | None = None) -> ExecResult:
        """Wait for exit; past ``timeout_ms`` the process tree is killed and the result is
        timed out (exit code 124)."""
        finished = True
        try:
            await asyncio.wait_for(
                self._done.wait(), None if timeout_ms is None else timeout_ms / 1000
            )
        except TimeoutError:
            finished = False
            await self.kill()
        if finished and self._failure is not None and self._exit_code is None:
            raise self._failed(self._failure) from self._failure
        return self.result(timed_out=not finished)

    def result(self, *, timed_out: bool = False) -> ExecResult:
        """What the process printed so far and how it ended (exit code -1 while it runs)."""
        ended = self._ended if self._ended is not None else time.monotonic()
        if timed_out:
            code = TIMEOUT_EXIT_CODE
        elif self._exit_code is None:
            code = -1
        else:
            code = self._exit_code
        return ExecResult(
            command=self.command,
            exit_code=code,
            stdout=self._out.text(),
            stderr=self._err.text(),
            duration_ms=(ended - self._started) * 1000,
            timed_out=timed_out,
            truncated=self._out.truncated or self._err.truncated,
            stdout_bytes=self._out.raw(),
        )

    async def kill(self) -> None:
        """Kill the process and everything it started; quiet when it already exited."""
        if self._done.is_set():
            return
        await self._kill()

    @property
    def exit_code(self) -> int | None:
        """The exit code once the process ended, else None."""
        return self._exit_code

    @property
    def stdout(self) -> str:
        """Output read so far."""
        return self._out.text()

    @property
    def stderr(self) -> str:
        return self._err.text()

    async def __aiter__(self) -> AsyncIterator[OutputChunk]:
        position = 0
        while True:
            changed = self._changed
            for number, chunk in builtins.list(self._chunks):
                if number >= position:
                    position = number + 1
                    yield chunk
            if self._done.is_set() and position >= self._next:
                return
            if position >= self._next:
                await changed.wait()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self._exit_code}"
        return f"<{type(self).__name__} {self.pid} {state}: {self.command!r}>"


class AsyncSandboxFS(abc.ABC):
    """Async file access inside one sandbox; relative paths resolve against ``work_dir``.

    The same operations, arguments and errors as :class:`pytest_kode.sandbox.SandboxFS`.
    """

    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir

    def abspath(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.work_dir, str(path)))

    async def read(self, path: str) -> str:
        return (await self.read_bytes(path)).decode("utf-8")

    @abc.abstractmethod
    async def read_bytes(self, path: str) -> bytes: ...

    @abc.abstractmethod
    async def write(self, path: str, data: str | bytes) -> None: ...

    @abc.abstractmethod
    async def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def stat(self, path: str) -> FileEntry: ...

    @abc.abstractmethod
    async def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]: ...

    @abc.abstractmethod
    async def mkdir(self, path: str) -> None: ...

    @abc.abstractmethod
    async def remove(self, path: str) -> None: ...

    @abc.abstractmethod
    async def rename(self, src: str, dst: str) -> None: ...

    async def glob(self, pattern: str) -> builtins.list[str]:
        plan = GlobPlan(self.abspath(pattern), str(pattern).startswith("/"))
        if plan.root is None:
            found = [plan.full] if await self.exists(plan.full) else []
            return plan.finish(found, self.work_dir)
        try:
            entries = await self.list(plan.root, depth=plan.depth)
        except FileNotFoundError:
            entries = []
        return plan.finish(plan.select(entries), self.work_dir)


class AsyncSandbox(abc.ABC):
    """An isolated place to run commands and keep files, driven from an event loop.

    ``Cls(options=None, **fields)`` takes what the backend's blocking class takes; ``await
    init()`` creates the sandbox (or connects to ``options.sandbox_id``); ``async with Cls(...)
    as sb:`` inits and always disposes. :meth:`wrap` gives the async view of a live blocking
    :class:`~pytest_kode.sandbox.Sandbox` (the fixtures do that).
    """

    backend: ClassVar[str] = "abstract"
    #: The blocking class whose object carries this sandbox's identity and life-cycle.
    sync_class: ClassVar[type[Sandbox]]

    def __init__(self, options: SandboxOptions | None = None, **fields: Any) -> None:
        self._sync: Sandbox = self.sync_class(options, **fields)

    @classmethod
    def wrap(cls, sandbox: Sandbox) -> AsyncSandbox:
        """The async view of ``sandbox``: same sandbox, same transcript, async commands."""
        twin = _twin_class(sandbox)
        view = twin.__new__(twin)
        view._sync = sandbox
        view._attached()
        return view

    def _attached(self) -> None:  # noqa: B027 - optional hook
        """Called once the blocking twin is live (on init's thread, or when wrapped); may
        block briefly (the local agent's readiness)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Let go of this view's connections without disposing the sandbox (for a view made
        with :meth:`wrap` whose sandbox someone else disposes). Needs no running loop."""

    # -- identity, shared with the twin -----------------------------------------------------
    @property
    def sync(self) -> Sandbox:
        """The blocking view of the same sandbox (for code that is not async)."""
        return self._sync

    @property
    def sandbox_id(self) -> str:
        return self._sync.sandbox_id

    @property
    def options(self) -> SandboxOptions:
        return self._sync.options

    @property
    def resumed(self) -> bool:
        return self._sync.resumed

    @property
    def transcript(self) -> Transcript:
        return self._sync.transcript

    @property
    def disposed(self) -> bool:
        return self._sync.disposed

    def __repr__(self) -> str:
        return repr(self._sync).replace(type(self._sync).__name__, type(self).__name__, 1)

    # -- life-cycle -------------------------------------------------------------------------
    async def init(self) -> Self:
        """Create the sandbox, or connect to ``options.sandbox_id``. Idempotent."""

        def init() -> None:
            self._sync.init()
            self._attached()

        await run_blocking(init, name=f"kode-aio-init-{self.backend}")
        return self

    async def dispose(self) -> None:
        """Kill the sandbox and everything in it. Idempotent and quiet when already gone."""
        if self._sync.disposed:
            return
        self.close()
        await run_blocking(self._sync.dispose, name=f"kode-aio-dispose-{self.backend}")

    async def __aenter__(self) -> Self:
        try:
            return await self.init()
        except BaseException:
            await self.dispose()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.dispose()

    async def set_timeout(self, timeout_ms: int) -> None:
        """Set the sandbox's remaining lifetime to ``timeout_ms`` from now."""
        await run_blocking(lambda: self._sync.set_timeout(timeout_ms))

    async def is_alive(self) -> bool:
        return await run_blocking(self._sync.is_alive)

    def get_host_url(self, port: int) -> str:
        """A URL that reaches ``port`` inside the sandbox from the test process."""
        return self._sync.get_host_url(port)

    # -- commands ---------------------------------------------------------------------------
    async def exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout_ms: int | None = None,
        stdin: str | bytes | None = None,
    ) -> ExecResult:
        """Run ``command`` through bash in ``work_dir`` (or ``cwd``) and return its result.

        As :meth:`Sandbox.exec`: a non-zero exit or a timeout is data in the result. Cancelling
        the awaiting task (``asyncio.wait_for``, ``task.cancel()``) kills the command's process
        tree in the sandbox before the cancellation propagates; the sandbox stays usable.
        """
        timeout = self._sync._check_exec(command, timeout_ms, stdin, cwd=cwd, envs=envs)
        result = await self._exec(
            command, cwd=cwd, envs=dict(envs or {}), timeout_ms=timeout, stdin=stdin
        )
        self._sync._record(result)
        return result

    async def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> AsyncProcessHandle:
        """Start a background process (not bound by ``exec_timeout_ms``; dies with the sandbox)."""
        self._sync._require_live()
        if not isinstance(command, str):
            raise ConfigError(f"start() needs the command as a str, got {type(command).__name__}")
        return await self._start(command, cwd=cwd, envs=dict(envs or {}))

    @property
    def fs(self) -> AsyncSandboxFS:
        """Async file operations (``await sb.fs.read(path)`` ...)."""
        self._sync._require_live()
        return self._fs()

    # -- what a backend provides ------------------------------------------------------------
    @abc.abstractmethod
    async def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult: ...

    @abc.abstractmethod
    async def _start(
        self, command: str, *, cwd: str | None, envs: dict[str, str]
    ) -> AsyncProcessHandle: ...

    @abc.abstractmethod
    def _fs(self) -> AsyncSandboxFS: ...


def _twin_class(sandbox: Sandbox) -> type[AsyncSandbox]:
    entry: Any = getattr(type(sandbox), "async_twin", None) or _BUILTIN_TWINS.get(sandbox.backend)
    if entry is None:
        raise ConfigError(
            f"backend {sandbox.backend!r} ({type(sandbox).__name__}) has no async twin",
            hint="use the blocking sandbox fixtures for it, or give its Sandbox subclass an "
            "`async_twin` (an AsyncSandbox subclass or 'module:Class')",
        )
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(entry, type) and issubclass(entry, AsyncSandbox)):
        raise ConfigError(f"the async twin of backend {sandbox.backend!r} is not an AsyncSandbox")
    return entry
