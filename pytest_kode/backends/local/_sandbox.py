"""The ``local`` backend: sandboxes that are directories on this machine, isolated by bubblewrap.

Each sandbox is a fresh directory ``<root>/<sandbox_id>`` that stands for ``work_dir``; a JSON
file ``<root>/<sandbox_id>.json`` beside it records what a resume, ``pytest-kode ls/gc`` or a
watchdog need (creation time, deadline, isolation, metadata, the names of the envs, the agent's
pid and socket).

A sandbox is a small machine: ``init()`` starts one long-lived process, the agent
(:mod:`._agent`). With bubblewrap it is the init of the sandbox's own user, mount, pid, ipc and
uts namespaces, with the directory mounted at ``work_dir``; without it (``isolation="none"``) it
is a plain process in the directory, made a child subreaper so every descendant stays findable.
Every ``exec``/``start`` is forked by the agent, so processes persist between commands (a server
started with ``nohup ... &`` keeps serving) and all die together at ``dispose()``, at the
deadline (the agent enforces it itself) or when the run is killed (the watchdog kills the
agent's tree). The agent listens on a Unix socket beside the sandbox on the host
(``<root>/.<sandbox_id>.sock``), so any host process can resume the sandbox by id. With
bubblewrap, ``fs`` goes through the agent too and reaches exactly what commands reach.

Lifetime: a sandbox ends at its deadline (``timeout_ms`` after creation or connection, moved by
``set_timeout``), as an E2B sandbox does. Past it, the object refuses work (``exec``, ``start``,
``fs``, ``set_timeout`` raise ``SandboxNotFoundError``; ``is_alive()`` is False). Under the pytest
plugin the run's watchdog (:mod:`pytest_kode.lifecycle.watchdog`) also kills the sandbox's
processes and removes its files at the deadline, even when the test process crashed. Used without
pytest nobody does: the directory and any background process stay until ``dispose()`` (or
:func:`remove_local_sandbox`).
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_kode.backends.local import _bwrap, _network, default_root
from pytest_kode.backends.local._agent import AGENT_ARGV, agent_source, kill_tree
from pytest_kode.backends.local._client import AgentClient, AgentError, AgentGone, socket_address
from pytest_kode.backends.local._fs import DEFAULT_READ_LIMIT, AgentFS, LocalFS
from pytest_kode.backends.local._process import LocalProcess
from pytest_kode.errors import (
    BackendUnavailableError,
    ConfigError,
    KodeError,
    SandboxCreateError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)
from pytest_kode.options import SandboxOptions
from pytest_kode.sandbox import BoundedOutput, ExecResult, Sandbox, check_call_args, check_envs

if TYPE_CHECKING:
    from pytest_kode.backends.local._seed import TemplateSeed

__all__ = [
    "LocalFS",
    "LocalProcess",
    "LocalSandbox",
    "default_root",
    "detect_isolation",
    "list_local_sandboxes",
    "remove_local_sandbox",
]

Isolation = Literal["auto", "bwrap", "none"]
_ISOLATIONS = ("auto", "bwrap", "none")
_ID_PREFIX = "local-"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# work_dirs that bwrap replaces with private instances cannot hold a sandbox.
_FORBIDDEN_WORK_DIRS = ("/proc", "/dev", "/sys")
# How long init() may wait for a new agent to say it is ready (bwrap + Python start: ~20 ms).
_AGENT_READY_S = 30.0
_AGENT_EXIT_S = 5.0
# A sandbox's /tmp (owner-only: every process inside runs with our uid) and its work_dir.
_TMP_MODE = 0o700
_DIR_MODE = 0o755


def detect_isolation() -> str:
    """What ``isolation="auto"`` gives: ``"bwrap"`` when bubblewrap works on this machine and
    the switch (``$KODE_SANDBOX_ISOLATION``, ``--sandbox-isolation``) is not ``none``."""
    if _bwrap.requested_isolation() == "none":
        return "none"
    return "bwrap" if _bwrap.diagnose().works else "none"


def list_local_sandboxes(root_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The metadata of every local sandbox under ``root_dir``, oldest first.

    Each dict has at least ``sandbox_id``, ``directory``, ``created``, ``deadline`` (Unix
    seconds), ``isolation``, ``metadata`` and ``pid`` (the creating process). A sandbox directory
    without a readable metadata file is listed with what can be seen on disk.
    """
    root = Path(root_dir) if root_dir is not None else default_root()
    found: dict[str, dict[str, Any]] = {}
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        path = root / name
        if name.endswith(".json") and _ID_RE.fullmatch(name[:-5]):
            data = _read_json(path)
            if data is not None:
                found[name[:-5]] = data
        elif path.is_dir() and _ID_RE.fullmatch(name):
            found.setdefault(
                name,
                {"sandbox_id": name, "directory": str(path), "created": path.stat().st_mtime},
            )
    return sorted(found.values(), key=lambda data: float(data.get("created", 0.0)))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _host_env() -> dict[str, str]:
    # PATH and locale only: nothing else from the host (API keys, CI tokens) may leak in.
    env = {
        key: value
        for key, value in os.environ.items()
        if key in ("LANG", "LANGUAGE") or key.startswith("LC_")
    }
    env["PATH"] = os.environ.get("PATH") or _DEFAULT_PATH
    return env


