"""The backend-neutral Sandbox API: what every backend implements and every test codes against.

The abstract :class:`Sandbox` owns the life-cycle bookkeeping (idempotent ``init``/``dispose``,
context management, the transcript); a backend fills in the ``_create``/``_connect``/``_exec``/
``_dispose`` primitives, ``start``, ``fs`` and a few lifetime calls.
"""

from __future__ import annotations

import abc
import builtins
import collections
import posixpath
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from pytest_kode.errors import ConfigError, KodeError
from pytest_kode.options import SandboxOptions

__all__ = [
    "BoundedOutput",
    "ExecResult",
    "FileEntry",
    "ProcessHandle",
    "Sandbox",
    "SandboxFS",
    "Transcript",
]

TIMEOUT_EXIT_CODE = 124
ELISION_MARKER = "\n[... pytest-kode: {n} bytes elided ...]\n"


class ExecResult(BaseModel):
    """The outcome of one command: exit code, output and timing. A failure is data, not an error."""

    model_config = ConfigDict(frozen=True)

    command: str
    exit_code: int
    stdout: str = ""
    stderr: str = ""
    duration_ms: float = 0.0
    timed_out: bool = False
    truncated: bool = False
    stdout_bytes: bytes | None = Field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class FileEntry(BaseModel):
    """One file-system entry as seen inside the sandbox."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    type: Literal["file", "dir", "symlink"]
    size: int = 0
    mode: int = 0
    modified_time: datetime | None = None
    symlink_target: str | None = None


class BoundedOutput:
    """Keeps the head and the tail of a byte stream within ``limit`` bytes.

    A command that prints 100 MB must not grow the test process by 100 MB: the first half of the
    budget keeps the head, a ring of the second half keeps the tail, and what falls between is
    counted and replaced by a visible marker.
    """

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail = bytearray()
        self.elided = 0

    def write(self, data: bytes) -> None:
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail += data
        excess = len(self._tail) - self._tail_limit
        if excess > 0:
            del self._tail[:excess]
            self.elided += excess

    @property
    def truncated(self) -> bool:
        return self.elided > 0

    def getvalue(self) -> bytes:
        if not self.elided:
            return bytes(self._head + self._tail)
        marker = ELISION_MARKER.format(n=self.elided).encode()
        return bytes(self._head) + marker + bytes(self._tail)

    def text(self) -> str:
        return self.getvalue().decode("utf-8", errors="replace")


class Transcript:
    """The sandbox's exec results in order, bounded in count and in bytes per stream."""

    MAX_ENTRIES = 200
    MAX_STREAM_BYTES = 64 * 1024

    def __init__(self) -> None:
        self._entries: collections.deque[ExecResult] = collections.deque(maxlen=self.MAX_ENTRIES)
        self.total = 0  # appended ever, so a reader can ask for "what came since"

    def since(self, mark: int) -> list[ExecResult]:
        """The entries appended after ``total`` was ``mark`` (those still kept)."""
        count = min(self.total - mark, len(self._entries))
        return list(self._entries)[len(self._entries) - count :] if count > 0 else []

    def append(self, result: ExecResult) -> None:
        self.total += 1
        self._entries.append(
            result.model_copy(
                update={
                    "stdout": _clip(result.stdout, self.MAX_STREAM_BYTES),
                    "stderr": _clip(result.stderr, self.MAX_STREAM_BYTES),
                    "stdout_bytes": None,
                }
            )
        )

    def __iter__(self) -> Iterator[ExecResult]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> ExecResult:
        return self._entries[index]


def _clip(text: str, limit: int) -> str:
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    buffer = BoundedOutput(limit)
    buffer.write(data)
    return buffer.text()


class ProcessHandle(abc.ABC):
    """A background process started with :meth:`Sandbox.start` (a server, a watcher...)."""

    command: str

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @abc.abstractmethod
    def wait(self, timeout_ms: int | None = None) -> ExecResult:
        """Wait for exit; past ``timeout_ms`` the process is killed and the result is timed out."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the process and everything it started; quiet when it already exited."""

    @property
    @abc.abstractmethod
    def stdout(self) -> str:
        """Output read so far."""

    @property
    @abc.abstractmethod
    def stderr(self) -> str: ...

    @abc.abstractmethod
    def send_stdin(self, data: str | bytes) -> None: ...

    @abc.abstractmethod
    def close_stdin(self) -> None: ...


