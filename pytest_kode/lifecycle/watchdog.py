"""The run registry and the watchdog that cleans up after a killed run (SPEC 3.6).

Every process of a run that makes sandboxes registers itself in the run folder
(``proc-<worker>.json``: pid and the kernel's start time of that pid, so a recycled pid is not
mistaken for the run). A run is *alive* while one of its registered processes is.

The watchdog is a small detached process, started once per run when the first local (or
emulated) sandbox is made::

    python -m pytest_kode.lifecycle.watchdog --run-dir DIR --root ROOT [--root ROOT...]

It polls the run's processes. While the run lives, each poll also ends the run's local sandboxes
whose deadline (``timeout_ms``, moved by ``set_timeout``; read from their metadata files) has
passed, kept and reused ones included, as E2B ends a sandbox at its end time (SPEC 2.1). When the
run folder disappears the run ended normally and it exits. When every process of the run is gone
while the folder is still there (SIGKILL, OOM), it kills every process living in the run's local
sandboxes, removes their directories and metadata files (the ones the journal says were kept or
reused excepted), removes the run folder and exits.

This module is imported by the plugin and by the watchdog itself: it stays light (no pydantic,
no pytest, no backend imports).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EMULATOR_SUBDIR",
    "ProcessId",
    "ensure_watchdog",
    "main",
    "process_alive",
    "process_id",
    "reap_expired",
    "reap_run",
    "reap_unjournaled",
    "register_process",
    "registered_processes",
    "run_alive",
    "spared_sandboxes",
]

EMULATOR_SUBDIR = "emulator"
"""Below the run folder: where the run's own emulator keeps its sandboxes' directories."""

_WATCHDOG_FILE = "watchdog.json"
_POLL_S = 0.25
_SPARED_FATES = frozenset({"kept", "reuse"})

ProcessId = tuple[int, int]
"""(pid, start time in clock ticks since boot): identifies a process across pid reuse."""


# -- liveness -----------------------------------------------------------------------------------
def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data.rsplit(b")", 1)[-1].split()
    if len(fields) < 20 or fields[0] == b"Z":  # a zombie has finished all the same
        return None
    return int(fields[19])


def process_id(pid: int | None = None) -> ProcessId:
    """This (or ``pid``'s) process as (pid, start time)."""
    pid = os.getpid() if pid is None else pid
    return pid, _start_time(pid) or 0


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs and, when ``start`` is given, is the same process as then."""
    current = _start_time(pid)
    if current is None:
        return False
    return start is None or start == 0 or current == start


# -- the run registry ---------------------------------------------------------------------------
def register_process(run_dir: Path, worker: str) -> None:
    """Record this process as part of the run in ``run_dir`` (idempotent, cheap)."""
    path = run_dir / f"proc-{worker}.json"
    pid, start = process_id()
    if _read_json(path) == {"pid": pid, "start": start}:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{pid}.tmp")
    temporary.write_text(json.dumps({"pid": pid, "start": start}), "utf-8")
    os.replace(temporary, path)


def registered_processes(run_dir: Path) -> list[ProcessId]:
    """The processes registered in ``run_dir``."""
    found: list[ProcessId] = []
    try:
        names = os.listdir(run_dir)
    except OSError:
        return found
    for name in names:
        if name.startswith("proc-") and name.endswith(".json"):
            data = _read_json(run_dir / name)
            if data is not None and isinstance(data.get("pid"), int):
                found.append((int(data["pid"]), int(data.get("start") or 0)))
    return found


def run_alive(run_dir: Path) -> bool | None:
    """True while a registered process of the run lives; False when all are gone; None when the
    run folder is missing or registers nobody (nothing to decide from)."""
    processes = registered_processes(run_dir)
    if not processes:
        return None
    return any(process_alive(pid, start) for pid, start in processes)


def spared_sandboxes(run_dir: Path) -> set[str]:
    """Ids the run's journals say were kept (failed test) or kept for reuse: never reaped."""
    spared: set[str] = set()
    for journal in run_dir.glob("journal-*.jsonl"):
        try:
            lines = journal.read_text("utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # cut short by the kill
            if entry.get("event") == "released" and entry.get("fate") in _SPARED_FATES:
                spared.add(str(entry.get("sandbox_id")))
    return spared


# -- starting the watchdog ----------------------------------------------------------------------
def ensure_watchdog(run_dir: Path, roots: Iterable[Path]) -> bool:
    """Start the run's watchdog unless some process of the run already did. True if started.

    The caller must have registered itself (:func:`register_process`) first: a watchdog that
    finds no live process of the run reaps it at once.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / _WATCHDOG_FILE
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    argv = [sys.executable, "-m", "pytest_kode.lifecycle.watchdog", "--detach"]
    argv += ["--run-dir", str(run_dir)]
    for root in dict.fromkeys(str(root) for root in roots):
        argv += ["--root", root]
    env = dict(os.environ)
    # The watchdog must import this package even when it is not installed (a checkout on
    # sys.path only through pytest's rootdir insertion).
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    # --detach forks once more and the first child exits at once: we reap it here, and the
    # watchdog, reparented to init, never becomes our zombie or a "still running" warning.
    try:
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd="/",
            start_new_session=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        marker.unlink(missing_ok=True)
        raise
    return True


# -- reaping ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_sandboxes(run_id: str, roots: Iterable[Path], spared: set[str]) -> list[Path]:
    """Directories (under ``roots``) of local sandboxes tagged with ``run_id``."""
    found: list[Path] = []
    for root in roots:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            data = _read_json(root / name)
            if data is None:
                continue
            metadata = data.get("metadata")
            sandbox_id = name[:-5]
            if (
                isinstance(metadata, dict)
                and metadata.get("kode_run") == run_id
                and sandbox_id not in spared
            ):
                found.append(root / sandbox_id)
    return found


def _dwellers(directories: Sequence[Path]) -> list[int]:
    """Processes working in (cwd) or homed at (HOME, the local backend sets it) a directory."""
    if not directories:
        return []
    wanted = [str(directory) for directory in directories]
    identities = set()
    for directory in directories:
        try:
            info = os.stat(directory)
        except OSError:
            continue
        identities.add((info.st_dev, info.st_ino))  # a bwrap cwd shows the in-sandbox path
    homes = {f"HOME={path}".encode() for path in wanted}
    me = os.getpid()
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, 1):
            continue
        pid = int(name)
        try:
            target = os.readlink(f"/proc/{pid}/cwd")
            if any(target == path or target.startswith(path + "/") for path in wanted):
                found.append(pid)
                continue
            info = os.stat(f"/proc/{pid}/cwd")
            if (info.st_dev, info.st_ino) in identities:
                found.append(pid)
                continue
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if homes.intersection(handle.read().split(b"\0")):
                    found.append(pid)
        except OSError:
            continue
    return found


def _make_removable(function: Callable[..., Any], path: str, exc_info: Any) -> None:
    if isinstance(exc_info[1], FileNotFoundError):
        return  # gone already (disposed meanwhile, or never made): leave the parent's bits alone
    # A command may have made a directory read-only; as its owner we may restore the bits.
    try:
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def reap_run(run_dir: Path, roots: Iterable[Path]) -> list[str]:
    """Kill and remove every local sandbox of the (dead) run in ``run_dir``; return their ids.

    Also removes the sandboxes of the run's own emulator (kept under the run folder), then the
    run folder itself.
    """
    run_id = run_dir.name
    spared = spared_sandboxes(run_dir)
    roots = list(roots)
    directories = _run_sandboxes(run_id, roots, spared)
    emulator_root = run_dir / EMULATOR_SUBDIR
    emulated = (
        [
            path
            for path in emulator_root.iterdir()
            if path.is_dir() and not path.name.startswith(".")
        ]
        if emulator_root.is_dir()
        else []
    )
    doomed = directories + emulated
    _remove_sandboxes(doomed)
    shutil.rmtree(run_dir, onerror=_make_removable)
    return [directory.name for directory in doomed]


def reap_unjournaled(run_dir: Path, roots: Iterable[Path]) -> list[str]:
    """Kill and remove the local sandboxes of the (still running) run in ``run_dir`` that no
    journal kept (failed test) or kept for reuse: once every worker is done, what is left is
    what a crashed worker was making when it died (a create or a recycle not yet journaled).
    Returns their ids."""
    doomed = _run_sandboxes(run_dir.name, list(roots), spared_sandboxes(run_dir))
    _remove_sandboxes(doomed)
    return [directory.name for directory in doomed]


def _kill_agents(doomed: Sequence[Path]) -> None:
    """Kill each sandbox's agent (recorded in its metadata file) with every process below it:
    with bubblewrap that ends the sandbox's pid namespace, without it the agent is a child
    subreaper, so even daemons that left its session are below it."""
    from pytest_kode.backends.local._agent import kill_tree

    for directory in doomed:
        data = _read_json(Path(f"{directory}.json")) or {}
        agent = data.get("agent")
        if not isinstance(agent, dict):
            continue
        pid, start = agent.get("pid"), agent.get("start")
        if (
            isinstance(pid, int)
            and pid > 1
            and process_alive(pid, start if isinstance(start, int) else None)
        ):
            kill_tree(pid, group=False)


def _remove_sandboxes(doomed: Sequence[Path]) -> None:
    """Kill every process living in the sandbox directories ``doomed``, then remove them."""
    _kill_agents(doomed)
    for _ in range(5):  # a process may fork between our scan and its kill: scan again
        victims = _dwellers(doomed)
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
    for directory in doomed:
        shutil.rmtree(directory, onerror=_make_removable)
        # The local backend keeps a sandbox's private /tmp beside it, hidden.
        shutil.rmtree(directory.with_name(f".{directory.name}.tmp"), onerror=_make_removable)
        # ... and its agent's socket.
        directory.with_name(f".{directory.name}.sock").unlink(missing_ok=True)
        Path(f"{directory}.json").unlink(missing_ok=True)


class _Deadlines:
    """The deadlines of one run's local sandboxes, re-read only from metadata files that changed
    (a poll costs a stat per file, not a read)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._seen: dict[Path, tuple[tuple[int, int, int], float | None]] = {}

    def expired(self, roots: Iterable[Path], now: float) -> list[Path]:
        """Directories of the run's sandboxes whose deadline is ``now`` or earlier."""
        found: list[Path] = []
        present: set[Path] = set()
        for root in roots:
            try:
                entries = list(os.scandir(root))
            except OSError:
                continue
            for entry in entries:
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                path = root / entry.name
                try:
                    info = entry.stat()
                except OSError:
                    continue
                # set_timeout replaces the file: a new inode even within one mtime tick.
                key = (info.st_ino, info.st_mtime_ns, info.st_size)
                present.add(path)
                cached = self._seen.get(path)
                if cached is None or cached[0] != key:
                    cached = (key, self._deadline(path))
                    self._seen[path] = cached
                # Read once more before acting: a set_timeout may have just moved it on.
                if cached[1] is not None and cached[1] <= now:
                    fresh = self._deadline(path)
                    if fresh is not None and fresh <= now:
                        found.append(root / entry.name[: -len(".json")])
        for gone in self._seen.keys() - present:
            del self._seen[gone]
        return found

    def _deadline(self, path: Path) -> float | None:
        data = _read_json(path)
        if data is None:
            return None
        metadata = data.get("metadata")
        if not isinstance(metadata, dict) or metadata.get("kode_run") != self.run_id:
            return None
        deadline = data.get("deadline")
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
            return None
        return float(deadline)


def reap_expired(
    run_dir: Path, roots: Iterable[Path], *, deadlines: _Deadlines | None = None
) -> list[str]:
    """End the local sandboxes of the (live) run in ``run_dir`` whose deadline has passed: kill
    their processes, remove their directory, private ``/tmp`` and metadata file. Returns their ids.

    ``deadlines`` carries what earlier polls read (the watchdog keeps one); None reads afresh.
    """
    deadlines = deadlines if deadlines is not None else _Deadlines(run_dir.name)
    doomed = deadlines.expired(list(roots), time.time())
    if doomed:
        _remove_sandboxes(doomed)
    return [directory.name for directory in doomed]


def watch(run_dir: Path, roots: Sequence[Path], poll_s: float = _POLL_S) -> int:
    """Poll until the run ends (folder removed: exit) or dies (reap, then exit); meanwhile end
    the run's sandboxes that outlive their deadline."""
    deadlines = _Deadlines(run_dir.name)
    while True:
        if not run_dir.is_dir():
            return 0
        if run_alive(run_dir) is not True:
            if not run_dir.is_dir():  # removed between the two checks: a normal end
                return 0
            reap_run(run_dir, roots)
            return 0
        try:
            reap_expired(run_dir, roots, deadlines=deadlines)
        except Exception:  # noqa: BLE001 - never give up the clean-up after a killed run
            pass
        time.sleep(poll_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pytest_kode.lifecycle.watchdog``."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_kode.lifecycle.watchdog",
        description="End a pytest-kode run's local sandboxes at their deadline, and remove them "
        "all once every process of the run is gone (started by the plugin; not meant to be run "
        "by hand).",
    )
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--root", action="append", default=[], type=Path)
    parser.add_argument("--poll", type=float, default=_POLL_S)
    parser.add_argument("--detach", action="store_true", help="fork and return at once")
    args = parser.parse_args(argv)
    if args.detach and os.fork() != 0:
        return 0
    # Ctrl-C in the terminal of the run must not stop the one process that cleans up after it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return watch(args.run_dir, args.root, args.poll)


if __name__ == "__main__":
    sys.exit(main())
