"""The agent: the one program that runs inside a local sandbox (standard library only).

The host starts it once per sandbox (``python -I -S`` of the host's interpreter, inside bwrap
as the pid namespace's init, or as a plain child-subreaper process without isolation) and feeds
it its source on stdin: :func:`agent_source` is the text of :mod:`._protocol` followed by this
file's, so both ends use one codec and nothing of the project checkout has to be visible inside.

It accepts connections on a listening Unix socket the host created and handed over as a file
descriptor (so the socket lives in a host-side private directory, reachable by any host process
-- a resuming pytest worker, the emulator, the watchdog -- and not from inside the sandbox) and
serves the operations described in :mod:`._protocol`: it forks each command into its own
session, streams its output, feeds its stdin, signals, lists and attaches to processes, runs
PTYs, does file operations as the sandbox's user in the sandbox's own view, and reaps every
orphan. At the sandbox's deadline (``deadline`` op, or ``--deadline``) it kills everything and
exits, so a sandbox ends on time even without a watchdog.

With the sandbox's network it also makes the sockets the host relays ports through (the
``socket`` operation: a TCP socket in the sandbox's namespace, handed over with SCM_RIGHTS), and
it holds the write end of the user-mode stack's exit pipe (``HOLD_FD``), never passed to a
command, so the stack lives exactly as long as the sandbox (see :mod:`._network`).

Run as ``python`` + :data:`AGENT_ARGV` + ``FD DEADLINE READ_LIMIT CWD [HOLD_FD]`` with
:func:`agent_source` on stdin; it prints ``ready <pid>`` on stdout once it accepts connections.
"""

from __future__ import annotations

# The C modules under signal and socket: the Python wrappers import enum, which would add half
# again to the agent's start-up (it runs once per sandbox).
import _socket
import errno
import select
import stat as stat_module
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal
if TYPE_CHECKING or __name__ != "__kode_agent__":
    import os
else:
    # Inside, the C module under os: os itself (posixpath, _collections_abc...) would add ~1 ms
    # to every sandbox's start. What os adds on top is written out below (_isdir, _makedirs).
    import posix as os

if __name__ != "__kode_agent__":  # on the host; inside, _protocol's text ran in these globals
    from pytest_kode.backends.local._protocol import (
        CHUNK,
        K_ERROR,
        K_EXIT,
        K_REPLY,
        K_REQUEST,
        K_STARTED,
        K_STDERR,
        K_STDIN,
        K_STDIN_EOF,
        K_STDOUT,
        VERSION,
        Decoder,
        ProtocolError,
        frame,
        message,
        unpack,
    )

if TYPE_CHECKING:
    from collections.abc import Callable

# After the main process exited, a daemon it forked may hold the pipes open: read what is there
# for this long, then end the stream instead of waiting for an EOF that may never come.
DRAIN_S = 0.05
# Output queued for a slow client beyond this stops reading the producing process (it blocks on
# its pipe, as it would writing to a slow terminal) until the queue falls below the low mark.
HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 512 * 1024
# An attached (not owning) client that falls this far behind loses output rather than stall
# the process for everybody.
SUBSCRIBER_CAP = 16 * 1024 * 1024
BATCH_MAX = 64 * 1024
DEFAULT_READ_LIMIT = 256 * 1024 * 1024
_SPECIAL_KINDS = (
    (stat_module.S_ISFIFO, "a FIFO (named pipe)"),
    (stat_module.S_ISSOCK, "a socket"),
    (stat_module.S_ISCHR, "a character device"),
    (stat_module.S_ISBLK, "a block device"),
)


_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DEFPATH = "/bin:/usr/bin"  # the os module's defpath
# How long reset waits for every other process of the sandbox to be gone.
RESET_WAIT_S = 2.0


def _isdir(path: str) -> bool:
    """``os.path.isdir``."""
    try:
        return stat_module.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _makedirs(path: str) -> None:
    """``os.makedirs(path)``: FileExistsError when ``path`` exists."""
    try:
        os.mkdir(path)
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent:
            raise
        try:
            _makedirs(parent)
        except FileExistsError:
            pass
        os.mkdir(path)


_found: dict[tuple[str, str], str] = {}


def _which(name: str, path: str) -> str:
    """``name`` looked up on the command's own ``PATH`` (posix_spawnp would use ours)."""
    if "/" in name:
        return name
    known = _found.get((name, path))
    if known is not None and os.access(known, os.X_OK):
        return known
    for directory in path.split(":"):
        candidate = (directory or ".") + "/" + name
        if os.access(candidate, os.X_OK) and not _isdir(candidate):
            _found[(name, path)] = candidate
            return candidate
    raise FileNotFoundError(errno.ENOENT, f"{name!r} not found on PATH={path!r}", name)


