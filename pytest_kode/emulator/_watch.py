"""Directory watchers for ``filesystem.WatchDir`` and ``CreateWatcher``, on Linux inotify.

envd watches with Go's fsnotify, so events are what inotify reports, mapped the fsnotify way:
``IN_CREATE``/``IN_MOVED_TO`` are CREATE, ``IN_MODIFY`` WRITE, ``IN_DELETE`` REMOVE,
``IN_MOVED_FROM`` RENAME and ``IN_ATTRIB`` CHMOD; an event's name is its path relative to the
watched directory. A recursive watcher also watches every directory created beneath it.

Nothing here blocks: the inotify descriptor is non-blocking and :meth:`DirWatcher.drain` reads
what the kernel has queued (a write's events are queued before the write call returns, so a
client that polls right after writing sees them). One shared thread also reads every watcher as
soon as events arrive, so a directory created under a recursive watch is watched soon after,
and a streaming watch is woken (``on_ready``). What was made inside such a directory before its
watch was in place is reported from a scan of it (CREATE, and WRITE for a file with content), so
no change is lost to that race, whichever side wins it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pytest_kode._threads import start_thread

__all__ = ["DirWatcher", "WatchEvent", "WatchGone"]

EventKind = Literal["create", "write", "remove", "rename", "chmod"]
WatchEvent = tuple[str, EventKind]

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_IGNORED = 0x8000
_IN_ISDIR = 0x40000000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_HEADER = struct.Struct("iIII")
_IDLE_S = 1.0  # the reader thread ends after this long without any watcher
_KINDS: tuple[tuple[int, EventKind], ...] = (
    (_IN_CREATE | _IN_MOVED_TO, "create"),
    (_IN_MODIFY, "write"),
    (_IN_DELETE, "remove"),
    (_IN_MOVED_FROM, "rename"),
    (_IN_ATTRIB, "chmod"),
)


class WatchGone(Exception):
    """The watched directory itself was removed or moved away: the watch is over."""


class _Libc:
    _instance: _Libc | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]

    @classmethod
    def get(cls) -> _Libc:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance


def _check(result: int, what: str, path: Path | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", None if path is None else str(path))
    return result


class DirWatcher:
    """One watch on a host directory (``root``); events are named relative to it."""

    def __init__(
        self, root: Path, *, recursive: bool, on_ready: Callable[[], None] | None = None
    ) -> None:
        if not root.is_dir():
            if root.exists():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root))
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(root))
        self._libc = _Libc.get()
        self._root = root
        self._recursive = recursive
        self._lock = threading.Lock()
        self._fd = _check(self._libc.init1(_IN_NONBLOCK | _IN_CLOEXEC), "inotify_init1")
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory relative to root
        self._root_wd = -1
        self._pending: list[WatchEvent] = []
        self._gone = False
        self._on_ready = on_ready
        try:
            self._root_wd = self._add(root, "")
            if recursive:
                self._add_tree(root, "", report=False)
        except BaseException:
            os.close(self._fd)
            raise
        _Pump.register(self)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def gone(self) -> bool:
        return self._gone

    def _add(self, host_dir: Path, relative: str) -> int:
        wd = _check(
            self._libc.add_watch(self._fd, os.fsencode(host_dir), _MASK),
            "inotify_add_watch",
            host_dir,
        )
        self._dirs[wd] = relative
        return wd

    def _add_tree(self, host_dir: Path, relative: str, *, report: bool) -> None:
        """Watch the directories beneath ``host_dir``; ``report``: it is new, so what is in it
        already was made before its watch existed and is reported as made now."""
        try:
            children = list(os.scandir(host_dir))
        except OSError:
            return
        for child in children:
            sub = f"{relative}/{child.name}" if relative else child.name
            if report:
                self._pending.append((sub, "create"))
                try:
                    if child.is_file(follow_symlinks=False) and child.stat().st_size > 0:
                        self._pending.append((sub, "write"))
                except OSError:
                    pass  # removed in between: its removal is reported by the watch
            if child.is_dir(follow_symlinks=False):
                try:
                    self._add(Path(child.path), sub)
                except OSError:
                    continue  # removed in between, or the watch limit is reached
                self._add_tree(Path(child.path), sub, report=report)

    def pump(self) -> None:
        """Read what the kernel queued into the pending list (the shared thread calls this)."""
        with self._lock:
            if self._fd < 0:
                return
            before = len(self._pending)
            self._read()
            ready = len(self._pending) > before or self._gone
        if ready and self._on_ready is not None:
            self._on_ready()

    def drain(self) -> list[WatchEvent]:
        """Everything that happened since the last call. Raises WatchGone once the root is gone
        and every event before its removal has been handed out."""
        with self._lock:
            if self._fd >= 0:
                self._read()
            events, self._pending = self._pending, []
            if not events and self._gone:
                raise WatchGone(str(self._root))
            return events

    def _read(self) -> None:
        while True:
            try:
                buffer = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            except OSError:
                return
            if not buffer:
                return
            offset = 0
            while offset + _HEADER.size <= len(buffer):
                wd, mask, _cookie, size = _HEADER.unpack_from(buffer, offset)
                offset += _HEADER.size
                raw_name = buffer[offset : offset + size].rstrip(b"\0")
                offset += size
                self._handle(wd, mask, os.fsdecode(raw_name))

    def _handle(self, wd: int, mask: int, name: str) -> None:
        directory = self._dirs.get(wd)
        if directory is None:
            return
        if mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
            if wd == self._root_wd and mask & (_IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED):
                self._gone = True
            if mask & _IN_IGNORED:
                self._dirs.pop(wd, None)
            return  # a sub-directory's own removal is reported by its parent
        if not name:
            return
        relative = f"{directory}/{name}" if directory else name
        for bits, kind in _KINDS:
            if mask & bits:
                self._pending.append((relative, kind))
        if self._recursive and mask & _IN_ISDIR and mask & (_IN_CREATE | _IN_MOVED_TO):
            host_dir = self._root / relative
            try:
                self._add(host_dir, relative)
            except OSError:
                return
            self._add_tree(host_dir, relative, report=True)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                _Pump.unregister(fd)
                os.close(fd)


class _Pump:
    """The one thread that reads every watcher as soon as the kernel has events for it; it
    ends when no watcher is left."""

    _instance: _Pump | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watchers: dict[int, DirWatcher] = {}
        start_thread(self._run, name="kode-emulator-watch")

    @classmethod
    def register(cls, watcher: DirWatcher) -> None:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            pump = cls._instance
            pump._watchers[watcher.fd] = watcher
            pump._epoll.register(watcher.fd, select.EPOLLIN)

    @classmethod
    def unregister(cls, fd: int) -> None:
        with cls._lock:
            pump = cls._instance
            if pump is None:
                return
            pump._watchers.pop(fd, None)
            try:
                pump._epoll.unregister(fd)
            except OSError:
                pass

    def _run(self) -> None:
        while True:
            ready = self._epoll.poll(_IDLE_S)
            with _Pump._lock:
                if not ready and not self._watchers:
                    _Pump._instance = None
                    self._epoll.close()
                    return
                watchers = [self._watchers.get(fd) for fd, _ in ready]
            for watcher in watchers:
                if watcher is not None:
                    watcher.pump()
