"""File access for local sandboxes: through the agent (:class:`AgentFS`) or, without
isolation, directly on the sandbox directory (:class:`LocalFS`).

:class:`AgentFS` sends each operation to the sandbox's agent, which does it as the sandbox's
user in the sandbox's own mount namespace: ``fs`` reaches exactly what commands reach (the
sandbox's writable ``work_dir`` and ``/tmp``, the read-only system files it sees) and nothing of
the host outside that view, symlinks included, because the kernel resolves every path.

:class:`LocalFS` is for ``isolation="none"``, where there is no such view: it confines every
path to the sandbox directory itself.
Paths are resolved the way the sandbox sees them: relative paths against ``work_dir``, symlinks
(made by commands inside) against the sandbox's own view, where ``/home/user/x`` is the
directory's ``x``. Resolution walks the tree one component at a time with directory file
descriptors and ``O_NOFOLLOW``, so a component swapped for a symlink between the check and the
use fails instead of escaping (no TOCTOU window as with ``realpath`` + ``open``).
"""

from __future__ import annotations

import builtins
import errno
import os
import posixpath
import shutil
import stat as stat_module
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pytest_kode.backends.local._agent import Refused, read_file, refuse_special
from pytest_kode.backends.local._client import AgentClient, AgentError, AgentGone
from pytest_kode.errors import (
    ConfigError,
    KodeError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
    SandboxPathError,
)
from pytest_kode.sandbox import FileEntry, SandboxFS, write_payload

__all__ = ["DEFAULT_READ_LIMIT", "AgentFS", "LocalFS", "refused"]

DEFAULT_READ_LIMIT = 256 * 1024 * 1024
"""The default cap on ``fs.read``/``read_bytes`` of a local sandbox (``max_read_bytes``)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40


def _is_a_directory() -> OSError:
    return IsADirectoryError(errno.EISDIR, "is a directory")


class _NotADirectory(KodeError, NotADirectoryError):
    """A parent of the path is a file."""


@dataclass
class _Located:
    """An open directory fd and the name of the entry in it (None: the sandbox root itself)."""

    dir_fd: int
    name: str | None
    parts: list[str]  # the entry's real location, relative to work_dir


def refused(exc: Refused, shown: str, *, backend: str, sandbox_id: str) -> SandboxPathError:
    """The user's error for a special file or an over-large read (``shown``: their path)."""
    if exc.kind == "too_large":
        hint = (
            "read it in a command instead (e.g. exec('head -c N file')), or raise the limit "
            "with LocalSandbox(max_read_bytes=...)"
        )
    else:
        hint = "read or write it with a command in the sandbox (exec) if you really mean to"
    message = str(exc).replace(repr(exc.path), repr(shown)) if exc.path else str(exc)
    return SandboxPathError(message, backend=backend, sandbox_id=sandbox_id, hint=hint)