class Refused(Exception):
    """A file operation the agent will not do: ``kind`` is ``"special"`` or ``"too_large"``."""

    def __init__(self, kind: str, message: str, path: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


def describe_special(mode: int) -> str | None:
    """What kind of special file ``mode`` is, or None for a regular file, dir or symlink."""
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            return name
    return None


def refuse_special(path: str, mode: int, verb: str) -> None:
    kind = describe_special(mode)
    if kind is not None:
        raise Refused(
            "special",
            f"{path!r} is {kind}; fs.{verb} only handles regular files (reading it could block "
            "forever or never end)",
            path,
        )


def read_file(path: str, limit: int, *, dir_fd: int | None = None, follow: bool = True) -> bytes:
    """The bytes of the regular file ``path``, never opening FIFOs, sockets or devices.

    Checks the type before opening (a device's open may have effects), opens non-blocking and
    checks again on the open file (it may have been swapped), and stops above ``limit`` bytes.
    Raises :class:`Refused` or ``OSError``. Shared by the agent and the host's unisolated fs.
    """
    refuse_special(path, os.stat(path, dir_fd=dir_fd, follow_symlinks=follow).st_mode, "read")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        refuse_special(path, info.st_mode, "read")
        if stat_module.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        too_large = Refused(
            "too_large",
            f"{path!r} is larger than the read limit of {limit} bytes; refusing to read it into "
            "memory",
            path,
        )
        if info.st_size > limit:
            raise too_large
        os.set_blocking(fd, True)
        parts: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, max(CHUNK, min(info.st_size + 1, limit + 1 - total)))
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > limit:
                raise too_large
            parts.append(chunk)
    finally:
        os.close(fd)


def _entry(path: str, info: os.stat_result) -> dict[str, object]:
    mode = info.st_mode
    if stat_module.S_ISLNK(mode):
        kind = "symlink"
    elif stat_module.S_ISDIR(mode):
        kind = "dir"
    else:
        kind = "file"
    entry: dict[str, object] = {
        "name": path.rsplit("/", 1)[-1] or path,
        "path": path,
        "type": kind,
        "size": info.st_size,
        "mode": stat_module.S_IMODE(mode),
        "mtime": info.st_mtime,
    }
    if kind == "symlink":
        try:
            entry["target"] = os.readlink(path)
        except OSError:
            entry["target"] = None
    return entry


def _walk(path: str, depth: int, out: list[dict[str, object]]) -> None:
    with os.scandir(path) as iterator:
        children = sorted(iterator, key=lambda child: child.name)
    for child in children:
        child_path = path.rstrip("/") + "/" + child.name
        try:
            info = child.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed while we listed
            continue
        out.append(_entry(child_path, info))
        if depth > 1 and stat_module.S_ISDIR(info.st_mode):
            try:
                _walk(child_path, depth - 1, out)
            except OSError:  # vanished or unreadable: list what we can
                continue


def _makedirs_for(path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent and not _isdir(parent):
        try:
            _makedirs(parent)
        except FileExistsError:
            if not _isdir(parent):
                raise


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, comm) of every process visible in /proc."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split at the last ')'.
        head, _, tail = raw.rpartition(b")")
        fields = tail.split()
        if len(fields) > 2:
            comm = head.partition(b"(")[2].decode("utf-8", "replace")
            table[int(name)] = (int(fields[1]), int(fields[2]), comm)
    return table


