"""The local backend's processes as the host sees them: handles on the agent's processes, and
the host-side process-table helpers (what lives below a pid, killing a tree).

A :class:`LocalProcess` is a command the sandbox's agent started (``run`` in
:mod:`._protocol`); its output streams back over the agent's shared streaming connection and is
kept bounded here (:class:`~pytest_kode.sandbox.BoundedOutput`: head and tail, a marker
between). Its :attr:`~LocalProcess.pid` is the pid *inside* the sandbox, as on E2B. Handles
made by :meth:`LocalSandbox.connect_process` attach to a process another handle (or another
host process) started, and see its output from then on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

from pytest_kode.backends.local._agent import descendants_of, kill_tree, process_table
from pytest_kode.backends.local._client import K_GONE, AgentClient, AgentError, AgentGone
from pytest_kode.backends.local._protocol import (
    K_ERROR,
    K_EXIT,
    K_STARTED,
    K_STDERR,
    K_STDOUT,
    unpack,
)
from pytest_kode.errors import ConfigError, KodeError
from pytest_kode.sandbox import TIMEOUT_EXIT_CODE, BoundedOutput, ExecResult, ProcessHandle

__all__ = [
    "LocalProcess",
    "descendants",
    "exit_code",
    "group_alive",
    "kill_group",
    "kill_tree",
]

_KILLED = 128 + signal.SIGKILL
_KILL_WAIT_S = 5.0


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


def descendants(root: int) -> list[tuple[int, int, str]]:
    """(pid, pgid, comm) of every live descendant of ``root`` (not ``root`` itself)."""
    table = process_table()
    return [(pid, table[pid][1], table[pid][2]) for pid in descendants_of(root) if pid in table]


class LocalProcess(ProcessHandle):
    """A process running inside a local sandbox, its output streamed and kept bounded.

    ``on_stdout``/``on_stderr`` are called from the agent connection's reader thread with each
    chunk as it arrives (keep them quick: they hold up the other background processes' output).
    """

    def __init__(
        self,
        client: AgentClient,
        command: str,
        *,
        limit: int,
        stdin: bool,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        sandbox_id: str | None = None,
        gone: Callable[[], KodeError] | None = None,
    ) -> None:
        self.command = command
        self._client = client
        self._sandbox_id = sandbox_id
        self._stdin_open = stdin
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._gone = gone
        self._lock = threading.Lock()
        self._out = BoundedOutput(limit)
        self._err = BoundedOutput(limit)
        self._started = time.monotonic()
        self._ended: float | None = None
        self._pid: int | None = None
        self._code: int | None = None
        self._timed_out = False
        self._start_error: KodeError | AgentError | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self.callback_error: BaseException | None = None
        self._send: Callable[[int, bytes], None] | None = None

    # -- wiring (called by the sandbox) -----------------------------------------------------
    def _begin(self, body: dict[str, object], blob: bytes = b"") -> None:
        """Send the request that starts (or attaches to) the process; wait for its pid."""
        try:
            _, self._send = self._client.open_stream(body, blob, self._on_frame)
        except AgentGone as exc:
            raise self._lost() from exc
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def _lost(self) -> KodeError:
        if self._gone is not None:
            return self._gone()
        return KodeError(
            "the sandbox's agent went away", backend="local", sandbox_id=self._sandbox_id
        )

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == K_STDOUT or kind == K_STDERR:
            sink, callback = (
                (self._out, self._on_stdout) if kind == K_STDOUT else (self._err, self._on_stderr)
            )
            with self._lock:
                sink.write(payload)
            if callback is not None and self.callback_error is None:
                try:
                    callback(payload)
                except Exception as exc:  # a broken consumer must not stop the draining
                    self.callback_error = exc
        elif kind == K_STARTED:
            pid = unpack(payload)[0].get("pid")
            self._pid = pid if isinstance(pid, int) else None
            self._ready.set()
        elif kind == K_EXIT:
            end = unpack(payload)[0]
            code = end.get("exit_code")
            self._code = code if isinstance(code, int) else _KILLED
            self._ended = time.monotonic()
            self._done.set()
            self._ready.set()
        elif kind == K_ERROR:
            self._start_error = AgentError(unpack(payload)[0])
            self._code = _KILLED
            self._done.set()
            self._ready.set()
        elif kind == K_GONE:
            # The agent (so the whole sandbox) ended: its processes were killed with it.
            if self._pid is None:
                self._start_error = self._lost()
            self._code = _KILLED
            self._ended = time.monotonic()
            self._done.set()
            self._ready.set()

    # -- ProcessHandle ----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The process's pid inside the sandbox."""
        return self._pid if self._pid is not None else -1

    @property
    def returncode(self) -> int | None:
        """The exit code (``128 + signum`` for a signal death), None while running."""
        return self._code if self._done.is_set() else None

    def is_running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout_ms: int | None = None) -> ExecResult:
        if timeout_ms is not None and timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be > 0, got {timeout_ms!r}")
        if not self._done.wait(None if timeout_ms is None else timeout_ms / 1000.0):
            self._timed_out = True
            self.kill()
            self._done.wait()
        with self._lock:
            out = self._out.getvalue()
            err = self._err.getvalue()
            truncated = self._out.truncated or self._err.truncated
        ended = self._ended if self._ended is not None else time.monotonic()
        code = self._code if self._code is not None else _KILLED
        return ExecResult(
            command=self.command,
            exit_code=TIMEOUT_EXIT_CODE if self._timed_out else code,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            duration_ms=(ended - self._started) * 1000.0,
            timed_out=self._timed_out,
            truncated=truncated,
            stdout_bytes=out,
        )

    def signal(self, signum: int) -> None:
        """Deliver ``signum`` to the process and its process group (SIGKILL: every
        descendant). A process that already ended is left alone."""
        if self._done.is_set():
            return
        try:
            self._client.call({"op": "signal", "pid": self.pid, "signum": int(signum)})
        except AgentError:
            pass  # it ended in between
        except AgentGone:
            pass  # the sandbox ended: nothing left to signal

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self._done.wait(_KILL_WAIT_S)

    @property
    def stdout(self) -> str:
        with self._lock:
            return self._out.text()

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.text()

    def _input(self, data: bytes, eof: bool) -> None:
        try:
            self._client.call({"op": "input", "pid": self.pid, "eof": eof}, data)
        except AgentError as exc:
            raise KodeError(
                f"process {self.pid} ({self.command!r}) "
                + ("has ended" if exc.type == "not_found" else "has no open stdin"),
                backend="local",
                sandbox_id=self._sandbox_id,
                hint="check returncode; stdin is open only for start(..., stdin=True) until "
                "close_stdin()",
            ) from exc
        except AgentGone as exc:
            raise self._lost() from exc

    def send_stdin(self, data: str | bytes) -> None:
        if not self._stdin_open:
            raise KodeError(
                f"process {self.pid} ({self.command!r}) has no open stdin",
                backend="local",
                sandbox_id=self._sandbox_id,
                hint="start it with start(..., stdin=True) and do not call close_stdin() "
                "before writing",
            )
        self._input(data.encode("utf-8") if isinstance(data, str) else bytes(data), False)

    def close_stdin(self) -> None:
        if self._stdin_open:
            self._stdin_open = False
            if not self._done.is_set():
                try:
                    self._input(b"", True)
                except KodeError:
                    pass  # it ended meanwhile: its stdin is closed all the same

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal of a process started with a PTY."""
        try:
            self._client.call({"op": "resize", "pid": self.pid, "rows": rows, "cols": cols})
        except AgentError as exc:
            raise KodeError(
                f"cannot resize the terminal of process {self.pid}: {exc}",
                backend="local",
                sandbox_id=self._sandbox_id,
            ) from exc
        except AgentGone as exc:
            raise self._lost() from exc

    def finished(self) -> bool:
        """True when the process exited."""
        return self._done.is_set()

    def close(self) -> None:
        """Kill the process tree."""
        if not self._done.is_set():
            self.kill()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"<LocalProcess pid={self.pid} {state} {self.command!r}>"
