"""The ``local`` backend: sandboxes that are directories on this machine, isolated by bubblewrap.

Each sandbox is a fresh directory ``<root>/<sandbox_id>`` that stands for ``work_dir``; a JSON
file ``<root>/<sandbox_id>.json`` beside it records what a resume, ``pytest-kode ls/gc`` or a
watchdog need (creation time, deadline, isolation, metadata, the names of the envs). With
bubblewrap every command runs in its own mount and pid namespace with the directory mounted at
``work_dir``; without it, commands run as a plain process group inside the directory.

Lifetime: a sandbox ends at its deadline (``timeout_ms`` after creation or connection, moved by
``set_timeout``), as an E2B sandbox does. Past it, the object refuses work (``exec``, ``start``,
``fs``, ``set_timeout`` raise ``SandboxNotFoundError``; ``is_alive()`` is False). Under the pytest
plugin the run's watchdog (:mod:`pytest_kode.lifecycle.watchdog`) also kills the sandbox's
processes and removes its files at the deadline, even when the test process crashed. Used without
pytest nobody does: the directory and any background process stay until ``dispose()`` (or
:func:`remove_local_sandbox`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pytest_kode.backends.local import _bwrap, _network, _process
from pytest_kode.backends.local._fs import LocalFS
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
from pytest_kode.sandbox import ExecResult, Sandbox, check_call_args, check_envs

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
_KILLED = 128 + signal.SIGKILL  # the exit code of a command the watchdog killed


def detect_isolation() -> str:
    """What ``isolation="auto"`` gives: ``"bwrap"`` when bubblewrap works on this machine and
    the switch (``$KODE_SANDBOX_ISOLATION``, ``--sandbox-isolation``) is not ``none``."""
    if _bwrap.requested_isolation() == "none":
        return "none"
    return "bwrap" if _bwrap.diagnose().works else "none"


def default_root() -> Path:
    """Where local sandboxes live: ``$KODE_LOCAL_ROOT`` or ``<tmp>/pytest-kode``."""
    configured = os.environ.get("KODE_LOCAL_ROOT")
    return Path(configured) if configured else Path(tempfile.gettempdir(), "pytest-kode")


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
    """

    backend = "local"

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        isolation: Isolation = "auto",
        root_dir: str | os.PathLike[str] | None = None,
        local_template: TemplateSeed | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(options, **fields)
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
        self._fs: LocalFS | None = None
        self._env: dict[str, str] = {}
        self._prefix: list[str] = []
        self._lock = threading.Lock()
        self._processes: list[LocalProcess] = []
        self._groups: set[int] = set()
        self._meta: dict[str, Any] = {}
        self._tmp: str | None = None
        self._network: _network.SandboxNetwork | None = None  # bwrap only: its own namespace
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
    def fs(self) -> LocalFS:
        self._require_live()
        assert self._fs is not None
        return self._fs

    def host_path(self, path: str) -> Path:
        """The host path of in-sandbox ``path`` (confined; SandboxPathError when it escapes)."""
        return self.fs.host_path(path)

    def get_host_url(self, port: int) -> str:
        """A URL on the host's 127.0.0.1 reaching ``port`` inside the sandbox.

        Under bubblewrap, a free host port relayed into the sandbox's own network (set up on
        first ask, closed at ``dispose()``); without isolation the sandbox shares the host's
        network, so it is the port itself.
        """
        port = self._port_arg(port)
        self._require_live()
        if self._network is None:
            return f"http://127.0.0.1:{port}"
        return self._network.host_url(port)

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

    def _prepare(self, directory: Path) -> None:
        self._dir = directory
        self._fs = LocalFS(
            self.options.work_dir, str(directory), backend=self.backend, sandbox_id=self.sandbox_id
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
            tmp.mkdir(mode=0o700, exist_ok=True)
            self._tmp = str(tmp)
            # Its own network namespace, made while the files are set up; ready at init's end.
            self._network = _network.SandboxNetwork(
                internet=self.options.allow_internet_access, sandbox_id=self.sandbox_id
            ).start()
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

    def _launcher(self, cwd: str | None = None) -> list[str]:
        """The bwrap prefix that runs a command in this sandbox, inside its own network."""
        assert self._dir is not None and self._network is not None
        return _bwrap.bwrap_argv(
            str(self._dir),
            self.options.work_dir,
            network=self._network,
            cwd=cwd,
            binds=self._template_binds(),
            tmp_dir=self._tmp,
        )

    def _template_binds(self) -> list[tuple[str, bool]]:
        # The template's venv may sit under /tmp, private in bwrap: show it, read-only.
        shared = self._local_template.shared if self._local_template is not None else ()
        return [(path, False) for path in shared]

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
                sandbox_id = _ID_PREFIX + secrets.token_hex(6)
                directory = self.root_dir / sandbox_id
                try:
                    directory.mkdir(mode=0o755)
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
        self._prepare(directory)
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
        self._write_meta(new=True)
        self._deadline = self._meta["deadline"]
        self._prefix = self._launcher() if self._network is not None else []

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
        self._prepare(directory)
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
        self._meta = meta
        try:
            self._write_meta()
            self._prefix = self._launcher() if self._network is not None else []
        except BaseException:
            self._drop_network()
            raise
        self._deadline = meta["deadline"]

    def _drop_network(self) -> None:
        if self._network is not None:
            self._network.close()

    def _detach(self) -> None:
        # The network's helpers belong to this object; the sandbox's files stay.
        self._drop_network()

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

    def _placement(self, cwd: str | None) -> tuple[list[str], str | None]:
        """The argv prefix and the host cwd for a command run in ``cwd``."""
        assert self._dir is not None and self._fs is not None
        bwrap = self._isolation == "bwrap"
        if cwd is None:
            return self._prefix, None if bwrap else str(self._dir)
        inside = posixpath.normpath(posixpath.join(self.options.work_dir, str(cwd)))
        prefix = self.options.work_dir.rstrip("/") + "/"
        if inside == self.options.work_dir or inside.startswith(prefix):
            try:
                host: Path | None = self._fs.host_path(inside)
            except FileNotFoundError:
                host = None  # a missing parent: the same answer as a missing cwd
            if host is None or not host.is_dir():
                raise self._fail(
                    SandboxFileNotFoundError,
                    f"cwd {inside!r} is not an existing directory in the sandbox",
                    "create it first (fs.mkdir) or pass another cwd",
                )
            inside = posixpath.join(self.options.work_dir, *host.relative_to(self._dir).parts)
            if not bwrap:
                return [], str(host)
        elif not bwrap:
            # Without isolation a cwd outside work_dir is simply a host directory.
            if not os.path.isdir(inside):
                raise self._fail(
                    SandboxFileNotFoundError,
                    f"cwd {inside!r} is not an existing directory",
                    "pass a directory below work_dir or an existing host directory",
                )
            return [], inside
        return self._launcher(inside), None

    def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        env = self._command_env(envs)
        prefix, host_cwd = self._placement(cwd)
        try:
            outcome = _process.run(
                [*prefix, "bash", "-c", command],
                cwd=host_cwd,
                env=env,
                stdin=stdin,
                timeout_s=timeout_ms / 1000.0,
                limit=self.options.max_output_bytes,
            )
        except OSError as exc:
            raise self._spawn_error(command, exc) from exc
        if time.time() >= self._deadline and (
            outcome.exit_code == _KILLED or self._dir is None or not self._dir.is_dir()
        ):
            # The watchdog ended the sandbox under the command (it kills, then removes): that is
            # no result of the command's, as on E2B.
            self._require_unexpired()
        if outcome.lingering_pgid is not None:
            with self._lock:
                # Forget groups that emptied, so dispose never signals a recycled pgid.
                self._groups = {pgid for pgid in self._groups if _process.group_alive(pgid)}
                self._groups.add(outcome.lingering_pgid)
        if outcome.exit_code == 1 and prefix:
            self._check_bwrap_failure(command, outcome.stderr.getvalue())
        out = outcome.stdout.getvalue()
        return ExecResult(
            command=command,
            exit_code=outcome.exit_code,
            stdout=out.decode("utf-8", "replace"),
            stderr=outcome.stderr.text(),
            duration_ms=outcome.duration_ms,
            timed_out=outcome.timed_out,
            truncated=outcome.stdout.truncated or outcome.stderr.truncated,
            stdout_bytes=out,
        )

    def _check_bwrap_failure(self, command: str, stderr: bytes) -> None:
        # bwrap (and nsenter, entering the sandbox's network) report their own failures as exit 1
        # with a "bwrap: " line; that is the sandbox failing, not the command, so it must not
        # pass for a command's result.
        if not stderr.startswith((b"bwrap: ", b"nsenter: ")):
            return
        if not self.is_alive():
            raise self._fail(
                SandboxNotFoundError,
                f"cannot run {command!r}: the sandbox's directory is gone",
                "the sandbox was disposed or removed; create a new one",
            )
        detail = stderr.decode("utf-8", "replace").strip().splitlines()[0]
        if self._network is not None and not self._network.alive():
            raise self._fail(
                KodeError,
                f"cannot run {command!r}: the sandbox's network helper died ({detail})",
                "the sandbox lost its network; dispose of it and create a new one",
            )
        raise self._fail(
            KodeError,
            f"bubblewrap could not set up the sandbox to run {command!r}: {detail}",
            "check the cwd and work_dir; run with isolation='none' to compare",
        )

    def _spawn_error(self, what: str, exc: OSError) -> KodeError:
        if not self.is_alive():
            return self._fail(
                SandboxNotFoundError,
                f"cannot run {what!r}: the sandbox's directory is gone",
                "the sandbox was disposed or removed; create a new one",
            )
        return self._fail(
            KodeError,
            f"cannot start {what!r}: {exc}",
            "check that bash and the command exist on this machine",
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
    ) -> LocalProcess:
        """Run ``argv`` in the background inside the sandbox's isolation, streaming its output.

        Same environment and cwd rules as :meth:`exec`. ``on_stdout``/``on_stderr`` receive each
        chunk from a reader thread as it arrives; the output is also kept (bounded) on the
        handle. ``stdin=True`` gives the process a pipe for ``send_stdin``; otherwise /dev/null.
        The process is not bound by ``exec_timeout_ms`` and dies with the sandbox.
        """
        self._require_live()
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"spawn() needs a non-empty list of str, got {argv!r}")
        env = self._command_env(envs)
        prefix, host_cwd = self._placement(cwd)
        bwrap = self._isolation == "bwrap"
        try:
            proc = _process.popen(
                [*prefix, *argv], cwd=host_cwd, env=env, stdin=stdin, pin_parent=bwrap
            )
        except OSError as exc:
            raise self._spawn_error(shlex.join(argv), exc) from exc
        handle = LocalProcess(
            proc,
            shlex.join(argv),
            limit=self.options.max_output_bytes,
            bwrap=bwrap,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            sandbox_id=self._sandbox_id,
        )
        with self._lock:
            done = [process for process in self._processes if process.finished()]
            self._processes = [process for process in self._processes if process not in done]
            self._processes.append(handle)
        for process in done:
            process.close_stdin()
        return handle

    def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> LocalProcess:
        if not isinstance(command, str):
            raise ConfigError(f"start() needs the command as a str, got {type(command).__name__}")
        check_call_args("start", cwd=cwd, envs=envs)
        handle = self.spawn(["bash", "-c", command], cwd=cwd, envs=envs)
        handle.command = command
        return handle

    # -- lifetime ---------------------------------------------------------------------------
    def set_timeout(self, timeout_ms: int) -> None:
        """Set the remaining lifetime to ``timeout_ms`` from now (recorded in the metadata file).

        Past the deadline this object raises ``SandboxNotFoundError``; under the pytest plugin
        the run's watchdog, which reads the metadata file, also removes the sandbox then. An
        ended sandbox cannot be revived: this raises ``SandboxNotFoundError`` too.
        """
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ConfigError(f"set_timeout(timeout_ms=...) needs an int > 0, got {timeout_ms!r}")
        self._require_live()
        previous = dict(self._meta)
        self._meta["deadline"] = time.time() + timeout_ms / 1000.0
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

    def _dispose(self) -> None:
        if self._network is not None:
            self._network.stop()  # its helpers exit while the rest is torn down
        with self._lock:
            processes, self._processes = self._processes, []
            groups, self._groups = self._groups, set()
        for process in processes:
            process.close()
        for pgid in groups:
            _process.kill_group(pgid, signal.SIGKILL)
        if self._dir is not None and self._sandbox_id is not None:
            # Without a pid namespace a daemon may have left our process groups (setsid); a
            # resumed sandbox may have processes started by another LocalSandbox object.
            _remove(
                self.root_dir,
                self._sandbox_id,
                sweep=self._isolation != "bwrap" or self.resumed,
            )
        self._drop_network()