def _children_of(pid: int) -> list[int] | None:
    """``pid``'s children from /proc/PID/task/*/children (None where the kernel lacks it)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                found += [int(child) for child in handle.read().split()]
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return found


def descendants_of(root: int) -> list[int]:
    """Every live descendant of ``root`` (not ``root`` itself)."""
    # Walking the tree from root reads a few files; the whole table reads one per process on
    # the machine (hundreds on a busy host).
    found: list[int] = []
    todo = [root]
    while todo:
        children_of = _children_of(todo.pop())
        if children_of is None:
            return _descendants_by_table(root)
        found += children_of
        todo += children_of
    return found


def _descendants_by_table(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in process_table().items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def kill_tree(root: int, *, include_root: bool = True, group: bool = True) -> None:
    """SIGKILL every descendant of ``root`` (and ``root`` with its process group, unless told
    otherwise), rescanning while they fork. Shared by the agent and the host."""
    if include_root and not group:
        try:
            os.kill(root, signal.SIGSTOP)  # stopped, it forks no child behind our scan
        except OSError:
            pass
    for _ in range(20):
        victims = descendants_of(root)
        if include_root:
            try:
                if group:
                    os.killpg(root, signal.SIGKILL)
                else:
                    os.kill(root, signal.SIGKILL)
            except OSError:
                pass
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class _Proc:
    """A process started by ``run``."""

    def __init__(self, pid: int, request: dict[str, object], owner: _Conn | None, stream: int):
        self.pid = pid
        self.argv = request.get("argv")
        self.cwd = request.get("cwd")
        self.tag = request.get("tag")
        self.env = request.get("env")
        self.pty = bool(request.get("pty"))
        self.own = bool(request.get("own"))
        self.owner = owner
        self.stream = stream
        self.subscribers: list[tuple[_Conn, int]] = []
        self.readers: dict[int, int] = {}  # fd -> K_STDOUT / K_STDERR
        self.stdin_fd = -1
        self.stdin_buffer = bytearray()
        self.stdin_eof = False
        self.started = time.monotonic()
        timeout_ms = request.get("timeout_ms") or 0
        assert isinstance(timeout_ms, (int, float))
        self.deadline = self.started + timeout_ms / 1000.0 if timeout_ms > 0 else float("inf")
        self.timed_out = False
        self.status: int | None = None
        self.drain_until = float("inf")
        self.paused = False
        self.ended: float | None = None
        # batch: the owner's output frames, held to go out with K_EXIT in one write (one
        # wake-up of a client that only wants the result), until they pass BATCH_MAX.
        self.held: bytearray | None = bytearray() if request.get("batch") else None


class _Conn:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = Decoder()
        self.out = bytearray()
        self.procs: dict[int, _Proc] = {}  # stream -> the process it started
        self.closed = False


class Agent:
    """The event loop: one thread, ``poll()``, SIGCHLD through a wakeup pipe."""

    def __init__(self, listener: _socket.socket, deadline: float, read_limit: int) -> None:
        self.listener = listener
        self.deadline = deadline
        self.read_limit = read_limit
        self.poller = select.poll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.conns: dict[int, _Conn] = {}
        self.procs: dict[int, _Proc] = {}  # pid -> process
        self.running = True
        self.is_init = os.getpid() == 1
        # What bwrap made in /dev (a tmpfs the sandbox's user may write), for reset to restore.
        self.dev_made = _dev_entries() if self.is_init else None
        self.null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_terminate)
        listener.setblocking(False)
        self._watch(listener.fileno(), select.POLLIN, self._accept)
        self._watch(wake_r, select.POLLIN, self._on_wake)

    # -- plumbing ---------------------------------------------------------------------------
    def _watch(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self.poller.register(fd, events)
        self.handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def _on_terminate(self, signum: int, frame: object) -> None:
        self.running = False

    def serve(self) -> None:
        poll = self.poller.poll
        handlers = self.handlers
        while self.running:
            now = time.monotonic()
            wake = self.deadline - time.time()
            for proc in self.procs.values():
                if proc.status is None:
                    wake = min(wake, proc.deadline - now)
                else:
                    wake = min(wake, proc.drain_until - now)
            if wake <= 0:
                self._timers()
                continue
            timeout = None if wake == float("inf") else int(wake * 1000) + 1
            for fd, events in poll(timeout):
                handler = handlers.get(fd)
                if handler is not None:
                    handler(events)
            if self.procs:
                self._timers()
        self.shutdown()

    def _timers(self) -> None:
        if time.time() >= self.deadline:
            self.running = False
            return
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.status is None and now >= proc.deadline and not proc.timed_out:
                proc.timed_out = True
                proc.deadline = float("inf")
                kill_tree(proc.pid)
            elif proc.status is not None and now >= proc.drain_until:
                self._finish(proc)

    def shutdown(self) -> None:
        """Kill every process of the sandbox (as its init, exiting does that too) and exit."""
        if not self.is_init:
            kill_tree(os.getpid(), include_root=False)
            # Reap them (as their subreaper we get them all): once we exit, every one is dead,
            # not merely signalled. (As a namespace's init the kernel does this for us.)
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        time.sleep(0.002)
                except ChildProcessError:
                    break
        for conn in list(self.conns.values()):
            self._flush(conn)
        os._exit(0)

    # -- connections ------------------------------------------------------------------------
    def _accept(self, events: int) -> None:
        while True:
            try:
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            except OSError:  # nothing more to accept now (EAGAIN), or a failed one
                return
            sock = _socket.socket(fileno=fd)
            sock.setblocking(False)
            conn = _Conn(sock)
            self.conns[conn.fd] = conn
            self._watch(conn.fd, select.POLLIN, self._conn_handler(conn))

    def _conn_handler(self, conn: _Conn) -> Callable[[int], None]:
        return lambda events: self._on_conn(conn, events)

    def _on_conn(self, conn: _Conn, events: int) -> None:
        if events & select.POLLOUT:
            self._flush(conn)
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            try:
                data = conn.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                return
            try:
                frames = conn.decoder.feed(data)
            except ProtocolError:
                self._drop(conn)
                return
            for stream, kind, payload in frames:
                if conn.closed:
                    return
                self._dispatch(conn, stream, kind, payload)

    def send(self, conn: _Conn, data: bytes, fd: int = -1) -> None:
        """Queue ``data`` for ``conn``; ``fd`` travels with its first byte (only when nothing
        is queued before it: the caller checks)."""
        if conn.closed:
            return
        if not conn.out:
            try:
                if fd < 0:
                    sent = conn.sock.send(data)
                else:
                    rights = [
                        (_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))
                    ]
                    sent = conn.sock.sendmsg([data], rights)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(conn)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self.poller.modify(conn.fd, select.POLLIN | select.POLLOUT)
        conn.out += data
        if len(conn.out) > HIGH_WATER:
            for proc in self.procs.values():
                if proc.owner is conn and not proc.paused:
                    proc.paused = True
                    for fd in proc.readers:
                        self._unwatch(fd)

    def _flush(self, conn: _Conn) -> None:
        if conn.closed or not conn.out:
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            self.poller.modify(conn.fd, select.POLLIN)
        if len(conn.out) < LOW_WATER:
            for proc in self.procs.values():
                if proc.owner is conn and proc.paused:
                    proc.paused = False
                    self._watch_output(proc)

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._unwatch(conn.fd)
        self.conns.pop(conn.fd, None)
        conn.sock.close()
        for proc in list(self.procs.values()):
            proc.subscribers = [(c, s) for c, s in proc.subscribers if c is not conn]
            if proc.owner is conn:
                proc.owner = None
                if proc.paused:
                    proc.paused = False
                    self._watch_output(proc)
                if proc.own and proc.status is None:
                    # The client gave up on a foreground command (interrupted): end it.
                    kill_tree(proc.pid)

    def _reply(self, conn: _Conn, stream: int, body: dict[str, object], blob: bytes = b"") -> None:
        self.send(conn, message(stream, K_REPLY, body, blob))

    def _error(self, conn: _Conn, stream: int, kind: str, text: str, **extra: object) -> None:
        body: dict[str, object] = {"type": kind, "message": text}
        body.update(extra)
        self.send(conn, message(stream, K_ERROR, body))

    # -- requests ---------------------------------------------------------------------------
    def _dispatch(self, conn: _Conn, stream: int, kind: int, payload: bytes) -> None:
        if kind == K_STDIN or kind == K_STDIN_EOF:
            proc = conn.procs.get(stream)
            if proc is not None:
                self._feed(proc, payload, kind == K_STDIN_EOF)
            return
        if kind != K_REQUEST:
            return
        try:
            request, blob = unpack(payload)
            op = request.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                self._error(conn, stream, "bad_request", f"unknown operation {op!r}")
                return
            handler(conn, stream, request, blob)
        except Refused as exc:
            self._error(conn, stream, exc.kind, str(exc), path=exc.path)
        except OSError as exc:
            self._error(
                conn,
                stream,
                "os",
                exc.strerror or str(exc),
                errno=exc.errno,
                path=exc.filename if isinstance(exc.filename, str) else None,
            )
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            self._error(conn, stream, "bad_request", f"{type(exc).__name__}: {exc}")

    def op_ping(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        self._reply(conn, stream, {"pid": os.getpid(), "version": VERSION})

    def op_deadline(
        self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes
    ) -> None:
        at = request["at"]
        assert isinstance(at, (int, float))
        self.deadline = float(at)
        self._reply(conn, stream, {})

    def op_socket(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        """A TCP socket in the sandbox's network namespace, for the host to relay a port through
        (it connects to a port inside): handed over with the reply."""
        family = _socket.AF_INET6 if request.get("family") == 6 else _socket.AF_INET
        self._flush(conn)
        if conn.out:
            # The fd must ride on the reply's first byte, which must not wait behind others.
            raise BlockingIOError(errno.EAGAIN, "the connection is busy; ask on an idle one")
        made = _socket.socket(family, _socket.SOCK_STREAM)
        try:
            self.send(conn, message(stream, K_REPLY, {}), made.fileno())
        finally:
            made.close()

    def op_reset(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        """Make the sandbox as new for its next user; reply what stands in the way (see
        :mod:`._protocol`). Only as the pid namespace's init: then ``kill(-1)`` reaches every
        other process of the sandbox and no process of the host."""
        at = request["at"]
        assert isinstance(at, (int, float))
        if not self.is_init:
            self._reply(conn, stream, {"left": ["the sandbox has no pid namespace of its own"]})
            return
        for other in list(self.conns.values()):
            if other is not conn:
                self._drop(other)  # the last user's clients: nothing of theirs carries over
        for proc in list(self.procs.values()):
            for fd in list(proc.readers):
                self._close_reader_quietly(proc, fd)
            self._close_stdin(proc)
        self.procs.clear()
        conn.procs.clear()
        left = _end_all_but_init(RESET_WAIT_S)
        wipe = request.get("wipe") or {}
        assert isinstance(wipe, dict)
        if not left:
            left += _wipe(wipe)
        left += self._restore_dev()
        left += _namespace_leftovers()
        self.deadline = float(at)
        self._reply(conn, stream, {"left": left})

    def _restore_dev(self) -> list[str]:
        """``/dev`` is bwrap's tmpfs, writable by the sandbox's user: remove what was added,
        empty ``/dev/shm``, and say what was changed beyond that (removed, replaced, chmod)."""
        if self.dev_made is None:
            return []
        left: list[str] = []
        try:
            for name in os.listdir("/dev"):
                if name not in self.dev_made:
                    _remove_tree(f"/dev/{name}")
            for name in os.listdir("/dev/shm"):
                _remove_tree(f"/dev/shm/{name}")
            if _dev_entries() != self.dev_made:
                left.append("/dev was changed")
        except OSError as exc:
            left.append(f"/dev cannot be restored: {exc}")
        return left

    def op_shutdown(
        self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes
    ) -> None:
        self._reply(conn, stream, {})
        self.running = False

    # -- processes --------------------------------------------------------------------------
    def op_run(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        argv = request["argv"]
        env = request.get("env") or {}
        cwd = request.get("cwd")
        stdin = request.get("stdin") or "none"
        pty = request.get("pty")
        if not isinstance(argv, list) or not argv or not isinstance(env, dict):
            raise ValueError("run needs argv (a non-empty list) and env (an object)")
        if cwd is not None and not _isdir(str(cwd)):
            raise NotADirectoryError(errno.ENOTDIR, "cwd is not a directory", cwd)
        parent_fds: list[int] = []
        child_fds: list[int] = []
        try:
            if pty:
                assert isinstance(pty, dict)
                master, slave = os.openpty()
                os.set_inheritable(master, False)
                os.set_inheritable(slave, False)
                self._set_size(master, int(pty.get("rows") or 24), int(pty.get("cols") or 80))
                parent_fds.append(master)
                child_fds.append(slave)
                in_fd, out_fd, err_fd = slave, slave, slave
            else:
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                parent_fds += [out_r, err_r]
                child_fds += [out_w, err_w]
                out_fd, err_fd = out_w, err_w
                if stdin == "none":
                    in_fd = self.null
                else:
                    in_r, in_w = os.pipe2(os.O_CLOEXEC)
                    parent_fds.append(in_w)
                    child_fds.append(in_r)
                    in_fd = in_r
            args = [str(arg) for arg in argv]
            if pty:
                pid = self._fork_pty(args, env, cwd, in_fd)
            else:
                pid = self._spawn(args, env, cwd, (in_fd, out_fd, err_fd))
            for fd in child_fds:
                os.close(fd)
            child_fds = []
        except BaseException:
            for fd in parent_fds + child_fds:
                os.close(fd)
            raise
        proc = _Proc(pid, request, conn, stream)
        if pty:
            proc.readers = {parent_fds[0]: K_STDOUT}
            proc.stdin_fd = parent_fds[0]
        else:
            proc.readers = {parent_fds[0]: K_STDOUT, parent_fds[1]: K_STDERR}
            if stdin != "none":
                proc.stdin_fd = parent_fds[2]
                os.set_blocking(proc.stdin_fd, False)
        for fd in proc.readers:
            os.set_blocking(fd, False)
        self.procs[pid] = proc
        conn.procs[stream] = proc
        if request.get("started", True):
            self.send(conn, message(stream, K_STARTED, {"pid": pid}))
        self._watch_output(proc)
        if stdin == "data":
            self._feed(proc, blob, True)

    @staticmethod
    def _spawn(argv: list[str], env: dict[str, str], cwd: object, fds: tuple[int, int, int]) -> int:
        # posix_spawn (a vfork underneath) costs a fraction of fork() and reports exec errors
        # itself. It cannot chdir before Python 3.13, but this loop is single-threaded: change
        # our own directory around the call.
        program = _which(argv[0], env.get("PATH") or _DEFPATH)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        if cwd is None:
            return os.posix_spawn(
                program, argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS
            )
        here = os.getcwd()
        os.chdir(str(cwd))
        try:
            return os.posix_spawn(
                program, argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS
            )
        finally:
            os.chdir(here)

    @staticmethod
    def _fork_pty(argv: list[str], env: dict[str, str], cwd: object, slave: int) -> int:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: only os calls until exec
            try:
                signal.set_wakeup_fd(-1)
                for signum in _DEFAULT_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                os.login_tty(slave)  # setsid + controlling terminal + fds 0-2
                if cwd is not None:
                    os.chdir(str(cwd))
                os.execve(_which(argv[0], env.get("PATH") or _DEFPATH), argv, env)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
                os.write(
                    report_w, f"{getattr(exc, 'errno', 0) or 0}:{exc}".encode(errors="replace")
                )
            finally:
                os._exit(127)
        os.close(report_w)
        report = b""
        while True:
            try:
                part = os.read(report_r, 4096)
            except InterruptedError:
                continue
            if not part:
                break
            report += part
        os.close(report_r)
        if report:
            os.waitpid(pid, 0)
            code, _, text = report.decode(errors="replace").partition(":")
            raise OSError(int(code or 0) or errno.ENOEXEC, text, argv[0])
        return pid

    @staticmethod
    def _set_size(fd: int, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _watch_output(self, proc: _Proc) -> None:
        for fd in proc.readers:
            self._watch(fd, select.POLLIN, self._output_handler(proc, fd))

    def _output_handler(self, proc: _Proc, fd: int) -> Callable[[int], None]:
        return lambda events: self._on_output(proc, fd)

    def _on_output(self, proc: _Proc, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: a PTY whose last slave closed
            data = b""
        if not data:
            self._close_reader(proc, fd)
            return
        kind = proc.readers[fd]
        if proc.owner is not None:
            if proc.held is None:
                self.send(proc.owner, frame(proc.stream, kind, data))
            else:
                proc.held += frame(proc.stream, kind, data)
                if len(proc.held) > BATCH_MAX:  # too much to hold: stream from now on
                    self.send(proc.owner, bytes(proc.held))
                    proc.held = None
        for conn, stream in proc.subscribers:
            if len(conn.out) < SUBSCRIBER_CAP:
                self.send(conn, frame(stream, kind, data))

    def _close_reader(self, proc: _Proc, fd: int) -> None:
        self._unwatch(fd)
        del proc.readers[fd]
        if proc.pty:
            proc.stdin_fd = -1  # the same fd as the reader
        os.close(fd)
        if not proc.readers and proc.status is not None:
            self._finish(proc)

    def _feed(self, proc: _Proc, data: bytes, eof: bool) -> None:
        if proc.stdin_fd < 0:
            return
        proc.stdin_buffer += data
        proc.stdin_eof = proc.stdin_eof or eof
        self._write_stdin(proc)

    def _stdin_handler(self, proc: _Proc) -> Callable[[int], None]:
        return lambda events: self._write_stdin(proc)

    def _write_stdin(self, proc: _Proc) -> None:
        fd = proc.stdin_fd
        if fd < 0:
            return
        while proc.stdin_buffer:
            try:
                written = os.write(fd, proc.stdin_buffer[:CHUNK])
            except (BlockingIOError, InterruptedError):
                if fd not in self.handlers:
                    self._watch(fd, select.POLLOUT, self._stdin_handler(proc))
                return
            except OSError:  # the process closed its stdin: what it did not read is dropped
                proc.stdin_buffer.clear()
                break
            del proc.stdin_buffer[:written]
        if not proc.pty and fd in self.handlers:
            self._unwatch(fd)
        if proc.stdin_eof:
            if proc.pty:
                if not proc.stdin_buffer:
                    try:
                        os.write(fd, b"\x04")  # end of input for a terminal: ^D
                    except OSError:
                        pass
            else:
                os.close(fd)
                proc.stdin_fd = -1

    def _on_wake(self, events: int) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.get(pid)
            if proc is None:
                continue  # an orphan we adopted as init / subreaper
            proc.status = status
            proc.ended = time.monotonic()
            if not proc.readers:
                self._finish(proc)
            else:
                proc.drain_until = time.monotonic() + DRAIN_S

    def _finish(self, proc: _Proc) -> None:
        for fd in list(proc.readers):
            # Read what is already there, then stop: a daemon holds the pipe open.
            while fd in proc.readers:
                before = len(proc.readers)
                self._on_output(proc, fd)
                if fd in proc.readers and len(proc.readers) == before:
                    try:
                        if not select.select([fd], [], [], 0)[0]:
                            self._close_reader_quietly(proc, fd)
                    except OSError:
                        self._close_reader_quietly(proc, fd)
            if proc.readers and fd in proc.readers:
                self._close_reader_quietly(proc, fd)
        self._close_stdin(proc)
        if self.procs.pop(proc.pid, None) is None:
            return
        status = proc.status or 0
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = 128 + signum if signum is not None else os.WEXITSTATUS(status)
        if proc.timed_out:
            code = 124
        ended = proc.ended if proc.ended is not None else time.monotonic()
        body: dict[str, object] = {
            "exit_code": code,
            "timed_out": proc.timed_out,
            "signal": signum,
            "duration_ms": (ended - proc.started) * 1000.0,
        }
        if proc.owner is not None:
            proc.owner.procs.pop(proc.stream, None)
            end = message(proc.stream, K_EXIT, body)
            self.send(proc.owner, bytes(proc.held) + end if proc.held else end)
        for conn, stream in proc.subscribers:
            self.send(conn, message(stream, K_EXIT, body))

    def _close_stdin(self, proc: _Proc) -> None:
        if proc.stdin_fd >= 0:
            self._unwatch(proc.stdin_fd)
            if not proc.pty:  # a PTY's stdin is its master, closed as its reader
                os.close(proc.stdin_fd)
            proc.stdin_fd = -1

    def _close_reader_quietly(self, proc: _Proc, fd: int) -> None:
        self._unwatch(fd)
        proc.readers.pop(fd, None)
        if proc.pty:
            proc.stdin_fd = -1
        os.close(fd)

    def _proc(self, request: dict[str, object]) -> _Proc:
        pid = request["pid"]
        proc = self.procs.get(pid) if isinstance(pid, int) else None
        if proc is None or proc.status is not None:
            raise KeyError(pid)
        return proc

    def _lookup(self, conn: _Conn, stream: int, request: dict[str, object]) -> _Proc | None:
        try:
            return self._proc(request)
        except KeyError:
            self._error(conn, stream, "not_found", f"no running process {request.get('pid')!r}")
            return None

    def op_input(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        proc = self._lookup(conn, stream, request)
        if proc is None:
            return
        if proc.stdin_fd < 0:
            self._error(conn, stream, "no_stdin", f"process {proc.pid} has no open stdin")
            return
        self._feed(proc, blob, bool(request.get("eof")))
        self._reply(conn, stream, {})

    def op_signal(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        proc = self._lookup(conn, stream, request)
        if proc is None:
            return
        signum = int(request["signum"])  # type: ignore[call-overload]
        if signum == signal.SIGKILL:
            kill_tree(proc.pid)
        else:
            try:
                os.killpg(proc.pid, signum)
            except OSError:
                os.kill(proc.pid, signum)
        self._reply(conn, stream, {})

    def op_attach(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        proc = self._lookup(conn, stream, request)
        if proc is not None:
            proc.subscribers.append((conn, stream))
            self.send(conn, message(stream, K_STARTED, {"pid": proc.pid}))

    def op_resize(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        proc = self._lookup(conn, stream, request)
        if proc is None:
            return
        if not proc.pty or proc.stdin_fd < 0:
            self._error(conn, stream, "bad_request", f"process {proc.pid} has no terminal")
            return
        self._set_size(proc.stdin_fd, int(request["rows"]), int(request["cols"]))  # type: ignore[call-overload]
        self._reply(conn, stream, {})

    def op_ps(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        processes = [
            {
                "pid": proc.pid,
                "argv": proc.argv,
                "cwd": proc.cwd,
                "tag": proc.tag,
                "pty": proc.pty,
                "env": proc.env,
            }
            for proc in self.procs.values()
            if proc.status is None
        ]
        self._reply(conn, stream, {"processes": processes})

    # -- files ------------------------------------------------------------------------------
    @staticmethod
    def _path(request: dict[str, object], key: str = "path") -> str:
        path = request[key]
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise ValueError(f"{key} must be an absolute path, got {path!r}")
        return path

    def op_stat(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        self._reply(conn, stream, _entry(path, os.stat(path)))

    def op_lstat(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        self._reply(conn, stream, _entry(path, os.lstat(path)))

    def op_list(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        depth = int(request.get("depth") or 1)  # type: ignore[call-overload]
        if not _isdir(path):
            os.stat(path)  # the missing path's error, else:
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path)
        entries: list[dict[str, object]] = []
        _walk(path, depth, entries)
        self._reply(conn, stream, {"entries": entries})

    def op_read(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        limit = request.get("limit")
        data = read_file(path, limit if isinstance(limit, int) else self.read_limit)
        self._reply(conn, stream, {"size": len(data)}, data)

    def op_write(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            _makedirs_for(path)
        else:
            refuse_special(path, info.st_mode, "write")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        try:
            refuse_special(path, os.fstat(fd).st_mode, "write")
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self._reply(conn, stream, {})

    def op_mkdir(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        try:
            _makedirs(path)
        except FileExistsError:
            if not _isdir(path):
                raise
        self._reply(conn, stream, {})

    def op_remove(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        path = self._path(request)
        if stat_module.S_ISDIR(os.lstat(path).st_mode):
            import shutil

            shutil.rmtree(path)
        else:
            os.unlink(path)
        self._reply(conn, stream, {})

    def op_rename(self, conn: _Conn, stream: int, request: dict[str, object], blob: bytes) -> None:
        src = self._path(request, "src")
        dst = self._path(request, "dst")
        os.lstat(src)
        _makedirs_for(dst)
        os.rename(src, dst)
        self._reply(conn, stream, {})


def _dev_entries() -> dict[str, tuple[int, int]]:
    """Each entry of ``/dev`` with its mode and inode (a replaced entry has another inode)."""
    entries: dict[str, tuple[int, int]] = {}
    for name in os.listdir("/dev"):
        info = os.lstat(f"/dev/{name}")
        entries[name] = (info.st_mode, info.st_ino)
    return entries


def _remove_tree(path: str) -> None:
    """Remove ``path`` (a directory with everything below it); as the owner of everything in
    the sandbox, restore the permission bits a command may have taken away first."""
    info = os.lstat(path)
    if not stat_module.S_ISDIR(info.st_mode):
        os.unlink(path)
        return
    os.chmod(path, 0o700)
    for name in os.listdir(path):
        _remove_tree(f"{path}/{name}")
    os.rmdir(path)


def _mount_points() -> set[str]:
    """Where something is mounted in the sandbox's view (from ``/proc/self/mountinfo``)."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as handle:
        for line in handle.read().decode("utf-8", "surrogateescape").splitlines():
            fields = line.split(" ")
            if len(fields) > 4:
                point = fields[4]
                for escaped in ("\\040", "\\011", "\\012", "\\134"):
                    point = point.replace(escaped, chr(int(escaped[1:], 8)))
                points.add(point)
    return points