def write_payload(path: str, data: object) -> bytes:
    """``fs.write``'s data as bytes (str as UTF-8), or the one ConfigError every backend and
    both APIs give for anything else."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    hint = " (serialise it first, e.g. json.dumps(...))" if isinstance(data, dict) else ""
    raise ConfigError(
        f"fs.write({path!r}, ...) needs str or bytes, got {type(data).__name__}{hint}"
    )


class SandboxFS(abc.ABC):
    """File access inside one sandbox. Relative paths resolve against the sandbox's ``work_dir``."""

    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir

    def abspath(self, path: str) -> str:
        """The normalised absolute in-sandbox path for ``path`` (no escape check here)."""
        return posixpath.normpath(posixpath.join(self.work_dir, str(path)))

    def read(self, path: str) -> str:
        """The file as UTF-8 text; a file that is not UTF-8 says to use :meth:`read_bytes`."""
        data = self.read_bytes(path)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Same class on every backend (callers may catch it), with the way out in the text.
            reason = (
                f"{exc.reason}: {self.abspath(path)!r} is not UTF-8 text; read binary files "
                "with fs.read_bytes()"
            )
            raise UnicodeDecodeError(exc.encoding, exc.object, exc.start, exc.end, reason) from None

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes: ...

    def write(self, path: str, data: str | bytes) -> None:
        """Write a file, creating parent directories and overwriting an existing one."""
        self._write(path, write_payload(path, data))

    @abc.abstractmethod
    def _write(self, path: str, data: str | bytes) -> None:
        """The backend's write; ``data`` is checked to be str or bytes."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def stat(self, path: str) -> FileEntry: ...

    @abc.abstractmethod
    def list(self, path: str = ".", depth: int = 1) -> list[FileEntry]:
        """Entries below ``path`` down to ``depth`` levels, without following symlinks."""

    @abc.abstractmethod
    def mkdir(self, path: str) -> None: ...

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Remove a file or a whole tree; a missing path raises SandboxFileNotFoundError."""

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None: ...

    # builtins.list: inside this class body the name `list` is the method above.
    def glob(self, pattern: str) -> builtins.list[str]:
        """Sorted paths matching ``pattern`` (``*``, ``?``, ``[...]``, and ``**`` across dirs).

        Paths come back absolute when the pattern is absolute, else relative to ``work_dir``.
        """
        plan = GlobPlan(self.abspath(pattern), str(pattern).startswith("/"))
        if plan.root is None:
            return plan.finish([plan.full] if self.exists(plan.full) else [], self.work_dir)
        try:
            entries = self.list(plan.root, depth=plan.depth)
        except FileNotFoundError:
            entries = []
        return plan.finish(plan.select(entries), self.work_dir)


class GlobPlan:
    """The I/O-free part of ``glob``: which directory to list, how deep, what matches.

    Shared by the blocking and the async file APIs, which differ only in how they list.
    """

    def __init__(self, full: str, absolute: bool) -> None:
        self.full = full
        self.absolute = absolute
        parts = full.split("/")
        magic = next((i for i, part in enumerate(parts) if _has_magic(part)), None)
        #: None when the pattern has no wildcard: then only ``full`` itself can match.
        self.root: str | None = None
        self.depth = 1
        self._regex: re.Pattern[str] | None = None
        if magic is not None:
            self.root = "/".join(parts[:magic]) or "/"
            rest = parts[magic:]
            self.depth = 10_000 if "**" in rest else len(rest)
            self._regex = _glob_regex(self.root, rest)

    def select(self, entries: builtins.list[FileEntry]) -> builtins.list[str]:
        regex = self._regex
        assert regex is not None
        return [entry.path for entry in entries if regex.fullmatch(entry.path)]

    def finish(self, matches: builtins.list[str], work_dir: str) -> builtins.list[str]:
        if self.absolute:
            return sorted(matches)
        return sorted(posixpath.relpath(match, work_dir) for match in matches)


def check_envs(envs: object, where: str = "envs") -> None:
    """``envs`` must map non-empty names to str values: one check and message for all backends."""
    if not isinstance(envs, dict):
        raise ConfigError(f"{where} must be a dict of str to str, got {type(envs).__name__}")
    bad = [
        f"- {key!r}={value!r}"
        for key, value in envs.items()
        if not isinstance(key, str)
        or not isinstance(value, str)
        or not key
        or "=" in key
        or "\0" in key
        or "\0" in value
    ]
    if bad:
        raise ConfigError(
            f"{where} must map non-empty names (no '=' or NUL) to str values (write numbers as "
            "strings, e.g. {'N': '1'}); offending:\n" + "\n".join(bad)
        )


