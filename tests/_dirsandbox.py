"""Test scaffolding: the smallest real Sandbox, a host directory standing for ``work_dir``.

Unit tests of the backend-neutral layer (assertions, glob, the life-cycle) need a concrete
Sandbox. This one does real file I/O under a ``tmp_path`` and runs real ``bash`` processes; it
has no isolation at all and is not a backend anyone should use.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import shutil
import stat
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pytest_kode.errors import SandboxFileNotFoundError, SandboxPathError
from pytest_kode.options import SandboxOptions
from pytest_kode.sandbox import ExecResult, FileEntry, ProcessHandle, Sandbox, SandboxFS

_ids = itertools.count(1)


class DirFS(SandboxFS):
    """``work_dir``-absolute paths map into ``root``; anything outside raises SandboxPathError."""

    def __init__(self, root: Path, work_dir: str) -> None:
        super().__init__(work_dir)
        self.root = root

    def _host(self, path: str) -> tuple[Path, str]:
        full = self.abspath(path)
        rel = posixpath.relpath(full, self.work_dir)
        if rel == ".." or rel.startswith("../"):
            raise SandboxPathError(f"{path!r} is outside {self.work_dir}", backend="dirtest")
        return (self.root if rel == "." else self.root / rel), full

    def _missing(self, path: str, exc: BaseException) -> SandboxFileNotFoundError:
        error = SandboxFileNotFoundError(f"no such file: {path}", backend="dirtest")
        error.__cause__ = exc
        return error

    def _entry(self, host: Path, full: str) -> FileEntry:
        st = host.lstat()
        kind = (
            "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
        )
        return FileEntry(
            name=posixpath.basename(full) or "/",
            path=full,
            type=kind,
            size=st.st_size,
            mode=stat.S_IMODE(st.st_mode),
            modified_time=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            symlink_target=os.readlink(host) if kind == "symlink" else None,
        )

    def read_bytes(self, path: str) -> bytes:
        host, _ = self._host(path)
        try:
            return host.read_bytes()
        except FileNotFoundError as exc:
            raise self._missing(path, exc) from exc

    def _write(self, path: str, data: str | bytes) -> None:
        host, _ = self._host(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data.encode() if isinstance(data, str) else data)

    def exists(self, path: str) -> bool:
        host, _ = self._host(path)
        return host.exists() or host.is_symlink()

    def stat(self, path: str) -> FileEntry:
        host, full = self._host(path)
        try:
            return self._entry(host, full)
        except FileNotFoundError as exc:
            raise self._missing(path, exc) from exc

    def list(self, path: str = ".", depth: int = 1) -> list[FileEntry]:
        host, full = self._host(path)
        if not host.is_dir():
            raise self._missing(path, FileNotFoundError(path))
        entries: list[FileEntry] = []

        def walk(directory: Path, inside: str, level: int) -> None:
            for child in sorted(directory.iterdir()):
                child_path = posixpath.join(inside, child.name)
                entry = self._entry(child, child_path)
                entries.append(entry)
                if entry.type == "dir" and level < depth:
                    walk(child, child_path, level + 1)

        walk(host, full, 1)
        return entries

    def mkdir(self, path: str) -> None:
        self._host(path)[0].mkdir(parents=True, exist_ok=True)

    def remove(self, path: str) -> None:
        host, _ = self._host(path)
        if host.is_dir() and not host.is_symlink():
            shutil.rmtree(host)
        elif host.exists() or host.is_symlink():
            host.unlink()
        else:
            raise self._missing(path, FileNotFoundError(path))

    def rename(self, src: str, dst: str) -> None:
        self._host(src)[0].rename(self._host(dst)[0])


class DirSandbox(Sandbox):
    """A sandbox that is a directory; ``fail_create`` makes init fail after creating it."""

    backend = "dirtest"

    def __init__(
        self,
        root: Path,
        options: SandboxOptions | None = None,
        *,
        fail_create: bool = False,
        **fields: Any,
    ) -> None:
        super().__init__(options, **fields)
        self.root = root
        self.fail_create = fail_create
        self.calls: list[str] = []
        self._fs = DirFS(root, self.options.work_dir)

    def _create(self) -> None:
        self.calls.append("create")
        self.root.mkdir(parents=True, exist_ok=True)
        self._sandbox_id = f"dir-{next(_ids)}"
        if self.fail_create:
            raise RuntimeError("simulated failure half-way through create")

    def _connect(self) -> None:
        self.calls.append("connect")

    def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        self.calls.append(f"exec timeout_ms={timeout_ms}")
        start = time.monotonic()
        data = stdin.encode() if isinstance(stdin, str) else stdin
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self._fs._host(cwd or ".")[0],
            env={"PATH": os.environ["PATH"], **envs},
            input=data,
            capture_output=True,
            timeout=timeout_ms / 1000,
            check=False,
        )
        return ExecResult(
            command=command,
            exit_code=done.returncode,
            stdout=done.stdout.decode(errors="replace"),
            stderr=done.stderr.decode(errors="replace"),
            duration_ms=(time.monotonic() - start) * 1000,
        )

    def _dispose(self) -> None:
        self.calls.append("dispose")
        shutil.rmtree(self.root, ignore_errors=True)

    def start(
        self, command: str, *, cwd: str | None = None, envs: dict[str, str] | None = None
    ) -> ProcessHandle:
        raise NotImplementedError("DirSandbox runs no background processes")

    @property
    def fs(self) -> DirFS:
        return self._fs

    def get_host_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def set_timeout(self, timeout_ms: int) -> None:
        self.calls.append(f"set_timeout {timeout_ms}")

    def is_alive(self) -> bool:
        return self._initialized and not self.disposed