def remove_local_sandbox(sandbox_id: str, root_dir: str | os.PathLike[str] | None = None) -> bool:
    """Remove a local sandbox left on disk, whatever its state: for gc and watchdogs.

    Kills the processes that still belong to it, then removes its directory, its ``/tmp`` and
    its metadata file. Returns False when there was nothing to remove. Live ``LocalSandbox``
    objects should use :meth:`LocalSandbox.dispose` instead.
    """
    root = Path(root_dir) if root_dir is not None else default_root()
    if not _ID_RE.fullmatch(sandbox_id):
        return False
    paths = (root / sandbox_id, _tmp_dir(root, sandbox_id), root / f"{sandbox_id}.json")
    if not any(path.exists() for path in paths):
        return False
    _remove(root, sandbox_id, sweep=True)
    return True


def _tmp_dir(root: Path, sandbox_id: str) -> Path:
    # Hidden, so listings of the root do not take it for a sandbox.
    return root / f".{sandbox_id}.tmp"


def _remove(root: Path, sandbox_id: str, *, sweep: bool) -> None:
    directory = root / sandbox_id
    if sweep and directory.is_dir():
        _kill_dwellers(directory)
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
    """Kill processes that belong to the sandbox but escaped its process groups.

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
                os.kill(int(name), signal.SIGKILL)
        except OSError:
            continue
