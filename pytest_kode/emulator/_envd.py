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
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.filesystem import filesystem_connect
from e2b.envd.filesystem import filesystem_pb as fs_pb
from e2b.envd.process import process_connect
from e2b.envd.process import process_pb as pr_pb
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from pytest_kode.emulator._files import (
    PathRejected,
    host_path,
    read_metadata,
    resolved_path,
    sandbox_path,
)
from pytest_kode.emulator._state import (
    WORK_DIR,
    EmulatedSandbox,
    ProcessEnd,
    ProcessRecord,
    ProcessSpec,
    Registry,
    current_sandbox,
)
from pytest_kode.emulator._watch import DirWatcher, WatchEvent, WatchGone
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
        pty: tuple[int, int] | None = None
        if request.has_field("pty") and request.pty is not None:
            size = request.pty.size
            pty = (size.rows or 24, size.cols or 80) if size is not None else (24, 80)
        config = request.process or pr_pb.ProcessConfig()
        if not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = sandbox_path(config.cwd if config.has_field("cwd") and config.cwd else "")
        # Off the event loop: outside work_dir the check asks the sandbox's agent.
        if not await asyncio.to_thread(_is_dir, sandbox, cwd):
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist or is not a directory"
            )
        spec = ProcessSpec(
            cmd=config.cmd,
            args=tuple(config.args),
            envs=dict(config.envs),
            cwd=config.cwd if config.has_field("cwd") else None,
            tag=request.tag if request.has_field("tag") else None,
            pty=pty is not None,
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
                # A terminal has one output: envd sends it as `pty` data.
                on_stdout=record.publish_pty if pty is not None else record.publish_stdout,
                on_stderr=record.publish_stderr,
                pty=pty,
                tag=spec.tag,
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
        record = _select(request.process)
        size = request.pty.size if request.pty is not None else None
        if size is None:
            return pr_pb.UpdateResponse()  # nothing to change
        if not record.spec.pty:
            raise ConnectError(
                Code.FAILED_PRECONDITION, f"process {record.pid} was not started with a PTY"
            )
        if size.rows <= 0 or size.cols <= 0:
            raise ConnectError(Code.INVALID_ARGUMENT, "pty size needs positive rows and cols")
        assert record.process is not None
        try:
            await asyncio.to_thread(record.process.resize, size.rows, size.cols)
        except KodeError as exc:
            raise ConnectError(Code.NOT_FOUND, str(exc)) from exc
        return pr_pb.UpdateResponse()

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


def _is_dir(sandbox: EmulatedSandbox, path: str) -> bool:
    try:
        return host_path(sandbox, path).is_dir()
    except (PathRejected, FileNotFoundError):
        # Outside work_dir (the sandbox's /tmp): ask the sandbox's own view.
        try:
            return sandbox.local.fs.stat(path).type == "dir"
        except (KodeError, OSError):
            return False


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
    if (chosen.field == "pty") != record.spec.pty:
        raise ConnectError(
            Code.FAILED_PRECONDITION,
            f"process {record.pid} "
            + ("has a PTY: send pty input" if record.spec.pty else "has no PTY: send stdin"),
        )
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
            if kind == "abort":
                raise _sandbox_gone(_sandbox())
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
    """``filesystem.Filesystem`` over the sandbox's LocalFS, with inotify watchers."""

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

    async def watch_dir(
        self, request: fs_pb.WatchDirRequest, ctx: RequestContext[Any, Any], /
    ) -> AsyncIterator[fs_pb.WatchDirResponse]:
        sandbox = _sandbox()
        path = sandbox_path(request.path)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        watcher = await asyncio.to_thread(
            _open_watcher,
            sandbox,
            path,
            request.recursive,
            lambda: _wake_threadsafe(loop, wake),
        )
        forget = sandbox.on_gone(lambda: _wake_threadsafe(loop, wake))
        keepalive_s = _keepalive_interval(ctx)
        try:
            yield _watch_response("start", fs_pb.WatchDirResponse.StartEvent())
            while sandbox.running:
                try:
                    await asyncio.wait_for(wake.wait(), keepalive_s)
                except TimeoutError:
                    yield _watch_response("keepalive", fs_pb.WatchDirResponse.KeepAlive())
                    continue
                wake.clear()
                if not sandbox.running:
                    break
                try:
                    events = await asyncio.to_thread(
                        _fs_events, sandbox, path, watcher, request.include_entry
                    )
                except WatchGone:
                    return  # the directory was removed: the stream ends cleanly, as envd's
                for event in events:
                    yield _watch_response("filesystem", event)
            raise _sandbox_gone(sandbox)
        finally:
            forget()
            watcher.close()

    async def create_watcher(
        self, request: fs_pb.CreateWatcherRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.CreateWatcherResponse:
        sandbox = _sandbox()
        path = sandbox_path(request.path)
        watcher = await asyncio.to_thread(_open_watcher, sandbox, path, request.recursive)
        watcher_id = sandbox.add_watcher(watcher, path=path, include_entry=request.include_entry)
        return fs_pb.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: fs_pb.GetWatcherEventsRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.GetWatcherEventsResponse:
        sandbox = _sandbox()
        found = sandbox.find_watcher(request.watcher_id)
        if found is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {request.watcher_id} not found")
        watcher, path, include_entry = found
        try:
            events = await asyncio.to_thread(_fs_events, sandbox, path, watcher, include_entry)
        except WatchGone:
            events = []  # the directory is gone: nothing more will come
        return fs_pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self, request: fs_pb.RemoveWatcherRequest, ctx: RequestContext[Any, Any], /
    ) -> fs_pb.RemoveWatcherResponse:
        sandbox = _sandbox()
        found = sandbox.find_watcher(request.watcher_id)
        if found is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher with id {request.watcher_id} not found")
        sandbox.remove_watcher(found[0])
        return fs_pb.RemoveWatcherResponse()


_EVENT_TYPES = {
    "create": fs_pb.EventType.CREATE,
    "write": fs_pb.EventType.WRITE,
    "remove": fs_pb.EventType.REMOVE,
    "rename": fs_pb.EventType.RENAME,
    "chmod": fs_pb.EventType.CHMOD,
}


def _wake_threadsafe(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    try:
        loop.call_soon_threadsafe(event.set)
    except RuntimeError:
        pass  # the loop is closed: the emulator is stopping


def _sandbox_gone(sandbox: EmulatedSandbox) -> ConnectError:
    # What envd's proxy answers when the VM under a stream goes away; the SDK then probes the
    # sandbox's health and reports it as killed.
    return ConnectError(
        Code.UNAVAILABLE,
        f"the connection to sandbox {sandbox.sandbox_id} ended before the stream completed",
    )


def _watch_response(kind: str, value: object) -> fs_pb.WatchDirResponse:
    return fs_pb.WatchDirResponse(event=cast(Any, Oneof(kind, value)))


def _open_watcher(
    sandbox: EmulatedSandbox,
    path: str,
    recursive: bool,
    on_ready: Callable[[], None] | None = None,
) -> DirWatcher:
    try:
        return DirWatcher(host_path(sandbox, path), recursive=recursive, on_ready=on_ready)
    except FileNotFoundError as exc:
        raise ConnectError(Code.NOT_FOUND, f"path '{path}' does not exist") from exc
    except NotADirectoryError as exc:
        raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory") from exc
    except PathRejected as exc:
        raise ConnectError(Code.PERMISSION_DENIED, str(exc)) from exc
    except OSError as exc:
        raise ConnectError(Code.INTERNAL, f"cannot watch '{path}': {exc}") from exc


def _fs_events(
    sandbox: EmulatedSandbox, root: str, watcher: DirWatcher, include_entry: bool
) -> list[fs_pb.FilesystemEvent]:
    return [_fs_event(sandbox, root, event, include_entry) for event in watcher.drain()]


def _fs_event(
    sandbox: EmulatedSandbox, root: str, event: WatchEvent, include_entry: bool
) -> fs_pb.FilesystemEvent:
    name, kind = event
    result = fs_pb.FilesystemEvent(name=name, type=_EVENT_TYPES[kind])
    if include_entry:
        # Best effort, as envd: only while the path still exists.
        try:
            result.entry = _entry(sandbox, sandbox.local.fs.stat(posixpath.join(root, name)))
        except (KodeError, OSError):
            pass
    return result


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
    symlink_target = entry.symlink_target
    if entry.type == "symlink":
        # envd reports the link's resolved absolute path, the target's type, and is_symlink.
        try:
            resolved = resolved_path(sandbox, entry.path)
            target = os.stat(host_path(sandbox, resolved))
            symlink_target = resolved
            kind = (
                fs_pb.FileType.DIRECTORY if _stat.S_ISDIR(target.st_mode) else fs_pb.FileType.FILE
            )
        except (KodeError, OSError, PathRejected, ValueError):
            pass  # dangling, or pointing out of what the sandbox exposes: keep the raw target
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
    if symlink_target is not None:
        result.symlink_target = symlink_target
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


# The sandbox's own files belong to its user: on the host that is whoever runs the emulator
# (the uid the sandbox's processes map to), in the sandbox it is E2B's `user`.
SANDBOX_USER = "user"


def _user_name(uid: int) -> str:
    if uid == os.geteuid():
        return SANDBOX_USER
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    if gid == os.getegid():
        return SANDBOX_USER
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
