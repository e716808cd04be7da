"""Spawning, streaming, bounding and killing the local backend's processes.

Every child is started with ``start_new_session=True`` (its own process group) and never with a
``preexec_fn``, which would force a full ``fork()`` of the test process (measured 2.7x slower with
a small parent and 18x with a 1 GiB one). Foreground commands are pumped in the calling thread
with ``poll()`` and a pidfd, so ``exec`` costs no extra threads; background processes get one
reader thread per stream.
"""

from __future__ import annotations

import math
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from pytest_kode._threads import start_thread
from pytest_kode.errors import ConfigError, KodeError
from pytest_kode.sandbox import TIMEOUT_EXIT_CODE, BoundedOutput, ExecResult, ProcessHandle

__all__ = ["LocalProcess", "RunOutcome", "exit_code", "kill_group", "run", "signal_tree"]

_CHUNK = 65536
# After the main process exited, a daemon it forked may still hold the pipes open: read what is
# already there for this long, then stop instead of waiting for an EOF that may never come.
_DRAIN_S = 0.05
_READER_JOIN_S = 0.5
_READER_POLL_MS = 100


def exit_code(returncode: int) -> int:
    """Map Popen's ``-signum`` for a signal death to bash's ``128 + signum``."""
    return 128 - returncode if returncode < 0 else returncode