def _wipe(modes: dict[str, object]) -> list[str]:
    """Empty each directory of ``modes`` (path: mode) and give it that mode back: everything
    in it goes but what bwrap mounted there (the template's shared directories) and the
    directories that lead to those."""
    left: list[str] = []
    try:
        mounts = _mount_points()
    except OSError as exc:
        return [f"the sandbox's mounts cannot be read: {exc}"]
    for top, mode in modes.items():
        keep = {point for point in mounts if point.startswith(top + "/")}
        try:
            os.chmod(top, 0o700)
            _wipe_below(top, keep)
            os.chmod(top, int(mode))  # type: ignore[call-overload]
        except OSError as exc:
            left.append(f"{top} cannot be emptied: {exc}")
    return left


def _wipe_below(path: str, keep: set[str]) -> None:
    for name in os.listdir(path):
        child = f"{path}/{name}"
        if child in keep:
            continue
        if any(point.startswith(child + "/") for point in keep):
            os.chmod(child, 0o755)  # as bwrap made it, on the way to a mount point
            _wipe_below(child, keep)
        else:
            _remove_tree(child)


def _end_all_but_init(wait_s: float) -> list[str]:
    """As a pid namespace's init: kill every other process in it and reap each one (the
    orphans come to init). Returns what is still there after ``wait_s`` (a process stuck in
    the kernel), for the host to dispose of the sandbox instead."""
    until = time.monotonic() + wait_s
    while True:
        try:
            os.kill(-1, signal.SIGKILL)  # all but init: as init, every other process
        except OSError:
            pass  # ESRCH: nobody else
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        others = [name for name in os.listdir("/proc") if name.isdigit() and name != "1"]
        if not others:
            return []
        if time.monotonic() >= until:
            return [f"{len(others)} process(es) that would not die"]
        time.sleep(0.001)


