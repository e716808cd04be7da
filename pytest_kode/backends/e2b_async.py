"""The async ``e2b`` backend (and so the emulator's): commands and files through
``e2b.AsyncSandbox``.

The life-cycle stays with the blocking :class:`~pytest_kode.backends.e2b.E2BSandbox` (one create,
retry and disposal path for both APIs); this module opens an ``e2b.AsyncSandbox`` on the same
sandbox from what the blocking SDK object already knows (id, domain, envd version and token,
connection config), which costs no request. Errors, retries, the exec-marker that finds a killed
command's whole tree, output bounding and file entries are the blocking backend's.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pytest_kode.aio import AsyncProcessHandle, AsyncSandbox, AsyncSandboxFS, kill_on_cancel
from pytest_kode.backends._e2b_errors import Kind, classify, is_retryable
from pytest_kode.backends._retry import RetryExhausted, acall_with_retries
from pytest_kode.backends.e2b import (
    _KILL_SETTLE_S,
    _MARKER_ENV,
    E2BSandbox,
    _entry,
    _log,
    _Stream,
    _sweep_script,
)
from pytest_kode.errors import KodeError, SandboxConnectionError, SandboxFileNotFoundError
from pytest_kode.sandbox import TIMEOUT_EXIT_CODE, ExecResult, FileEntry

if TYPE_CHECKING:
    from e2b import AsyncSandbox as AsyncSdk
    from e2b.sandbox_async.commands.command_handle import AsyncCommandHandle

__all__ = ["AsyncE2BSandbox"]

_T = TypeVar("_T")


class AsyncE2BSandbox(AsyncSandbox):
    """An E2B sandbox driven from an event loop (``e2b.AsyncSandbox`` under the hood).

    Takes what :class:`~pytest_kode.backends.e2b.E2BSandbox` takes (``api_url``,
    ``sandbox_url`` for the emulator, ...).
    """

    backend: ClassVar[str] = "e2b"
    sync_class: ClassVar[type[E2BSandbox]] = E2BSandbox
    _sync: E2BSandbox

    def _attached(self) -> None:
        self._async_sdk: AsyncSdk | None = None
        self._fs_view: _AsyncE2BFS | None = None
        self._processes: list[_AsyncE2BProcess] = []

    def close(self) -> None:
        # Stop following background commands (they die with the sandbox), so that no stream
        # task is left pending on a loop that is about to close.
        processes, self._processes = self._processes, []
        for process in processes:
            process.detach()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attached()

    # -- plumbing ---------------------------------------------------------------------------
    def _sdk(self) -> AsyncSdk:
        if self._async_sdk is None:
            from e2b import AsyncSandbox as AsyncSdk

            live = self._sync._live
            # The SDK's own constructor, given what create/connect returned: no request, and
            # the same connection config (api key, urls, access-token header).
            self._async_sdk = AsyncSdk(
                sandbox_id=live.sandbox_id,
                sandbox_domain=live.sandbox_domain,
                envd_version=live._envd_version,
                envd_access_token=live._envd_access_token,
                traffic_access_token=live.traffic_access_token,
                connection_config=live.connection_config,
            )
        return self._async_sdk

    async def _call(self, fn: Callable[[], Awaitable[_T]], action: str, path: str | None) -> _T:
        """Await one SDK call; every failure leaves as a KodeError chained to the SDK's."""
        try:
            return await fn()
        except KodeError:
            raise
        except Exception as exc:
            raise self._sync._error(exc, action, path=path) from exc

    # -- commands ---------------------------------------------------------------------------
    async def _start_command(
        self,
        command: str,
        *,
        envs: dict[str, str],
        marker: str,
        cwd: str,
        stdin: bool,
        timeout_s: float,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> AsyncCommandHandle[Any] | None:
        """As :meth:`E2BSandbox._start_command`: None when the deadline ran out before the
        start event; retried only up to the start event."""
        sdk = self._sdk()
        action = f"starting command {command!r}"
        try:
            return await acall_with_retries(
                lambda: sdk.commands.run(
                    command,
                    background=True,
                    envs={**envs, _MARKER_ENV: marker},
                    cwd=cwd,
                    stdin=stdin,
                    timeout=timeout_s,
                    retain_output=False,
                    on_stdout=on_stdout,
                    on_stderr=on_stderr,
                ),
                policy=self._sync._policy(),
                retryable=is_retryable,
            )
        except RetryExhausted as exc:
            raise self._sync._error(exc.last, action, attempts=exc.attempts) from exc.last
        except Exception as exc:
            kind = classify(exc)
            if kind is Kind.TIMEOUT and timeout_s > 0:
                return None
            if kind is Kind.INVALID and not await self._is_dir(cwd):
                raise self._sync._missing_cwd(cwd) from exc
            raise self._sync._error(exc, action) from exc

    async def _is_dir(self, path: str) -> bool:
        try:
            kind = (await self._sdk().files.get_info(path)).type
            return kind is not None and kind.value == "dir"
        except Exception:
            return False

    async def _kill_tree(self, marker: str, pid: int | None) -> None:
        """Kill a command and everything it started (best effort; the sandbox may be dying)."""
        sdk = self._sdk()
        try:
            if pid is not None:
                await sdk.commands.kill(pid)
            await sdk.commands.run(_sweep_script(marker), timeout=30)
        except Exception as exc:
            _log.debug(
                "e2b: killing process tree %s in %s failed: %s", marker, self.sandbox_id, exc
            )

    async def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        from e2b import CommandExitException

        marker = uuid.uuid4().hex
        limit = self.options.max_output_bytes
        out, err = _Stream(limit), _Stream(limit)
        workdir = self._sync._resolve_cwd(cwd)
        started = time.monotonic()
        handle: AsyncCommandHandle[Any] | None = None

        async def kill() -> None:
            await self._kill_tree(marker, handle.pid if handle is not None else None)
            if handle is not None:
                await handle.disconnect()

        async def run() -> tuple[int, bool]:
            nonlocal handle
            handle = await self._start_command(
                command,
                envs=envs,
                marker=marker,
                cwd=workdir,
                stdin=stdin is not None,
                timeout_s=timeout_ms / 1000,
                on_stdout=out.write,
                on_stderr=err.write,
            )
            if handle is None:
                return TIMEOUT_EXIT_CODE, True
            if stdin is not None:
                await self._feed_stdin(handle, stdin, command)
            try:
                return (await handle.wait()).exit_code, False
            except CommandExitException as exc:
                return exc.exit_code, False
            except Exception as exc:
                if classify(exc) is not Kind.TIMEOUT:
                    raise self._sync._error(exc, f"running command {command!r}") from exc
                return TIMEOUT_EXIT_CODE, True

        exit_code, timed_out = await kill_on_cancel(run(), kill)
        duration_ms = (time.monotonic() - started) * 1000
        if timed_out:
            await self._kill_tree(marker, handle.pid if handle is not None else None)
        return ExecResult(
            command=command,
            exit_code=exit_code,
            stdout=out.text(),
            stderr=err.text(),
            duration_ms=duration_ms,
            timed_out=timed_out,
            truncated=out.truncated or err.truncated,
            stdout_bytes=out.raw(),
        )

    async def _feed_stdin(
        self, handle: AsyncCommandHandle[Any], data: str | bytes, command: str
    ) -> None:
        try:
            if data:
                await handle.send_stdin(data)
            await handle.close_stdin()
        except Exception as exc:
            error = self._sync._stdin_error(exc, command)
            if error is not None:
                raise error from exc

    async def _start(
        self, command: str, *, cwd: str | None, envs: dict[str, str]
    ) -> AsyncProcessHandle:
        marker = uuid.uuid4().hex
        process = _AsyncE2BProcess(self, command, marker)
        # timeout=0: the SDK's default 60 s would also be the process's deadline inside envd.
        handle = await self._start_command(
            command,
            envs=envs,
            marker=marker,
            cwd=self._sync._resolve_cwd(cwd),
            stdin=True,
            timeout_s=0,
            on_stdout=lambda text: process._feed_text("stdout", text),
            on_stderr=lambda text: process._feed_text("stderr", text),
        )
        if handle is None:  # pragma: no cover - no deadline was set, so none can run out
            raise SandboxConnectionError(
                f"starting background command {command!r} timed out",
                backend=self.backend,
                sandbox_id=self.sandbox_id,
                hint="the sandbox did not answer; check it with is_alive()",
            )
        process.attach(handle)
        self._processes = [p for p in self._processes if p.is_running()] + [process]
        return process

    def _fs(self) -> AsyncSandboxFS:
        if self._fs_view is None:
            self._fs_view = _AsyncE2BFS(self)
        return self._fs_view


class _AsyncE2BProcess(AsyncProcessHandle):
    def __init__(self, owner: AsyncE2BSandbox, command: str, marker: str) -> None:
        super().__init__(command, limit=owner.options.max_output_bytes)
        self._owner = owner
        self._marker = marker
        self._handle: AsyncCommandHandle[Any] | None = None

    def attach(self, handle: AsyncCommandHandle[Any]) -> None:
        self._handle = handle
        self._watcher = asyncio.ensure_future(self._watch(handle))

    def detach(self) -> None:
        """Stop reading the command's stream (without awaiting: the loop may not run)."""
        for task in (getattr(self, "_watcher", None), getattr(self._handle, "_wait", None)):
            if isinstance(task, asyncio.Future) and not task.done():
                with contextlib.suppress(RuntimeError):  # its loop is closed already
                    task.cancel()

    async def _watch(self, handle: AsyncCommandHandle[Any]) -> None:
        from e2b import CommandExitException

        try:
            result = await handle.wait()
            self._finish(result.exit_code)
        except CommandExitException as exc:
            self._finish(exc.exit_code)
        except Exception as exc:
            self._finish(None, self._owner._sync._error(exc, f"waiting for {self.command!r}"))

    @property
    def pid(self) -> int:
        assert self._handle is not None
        return int(self._handle.pid)

    async def _kill(self) -> None:
        await self._owner._kill_tree(self._marker, self.pid)
        try:
            await asyncio.wait_for(self._done.wait(), _KILL_SETTLE_S)
        except TimeoutError:
            self._finish(None)

    async def send_stdin(self, data: str | bytes) -> None:
        handle = self._handle
        assert handle is not None
        await self._owner._call(
            lambda: handle.send_stdin(data), f"sending stdin to {self.command!r}", None
        )

    async def close_stdin(self) -> None:
        handle = self._handle
        assert handle is not None
        await self._owner._call(handle.close_stdin, f"closing stdin of {self.command!r}", None)


class _AsyncE2BFS(AsyncSandboxFS):
    """``AsyncSandbox.files`` with absolute paths only, as the blocking ``_E2BFS``."""

    def __init__(self, owner: AsyncE2BSandbox) -> None:
        super().__init__(owner.options.work_dir)
        self._owner = owner

    def _files(self) -> Any:
        self._owner.sync._require_live()
        return self._owner._sdk().files

    async def _do(self, fn: Callable[[], Awaitable[_T]], action: str, path: str) -> _T:
        return await self._owner._call(fn, f"{action} {path!r}", path)

    async def read_bytes(self, path: str) -> bytes:
        full = self.abspath(path)
        files = self._files()
        return bytes(await self._do(lambda: files.read(full, format="bytes"), "reading", full))

    async def write(self, path: str, data: str | bytes) -> None:
        full = self.abspath(path)
        files = self._files()
        await self._do(lambda: files.write(full, data), "writing", full)

    async def exists(self, path: str) -> bool:
        full = self.abspath(path)
        files = self._files()
        return bool(await self._do(lambda: files.exists(full), "checking", full))

    async def stat(self, path: str) -> FileEntry:
        full = self.abspath(path)
        files = self._files()
        return _entry(await self._do(lambda: files.get_info(full), "inspecting", full))

    async def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth!r}")
        full = self.abspath(path)
        files = self._files()
        entries = await self._do(lambda: files.list(full, depth=depth), "listing", full)
        return [_entry(entry) for entry in entries]

    async def mkdir(self, path: str) -> None:
        full = self.abspath(path)
        files = self._files()
        await self._do(lambda: files.make_dir(full), "creating directory", full)

    async def remove(self, path: str) -> None:
        full = self.abspath(path)
        files = self._files()
        # Real envd treats a missing path as a no-op; the contract says missing is an error.
        if not await self._do(lambda: files.exists(full), "checking", full):
            raise SandboxFileNotFoundError(
                f"cannot remove {full!r}: it does not exist in the sandbox",
                backend=self._owner.backend,
                sandbox_id=self._owner.sandbox_id,
                hint="check the path (relative paths resolve against work_dir)",
            )
        await self._do(lambda: files.remove(full), "removing", full)

    async def rename(self, src: str, dst: str) -> None:
        full_src, full_dst = self.abspath(src), self.abspath(dst)
        files = self._files()
        await self._do(
            lambda: files.rename(full_src, full_dst), f"renaming to {full_dst!r}", full_src
        )