def check_call_args(call: str, *, cwd: object, envs: object) -> None:
    """The arguments ``exec`` and ``start`` share, checked the same way on every backend."""
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError(f"{call}(cwd=...) needs a str path, got {type(cwd).__name__}")
    if envs is not None:
        check_envs(envs, f"{call}(envs=...)")


def _has_magic(part: str) -> bool:
    return any(char in part for char in "*?[")


def _glob_regex(root: str, parts: list[str]) -> re.Pattern[str]:
    body = ""
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            # Zero or more whole directories; a trailing ** matches everything below.
            body += "(?:[^/]+/)*[^/]+" if last else "(?:[^/]+/)*"
        else:
            body += _segment_regex(part) + ("" if last else "/")
    return re.compile(re.escape(root.rstrip("/")) + "/" + body)


def _segment_regex(part: str) -> str:
    piece = ""
    i = 0
    while i < len(part):
        char = part[i]
        end = part.find("]", i + 2) if char == "[" else -1
        if char == "*":
            piece += "[^/]*"
        elif char == "?":
            piece += "[^/]"
        elif end != -1:
            inner = part[i + 1 : end]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            piece += "[" + inner.replace("\\", "\\\\") + "]"
            i = end
        else:
            piece += re.escape(char)
        i += 1
    return piece