def _namespace_leftovers() -> list[str]:
    """What the sandbox's network and IPC namespaces still hold once every process is gone:
    connections closing (TIME_WAIT), System V IPC objects. A new sandbox has none of them.

    Counted from ``sockstat`` (per network namespace, and cheap: ``/proc/net/tcp`` walks the
    host's whole socket table, milliseconds on a busy machine)."""
    left: list[str] = []
    for table in ("net/sockstat", "net/sockstat6"):
        try:
            with open(f"/proc/{table}", "rb") as handle:
                lines = handle.read().decode("ascii", "replace").splitlines()
        except OSError:
            continue  # no IPv6 in this kernel
        for line in lines:
            protocol, _, fields = line.partition(": ")
            if protocol in ("sockets", "FRAG", "FRAG6"):
                continue  # the first: every socket of ours, the agent's included
            numbers = fields.split()
            for name, value in zip(numbers[::2], numbers[1::2], strict=False):
                if name in ("inuse", "tw") and value != "0":
                    left.append(f"{protocol} {name} {value}")
    for table in ("net/unix", "sysvipc/shm", "sysvipc/sem", "sysvipc/msg"):
        try:
            with open(f"/proc/{table}", "rb") as handle:
                rows = handle.read().count(b"\n") - 1  # the first line is a header
        except OSError:
            continue
        if rows > 0:
            left.append(f"{rows} {table} entr{'y' if rows == 1 else 'ies'}")
    return left