class LocalSandbox(Sandbox):
    """A sandbox that is a directory on this machine, isolated with bubblewrap when available.

    ``isolation``: ``"auto"`` (bubblewrap when it works, else none), ``"bwrap"`` (required) or
    ``"none"`` (a plain process group in the directory). ``root_dir`` overrides where sandbox
    directories are kept (default :func:`default_root`). ``local_template``, a
    :class:`~pytest_kode.backends.local._seed.TemplateSeed` the template layer hands over as
    plain data, seeds a new sandbox with a copy of a built template's files and shows its
    shared, read-only venv/npm directories with their ``bin`` on ``PATH``. A ``TemplateSpec``
    in ``options.template`` is built by the template layer before ``_create`` (see
    :meth:`Sandbox.init`); this backend never imports it.
    ``max_read_bytes`` caps ``fs.read``/``read_bytes`` (default 256 MiB): a larger file raises
    ``SandboxPathError`` instead of filling the test process's memory.
    """

    backend = "local"

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        isolation: Isolation = "auto",
        root_dir: str | os.PathLike[str] | None = None,
        local_template: TemplateSeed | None = None,
        max_read_bytes: int = DEFAULT_READ_LIMIT,
        shared_dirs: Sequence[str] = (),
        **fields: Any,
    ) -> None:
        super().__init__(options, **fields)
        # Host directories shown read-only at the same path (the emulator's stand-ins for
        # tools of E2B's base image); everything else of the host stays out of view.
        self._shared_dirs = tuple(shared_dirs)
        if (
            isinstance(max_read_bytes, bool)
            or not isinstance(max_read_bytes, int)
            or (max_read_bytes <= 0)
        ):
            raise ConfigError(f"max_read_bytes must be an int > 0, got {max_read_bytes!r}")
        self.max_read_bytes = max_read_bytes
        self._local_template: TemplateSeed | None = None
        if local_template is not None:
            self.use_template(local_template)
        if isolation not in _ISOLATIONS:
            raise ConfigError(
                f"invalid isolation={isolation!r} for the local backend; allowed: "
                + ", ".join(repr(name) for name in _ISOLATIONS)
            )
        self._requested_isolation: str = isolation
        self._isolation: str | None = None
        self.root_dir = Path(root_dir) if root_dir is not None else default_root()
        self._dir: Path | None = None
        self._dir_mode = _DIR_MODE  # as made (the umask applied), for recycle to restore
        self._fs: LocalFS | AgentFS | None = None
        self._hostfs: LocalFS | None = None
        self._env: dict[str, str] = {}
        self._lock = threading.Lock()
        self._processes: list[LocalProcess] = []
        self._client: AgentClient | None = None
        # The agent we spawned (pid, fd that reports readiness), until it said it is ready.
        self._agent_pid: int | None = None
        self._ready_fd: int | None = None
        self._meta: dict[str, Any] = {}
        self._tmp: str | None = None
        # bwrap only: the route out of its own network (the creator's, internet on), and the
        # host's way in (any object's, made on first get_host_url).
        self._stack: _network.NetworkStack | None = None
        self._relays: _network.PortRelays | None = None
        # A copy of _meta["deadline"] checked on every operation: a float compare, no file read.
        self._deadline = float("inf")

    # -- properties -------------------------------------------------------------------------
    @property
    def isolation(self) -> str:
        """``"bwrap"`` or ``"none"``: the isolation in use (resolved on first access)."""
        if self._isolation is None:
            self._isolation = self._resolve_isolation()
        return self._isolation

    @property
    def directory(self) -> Path:
        """The host directory that holds the sandbox's ``work_dir``."""
        if self._dir is None:
            raise KodeError(
                "the sandbox has no directory yet", backend=self.backend, hint="call init() first"
            )
        return self._dir

    @property
    def agent_socket(self) -> str:
        """The Unix socket of the sandbox's agent (speak :mod:`._protocol` to it; an async
        client connects here). Ready once any operation (or :meth:`wait_ready`) returned."""
        agent = self._meta.get("agent")
        path = agent.get("socket") if isinstance(agent, dict) else None
        if not isinstance(path, str):
            raise KodeError(
                "the sandbox has no agent yet", backend=self.backend, hint="call init() first"
            )
        return path

    def _wait_agent_ready(self) -> None:
        """Wait until the agent said it is ready (not for its network)."""
        if self._ready_fd is not None:
            with self._lock:
                if self._ready_fd is not None:
                    self._await_ready()

    def wait_ready(self) -> None:
        """Wait until the agent accepts requests (init() returns before it does)."""
        self._require_live()
        self._agent()

    @property
    def metadata_path(self) -> Path:
        """The JSON file beside the directory that describes the sandbox."""
        return self.root_dir / f"{self.sandbox_id}.json"

    @property
    def deadline(self) -> float | None:
        """When the sandbox's lifetime (``timeout_ms``) ends, in Unix seconds."""
        value = self._meta.get("deadline")
        return float(value) if value is not None else None

    def _require_live(self) -> None:
        super()._require_live()
        if time.time() >= self._deadline:
            self._require_unexpired()

    def _require_unexpired(self) -> None:
        """Raise SandboxNotFoundError unless another object moved the deadline on meanwhile."""
        now = time.time()
        if now < self._extended_deadline():
            return
        spent = now - self._deadline
        raise self._fail(
            SandboxNotFoundError,
            f"local sandbox {self._sandbox_id!r} is gone: its timeout_ms lifetime "
            f"({self._meta.get('timeout_ms')} ms) ended {spent:.1f}s ago",
            "extend it before it ends with sandbox.set_timeout(ms), or create it with a larger "
            "timeout_ms (e.g. @pytest.mark.sandbox(timeout_ms=...))",
        )

    def _extended_deadline(self) -> float:
        # Past our deadline only: another object of this sandbox (an xdist worker sharing a
        # session sandbox) may have called set_timeout, which only its metadata file shows.
        if self._dir is None or not self._dir.is_dir():
            return self._deadline
        data = _read_json(self.metadata_path)
        deadline = data.get("deadline") if data is not None else None
        if isinstance(deadline, (int, float)) and deadline > self._deadline:
            self._meta["deadline"] = float(deadline)
            self._meta["timeout_ms"] = data.get("timeout_ms") if data is not None else None
            self._deadline = float(deadline)
        return self._deadline

    @property
    def fs(self) -> LocalFS | AgentFS:
        """File operations in the sandbox: with bubblewrap done by the agent in the sandbox's
        own view (``/tmp/x.py`` is the sandbox's ``/tmp``); without, confined to ``work_dir``."""
        self._require_live()
        assert self._fs is not None
        return self._fs

    def host_path(self, path: str) -> Path:
        """The host path of in-sandbox ``path`` below ``work_dir`` (symlinks resolved and
        confined; SandboxPathError for anything else, such as the sandbox's ``/tmp``)."""
        self._require_live()
        assert self._hostfs is not None
        return self._hostfs.host_path(path)

    def get_host_url(self, port: int) -> str:
        """A URL on the host's 127.0.0.1 reaching ``port`` inside the sandbox.

        Under bubblewrap, a free host port relayed into the sandbox's own network through
        sockets its agent makes there (set up on first ask, in whichever process asks, also one
        that resumed the sandbox; closed at ``dispose()``/``detach()``); without isolation the
        sandbox shares the host's network, so it is the port itself.
        """
        port = self._port_arg(port)
        self._require_live()
        if self.isolation != "bwrap":
            return f"http://127.0.0.1:{port}"
        with self._lock:
            relays = self._relays
            if relays is None:
                if self._disposed:
                    raise self._agent_gone()
                relays = self._relays = _network.PortRelays(
                    self._inner_socket, sandbox_id=self._sandbox_id
                )
        return relays.url(port)

    def _inner_socket(self, family: socket.AddressFamily) -> socket.socket:
        """A TCP socket in the sandbox's network, made by its agent (relays connect it)."""
        try:
            return self._agent().inner_socket(family)
        except (AgentGone, AgentError, KodeError) as exc:
            raise OSError(f"the sandbox's agent made no socket: {exc}") from exc

    # -- set-up -----------------------------------------------------------------------------
    def _fail(self, cls: type[KodeError], message: str, hint: str) -> KodeError:
        return cls(message, backend=self.backend, sandbox_id=self._sandbox_id, hint=hint)

    def _resolve_isolation(self) -> str:
        wanted = self._requested_isolation
        if wanted == "auto":
            wanted = _bwrap.requested_isolation()  # the run's switch
        found = _bwrap.diagnose() if wanted != "none" else None
        if found is not None and not found.works and wanted == "bwrap":
            raise self._fail(
                BackendUnavailableError,
                f"isolation='bwrap' was requested but bubblewrap does not work here: {found.why}",
                found.fix,
            )
        usable = "bwrap" if found is not None and found.works else "none"
        if not self.options.allow_internet_access and usable == "none":
            if found is None:
                why = f"isolation 'none' was chosen ({_bwrap.ISOLATION_ENV} or isolation=)"
                fix = "let the sandbox use bubblewrap (--sandbox-isolation=auto)"
            else:
                why, fix = f"bubblewrap does not work here: {found.why}", found.fix
            raise self._fail(
                BackendUnavailableError,
                "allow_internet_access=False needs the sandbox's own network namespace, which "
                f"the local backend only has with bubblewrap; {why}",
                f"{fix}; or drop allow_internet_access=False",
            )
        return usable

    def _check_work_dir(self) -> None:
        work_dir = self.options.work_dir
        if work_dir == "/" or any(
            work_dir == bad or work_dir.startswith(bad + "/") for bad in _FORBIDDEN_WORK_DIRS
        ):
            raise ConfigError(
                f"work_dir={work_dir!r} cannot hold a local sandbox; use a directory such as "
                "'/home/user' (not '/', /proc, /dev or /sys)"
            )

    def _prepare(self, directory: Path, *, new: bool) -> None:
        self._dir = directory
        self._hostfs = LocalFS(
            self.options.work_dir,
            str(directory),
            backend=self.backend,
            sandbox_id=self.sandbox_id,
            read_limit=self.max_read_bytes,
        )
        env = _host_env()
        env.update(self.options.envs)
        if self._local_template is not None:
            env.update(self._local_template.environment(env.get("PATH")))
        bwrap = self.isolation == "bwrap"
        if bwrap:
            # The sandbox's own /tmp, kept across its commands as on E2B (not the host's).
            # Every process inside runs with our uid, so owner-writable suffices (no chmod 1777).
            tmp = _tmp_dir(self.root_dir, self.sandbox_id)
            tmp.mkdir(mode=_TMP_MODE, exist_ok=True)
            self._tmp = str(tmp)
            if new and self.options.allow_internet_access:
                # bwrap makes the network namespace; its route out is attached once the agent
                # runs. (Checked here: a missing slirp4netns fails before anything starts.)
                self._stack = _network.NetworkStack(sandbox_id=self.sandbox_id)
            self._fs = AgentFS(
                self.options.work_dir,
                self._agent,
                gone=self._agent_gone,
                backend=self.backend,
                sandbox_id=self.sandbox_id,
                read_limit=self.max_read_bytes,
            )
        else:
            self._fs = self._hostfs
        # HOME is the sandbox even when options.envs names one: commands must not write outside.
        env["HOME"] = self.options.work_dir if bwrap else str(directory)
        self._env = env

    def use_template(self, seed: TemplateSeed) -> None:
        """Start from ``seed`` (a built template, from the template layer) when created."""
        if seed.work_dir != self.options.work_dir:
            raise ConfigError(
                f"the template was built for work_dir={seed.work_dir!r} but the "
                f"sandbox has work_dir={self.options.work_dir!r}; build it for the same work_dir"
            )
        self._local_template = seed

    def _needs_template_build(self) -> bool:
        return self._local_template is None and super()._needs_template_build()

    # -- the agent ----------------------------------------------------------------------------
    def _start_agent(self) -> None:
        """Spawn the sandbox's agent; :meth:`_agent` waits for it on first use."""
        assert self._dir is not None and self._sandbox_id is not None
        path = str(_agent_socket(self.root_dir, self._sandbox_id))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fds: list[int] = []
        try:
            address, dir_fd = socket_address(path)
            try:
                listener.bind(address)
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)
            os.chmod(path, 0o600)  # only our user may command the sandbox
            listener.listen(128)
            source_r, source_w = os.pipe2(os.O_CLOEXEC)
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            fds += [source_r, source_w, ready_r, ready_w]
            # stdout and stderr share one pipe: "ready" arrives on it, or why not (bwrap's
            # error, a traceback) before it closes.
            actions = [
                (os.POSIX_SPAWN_DUP2, source_r, 0),
                (os.POSIX_SPAWN_DUP2, ready_w, 1),
                (os.POSIX_SPAWN_DUP2, ready_w, 2),
                (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
            ]
            bwrap = self.isolation == "bwrap"
            hold: list[str] = []
            info_fd: int | None = None
            if self._stack is not None:
                # bwrap reports the agent's host pid on info_fd (for the stack to attach to);
                # the agent holds the stack's exit pipe. Numbered above every source fd, so
                # that no dup2 overwrites one still to be read.
                stack_fds = self._stack.prepare()
                fds += stack_fds
                info_fd = max(*fds, listener.fileno()) + 1
                actions += [
                    (os.POSIX_SPAWN_DUP2, stack_fds[0], info_fd),
                    (os.POSIX_SPAWN_DUP2, stack_fds[1], info_fd + 1),
                ]
                hold = [str(info_fd + 1)]
            prefix = (
                _bwrap.bwrap_argv(
                    str(self._dir),
                    self.options.work_dir,
                    network="own",
                    nameserver=self._stack.dns if self._stack is not None else None,
                    info_fd=info_fd,
                    binds=self._template_binds(),
                    tmp_dir=self._tmp,
                    persistent=True,
                )
                if bwrap
                else []
            )
            argv = [*prefix, _network.agent_python(), *AGENT_ARGV, "3"]
            argv += [
                repr(self._deadline),
                str(self.max_read_bytes),
                "-" if bwrap else str(self._dir),
                *hold,
            ]
            # posix_spawn, not fork: cheap from a large test process, and the agent is tied to
            # no thread of ours (a sandbox outlives the thread, even the process, that made it).
            source = agent_source()
            # The whole program must fit in the pipe, so that init() does not wait for the
            # agent's interpreter to start and read it.
            fcntl.fcntl(source_w, fcntl.F_SETPIPE_SZ, max(len(source), 65536))
            pid = os.posix_spawn(argv[0], argv, self._env, file_actions=actions, setsid=True)
            _children.add(pid)
            view = memoryview(source)
            while view:
                view = view[os.write(source_w, view) :]
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise self._fail(
                SandboxCreateError,
                f"cannot start the sandbox's agent: {exc}",
                "check that bubblewrap and this Python interpreter can run here",
            ) from exc
        finally:
            listener.close()
        for fd in fds:
            if fd != ready_r:
                os.close(fd)
        self._agent_pid = pid
        self._ready_fd = ready_r
        self._meta["agent"] = {
            "pid": pid,
            "start": _start_time(pid),
            "socket": path,
        }
        self._client = AgentClient(path)

    def _agent(self) -> AgentClient:
        """The agent's client, once the agent said it is ready (and its network is)."""
        if self._ready_fd is not None:
            self._wait_agent_ready()
        if self._stack is not None:
            # No command runs before the route out exists (raises if it cannot).
            self._stack.ready()
        client = self._client
        if client is None:
            raise self._agent_gone()
        return client

    def _await_ready(self) -> None:
        fd = self._ready_fd
        assert fd is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        said = b""
        deadline = time.monotonic() + _AGENT_READY_S
        try:
            while not said.startswith(b"ready ") or not said.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(int(left * 1000) + 1):
                    raise self._agent_failed(f"it did not start within {_AGENT_READY_S:.0f}s", said)
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise self._agent_failed("it exited before it was ready", said)
                said += chunk
        finally:
            os.close(fd)
            self._ready_fd = None
        if self._stack is not None:
            # Only now: slirp4netns sets the namespace's loopback up itself, and bwrap's own
            # set-up of it (before it runs the agent) fails if that came first.
            self._stack.attach()

    def _agent_failed(self, why: str, said: bytes) -> KodeError:
        assert self._sandbox_id is not None
        if self._agent_pid is not None:
            _stop_child(self._agent_pid, 0.0)
            self._agent_pid = None
        self._client = None
        self._require_directory()  # removed from the host before the agent could start
        detail = said.decode("utf-8", "replace").strip()
        hint = (
            _bwrap.BWRAP_INSTALL_HINT
            if detail.startswith("bwrap:")
            else "check that this Python interpreter can run in the sandbox"
        )
        return self._fail(
            SandboxCreateError,
            f"the sandbox's agent failed to start: {why}" + (f": {detail}" if detail else ""),
            hint,
        )

    def _agent_gone(self) -> KodeError:
        """The error for an agent that is not there any more: expired, disposed or killed."""
        self._require_unexpired()
        if self._disposed or not self.is_alive():
            return self._fail(
                SandboxNotFoundError,
                f"local sandbox {self._sandbox_id!r} is gone (disposed or removed)",
                "create a new sandbox",
            )
        return self._fail(
            SandboxNotFoundError,
            f"local sandbox {self._sandbox_id!r} stopped: its agent (the sandbox's init "
            "process) is gone, killed from inside or from the host, and every process in it "
            "with it",
            "do not kill the sandbox's pid 1 or its agent; create a new sandbox",
        )

    def _template_binds(self) -> list[tuple[str, bool]]:
        # The template's venv may sit under /tmp, private in bwrap: show it, read-only.
        shared = self._local_template.shared if self._local_template is not None else ()
        return [(path, False) for path in (*shared, *self._shared_dirs)]

    def _create(self) -> None:
        self._check_work_dir()
        isolation = self.isolation
        template = self.options.template
        if self._local_template is None and isinstance(template, str) and template != "base":
            # E2B refuses an unknown template name; so must we, rather than run on the host's
            # tools as if the name meant nothing.
            raise SandboxCreateError(
                f"template {template!r} not found: the local backend provides only 'base' (the "
                "host's tools) and templates described by a TemplateSpec",
                backend=self.backend,
                hint="describe the template as TemplateSpec(...) so every backend can build it, "
                "or run the tests that need this E2B template with --sandbox-backend=e2b",
            )
        try:
            while True:
                sandbox_id = _new_id()
                directory = self.root_dir / sandbox_id
                try:
                    directory.mkdir(mode=_DIR_MODE)
                except FileExistsError:
                    continue
                except FileNotFoundError:
                    # First sandbox under this root (asked only now: file operations dominate
                    # the cost of a short-lived sandbox).
                    self.root_dir.mkdir(parents=True, exist_ok=True)
                    continue
                break
        except OSError as exc:
            raise self._fail(
                SandboxCreateError,
                f"cannot create a sandbox directory under {str(self.root_dir)!r}: {exc}",
                "make the root writable, or point root_dir / $KODE_LOCAL_ROOT elsewhere",
            ) from exc
        self._sandbox_id = sandbox_id
        self._dir_mode = directory.stat().st_mode & 0o7777
        self._prepare(directory, new=True)
        try:
            self._populate(directory, isolation)
        except BaseException:
            self._drop_network()
            raise

    def _populate(self, directory: Path, isolation: str) -> None:
        """Fill a new sandbox's directory and metadata; ready its launcher."""
        assert self._sandbox_id is not None
        sandbox_id = self._sandbox_id
        if self._local_template is not None:
            try:
                self._local_template.populate(directory)
            except OSError as exc:
                raise self._fail(
                    SandboxCreateError,
                    f"cannot copy template {self._local_template.label} into the sandbox: {exc}",
                    f"check {str(self._local_template.tree)!r} and free disk space",
                ) from exc
        now = time.time()
        self._meta = {
            "sandbox_id": sandbox_id,
            "backend": self.backend,
            "isolation": isolation,
            "directory": str(directory),
            "work_dir": self.options.work_dir,
            "created": now,
            "deadline": now + self.options.timeout_ms / 1000.0,
            "timeout_ms": self.options.timeout_ms,
            "metadata": dict(self.options.metadata),
            "env_names": sorted(self.options.envs),
            "allow_internet_access": self.options.allow_internet_access,
            "template": str(self.options.template)
            if isinstance(self.options.template, str)
            else self.options.template.digest(),
            "pid": os.getpid(),
        }
        self._deadline = self._meta["deadline"]
        try:
            self._start_agent()
            self._write_meta(new=True)
            if self._stack is not None:
                # The route out can only be attached once the agent runs (_await_ready): wait
                # for both here, where prewarm hides it, not at the first command; and have a
                # connection ready for that command.
                self._wait_agent_ready()
                self._stack.ready()
                assert self._client is not None
                self._client.warm()
        except BaseException:
            self._abandon()
            raise

    def _connect(self) -> None:
        self._check_work_dir()
        sandbox_id = self.options.sandbox_id
        assert sandbox_id is not None
        directory = self.root_dir / sandbox_id
        if not _ID_RE.fullmatch(sandbox_id) or not directory.is_dir():
            raise self._fail(
                SandboxNotFoundError,
                f"no local sandbox {sandbox_id!r} under {str(self.root_dir)!r}",
                "it was disposed or removed (or lives under another root_dir / "
                "$KODE_LOCAL_ROOT); create a new sandbox by leaving out sandbox_id",
            )
        meta = _read_json(self.root_dir / f"{sandbox_id}.json") or {}
        now = time.time()
        deadline = meta.get("deadline")
        if isinstance(deadline, (int, float)) and deadline < now:
            raise self._fail(
                SandboxNotFoundError,
                f"local sandbox {sandbox_id!r} under {str(self.root_dir)!r} expired "
                f"{now - deadline:.0f}s ago (its timeout_ms lifetime ended)",
                "create a new sandbox; `pytest-kode gc` removes expired ones",
            )
        self._prepare(directory, new=False)
        meta.update(
            sandbox_id=sandbox_id,
            backend=self.backend,
            isolation=self.isolation,
            directory=str(directory),
            work_dir=self.options.work_dir,
            deadline=now + self.options.timeout_ms / 1000.0,
            timeout_ms=self.options.timeout_ms,
        )
        meta.setdefault("created", directory.stat().st_mtime)
        meta.setdefault("metadata", dict(self.options.metadata))
        meta.setdefault("env_names", sorted(self.options.envs))
        meta.setdefault("pid", os.getpid())
        agent = meta.get("agent")
        address = agent.get("socket") if isinstance(agent, dict) else None
        if not isinstance(address, str):
            raise self._fail(
                SandboxNotFoundError,
                f"local sandbox {sandbox_id!r} has no agent recorded in its metadata file",
                "it was made by an older pytest-kode or its metadata was edited; create a new one",
            )
        client = AgentClient(address)
        try:
            client.call({"op": "deadline", "at": meta["deadline"]})
        except (AgentGone, AgentError) as exc:
            client.close()
            raise self._fail(
                SandboxNotFoundError,
                f"local sandbox {sandbox_id!r} under {str(self.root_dir)!r} has stopped: its "
                f"agent does not answer ({exc})",
                "it ended at its deadline or was killed; create a new sandbox "
                "(`pytest-kode gc` removes what is left of it)",
            ) from exc
        self._client = client
        self._meta = meta
        self._write_meta()
        self._deadline = meta["deadline"]

    def _drop_network(self) -> None:
        with self._lock:
            relays, self._relays = self._relays, None
            stack, self._stack = self._stack, None
        if relays is not None:
            relays.close()
        if stack is not None:
            stack.close()

    def _write_meta(self, *, new: bool = False) -> None:
        path = self.metadata_path
        text = json.dumps(self._meta, sort_keys=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if new:
                # A fresh id: nobody can be reading this file yet, so skip the atomic rename
                # (file operations dominate the cost of creating a sandbox).
                with open(path, "x", encoding="utf-8") as handle:
                    handle.write(text)
            else:
                temporary.write_text(text, "utf-8")
                os.replace(temporary, path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise self._fail(
                SandboxCreateError,
                f"cannot write the sandbox's metadata file {str(path)!r}: {exc}",
                "make the root writable, or point root_dir / $KODE_LOCAL_ROOT elsewhere",
            ) from exc

    # -- commands ---------------------------------------------------------------------------
    def _command_env(self, envs: dict[str, str] | None) -> dict[str, str]:
        if not envs:
            return self._env
        check_envs(envs)
        env = dict(self._env)
        env.update(envs)
        return env

    def _cwd(self, cwd: str | None) -> str | None:
        """The directory the agent runs a command in (None: its own, work_dir)."""
        assert self._dir is not None and self._hostfs is not None
        if cwd is None:
            return None
        inside = posixpath.normpath(posixpath.join(self.options.work_dir, str(cwd)))
        if self._isolation == "bwrap":
            return inside  # the agent sees the sandbox's own tree: it checks the path itself
        prefix = self.options.work_dir.rstrip("/") + "/"
        if inside == self.options.work_dir or inside.startswith(prefix):
            try:
                host: Path | None = self._hostfs.host_path(inside)
            except FileNotFoundError:
                host = None  # a missing parent: the same answer as a missing cwd
            if host is None or not host.is_dir():
                raise self._cwd_missing(inside)
            return str(host)
        # Without isolation a cwd outside work_dir is simply a host directory.
        if not os.path.isdir(inside):
            raise self._fail(
                SandboxFileNotFoundError,
                f"cwd {inside!r} is not an existing directory",
                "pass a directory below work_dir or an existing host directory",
            )
        return inside

    def _cwd_missing(self, inside: str) -> KodeError:
        return self._fail(
            SandboxFileNotFoundError,
            f"cwd {inside!r} is not an existing directory in the sandbox",
            "create it first (fs.mkdir) or pass another cwd",
        )

    def _run_error(self, what: str, cwd: str | None, exc: AgentError) -> KodeError:
        if cwd is not None and exc.type == "os" and exc.path == cwd:
            return self._cwd_missing(cwd)
        return self._fail(
            KodeError,
            f"cannot start {what!r}: {exc}",
            "check that bash and the command exist in the sandbox",
        )

    def _require_directory(self) -> None:
        if self._dir is None or not os.path.isdir(self._dir):
            raise self._fail(
                SandboxNotFoundError,
                f"local sandbox {self._sandbox_id!r} is gone: the sandbox's directory is gone "
                "from the host",
                "the sandbox was disposed or removed; create a new one",
            )

    def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
        body, where = self._run_body(
            ["bash", "-c", command], cwd=cwd, envs=envs, stdin="none" if data is None else "data"
        )
        body.update(
            timeout_ms=timeout_ms,
            started=False,
            own=True,  # interrupted (Ctrl-C): the agent kills it when we hang up
            batch=True,  # the output with the exit, in one answer: we wake once
        )
        out = BoundedOutput(self.options.max_output_bytes)
        err = BoundedOutput(self.options.max_output_bytes)
        started = time.monotonic()
        try:
            end = self._agent().run(body, data or b"", out.write, err.write)
        except AgentGone as exc:
            self._require_directory()
            raise self._agent_gone() from exc
        except AgentError as exc:
            self._require_directory()
            raise self._run_error(command, where, exc) from exc
        return self._exec_result(command, end, out, err, (time.monotonic() - started) * 1000.0)

    def _run_body(
        self, argv: list[str], *, cwd: str | None, envs: dict[str, str] | None, stdin: str
    ) -> tuple[dict[str, object], str | None]:
        """The agent's ``run`` request for ``argv`` (both APIs), and the cwd it names."""
        where = self._cwd(cwd)
        body: dict[str, object] = {
            "op": "run",
            "argv": argv,
            "env": self._command_env(envs),
            "stdin": stdin,
        }
        if where is not None:
            body["cwd"] = where
        return body, where

    def _exec_result(
        self,
        command: str,
        end: dict[str, object],
        out: BoundedOutput,
        err: BoundedOutput,
        duration_ms: float,
    ) -> ExecResult:
        """The result of a command that ran to its ``K_EXIT`` (both APIs)."""
        # Removed from the host under us (gc, the watchdog at the deadline): what the command
        # saw is no result of a sandbox, as on E2B.
        self._require_directory()
        stdout = out.getvalue()
        code = end.get("exit_code")
        return ExecResult(
            command=command,
            exit_code=code if isinstance(code, int) else 128 + signal.SIGKILL,
            stdout=stdout.decode("utf-8", "replace"),
            stderr=err.text(),
            duration_ms=duration_ms,
            timed_out=bool(end.get("timed_out")),
            truncated=out.truncated or err.truncated,
            stdout_bytes=stdout,
        )

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        stdin: bool = False,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        pty: tuple[int, int] | None = None,
        tag: str | None = None,
    ) -> LocalProcess:
        """Run ``argv`` in the background inside the sandbox, streaming its output.

        Same environment and cwd rules as :meth:`exec`. ``on_stdout``/``on_stderr`` receive each
        chunk as it arrives (from the agent connection's reader thread); the output is also kept
        (bounded) on the handle. ``stdin=True`` gives the process a pipe that ``send_stdin`` /
        ``close_stdin`` feed; otherwise /dev/null. ``pty=(rows, cols)`` runs it on a terminal
        instead (output on stdout; ``send_stdin`` types, ``resize`` resizes). ``tag`` is kept
        for :meth:`list_processes`. The process is not bound by ``exec_timeout_ms``; it
        persists until it exits and dies with the sandbox. The handle's ``pid`` is the pid in
        the sandbox.
        """
        self._require_live()
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"spawn() needs a non-empty list of str, got {argv!r}")
        body, where = self._run_body(
            list(argv), cwd=cwd, envs=envs, stdin="pipe" if stdin or pty else "none"
        )
        body["tag"] = tag
        if pty is not None:
            body["pty"] = {"rows": int(pty[0]), "cols": int(pty[1])}
        handle = LocalProcess(
            self._agent(),
            shlex.join(argv),
            limit=self.options.max_output_bytes,
            stdin=stdin or pty is not None,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            sandbox_id=self._sandbox_id,
            gone=self._agent_gone,
        )
        try:
            handle._begin(body)
        except AgentError as exc:
            raise self._run_error(shlex.join(argv), where, exc) from exc
        with self._lock:
            self._processes = [process for process in self._processes if not process.finished()]
            self._processes.append(handle)
        return handle

    def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        stdin: bool = True,
    ) -> LocalProcess:
        """Start ``command`` through bash in the background; it persists until it exits.

        Its stdin is a pipe that ``send_stdin``/``close_stdin`` feed, as on E2B
        (``stdin=False``: /dev/null, so a program that reads stdin sees its end at once).
        """
        if not isinstance(command, str):
            raise ConfigError(f"start() needs the command as a str, got {type(command).__name__}")
        check_call_args("start", cwd=cwd, envs=envs)
        handle = self.spawn(["bash", "-c", command], cwd=cwd, envs=envs, stdin=stdin)
        handle.command = command
        return handle

    def list_processes(self) -> list[dict[str, Any]]:
        """The running processes that ``exec``/``start``/``spawn`` started in this sandbox (by
        any host process): dicts with ``pid`` (in the sandbox), ``argv``, ``cwd``, ``tag``,
        ``pty`` and ``env``."""
        self._require_live()
        try:
            answer, _ = self._agent().call({"op": "ps"})
        except AgentGone as exc:
            raise self._agent_gone() from exc
        processes = answer.get("processes")
        return list(processes) if isinstance(processes, list) else []

    def connect_process(
        self,
        pid: int,
        *,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> LocalProcess:
        """A handle on running process ``pid`` (a pid in the sandbox, as :meth:`list_processes`
        reports): its output from now on, its end, signals and stdin."""
        self._require_live()
        handle = LocalProcess(
            self._agent(),
            f"pid {pid}",
            limit=self.options.max_output_bytes,
            stdin=True,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            sandbox_id=self._sandbox_id,
            gone=self._agent_gone,
        )
        try:
            handle._begin({"op": "attach", "pid": int(pid)})
        except AgentError as exc:
            raise self._fail(
                KodeError,
                f"no running process with pid {pid} in the sandbox",
                "list them with list_processes()",
            ) from exc
        return handle

    # -- lifetime ---------------------------------------------------------------------------
    def set_timeout(self, timeout_ms: int) -> None:
        """Set the remaining lifetime to ``timeout_ms`` from now.

        The agent ends the sandbox then (every process killed) and the metadata file records it
        for other host processes and the run's watchdog. Past the deadline this object raises
        ``SandboxNotFoundError``; an ended sandbox cannot be revived.
        """
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ConfigError(f"set_timeout(timeout_ms=...) needs an int > 0, got {timeout_ms!r}")
        self._require_live()
        previous = dict(self._meta)
        deadline = time.time() + timeout_ms / 1000.0
        try:
            self._agent().call({"op": "deadline", "at": deadline})
        except AgentGone as exc:
            raise self._agent_gone() from exc
        self._meta["deadline"] = deadline
        self._meta["timeout_ms"] = timeout_ms
        try:
            self._write_meta()
        except KodeError:
            self._meta = previous  # not recorded: the watchdog still holds the old deadline
            raise
        self._deadline = self._meta["deadline"]

    def is_alive(self) -> bool:
        """False once disposed, removed, or past the ``timeout_ms`` deadline."""
        return (
            self._initialized
            and not self._disposed
            and self._dir is not None
            and self._dir.is_dir()
            and (time.time() < self._deadline or time.time() < self._extended_deadline())
        )

    def _stop_agent(self) -> bool:
        """End the agent and with it every process of the sandbox. True when it shut down as
        asked (then nothing of the sandbox can be left: it killed its whole tree)."""
        client, self._client = self._client, None
        clean = False
        if self._ready_fd is not None:
            # Never used (a spare nobody took): nothing runs in it yet, kill it as it starts.
            os.close(self._ready_fd)
            self._ready_fd = None
            if client is not None:
                client.close()
                client = None
        if client is not None:
            try:
                client.call({"op": "shutdown"})
                clean = True
            except (AgentGone, AgentError):
                pass  # already gone
            client.close()
        if self._agent_pid is not None:
            # Ours: wait for it (no zombie), and kill its tree if it does not go.
            _stop_child(self._agent_pid, _AGENT_EXIT_S if clean else 0.0)
            self._agent_pid = None
        else:
            agent = self._meta.get("agent")
            if clean:
                # Another process's agent (a resumed sandbox): it answers before it kills its
                # tree, so wait for it to exit, after which every process of it is dead.
                _wait_agent(agent, _AGENT_EXIT_S)
            _kill_agent(agent)
        return clean

    def _detach(self) -> None:
        # The sandbox lives on (its agent is no child of any thread of ours); only our
        # connections go. A spawned agent that is still starting is left to start.
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None
        client, self._client = self._client, None
        if client is not None:
            client.close()
        # The route out ends with the sandbox (its agent holds the stack's exit pipe), not
        # with us; our relays are ours.
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.release()
        self._drop_network()

    def _abandon(self) -> None:
        """Undo a half-made sandbox."""
        self._stop_agent()
        if self._sandbox_id is not None:
            _remove(self.root_dir, self._sandbox_id, sweep=False)

    def _dispose(self) -> None:
        if self._stack is not None:
            self._stack.stop()  # slirp4netns exits while the rest is torn down
        clean = self._stop_agent()
        with self._lock:
            processes, self._processes = self._processes, []
        for process in processes:
            process.close()
        if self._dir is not None and self._sandbox_id is not None:
            # Without a pid namespace, processes may have escaped an agent that did not shut
            # down cleanly (killed, or never started): look for them by what the sandbox gave
            # them.
            _remove(self.root_dir, self._sandbox_id, sweep=self._isolation != "bwrap" and not clean)
        self._drop_network()

    # -- recycling --------------------------------------------------------------------------
    @property
    def recyclable(self) -> bool:
        """Under bubblewrap, created by this object (a resumed one's agent is another
        process's): its agent is the sandbox's pid 1."""
        return self._isolation == "bwrap" and self._agent_pid is not None and not self._disposed

    def recycle(self, options: SandboxOptions) -> LocalSandbox | None:
        """This used sandbox made as new under a new id (see :meth:`Sandbox.recycle`).

        Creating a sandbox costs a bwrap, an interpreter start and a network stack, ~16 ms of
        CPU; making a used one as new costs a fraction of it. As new means: every process of
        it killed (its agent is the pid namespace's init), its files (``work_dir``, ``/tmp``,
        ``/dev``) as a new one's, its deadline from now, its port relays closed, the last
        user's connections dropped, and nothing left in its network or IPC namespace (else it
        is disposed instead). Only a bwrap sandbox this object created and nobody else holds.
        """
        client = self._client
        if (
            not self.recyclable
            or not self._initialized
            or self._ready_fd is not None  # never used: a spare nobody took
            or client is None
            or self._dir is None
            or self._sandbox_id is None
            or time.time() >= self._deadline
            or options.sandbox_id is not None
            or options.replace(metadata={}) != self.options.replace(metadata={})
        ):
            return None
        old_id, root, directory = self._sandbox_id, self.root_dir, self._dir
        with self._lock:
            relays, self._relays = self._relays, None
        if relays is not None:
            relays.close()  # before the check: its sockets live in the sandbox's namespace
        deadline = time.time() + options.timeout_ms / 1000.0
        # Emptied by the agent, which sees what is mounted in them (a template's venv may sit
        # under /tmp): from the host, removing a mount point would unmount it inside.
        wipe = {self.options.work_dir: self._dir_mode, "/tmp": _TMP_MODE}
        try:
            left = client.call({"op": "reset", "at": deadline, "wipe": wipe})[0].get("left")
        except (AgentGone, AgentError):
            return None
        if left:
            return None
        try:
            if self._local_template is not None:
                self._local_template.copy_into(directory)
        except OSError:
            return None
        # From here the machine is the new sandbox's; this object lets go of it.
        fresh = LocalSandbox(
            options,
            isolation="bwrap",
            root_dir=root,
            local_template=self._local_template,
            max_read_bytes=self.max_read_bytes,
            shared_dirs=self._shared_dirs,
        )
        new_id = _unused_id(root)
        fresh._sandbox_id = new_id
        fresh._isolation = "bwrap"
        fresh._dir_mode = self._dir_mode
        meta = dict(self._meta)
        meta.update(
            sandbox_id=new_id,
            directory=str(root / new_id),
            created=time.time(),
            deadline=deadline,
            timeout_ms=options.timeout_ms,
            metadata=dict(options.metadata),
            agent={**meta["agent"], "socket": str(_agent_socket(root, new_id))},
            pid=os.getpid(),
        )
        fresh._meta = meta
        fresh._deadline = deadline
        try:
            # The new metadata file first and the old one last: whoever looks (gc, the
            # watchdog) always finds one that names the agent.
            fresh._write_meta(new=True)
            os.rename(_agent_socket(root, old_id), _agent_socket(root, new_id))
            os.rename(_tmp_dir(root, old_id), _tmp_dir(root, new_id))
            os.rename(directory, root / new_id)  # the same inode stays mounted inside
            (root / f"{old_id}.json").unlink(missing_ok=True)
        except (OSError, KodeError):
            # Half renamed: end the machine under both names (this object's dispose does).
            _remove(root, new_id, sweep=False)
            return None
        fresh._prepare(root / new_id, new=False)
        fresh._stack, self._stack = self._stack, None
        if fresh._stack is not None:
            fresh._stack.sandbox_id = new_id
        fresh._agent_pid, self._agent_pid = self._agent_pid, None
        fresh._client = AgentClient(meta["agent"]["socket"])
        fresh._client.warm()
        fresh._initialized = True
        self._client = None
        client.close()
        with self._lock:
            processes, self._processes = self._processes, []
        for process in processes:
            process.close()  # their streams' connections (the agent dropped them already)
        self._disposed = True
        return fresh


def _new_id() -> str:
    return _ID_PREFIX + secrets.token_hex(6)


def _unused_id(root: Path) -> str:
    while True:
        sandbox_id = _new_id()
        if not (root / sandbox_id).exists():
            return sandbox_id


def remove_local_sandbox(sandbox_id: str, root_dir: str | os.PathLike[str] | None = None) -> bool:
    """Remove a local sandbox left on disk, whatever its state: for gc and watchdogs.

    Kills its agent and every process in it, then removes its directory, its ``/tmp``, its
    agent's directory and its metadata file. Returns False when there was nothing to remove.
    Live ``LocalSandbox`` objects should use :meth:`LocalSandbox.dispose` instead.
    """
    root = Path(root_dir) if root_dir is not None else default_root()
    if not _ID_RE.fullmatch(sandbox_id):
        return False
    paths = (
        root / sandbox_id,
        _tmp_dir(root, sandbox_id),
        _agent_socket(root, sandbox_id),
        root / f"{sandbox_id}.json",
    )
    if not any(path.exists() for path in paths):
        return False
    _remove(root, sandbox_id, sweep=True)
    return True


def _tmp_dir(root: Path, sandbox_id: str) -> Path:
    # Hidden, so listings of the root do not take it for a sandbox.
    return root / f".{sandbox_id}.tmp"


def _agent_socket(root: Path, sandbox_id: str) -> Path:
    """Where the agent listens: beside the sandbox on the host (hidden, never visible inside,
    only our user may connect)."""
    return root / f".{sandbox_id}.sock"


# Agents this process spawned and has not reaped yet (a kept sandbox's agent ends later).
_children: set[int] = set()


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[-1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _stop_child(pid: int, wait_s: float) -> None:
    """Wait up to ``wait_s`` for our agent ``pid`` to exit, else kill its tree; reap it."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = -1
    try:
        if pidfd >= 0 and wait_s > 0:
            select.select([pidfd], [], [], wait_s)
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if not done:
            kill_tree(pid, group=False)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        _children.discard(pid)
        _network.reap_exited(_children)


def _recorded_agent(agent: object) -> int | None:
    """The pid of an agent recorded in a metadata file, if it is still that process."""
    if not isinstance(agent, dict):
        return None
    pid, start = agent.get("pid"), agent.get("start")
    if not isinstance(pid, int) or pid <= 1:
        return None
    if isinstance(start, int) and start and _start_time(pid) != start:
        return None  # gone, and the pid reused by someone else
    return pid


def _wait_agent(agent: object, wait_s: float) -> None:
    """Wait up to ``wait_s`` for an agent recorded in a metadata file (not our child) to exit."""
    try:
        # Opened before the pid is checked: it then names that process even if it exits.
        pidfd = os.pidfd_open(agent["pid"]) if isinstance(agent, dict) else -1
    except (OSError, TypeError, KeyError):
        return
    try:
        if pidfd >= 0 and _recorded_agent(agent) is not None:
            select.select([pidfd], [], [], wait_s)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _kill_agent(agent: object) -> None:
    """Kill the tree of an agent recorded in a metadata file, if it is still that process."""
    pid = _recorded_agent(agent)
    if pid is None:
        return
    kill_tree(pid, group=False)
    if pid in _children:
        _stop_child(pid, 0.0)


def _remove(root: Path, sandbox_id: str, *, sweep: bool) -> None:
    directory = root / sandbox_id
    if sweep:
        _kill_agent((_read_json(root / f"{sandbox_id}.json") or {}).get("agent"))
        if directory.is_dir():
            _kill_dwellers(directory)
    _agent_socket(root, sandbox_id).unlink(missing_ok=True)
    for tree in (directory, _tmp_dir(root, sandbox_id)):
        try:
            os.rmdir(tree)  # the common case of a short-lived sandbox: one call, not a walk
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(tree, onerror=_make_removable)
    (root / f"{sandbox_id}.json").unlink(missing_ok=True)


def _make_removable(function: Callable[..., Any], path: str, exc_info: Any) -> None:
    if isinstance(exc_info[1], FileNotFoundError):
        return
    # A command may have made a directory read-only; as its owner we may restore the bits.
    parent = os.path.dirname(path)
    try:
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _kill_dwellers(directory: Path) -> None:
    """Kill processes that belong to the sandbox but are not below its agent any more.

    Recognised by what the sandbox gave them, never by the directory alone (a developer's shell
    may sit in a kept sandbox's directory): without bwrap, ``HOME`` set to the directory; under
    bwrap, a foreign mount namespace whose working directory is the sandbox's.
    """
    home = b"HOME=" + os.fsencode(directory)
    try:
        root_stat = directory.stat()
        own_mounts = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return
    killed: list[int] = []
    try:
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as handle:
                    ours = home in handle.read().split(b"\0")
                if not ours and os.readlink(f"/proc/{name}/ns/mnt") != own_mounts:
                    info = os.stat(f"/proc/{name}/cwd")
                    ours = (info.st_dev, info.st_ino) == (root_stat.st_dev, root_stat.st_ino)
                if ours:
                    # Opened first: it then names this process, not a later one with its pid.
                    pidfd = os.pidfd_open(int(name))
                    killed.append(pidfd)
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                continue
        # SIGKILL takes effect when the victim next runs: wait for that (briefly), so that
        # nothing of the sandbox is left running once dispose() returns.
        deadline = time.monotonic() + _AGENT_EXIT_S
        for pidfd in killed:
            select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        for pidfd in killed:
            os.close(pidfd)
