"""The in-sandbox daemon's RPC services (``process.Process``, ``filesystem.Filesystem``).

They plug into the Connect ASGI stubs the ``e2b`` package ships; the router has already put the
addressed sandbox into :data:`~pytest_kode.emulator._state.current_sandbox`. Behaviour follows
envd: ``Start`` streams start/data/end as output arrives, the ``Connect-Timeout-Ms`` deadline kills
the process and ends the stream with DEADLINE_EXCEEDED, ``EndEvent.error`` reads "exit status N".
"""

from __future__ import annotations

import asyncio
import datetime
import grp
import os
import posixpath
import pwd
import stat as _stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.filesystem import filesystem_connect
from e2b.envd.filesystem import filesystem_pb as fs_pb
from e2b.envd.process import process_connect
from e2b.envd.process import process_pb as pr_pb
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from pytest_kode.emulator._files import PathRejected, host_path, read_metadata, sandbox_path
from pytest_kode.emulator._state import (
    WORK_DIR,
    EmulatedSandbox,
    ProcessEnd,
    ProcessRecord,
    ProcessSpec,
    Registry,
    current_sandbox,
)
from pytest_kode.errors import KodeError, SandboxPathError

if TYPE_CHECKING:
    from connectrpc.request import RequestContext

    from pytest_kode.sandbox import FileEntry

_KEEPALIVE_HEADER = "keepalive-ping-interval"
_DEFAULT_KEEPALIVE_S = 50.0


def _sandbox() -> EmulatedSandbox:
    return current_sandbox.get()


# -- processes ------------------------------------------------------------------------------