def kill_group(pgid: int, signum: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it is already gone."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _process_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, comm) for every process we can see."""
    table = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read().decode("utf-8", "replace")
        except OSError:
            continue
        # comm may contain spaces and parentheses: split at the last ')'.
        head, _, tail = raw.rpartition(")")
        fields = tail.split()
        if len(fields) < 3:
            continue
        comm = head.partition("(")[2]
        table.append((int(name), int(fields[1]), int(fields[2]), comm))
    return table


def descendants(root: int) -> list[tuple[int, int, str]]:
    """(pid, pgid, comm) of every live descendant of ``root`` (not ``root`` itself)."""
    children: dict[int, list[tuple[int, int, str]]] = {}
    for pid, ppid, pgid, comm in _process_table():
        children.setdefault(ppid, []).append((pid, pgid, comm))
    found: list[tuple[int, int, str]] = []
    todo = [root]
    while todo:
        for entry in children.get(todo.pop(), []):
            found.append(entry)
            todo.append(entry[0])
    return found


def signal_tree(root: int, signum: int, *, bwrap: bool) -> None:
    """Deliver ``signum`` to the process tree under ``root`` (its own process group).

    Under bwrap the bwrap processes themselves are skipped: they forward nothing and would take
    the whole pid namespace down with SIGKILL, while the command should get the chance to handle
    e.g. SIGTERM. SIGKILL goes to the group, which under bwrap ends the namespace and with it
    every process inside.
    """
    tree = descendants(root)
    if signum == signal.SIGKILL or not bwrap:
        kill_group(root, signum)
        targets = [pid for pid, pgid, _ in tree if pgid != root]
    else:
        targets = [pid for pid, _, comm in tree if comm != "bwrap"]
    for pid in targets:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


# -- spawning -------------------------------------------------------------------------------


class _Spawner:
    """A long-lived thread that forks on behalf of short-lived threads.

    bwrap's ``--die-with-parent`` uses PR_SET_PDEATHSIG, documented to fire when the *thread*
    that forked the process exits. A background process spawned from a worker thread (an HTTP
    server's handler pool) could die when that worker idles out, so such spawns go through this
    thread instead. (Foreground ``exec`` blocks its thread until the command ends: no issue.)
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], Future[subprocess.Popen[bytes]]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, make: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = start_thread(self._loop, name="pytest-kode-spawner")
        future: Future[subprocess.Popen[bytes]] = Future()
        self._queue.put((make, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            make, future = self._queue.get()
            try:
                future.set_result(make())
            except BaseException as exc:  # handed back to the caller's thread
                future.set_exception(exc)


_spawner = _Spawner()


def popen(
    argv: Sequence[str],
    *,
    cwd: str | None,
    env: dict[str, str],
    stdin: bool,
    pin_parent: bool,
) -> subprocess.Popen[bytes]:
    def make() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    if pin_parent and threading.current_thread() is not threading.main_thread():
        return _spawner.submit(make)
    return make()


# -- foreground commands --------------------------------------------------------------------


@dataclass
class RunOutcome:
    exit_code: int
    stdout: BoundedOutput
    stderr: BoundedOutput
    timed_out: bool
    duration_ms: float
    # A process group that still has members after the command exited (a daemon it forked).
    lingering_pgid: int | None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def run(
    argv: Sequence[str],
    *,
    cwd: str | None,
    env: dict[str, str],
    stdin: str | bytes | None,
    timeout_s: float,
    limit: int,
) -> RunOutcome:
    """Run a command to completion (or to ``timeout_s``), output bounded per stream."""
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    started = time.monotonic()
    proc = popen(argv, cwd=cwd, env=env, stdin=data is not None, pin_parent=False)
    out = BoundedOutput(limit)
    err = BoundedOutput(limit)
    try:
        timed_out = _pump(proc, data, out, err, started + timeout_s)
        returncode = proc.wait()
    except BaseException:
        # KeyboardInterrupt or a bug: the command must not outlive the call.
        kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
    duration_ms = (time.monotonic() - started) * 1000.0
    lingering = proc.pid if group_alive(proc.pid) else None
    code = TIMEOUT_EXIT_CODE if timed_out else exit_code(returncode)
    return RunOutcome(code, out, err, timed_out, duration_ms, lingering)


def _pump(
    proc: subprocess.Popen[bytes],
    data: bytes | None,
    out: BoundedOutput,
    err: BoundedOutput,
    deadline: float,
) -> bool:
    assert proc.stdout is not None and proc.stderr is not None
    poller = select.poll()
    sinks: dict[int, BoundedOutput] = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    for fd in sinks:
        poller.register(fd, select.POLLIN)
    in_fd = -1
    pending = memoryview(data or b"")
    if proc.stdin is not None:
        if pending:
            in_fd = proc.stdin.fileno()
            os.set_blocking(in_fd, False)
            poller.register(in_fd, select.POLLOUT)
        else:
            proc.stdin.close()
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    timed_out = False
    exited = False
    drain_until = math.inf
    try:
        while True:
            now = time.monotonic()
            if exited:
                if not sinks or now >= drain_until:
                    return timed_out
                wait = drain_until - now
            else:
                if now >= deadline:
                    timed_out = True
                    deadline = math.inf
                    kill_group(proc.pid)
                wait = deadline - now
                if pidfd is None:
                    wait = min(wait, 0.01)
            timeout_ms = None if wait == math.inf else max(0, math.ceil(wait * 1000))
            for fd, _event in poller.poll(timeout_ms):
                if fd == pidfd:
                    poller.unregister(fd)
                    exited = True
                elif fd == in_fd:
                    try:
                        written = os.write(fd, pending[:_CHUNK])
                    except BlockingIOError:
                        continue
                    except OSError:  # the command closed its stdin early
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        poller.unregister(fd)
                        assert proc.stdin is not None
                        try:
                            proc.stdin.close()
                        except OSError:
                            pass
                        in_fd = -1
                else:
                    chunk = os.read(fd, _CHUNK)
                    if chunk:
                        sinks[fd].write(chunk)
                    else:
                        poller.unregister(fd)
                        del sinks[fd]
            if not exited and pidfd is None and proc.poll() is not None:
                exited = True
            if exited and drain_until == math.inf:
                drain_until = time.monotonic() + _DRAIN_S
    finally:
        if pidfd is not None:
            os.close(pidfd)


# -- background processes -------------------------------------------------------------------


class LocalProcess(ProcessHandle):
    """A process running inside a local sandbox, its output streamed and kept bounded.

    ``on_stdout``/``on_stderr`` are called from reader threads with each chunk as it arrives.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        command: str,
        *,
        limit: int,
        bwrap: bool,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        sandbox_id: str | None = None,
    ) -> None:
        self.command = command
        self._proc = proc
        self._bwrap = bwrap
        self._sandbox_id = sandbox_id
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._out = BoundedOutput(limit)
        self._err = BoundedOutput(limit)
        self._timed_out = False
        self._ended: float | None = None
        self.callback_error: BaseException | None = None
        self._stop = threading.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._reader = start_thread(
            self._read,
            args=(
                {
                    proc.stdout.fileno(): (self._out, on_stdout),
                    proc.stderr.fileno(): (self._err, on_stderr),
                },
            ),
            name=f"pytest-kode-reader-{proc.pid}",
        )

    def _read(self, sinks: dict[int, tuple[BoundedOutput, Callable[[bytes], None] | None]]) -> None:
        # poll() with a timeout rather than a blocking read, so close() can stop the reader
        # even when an escaped daemon keeps a pipe open (and only then close the fds).
        poller = select.poll()
        for fd in sinks:
            poller.register(fd, select.POLLIN)
        while sinks and not self._stop.is_set():
            for fd, _event in poller.poll(_READER_POLL_MS):
                try:
                    chunk = os.read(fd, _CHUNK)
                except OSError:
                    chunk = b""
                if not chunk:
                    poller.unregister(fd)
                    del sinks[fd]
                    continue
                sink, callback = sinks[fd]
                with self._lock:
                    sink.write(chunk)
                if callback is not None and self.callback_error is None:
                    try:
                        callback(chunk)
                    except Exception as exc:  # a broken consumer must not stop the draining
                        self.callback_error = exc
        if not sinks:
            # Both streams ended: nobody else reads these pipes, release them now.
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code (``128 + signum`` for a signal death), None while running."""
        returncode = self._proc.poll()
        return None if returncode is None else exit_code(returncode)

    def is_running(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout_ms: int | None = None) -> ExecResult:
        if timeout_ms is not None and timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be > 0, got {timeout_ms!r}")
        try:
            returncode = self._proc.wait(None if timeout_ms is None else timeout_ms / 1000.0)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            self.kill()
            returncode = self._proc.wait()
        if self._ended is None:
            self._ended = time.monotonic()
        self.close_stdin()
        self._join_readers()
        with self._lock:
            out = self._out.getvalue()
            err = self._err.getvalue()
            truncated = self._out.truncated or self._err.truncated
        return ExecResult(
            command=self.command,
            exit_code=TIMEOUT_EXIT_CODE if self._timed_out else exit_code(returncode),
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            duration_ms=(self._ended - self._started) * 1000.0,
            timed_out=self._timed_out,
            truncated=truncated,
            stdout_bytes=out,
        )

    def _join_readers(self) -> None:
        # A daemon forked by the process may keep the pipes open (without bwrap's pid
        # namespace): give the reader a moment, then stop waiting for it.
        self._reader.join(_READER_JOIN_S)

    def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the process and everything it started."""
        if self._proc.poll() is None or not self._bwrap:
            signal_tree(self._proc.pid, signum, bwrap=self._bwrap)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass

    @property
    def stdout(self) -> str:
        with self._lock:
            return self._out.text()

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.text()

    def send_stdin(self, data: str | bytes) -> None:
        if self._proc.stdin is None or self._proc.stdin.closed:
            raise KodeError(
                f"process {self.pid} ({self.command!r}) has no open stdin",
                backend="local",
                sandbox_id=self._sandbox_id,
                hint="spawn it with stdin=True and do not call close_stdin() before writing",
            )
        payload = data.encode("utf-8") if isinstance(data, str) else data
        try:
            self._proc.stdin.write(payload)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise KodeError(
                f"process {self.pid} ({self.command!r}) closed its stdin",
                backend="local",
                sandbox_id=self._sandbox_id,
                hint="the process exited or closed its input; check returncode",
            ) from exc

    def close_stdin(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def finished(self) -> bool:
        """True when the process exited and nothing of its process group is left."""
        return self._proc.poll() is not None and not group_alive(self._proc.pid)

    def close(self) -> None:
        """Kill the process tree and release pipes and reader threads."""
        self.kill()
        self.close_stdin()
        self._join_readers()
        self._stop.set()
        self._reader.join()
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<LocalProcess pid={self.pid} {state} {self.command!r}>"
