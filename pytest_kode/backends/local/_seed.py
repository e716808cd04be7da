"""What a local sandbox starts from, as plain data: the seam between the template layer and us.

The template layer (:mod:`pytest_kode.templates`) sits above this backend and builds templates;
it hands a sandbox a :class:`TemplateSeed` — a directory whose copy becomes the sandbox's
``work_dir``, host directories shown read-only at their own path (a shared venv), ``PATH``
additions and variables. This backend never imports the template layer.

Each sandbox gets its own full copy of the tree (never hardlinks: a command may write through
any hardlink whatever its mode bits, which would change the template for every later sandbox).
Copies are made ahead of need by a background thread (:class:`_SparePool`), so a run that makes
many sandboxes of a template mostly pays a rename.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import os
import secrets
import shutil
import stat
import threading
from pathlib import Path

from pytest_kode._threads import start_thread

__all__ = ["TemplateSeed", "copy_tree"]

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TemplateSeed:
    """A built template as a local sandbox needs it.

    ``tree`` is copied into each new sandbox as its ``work_dir`` (which must equal
    ``work_dir``); ``shared`` host directories are shown read-only at their own path;
    ``path_dirs`` go first on ``PATH``; ``envs`` are added to every command's environment.
    ``label`` names the template in error messages.
    """

    label: str
    tree: Path
    work_dir: str
    path_dirs: tuple[str, ...] = ()
    envs: tuple[tuple[str, str], ...] = ()
    shared: tuple[str, ...] = ()

    def environment(self, base_path: str | None) -> dict[str, str]:
        """The variables a sandbox of this template adds: PATH first, then e.g. VIRTUAL_ENV."""
        path = os.pathsep.join(
            [*self.path_dirs, base_path or os.environ.get("PATH") or _DEFAULT_PATH]
        )
        return {"PATH": path, **dict(self.envs)}

    def populate(self, directory: Path) -> None:
        """Give the new, empty sandbox ``directory`` its own copy of the template's tree.

        A copy made ahead of need (beside the template, off the critical path) is renamed into
        place when one is ready; otherwise the tree is copied now. Either way the next copy
        starts in the background.
        """
        root = directory.parent
        spare = _SPARES.take(self.tree)
        if spare is not None:
            try:
                os.rename(spare, directory)  # replaces the empty directory atomically
            except OSError as exc:
                shutil.rmtree(spare, ignore_errors=True)
                spare = None
                if exc.errno == errno.EXDEV:
                    _SPARES.cross_device.add((self.tree, root))
        if spare is None:
            copy_tree(self.tree, directory)
        if (self.tree, root) not in _SPARES.cross_device:
            _SPARES.refill(self.tree)

    def copy_into(self, directory: Path) -> None:
        """Copy the template's tree into the existing, emptied ``directory`` of a recycled
        sandbox (mounted inside it, so it cannot be replaced by a ready copy)."""
        copy_tree(self.tree, directory)


class _SparePool:
    """Template copies made ahead of need, one per template, by a background thread.

    They live beside the template's tree as ``spares/<pid>-<random>``, so they never show up
    among sandboxes; this process removes its own at exit, and a later process removes those a
    killed one left (their pid is gone).
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._ready: dict[Path, Path] = {}
        self._busy: set[Path] = set()
        self._swept: set[Path] = set()
        self._threads: list[threading.Thread] = []
        self.cross_device: set[tuple[Path, Path]] = set()  # (tree, root): rename cannot work
        atexit.register(self.clear)

    def take(self, tree: Path) -> Path | None:
        """A ready spare; waits for one in the making (copying anew beside it would only
        compete with it for the disk)."""
        with self._lock:
            self._lock.wait_for(lambda: tree not in self._busy, timeout=60)
            return self._ready.pop(tree, None)

    def refill(self, tree: Path) -> None:
        with self._lock:
            if tree in self._ready or tree in self._busy:
                return
            self._busy.add(tree)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(start_thread(self._make, args=(tree,), name="kode-template-spare"))

    def _make(self, tree: Path) -> None:
        folder = tree.parent / "spares"
        if tree not in self._swept:
            self._swept.add(tree)
            _remove_dead_spares(folder)
        spare = folder / f"{os.getpid()}-{secrets.token_hex(6)}"
        try:
            folder.mkdir(exist_ok=True)
            spare.mkdir(mode=0o755)
            copy_tree(tree, spare)
        except OSError:
            shutil.rmtree(spare, ignore_errors=True)  # the next sandbox copies synchronously
            with self._lock:
                self._busy.discard(tree)
                self._lock.notify_all()
            return
        with self._lock:
            self._busy.discard(tree)
            self._ready[tree] = spare
            self._lock.notify_all()

    def clear(self) -> None:
        """Remove this process's spares (at exit), after any copy in flight has finished."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=30)
        with self._lock:
            spares, self._ready = list(self._ready.values()), {}
        for spare in spares:
            shutil.rmtree(spare, ignore_errors=True)


def _remove_dead_spares(folder: Path) -> None:
    if not folder.is_dir():
        return
    for spare in folder.iterdir():
        pid = spare.name.partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(spare, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process


_SPARES = _SparePool()


def copy_tree(source: Path, target: Path) -> None:
    """Copy the contents of ``source`` into the existing directory ``target``.

    Modes and mtimes follow (tools that compare timestamps behave as on E2B); symlinks are
    copied as links; sockets, FIFOs and devices are left out.
    """
    # Measured on this project's CI machine (benchmarks/templates.py, README): on ext4 the cost
    # is the kernel creating inodes (~150-300 us of CPU a file), whatever the copy syscall;
    # reflinks (FICLONE) are not supported by ext4 or tmpfs. So: as few syscalls per file as
    # possible, all on file descriptors (no second path walk for the mode and times).
    with os.scandir(source) as scan:
        entries = list(scan)
    for entry in entries:
        destination = os.path.join(target, entry.name)
        info = entry.stat(follow_symlinks=False)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISREG(info.st_mode):
            _copy_file(entry.path, destination, info, mode)
        elif stat.S_ISDIR(info.st_mode):
            os.mkdir(destination, 0o700)
            copy_tree(Path(entry.path), Path(destination))
            # After the children: creating them changed the directory's mtime.
            os.chmod(destination, mode)
            os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(entry.path), destination)


def _umask() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


_UMASK = _umask()


def _copy_file(source: str, destination: str, info: os.stat_result, mode: int) -> None:
    reader = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        writer = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            left = info.st_size
            while left > 0:
                sent = os.sendfile(writer, reader, None, left)
                if sent == 0:
                    break
                left -= sent
            if _UMASK is None or mode & _UMASK:
                os.fchmod(writer, mode)  # the umask took bits off at creation
            os.utime(writer, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(writer)
    finally:
        os.close(reader)