def _become_subreaper() -> None:
    # Without a pid namespace, orphans (``cd / && setsid daemon &``) would go to the host's init;
    # as a child subreaper they come to us, so shutdown finds and kills every one of them.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def main(argv: list[str]) -> None:
    """Serve on the listening socket ``argv[0]`` (an fd) until ``argv[1]`` (Unix time)."""
    listen_fd, deadline, read_limit = int(argv[0]), float(argv[1]), int(argv[2])
    if argv[3] != "-":
        os.chdir(argv[3])
    listener = _socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    # Whatever else the host process left open (a CI runner's pipes...) is none of the
    # sandbox's business: close it, keeping only the fd we hold for life (by us alone).
    hold = int(argv[4]) if len(argv) > 4 else listen_fd
    os.closerange(listen_fd + 1, hold)
    os.closerange(hold + 1, os.sysconf("SC_OPEN_MAX"))
    os.set_inheritable(hold, False)
    if os.getpid() != 1:
        _become_subreaper()
    agent = Agent(listener, deadline, read_limit)
    try:
        os.write(1, f"ready {os.getpid()}\n".encode())
    except OSError:
        pass  # the creator did not wait (it exited): the sandbox lives on all the same
    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)  # the host stops listening once we are ready
    os.close(null)
    agent.serve()