class LocalFS(SandboxFS):
    """``Sandbox.fs`` for a sandbox that is a directory on this machine (no isolation)."""

    def __init__(
        self,
        work_dir: str,
        directory: str,
        *,
        backend: str = "local",
        sandbox_id: str = "",
        read_limit: int = DEFAULT_READ_LIMIT,
    ) -> None:
        super().__init__(work_dir)
        self._root = os.path.realpath(directory)
        self._backend = backend
        self._sandbox_id = sandbox_id
        self._read_limit = read_limit

    # -- errors -----------------------------------------------------------------------------
    def _escape(self, path: str, why: str) -> SandboxPathError:
        return SandboxPathError(
            f"path {path!r} {why}; only paths inside the sandbox's work_dir {self.work_dir!r} "
            "are reachable",
            backend=self._backend,
            sandbox_id=self._sandbox_id,
            hint="use a path relative to work_dir or an absolute path below it",
        )

    def _missing(self, path: str) -> SandboxFileNotFoundError:
        return SandboxFileNotFoundError(
            f"no such file or directory: {self.abspath(path)!r}",
            backend=self._backend,
            sandbox_id=self._sandbox_id,
            hint="check the path (relative paths resolve against work_dir) or create it first",
        )

    def _error(self, path: str, what: str, exc: OSError) -> KodeError:
        return KodeError(
            f"{what} {self.abspath(path)!r} failed: {exc.strerror or exc}",
            backend=self._backend,
            sandbox_id=self._sandbox_id,
        )

    # -- resolution -------------------------------------------------------------------------
    def _split(self, inside: str, original: str) -> list[str]:
        """Parts of an absolute in-sandbox path below work_dir; SandboxPathError outside."""
        if inside == self.work_dir:
            return []
        prefix = self.work_dir.rstrip("/") + "/"
        if inside.startswith(prefix):
            return [part for part in inside[len(prefix) :].split("/") if part]
        # A command running without bwrap writes symlinks with host paths into the directory.
        host_prefix = self._root + "/"
        if inside == self._root:
            return []
        if inside.startswith(host_prefix):
            return [part for part in inside[len(host_prefix) :].split("/") if part]
        raise self._escape(original, f"resolves to {inside!r}, outside the sandbox")

    def _retarget(self, base: list[str], target: str, original: str) -> list[str]:
        if target.startswith("/"):
            inside = posixpath.normpath(target)
        else:
            inside = posixpath.normpath(posixpath.join(self.work_dir, *base, target))
        return self._split(inside, original)

    @contextmanager
    def _locate(
        self, path: str, *, follow: bool, create_parents: bool = False
    ) -> Iterator[_Located]:
        """Open the directory holding ``path`` (resolved, confined) and yield it with the name."""
        path = str(path)
        if "\0" in path:
            raise ConfigError(f"path {path!r} contains a NUL byte")
        parts = self._split(self.abspath(path), path)
        hops = 0
        fd = -1
        try:
            while True:
                fd = self._open_root()
                redirected: list[str] | None = None
                for index, part in enumerate(parts):
                    last = index == len(parts) - 1
                    try:
                        info = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError as exc:
                        if last:
                            break
                        if not create_parents:
                            raise self._missing(path) from exc
                        try:
                            os.mkdir(part, dir_fd=fd)
                        except FileExistsError:
                            pass
                        info = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat_module.S_ISLNK(info.st_mode) and (follow or not last):
                        target = os.readlink(part, dir_fd=fd)
                        redirected = self._retarget(parts[:index], target, path)
                        redirected += parts[index + 1 :]
                        break
                    if last:
                        break
                    if not stat_module.S_ISDIR(info.st_mode):
                        raise _NotADirectory(
                            f"{'/'.join([self.work_dir, *parts[: index + 1]])!r} is not a "
                            f"directory, so {self.abspath(path)!r} cannot exist",
                            backend=self._backend,
                            sandbox_id=self._sandbox_id,
                        )
                    try:
                        next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                            raise self._escape(
                                path, "changed into a symlink while resolving"
                            ) from exc
                        raise
                    os.close(fd)
                    fd = next_fd
                if redirected is None:
                    yield _Located(fd, parts[-1] if parts else None, parts)
                    return
                os.close(fd)
                fd = -1
                parts = redirected
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise self._escape(path, "has too many levels of symbolic links")
        finally:
            if fd >= 0:
                os.close(fd)

    def _open_root(self) -> int:
        try:
            return os.open(self._root, _DIR_FLAGS)
        except FileNotFoundError as exc:
            raise SandboxNotFoundError(
                f"the sandbox's directory {self._root!r} no longer exists",
                backend=self._backend,
                sandbox_id=self._sandbox_id,
                hint="the sandbox was disposed or removed from disk; create a new one",
            ) from exc

    def host_path(self, path: str) -> Path:
        """The host path of ``path`` inside the sandbox, symlinks resolved and confined.

        For code that must hand a real path to another tool (the E2B emulator). Prefer ``fs``
        methods otherwise: a path can be swapped for a symlink after this check.
        """
        with self._locate(path, follow=True) as located:
            return Path(self._root, *located.parts)

    def inside_path(self, path: str) -> str:
        """The in-sandbox absolute path of ``path`` (symlinks resolved, confined)."""
        with self._locate(path, follow=True) as located:
            return posixpath.join(self.work_dir, *located.parts)

    # -- reading and writing ----------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self._locate(path, follow=True) as located:
            if located.name is None:
                raise self._error(path, "reading", _is_a_directory())
            try:
                return read_file(
                    located.name, self._read_limit, dir_fd=located.dir_fd, follow=False
                )
            except Refused as exc:
                raise refused(
                    exc, self.abspath(path), backend=self._backend, sandbox_id=self._sandbox_id
                ) from exc
            except FileNotFoundError as exc:
                raise self._missing(path) from exc
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise self._escape(path, "changed into a symlink while reading") from exc
                raise self._error(path, "reading", exc) from exc

    def _write(self, path: str, data: str | bytes) -> None:
        payload = write_payload(path, data)
        with self._locate(path, follow=True, create_parents=True) as located:
            if located.name is None:
                raise self._error(path, "writing", _is_a_directory())
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                # A FIFO or device is refused before it is opened (opening one may block,
                # fail, or have effects), and checked again on the open file below.
                existing = os.stat(located.name, dir_fd=located.dir_fd, follow_symlinks=False)
                refuse_special(self.abspath(path), existing.st_mode, "write")
            except FileNotFoundError:
                pass
            except Refused as exc:
                raise refused(
                    exc, exc.path, backend=self._backend, sandbox_id=self._sandbox_id
                ) from exc
            try:
                fd = os.open(located.name, flags, 0o644, dir_fd=located.dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise self._escape(path, "changed into a symlink while writing") from exc
                raise self._error(path, "writing", exc) from exc
            with os.fdopen(fd, "wb") as handle:
                try:
                    # Checked on the open file: a FIFO or device must not be written (or
                    # truncated) through fs.
                    refuse_special(self.abspath(path), os.fstat(fd).st_mode, "write")
                except Refused as exc:
                    raise refused(
                        exc, exc.path, backend=self._backend, sandbox_id=self._sandbox_id
                    ) from exc
                os.set_blocking(fd, True)
                os.ftruncate(fd, 0)
                handle.write(payload)

    # -- metadata ---------------------------------------------------------------------------
    def _entry(self, inside: str, info: os.stat_result, target: str | None) -> FileEntry:
        kind: Literal["file", "dir", "symlink"]
        if stat_module.S_ISLNK(info.st_mode):
            kind = "symlink"
        elif stat_module.S_ISDIR(info.st_mode):
            kind = "dir"
        else:
            kind = "file"
        return FileEntry(
            name=posixpath.basename(inside) or inside,
            path=inside,
            type=kind,
            size=info.st_size,
            mode=stat_module.S_IMODE(info.st_mode),
            modified_time=datetime.fromtimestamp(info.st_mtime, UTC),
            symlink_target=target,
        )

    def _lstat(self, located: _Located) -> os.stat_result:
        if located.name is None:
            return os.stat(located.dir_fd)
        return os.stat(located.name, dir_fd=located.dir_fd, follow_symlinks=False)

    def exists(self, path: str) -> bool:
        try:
            with self._locate(path, follow=False) as located:
                self._lstat(located)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def stat(self, path: str) -> FileEntry:
        with self._locate(path, follow=False) as located:
            try:
                info = self._lstat(located)
                target = None
                if stat_module.S_ISLNK(info.st_mode):
                    assert located.name is not None
                    target = os.readlink(located.name, dir_fd=located.dir_fd)
            except FileNotFoundError as exc:
                raise self._missing(path) from exc
        return self._entry(self.abspath(path), info, target)

    def list(self, path: str = ".", depth: int = 1) -> list[FileEntry]:
        if not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"fs.list depth must be an int >= 1, got {depth!r}")
        with self._locate(path, follow=True) as located:
            try:
                if located.name is None:
                    fd = os.dup(located.dir_fd)
                else:
                    fd = os.open(located.name, _DIR_FLAGS, dir_fd=located.dir_fd)
            except FileNotFoundError as exc:
                raise self._missing(path) from exc
            except OSError as exc:
                raise self._error(path, "listing", exc) from exc
        entries: list[FileEntry] = []
        try:
            self._walk(fd, self.abspath(path), depth, entries)
        finally:
            os.close(fd)
        return entries

    def _walk(self, fd: int, inside: str, depth: int, entries: builtins.list[FileEntry]) -> None:
        with os.scandir(fd) as iterator:
            children = sorted(iterator, key=lambda entry: entry.name)
        for child in children:
            child_inside = posixpath.join(inside, child.name)
            try:
                info = child.stat(follow_symlinks=False)
                target = os.readlink(child.name, dir_fd=fd) if child.is_symlink() else None
            except FileNotFoundError:  # removed while we listed
                continue
            entries.append(self._entry(child_inside, info, target))
            if depth > 1 and stat_module.S_ISDIR(info.st_mode):
                try:
                    sub = os.open(child.name, _DIR_FLAGS, dir_fd=fd)
                except OSError:  # vanished or swapped for a symlink: do not descend
                    continue
                try:
                    self._walk(sub, child_inside, depth - 1, entries)
                finally:
                    os.close(sub)

    # -- changing the tree ------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        with self._locate(path, follow=True, create_parents=True) as located:
            if located.name is None:
                return
            try:
                os.mkdir(located.name, dir_fd=located.dir_fd)
            except FileExistsError as exc:
                info = os.stat(located.name, dir_fd=located.dir_fd, follow_symlinks=False)
                if not stat_module.S_ISDIR(info.st_mode):
                    raise self._error(path, "creating directory", exc) from exc

    def remove(self, path: str) -> None:
        with self._locate(path, follow=False) as located:
            if located.name is None:
                raise self._escape(path, "is the sandbox's root; it cannot be removed")
            try:
                info = os.stat(located.name, dir_fd=located.dir_fd, follow_symlinks=False)
                if stat_module.S_ISDIR(info.st_mode):
                    # The fd-based rmtree never follows symlinks out of the tree.
                    shutil.rmtree(located.name, dir_fd=located.dir_fd)
                else:
                    os.unlink(located.name, dir_fd=located.dir_fd)
            except FileNotFoundError as exc:
                raise self._missing(path) from exc
            except OSError as exc:
                raise self._error(path, "removing", exc) from exc

    def rename(self, src: str, dst: str) -> None:
        with self._locate(src, follow=False) as source:
            if source.name is None:
                raise self._escape(src, "is the sandbox's root; it cannot be renamed")
            with self._locate(dst, follow=False, create_parents=True) as target:
                if target.name is None:
                    raise self._escape(dst, "is the sandbox's root; it cannot be replaced")
                try:
                    os.rename(
                        source.name,
                        target.name,
                        src_dir_fd=source.dir_fd,
                        dst_dir_fd=target.dir_fd,
                    )
                except FileNotFoundError as exc:
                    raise self._missing(src) from exc
                except OSError as exc:
                    raise self._error(src, f"renaming to {self.abspath(dst)!r}:", exc) from exc