class ProcessService(process_connect.Process):
    """``process.Process`` over LocalSandbox processes."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def list(
        self, request: pr_pb.ListRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.ListResponse:
        return pr_pb.ListResponse(
            processes=[_process_info(record) for record in _sandbox().live_processes()]
        )

    async def start(
        self, request: pr_pb.StartRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pr_pb.StartResponse]:
        sandbox = _sandbox()
        if request.has_field("pty") and request.pty is not None:
            raise ConnectError(Code.UNIMPLEMENTED, "the emulator does not provide PTYs")
        config = request.process or pr_pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = sandbox_path(config.cwd if config.has_field("cwd") and config.cwd else "")
        try:
            host_cwd: Path | None = host_path(sandbox, cwd)
        except PathRejected as exc:
            raise ConnectError(Code.INVALID_ARGUMENT, str(exc)) from exc
        except FileNotFoundError:
            host_cwd = None  # a missing parent: the same answer as a missing cwd
        if host_cwd is None or not host_cwd.is_dir():
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist or is not a directory"
            )
        spec = ProcessSpec(
            cmd=config.cmd,
            args=tuple(config.args),
            envs=dict(config.envs),
            cwd=config.cwd if config.has_field("cwd") else None,
            tag=request.tag if request.has_field("tag") else None,
        )
        record = ProcessRecord(spec)
        loop = asyncio.get_running_loop()
        # Subscribe before spawning: the first output may arrive before spawn() returns.
        subscriber = record.subscribe(loop)
        stdin = request.stdin if request.has_field("stdin") else True
        try:
            record.process = await asyncio.to_thread(
                sandbox.local.spawn,
                [config.cmd, *config.args],
                cwd=cwd,
                envs={**sandbox.env_vars, **spec.envs},
                stdin=stdin,
                on_stdout=record.publish_stdout,
                on_stderr=record.publish_stderr,
            )
        except (KodeError, OSError) as exc:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cannot start {config.cmd!r}: {exc}"
            ) from exc
        sandbox.register(record)
        self._registry.run_worker(
            lambda: _reap_process(sandbox, record), name=f"kode-emulator-pid-{record.pid}"
        )
        deadline_ms = ctx.timeout_ms
        if deadline_ms is not None:
            # envd runs the process under the request's deadline: it dies with it, even when
            # the client went away first.
            loop.call_later(max(0.0, deadline_ms / 1000.0), _deadline_kill, loop, record)
        async for event in _stream(record, subscriber, ctx):
            yield pr_pb.StartResponse(event=event)

    async def connect(
        self, request: pr_pb.ConnectRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[pr_pb.ConnectResponse]:
        record = _select(request.process)
        subscriber = record.subscribe(asyncio.get_running_loop())
        async for event in _stream(record, subscriber, ctx):
            yield pr_pb.ConnectResponse(event=event)

    async def update(
        self, request: pr_pb.UpdateRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.UpdateResponse:
        raise ConnectError(Code.UNIMPLEMENTED, "the emulator does not provide PTYs to resize")

    async def stream_input(
        self,
        request: AsyncIterator[pr_pb.StreamInputRequest],
        ctx: RequestContext[Any, Any],
        /,
    ) -> pr_pb.StreamInputResponse:
        record: ProcessRecord | None = None
        async for message in request:
            event = message.event
            if event is None:
                continue
            if event.field == "start":
                record = _select(event.value.process)
            elif event.field == "data":
                if record is None:
                    raise ConnectError(Code.FAILED_PRECONDITION, "data before the start event")
                await _write_input(record, event.value.input)
        return pr_pb.StreamInputResponse()

    async def send_input(
        self, request: pr_pb.SendInputRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.SendInputResponse:
        await _write_input(_select(request.process), request.input)
        return pr_pb.SendInputResponse()

    async def send_signal(
        self, request: pr_pb.SendSignalRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.SendSignalResponse:
        record = _select(request.process)
        signum = request.signal.value if request.signal is not None else 0
        if signum not in (9, 15):
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"unsupported signal {signum}; use SIGKILL or SIGTERM"
            )
        await asyncio.to_thread(record.send_signal, signum)
        return pr_pb.SendSignalResponse()

    async def close_stdin(
        self, request: pr_pb.CloseStdinRequest, ctx: RequestContext[Any, Any], /
    ) -> pr_pb.CloseStdinResponse:
        record = _select(request.process)
        assert record.process is not None
        try:
            await asyncio.to_thread(record.process.close_stdin)
        except OSError as exc:
            raise ConnectError(Code.FAILED_PRECONDITION, f"cannot close stdin: {exc}") from exc
        return pr_pb.CloseStdinResponse()


def _process_info(record: ProcessRecord) -> pr_pb.ProcessInfo:
    spec = record.spec
    config = pr_pb.ProcessConfig(cmd=spec.cmd, args=list(spec.args), envs=dict(spec.envs))
    if spec.cwd is not None:
        config.cwd = spec.cwd
    info = pr_pb.ProcessInfo(config=config, pid=record.pid)
    if spec.tag is not None:
        info.tag = spec.tag
    return info


def _select(selector: pr_pb.ProcessSelector | None) -> ProcessRecord:
    chosen = selector.selector if selector is not None else None
    if chosen is None:
        raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")
    sandbox = _sandbox()
    if chosen.field == "pid":
        record = sandbox.find_process(pid=int(chosen.value))
    else:
        record = sandbox.find_process(tag=str(chosen.value))
    if record is None:
        raise ConnectError(Code.NOT_FOUND, f"process with {chosen.field} {chosen.value} not found")
    return record


async def _write_input(record: ProcessRecord, data: pr_pb.ProcessInput | None) -> None:
    chosen = data.input if data is not None else None
    if chosen is None:
        return
    if chosen.field != "stdin":
        raise ConnectError(Code.UNIMPLEMENTED, "the emulator does not provide PTY input")
    assert record.process is not None
    try:
        await asyncio.to_thread(record.process.send_stdin, bytes(chosen.value))
    except (KodeError, OSError, ValueError) as exc:
        raise ConnectError(
            Code.FAILED_PRECONDITION,
            f"cannot write to stdin of pid {record.pid}: {exc} (was it started with stdin=True?)",
        ) from exc


def _reap_process(sandbox: EmulatedSandbox, record: ProcessRecord) -> None:
    process = record.process
    assert process is not None
    process.wait(None)  # also drains the output readers, so data precedes the end event
    returncode = process.returncode
    end = ProcessEnd.from_returncode(137 if returncode is None else returncode, record.signalled)
    record.finish(end)
    sandbox.forget(record)
    process.close()


def _deadline_kill(loop: asyncio.AbstractEventLoop, record: ProcessRecord) -> None:
    if record.ended:
        return
    record.deadline_exceeded = True
    loop.run_in_executor(None, record.kill)


async def _stream(
    record: ProcessRecord, subscriber: Any, ctx: RequestContext[Any, Any]
) -> AsyncIterator[pr_pb.ProcessEvent]:
    keepalive_s = _keepalive_interval(ctx)
    try:
        yield _event("start", pr_pb.ProcessEvent.StartEvent(pid=record.pid))
        while True:
            remaining_ms = ctx.timeout_ms
            if remaining_ms is not None and remaining_ms <= 0:
                raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            wait_s = (
                keepalive_s if remaining_ms is None else min(keepalive_s, remaining_ms / 1000.0)
            )
            try:
                kind, payload = await asyncio.wait_for(subscriber.queue.get(), wait_s)
            except TimeoutError:
                if ctx.timeout_ms is None or ctx.timeout_ms > 0:
                    yield _event("keepalive", pr_pb.ProcessEvent.KeepAlive())
                continue
            if kind == "end":
                if record.deadline_exceeded:
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
                end: ProcessEnd = payload
                event = pr_pb.ProcessEvent.EndEvent(
                    exit_code=end.exit_code, exited=end.exited, status=end.status
                )
                if end.error is not None:
                    event.error = end.error
                yield _event("end", event)
                return
            data = pr_pb.ProcessEvent.DataEvent(output=cast(Any, Oneof(kind, payload)))
            yield _event("data", data)
    finally:
        record.unsubscribe(subscriber)


def _event(kind: str, value: object) -> pr_pb.ProcessEvent:
    return pr_pb.ProcessEvent(event=cast(Any, Oneof(kind, value)))


def _keepalive_interval(ctx: RequestContext[Any, Any]) -> float:
    raw = ctx.request_headers.get(_KEEPALIVE_HEADER)
    try:
        return max(0.05, float(raw)) if raw else _DEFAULT_KEEPALIVE_S
    except ValueError:
        return _DEFAULT_KEEPALIVE_S


# -- file system ----------------------------------------------------------------------------


class FilesystemService(filesystem_connect.Filesystem):
    """``filesystem.Filesystem`` over the sandbox's LocalFS (watchers are not emulated)."""

    async def stat(
        self, request: fs_pb.StatRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.StatResponse:
        sandbox = _sandbox()
        return await asyncio.to_thread(_stat_entry, sandbox, request.path)

    async def make_dir(
        self, request: fs_pb.MakeDirRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.MakeDirResponse:
        return await asyncio.to_thread(_make_dir, _sandbox(), request.path)

    async def move(
        self, request: fs_pb.MoveRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.MoveResponse:
        return await asyncio.to_thread(_move, _sandbox(), request.source, request.destination)

    async def list_dir(
        self, request: fs_pb.ListDirRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.ListDirResponse:
        return await asyncio.to_thread(_list_dir, _sandbox(), request.path, request.depth)

    async def remove(
        self, request: fs_pb.RemoveRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.RemoveResponse:
        return await asyncio.to_thread(_remove, _sandbox(), request.path)


def _fs_error(path: str, exc: Exception) -> ConnectError:
    if isinstance(exc, FileNotFoundError):
        return ConnectError(Code.NOT_FOUND, f"path '{path}' does not exist")
    if isinstance(exc, SandboxPathError):
        return ConnectError(Code.PERMISSION_DENIED, str(exc))
    return ConnectError(Code.INVALID_ARGUMENT, str(exc))


def _entry(sandbox: EmulatedSandbox, entry: FileEntry) -> fs_pb.EntryInfo:
    """envd's EntryInfo for a LocalFS entry, with the owner/permission details it lacks."""
    info = _host_lstat(sandbox, entry.path)
    kind = _KINDS[entry.type]
    if entry.type == "symlink":
        target = _host_stat(sandbox, entry.path)
        if target is not None:
            # Newer envd reports the target's type and flags the link with is_symlink.
            kind = (
                fs_pb.FileType.DIRECTORY if _stat.S_ISDIR(target.st_mode) else fs_pb.FileType.FILE
            )
    modified = entry.modified_time or datetime.datetime.fromtimestamp(0, datetime.UTC)
    result = fs_pb.EntryInfo(
        name=entry.name,
        type=kind,
        path=entry.path,
        size=entry.size,
        mode=entry.mode,
        permissions=_stat.filemode(info.st_mode) if info else "",
        owner=_user_name(info.st_uid) if info else "",
        group=_group_name(info.st_gid) if info else "",
        modified_time=Timestamp.from_datetime(modified),
        is_symlink=entry.type == "symlink",
        metadata=_metadata(sandbox, entry) if entry.type == "file" else {},
    )
    if entry.symlink_target is not None:
        result.symlink_target = entry.symlink_target
    return result


_KINDS = {
    "file": fs_pb.FileType.FILE,
    "dir": fs_pb.FileType.DIRECTORY,
    "symlink": fs_pb.FileType.SYMLINK,
}


def _host_lstat(sandbox: EmulatedSandbox, path: str) -> os.stat_result | None:
    try:
        if path == WORK_DIR:
            return os.lstat(host_path(sandbox, path))
        parent = host_path(sandbox, posixpath.dirname(path))
        return os.lstat(parent / posixpath.basename(path))
    except (OSError, PathRejected):
        return None


def _host_stat(sandbox: EmulatedSandbox, path: str) -> os.stat_result | None:
    try:
        return os.stat(host_path(sandbox, path))
    except (OSError, PathRejected):
        return None


def _metadata(sandbox: EmulatedSandbox, entry: FileEntry) -> dict[str, str]:
    try:
        return read_metadata(host_path(sandbox, entry.path))
    except (OSError, PathRejected):
        return {}


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _stat_entry(sandbox: EmulatedSandbox, raw: str) -> fs_pb.StatResponse:
    path = sandbox_path(raw)
    try:
        entry = sandbox.local.fs.stat(path)
    except (KodeError, OSError) as exc:
        raise _fs_error(path, exc) from exc
    return fs_pb.StatResponse(entry=_entry(sandbox, entry))


def _make_dir(sandbox: EmulatedSandbox, raw: str) -> fs_pb.MakeDirResponse:
    path = sandbox_path(raw)
    fs = sandbox.local.fs
    try:
        if fs.exists(path):
            if fs.stat(path).type == "dir" or _host_stat_is_dir(sandbox, path):
                raise ConnectError(Code.ALREADY_EXISTS, f"directory '{path}' already exists")
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"path '{path}' exists and is not a directory"
            )
        fs.mkdir(path)
        return fs_pb.MakeDirResponse(entry=_entry(sandbox, fs.stat(path)))
    except (KodeError, OSError) as exc:
        raise _fs_error(path, exc) from exc


def _host_stat_is_dir(sandbox: EmulatedSandbox, path: str) -> bool:
    info = _host_stat(sandbox, path)
    return info is not None and _stat.S_ISDIR(info.st_mode)


def _move(sandbox: EmulatedSandbox, raw_source: str, raw_destination: str) -> fs_pb.MoveResponse:
    source, destination = sandbox_path(raw_source), sandbox_path(raw_destination)
    fs = sandbox.local.fs
    try:
        fs.rename(source, destination)
        return fs_pb.MoveResponse(entry=_entry(sandbox, fs.stat(destination)))
    except (KodeError, OSError) as exc:
        raise _fs_error(source, exc) from exc


def _list_dir(sandbox: EmulatedSandbox, raw: str, depth: int) -> fs_pb.ListDirResponse:
    path = sandbox_path(raw)
    try:
        entries = sandbox.local.fs.list(path, depth=max(1, depth))
    except (KodeError, OSError) as exc:
        raise _fs_error(path, exc) from exc
    return fs_pb.ListDirResponse(entries=[_entry(sandbox, entry) for entry in entries])


def _remove(sandbox: EmulatedSandbox, raw: str) -> fs_pb.RemoveResponse:
    path = sandbox_path(raw)
    fs = sandbox.local.fs
    try:
        # envd removes with os.RemoveAll: a missing path is not an error.
        if fs.exists(path):
            fs.remove(path)
    except FileNotFoundError:
        pass  # removed in between
    except (KodeError, OSError) as exc:
        raise _fs_error(path, exc) from exc
    return fs_pb.RemoveResponse()