_source: bytes | None = None


def agent_source() -> bytes:
    """The agent's program as :data:`AGENT_ARGV` reads it from stdin: the codec's module and
    then this one, compiled here (once per process) and marshalled, so that each sandbox's
    interpreter neither reads nor compiles Python source (that would cost more than the rest
    of its start-up). Both are run in one namespace, each compiled on its own (each keeps its
    ``from __future__`` import); the same interpreter runs both ends, so marshal fits."""
    global _source
    if _source is None:
        import marshal
        from pathlib import Path

        here = Path(__file__).resolve().parent
        codes = tuple(
            compile((here / name).read_text("utf-8"), f"<kode-agent:{name}>", "exec")
            for name in ("_protocol.py", "_agent.py")
        )
        _source = marshal.dumps(codes)
    return _source


AGENT_ARGV = (
    "-I",
    "-S",
    "-c",
    "import marshal, sys\n"
    "g = {'__name__': '__kode_agent__'}\n"
    "for code in marshal.loads(sys.stdin.buffer.read()): exec(code, g)\n"
    "g['main'](sys.argv[1:])",
)
"""The interpreter options that run the agent: isolated, no site-packages, the program
(:func:`agent_source`) on stdin. Append the listening fd, the deadline (Unix time), the read
limit, the directory to work in (``-``: stay) and optionally an fd to hold for life."""