class Sandbox(abc.ABC):
    """An isolated place to run commands and keep files. Every backend implements exactly this.

    ``Cls(options=None, **fields)`` only configures; :meth:`init` creates the sandbox (or connects
    to ``options.sandbox_id``). ``with Cls(...) as sb:`` inits and always disposes.
    """

    backend: ClassVar[str] = "abstract"

    def __init__(self, options: SandboxOptions | None = None, **fields: Any) -> None:
        if options is None:
            options = SandboxOptions(**fields)
        elif fields:
            options = options.replace(**fields)
        self.options: SandboxOptions = options
        self.resumed = False
        self.transcript = Transcript()
        # Summed here rather than from the transcript, which forgets old entries.
        self.exec_time_ms = 0.0
        self._sandbox_id: str | None = options.sandbox_id
        self._initialized = False
        self._disposed = False

    # -- identity ---------------------------------------------------------------------------
    @property
    def sandbox_id(self) -> str:
        if self._sandbox_id is None:
            raise KodeError(
                "the sandbox has no id yet", backend=self.backend, hint="call init() first"
            )
        return self._sandbox_id

    def __repr__(self) -> str:
        state = "disposed" if self._disposed else "live" if self._initialized else "new"
        return f"<{type(self).__name__} {self._sandbox_id or '-'} {state}>"

    # -- life-cycle -------------------------------------------------------------------------
    def init(self) -> Self:
        """Create the sandbox, or connect to ``options.sandbox_id``. Idempotent."""
        # Disposed first: an initialised-then-disposed sandbox must not look ready again.
        if self._disposed:
            raise KodeError(
                "the sandbox was disposed",
                backend=self.backend,
                sandbox_id=self._sandbox_id,
                hint="create a new sandbox instead of re-initialising a disposed one",
            )
        if self._initialized:
            return self
        if self.options.sandbox_id:
            self._connect()
            self.resumed = True
        else:
            if self._needs_template_build():
                # Library use (the pytest layer builds first): the template layer sits above
                # the backends, so it is called from here and never from a backend.
                from pytest_kode.templates import attach_template

                attach_template(self)
            self._create()
        self._initialized = True
        return self

    def _needs_template_build(self) -> bool:
        """Whether ``options.template`` is a TemplateSpec not yet built for this sandbox."""
        return not isinstance(self.options.template, str)

    def dispose(self) -> None:
        """Kill the sandbox and everything in it. Idempotent and quiet when already gone."""
        if self._disposed:
            return
        self._disposed = True
        self._dispose()

    def detach(self) -> None:
        """Let go of the sandbox without disposing it: it stays alive for someone else.

        Used when another process owns the disposal (a session sandbox under xdist) or the
        sandbox is kept for the next run. This object becomes unusable; ``dispose()`` is a no-op.
        """
        if self._disposed:
            return
        self._disposed = True
        self._detach()

    def _detach(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release what this object holds locally (threads, connections); keep the sandbox."""

    @property
    def recyclable(self) -> bool:
        """Whether :meth:`recycle` may make this sandbox as new (the plugin asks only then)."""
        return False

    def recycle(self, options: SandboxOptions) -> Sandbox | None:
        """This used sandbox made as new, under a new id and ``options`` (equal to its own but
        for ``metadata``), or None when it cannot be (then dispose it as usual).

        On success this object is disposed as far as its user can tell (its id is gone) and
        the returned one is initialised. Backends whose sandboxes cannot be made
        indistinguishable from new ones keep this default.
        """
        return None

    def __enter__(self) -> Self:
        try:
            return self.init()
        except BaseException:
            self.dispose()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    @property
    def disposed(self) -> bool:
        return self._disposed

    def _port_arg(self, port: object) -> int:
        """``port`` as an int in 1-65535 (for ``get_host_url``), else ConfigError."""
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(
                f"get_host_url(port=...) needs a TCP port, an int in 1-65535; got {port!r}",
                backend=self.backend,
                sandbox_id=self._sandbox_id,
                hint="pass the port the server inside the sandbox listens on, e.g. 8000",
            )
        return port

    def _require_live(self) -> None:
        if self._disposed or not self._initialized:
            state = "disposed" if self._disposed else "not initialised"
            raise KodeError(
                f"the sandbox is {state}",
                backend=self.backend,
                sandbox_id=self._sandbox_id,
                hint="use it between init() and dispose(), or inside `with`",
            )

    # -- commands ---------------------------------------------------------------------------
    def exec(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout_ms: int | None = None,
        stdin: str | bytes | None = None,
    ) -> ExecResult:
        """Run ``command`` through bash in ``work_dir`` (or ``cwd``) and return its result.

        A non-zero exit or a timeout is data in the result; only a failing sandbox raises.
        """
        result = self._exec(
            command,
            cwd=cwd,
            envs=dict(envs or {}),
            timeout_ms=self._check_exec(command, timeout_ms, stdin, cwd=cwd, envs=envs),
            stdin=stdin,
        )
        self._record(result)
        return result

    def _check_exec(
        self,
        command: str,
        timeout_ms: int | None,
        stdin: str | bytes | None,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> int:
        """Validate exec()'s arguments (for the sync and the async API); the timeout to apply."""
        self._require_live()
        if not isinstance(command, str):
            raise ConfigError(f"exec() needs the command as a str, got {type(command).__name__}")
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0
        ):
            raise ConfigError(
                f"exec(timeout_ms={timeout_ms!r}) needs an int > 0 (milliseconds), or None for "
                f"options.exec_timeout_ms ({self.options.exec_timeout_ms})"
            )
        if stdin is not None and not isinstance(stdin, (str, bytes)):
            raise ConfigError(f"exec(stdin=...) needs str or bytes, got {type(stdin).__name__}")
        check_call_args("exec", cwd=cwd, envs=envs)
        return timeout_ms or self.options.exec_timeout_ms

    def _record(self, result: ExecResult) -> None:
        """Add a finished command to the transcript and the exec time (both APIs)."""
        self.transcript.append(result)
        self.exec_time_ms += result.duration_ms

    # -- what a backend provides ------------------------------------------------------------
    @abc.abstractmethod
    def _create(self) -> None:
        """Create a new sandbox and set ``self._sandbox_id``."""

    @abc.abstractmethod
    def _connect(self) -> None:
        """Attach to ``self.options.sandbox_id``; raise SandboxNotFoundError when it is gone."""

    @abc.abstractmethod
    def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult: ...

    @abc.abstractmethod
    def _dispose(self) -> None:
        """Release everything; must not raise when the sandbox is already gone."""

    @abc.abstractmethod
    def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> ProcessHandle:
        """Start a background process (not bound by ``exec_timeout_ms``; dies with the sandbox)."""

    @property
    @abc.abstractmethod
    def fs(self) -> SandboxFS: ...

    @abc.abstractmethod
    def get_host_url(self, port: int) -> str:
        """A URL that reaches ``port`` inside the sandbox from the test process."""

    @abc.abstractmethod
    def set_timeout(self, timeout_ms: int) -> None:
        """Set the sandbox's remaining lifetime to ``timeout_ms`` from now."""

    @abc.abstractmethod
    def is_alive(self) -> bool: ...