class AgentFS(SandboxFS):
    """``Sandbox.fs`` done by the sandbox's agent, in the sandbox's own view (see above)."""

    def __init__(
        self,
        work_dir: str,
        client: Callable[[], AgentClient],
        *,
        gone: Callable[[], KodeError],
        backend: str = "local",
        sandbox_id: str = "",
        read_limit: int = DEFAULT_READ_LIMIT,
    ) -> None:
        super().__init__(work_dir)
        self._client = client
        self._gone = gone
        self._backend = backend
        self._sandbox_id = sandbox_id
        self._read_limit = read_limit

    def _call(
        self, what: str, path: str, body: dict[str, object], blob: bytes = b""
    ) -> tuple[dict[str, object], bytes]:
        try:
            return self._client().call(body, blob)
        except AgentGone as exc:
            raise self._gone() from exc
        except AgentError as exc:
            raise self._translate(what, path, exc) from exc

    def _translate(self, what: str, path: str, exc: AgentError) -> KodeError:
        shown = self.abspath(path)
        if exc.type in ("special", "too_large"):
            return refused(
                Refused(exc.type, str(exc), exc.path or shown),
                shown,
                backend=self._backend,
                sandbox_id=self._sandbox_id,
            )
        if exc.type == "os" and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return SandboxFileNotFoundError(
                f"no such file or directory: {shown!r}",
                backend=self._backend,
                sandbox_id=self._sandbox_id,
                hint="check the path (relative paths resolve against work_dir) or create it first",
            )
        hint = None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = (
                "the sandbox's user cannot change this path (system files are read-only); "
                "write below work_dir or /tmp"
            )
        return KodeError(
            f"{what} {shown!r} failed: {exc}",
            backend=self._backend,
            sandbox_id=self._sandbox_id,
            hint=hint,
        )

    def _entry(self, data: dict[str, object]) -> FileEntry:
        mtime = data.get("mtime")
        target = data.get("target")
        kind = data.get("type")
        return FileEntry(
            name=str(data.get("name")),
            path=str(data.get("path")),
            type=kind if kind in ("file", "dir", "symlink") else "file",
            size=int(data.get("size") or 0),  # type: ignore[call-overload]
            mode=int(data.get("mode") or 0),  # type: ignore[call-overload]
            modified_time=datetime.fromtimestamp(float(mtime), UTC)  # type: ignore[arg-type]
            if mtime is not None
            else None,
            symlink_target=target if isinstance(target, str) else None,
        )

    def _path(self, path: str) -> str:
        path = str(path)
        if "\0" in path:
            raise ConfigError(f"path {path!r} contains a NUL byte")
        return self.abspath(path)

    def read_bytes(self, path: str) -> bytes:
        full = self._path(path)
        _, data = self._call(
            "reading", path, {"op": "read", "path": full, "limit": self._read_limit}
        )
        return data

    @staticmethod
    def _payload(path: str, data: str | bytes) -> bytes:
        """What ``write(path, data)`` sends (the blocking and the async API)."""
        return write_payload(path, data)

    @staticmethod
    def _check_depth(depth: int) -> None:
        if not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"fs.list depth must be an int >= 1, got {depth!r}")

    def _write(self, path: str, data: str | bytes) -> None:
        payload = self._payload(path, data)
        self._call("writing", path, {"op": "write", "path": self._path(path)}, payload)

    def exists(self, path: str) -> bool:
        try:
            self._call("checking", path, {"op": "lstat", "path": self._path(path)})
        except SandboxFileNotFoundError:
            return False
        return True

    def stat(self, path: str) -> FileEntry:
        full = self._path(path)
        data, _ = self._call("inspecting", path, {"op": "lstat", "path": full})
        return self._entry(data)

    def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]:
        self._check_depth(depth)
        data, _ = self._call(
            "listing", path, {"op": "list", "path": self._path(path), "depth": depth}
        )
        entries = data.get("entries")
        assert isinstance(entries, builtins.list)
        return [self._entry(entry) for entry in entries]

    def mkdir(self, path: str) -> None:
        self._call("creating directory", path, {"op": "mkdir", "path": self._path(path)})

    def _not_root(self, path: str, verb: str) -> str:
        full = self._path(path)
        if full in ("/", self.work_dir):
            raise SandboxPathError(
                f"path {path!r} is {'the sandbox root' if full == '/' else 'work_dir'}; it "
                f"cannot be {verb}",
                backend=self._backend,
                sandbox_id=self._sandbox_id,
                hint="name a file or directory below it",
            )
        return full

    def remove(self, path: str) -> None:
        self._call("removing", path, {"op": "remove", "path": self._not_root(path, "removed")})

    def rename(self, src: str, dst: str) -> None:
        body: dict[str, object] = {
            "op": "rename",
            "src": self._not_root(src, "renamed"),
            "dst": self._not_root(dst, "replaced"),
        }
        self._call(f"renaming to {self.abspath(dst)!r}:", src, body)
