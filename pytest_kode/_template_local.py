"""Templates for local sandboxes: build a template directory once, copy it into each sandbox.

A built template lives in ``<cache>/<digest>/`` (see :func:`default_cache_dir`):

* ``tree/``  what the sandbox's ``work_dir`` starts with; every sandbox gets its own full copy
  (``cp --reflink=auto`` semantics: copy-on-write where the file system can, a real copy where it
  cannot). Never hardlinks: sandbox commands may run as root, and root writes through any
  hardlink whatever its mode bits, which would change the template for every later sandbox.
* ``venv/``  the pip packages, in a virtualenv shared by every sandbox of the template. It is
  not copied: sandboxes see it read-only (a read-only bind mount under bubblewrap) at its real
  path, with its ``bin`` first on ``PATH``.
* ``npm/``   npm packages (``node_modules/.bin`` on ``PATH``, ``NODE_PATH``), shared the same way.
* ``ready.json``  written last; a directory without it is a build that died and is redone.

Builds run inside the same isolation as the sandboxes (bubblewrap when it works): the tree is
mounted at ``work_dir`` and only the tree, the venv and the npm prefix are writable, so a build
command can never change the host. A ``filelock`` per digest makes concurrent processes (xdist
workers, parallel runs) build once and wait for each other.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pytest_kode._threads import start_thread
from pytest_kode.errors import BackendUnavailableError, ConfigError, KodeError, SandboxCreateError
from pytest_kode.options import TemplateSpec

__all__ = [
    "BuildStep",
    "LocalTemplate",
    "LocalTemplateBuilder",
    "LogCallback",
    "default_cache_dir",
    "missing_apt_packages",
    "steps_from_spec",
]

LogCallback = Callable[[str], None]
StepKind = Literal["apt", "pip", "npm", "run", "workdir", "env"]

_READY = "ready.json"
_LOCK_TIMEOUT_S = 1800.0
_STEP_TIMEOUT_S = 1800.0
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pip settings a user points the build at (wheelhouses, mirrors): passed to the build only.
_PIP_ENV = re.compile(r"PIP_[A-Z0-9_]+")
_BACKEND = "local"


def default_cache_dir() -> Path:
    """``$KODE_TEMPLATE_CACHE``, else ``$XDG_CACHE_HOME/pytest-kode/templates`` (``~/.cache``)."""
    configured = os.environ.get("KODE_TEMPLATE_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "pytest-kode", "templates")


@dataclasses.dataclass(frozen=True)
class BuildStep:
    """One thing a template build does, whatever produced it (a TemplateSpec, E2B build steps)."""

    kind: StepKind
    args: tuple[str, ...] = ()


def steps_from_spec(spec: TemplateSpec) -> list[BuildStep]:
    """The build steps of ``spec``, in the order E2B runs them (packages, workdir, commands)."""
    steps: list[BuildStep] = []
    if spec.apt_packages:
        steps.append(BuildStep("apt", spec.apt_packages))
    if spec.pip_packages:
        steps.append(BuildStep("pip", spec.pip_packages))
    if spec.npm_packages:
        steps.append(BuildStep("npm", spec.npm_packages))
    if spec.work_dir:
        steps.append(BuildStep("workdir", (spec.work_dir,)))
    steps += [BuildStep("run", (command,)) for command in spec.build_commands]
    return steps


@dataclasses.dataclass(frozen=True)
class LocalTemplate:
    """A built local template: what a LocalSandbox needs to start from it."""

    digest: str
    directory: Path
    work_dir: str
    path_dirs: tuple[str, ...] = ()
    envs: tuple[tuple[str, str], ...] = ()
    shared: tuple[str, ...] = ()
    built: bool = False
    """True when this call built it, False when it came from the cache."""

    @property
    def tree(self) -> Path:
        return self.directory / "tree"

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
        starts in the background, so a run that makes many sandboxes of a template mostly pays a
        rename.
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
            _copy_tree(self.tree, directory)
        if (self.tree, root) not in _SPARES.cross_device:
            _SPARES.refill(self.tree)


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
            _copy_tree(tree, spare)
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


def _copy_tree(source: Path, target: Path) -> None:
    # Plain syscalls (open/sendfile/utime): shutil.copy2's copystat and xattr probing cost
    # several times the copy itself for the small files templates are made of. Modes and
    # mtimes follow, so tools that compare timestamps behave as on E2B.
    with os.scandir(source) as scan:
        entries = list(scan)
    for entry in entries:
        destination = os.path.join(target, entry.name)
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(entry.path), destination)
            continue
        if stat.S_ISDIR(info.st_mode):
            os.mkdir(destination, 0o700)
            _copy_tree(Path(entry.path), Path(destination))
        elif stat.S_ISREG(info.st_mode):
            _copy_file(entry.path, destination, info.st_size)
        else:
            continue  # sockets, fifos, devices: nothing a template should hand out
        os.chmod(destination, stat.S_IMODE(info.st_mode))
        os.utime(destination, ns=(info.st_atime_ns, info.st_mtime_ns))


def _copy_file(source: str, destination: str, size: int) -> None:
    reader = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        writer = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            left = size
            while left > 0:
                sent = os.sendfile(writer, reader, None, left)
                if sent == 0:
                    break
                left -= sent
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def missing_apt_packages(packages: Sequence[str]) -> list[str]:
    """The Debian packages of ``packages`` not installed on this host (``name=version`` allowed).

    Raises BackendUnavailableError when the host has no ``dpkg-query`` to ask.
    """
    if not packages:
        return []
    dpkg = shutil.which("dpkg-query")
    if dpkg is None:
        raise BackendUnavailableError(
            "the template wants apt packages ("
            + ", ".join(packages)
            + ") but this host has no dpkg-query to check them (not Debian/Ubuntu)",
            backend=_BACKEND,
            hint="install the equivalent packages with the host's package manager and drop "
            "apt_packages for local runs, or use the e2b backend (--sandbox-backend=e2b)",
        )
    missing = []
    for package in packages:
        name = re.split(r"[=:<>]", package, maxsplit=1)[0].strip()
        completed = subprocess.run(
            [dpkg, "-W", "-f=${db:Status-Abbrev}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0 or not completed.stdout.startswith("ii"):
            missing.append(package)
    return missing


class LocalTemplateBuilder:
    """Builds local templates into ``cache_dir`` (default :func:`default_cache_dir`), once each.

    ``isolation`` is the local backend's (``"bwrap"`` or ``"none"``); ``on_log`` receives each
    line of build output as it happens.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        isolation: str | None = None,
        on_log: LogCallback | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._isolation = isolation
        self._on_log = on_log
        self._memo: dict[str, LocalTemplate] = {}
        self._memo_lock = threading.Lock()

    @property
    def isolation(self) -> str:
        if self._isolation is None:
            from pytest_kode.backends.local import detect_isolation

            self._isolation = detect_isolation()
        return self._isolation

    # -- public entry points ----------------------------------------------------------------
    def prepare(
        self,
        spec: TemplateSpec,
        *,
        work_dir: str = "/home/user",
        on_log: LogCallback | None = None,
    ) -> LocalTemplate:
        """The built template for ``spec`` with its files at ``work_dir`` (built, or cached).

        ``spec.work_dir`` must be ``work_dir`` or below it (the template layer makes the
        sandbox's work_dir the template's, so that holds there).
        """
        if spec.base == "custom" or spec.dockerfile is not None:
            raise BackendUnavailableError(
                "the local backend cannot build a Dockerfile template (base='custom' / "
                "dockerfile=...)",
                backend=_BACKEND,
                hint="use the e2b backend (--sandbox-backend=e2b) for Dockerfile templates, or "
                "describe the image with base/apt_packages/pip_packages/build_commands",
            )
        interpreter = self._python_for(spec) if spec.base == "python" or spec.pip_packages else None
        if spec.base == "node" or spec.npm_packages:
            self._check_node(spec)
        digest = spec.digest()
        if work_dir != (spec.work_dir or "/home/user"):
            # The tree's absolute paths depend on where it is built: another work_dir is
            # another template.
            digest += "-" + hashlib.sha256(work_dir.encode()).hexdigest()[:8]
        return self.prepare_steps(
            digest,
            steps_from_spec(spec),
            work_dir=work_dir,
            python=interpreter,
            venv=interpreter is not None,
            on_log=on_log,
        )

    def prepare_steps(
        self,
        digest: str,
        steps: Sequence[BuildStep],
        *,
        work_dir: str,
        python: str | None = None,
        venv: bool = False,
        on_log: LogCallback | None = None,
        login_profile: bool = False,
    ) -> LocalTemplate:
        """The built template ``digest`` made of ``steps`` (what the emulator builds from).

        ``login_profile`` also writes the template's PATH and variables to ``~/.profile`` in the
        tree, for sandboxes whose commands run in login shells (the emulator's).
        """
        log = on_log or self._on_log or _quiet
        with self._memo_lock:
            known = self._memo.get(digest)
        if known is not None:
            return dataclasses.replace(known, built=False)
        missing = missing_apt_packages(
            [pkg for step in steps if step.kind == "apt" for pkg in step.args]
        )
        if missing:
            raise BackendUnavailableError(
                "the template needs apt packages this host does not have: " + ", ".join(missing),
                backend=_BACKEND,
                hint=f"install them on the host (`sudo apt-get install -y {' '.join(missing)}`), "
                "or run these tests on the e2b backend (--sandbox-backend=e2b), which installs "
                "apt packages into the template image",
            )
        import filelock

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        directory = self.cache_dir / digest
        lock = filelock.FileLock(str(self.cache_dir / f"{digest}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            log(f"template {digest}: waiting for another process that is building it")
            try:
                lock.acquire(timeout=_LOCK_TIMEOUT_S)
            except filelock.Timeout as exc:
                raise SandboxCreateError(
                    f"gave up after {_LOCK_TIMEOUT_S:.0f}s waiting for the build lock of template "
                    f"{digest} ({lock.lock_file})",
                    backend=_BACKEND,
                    hint="a build is stuck or its process hangs; stop it, or delete the lock file",
                ) from exc
        try:
            template = self._load(directory, digest, log)
            if template is None:
                template = self._build(
                    directory, digest, steps, work_dir, python, venv, log, login_profile
                )
        finally:
            lock.release()
        with self._memo_lock:
            self._memo[digest] = template
        return template

    # -- checks -----------------------------------------------------------------------------
    def _python_for(self, spec: TemplateSpec) -> str:
        version = spec.base_version if spec.base == "python" else None
        running = f"{sys.version_info.major}.{sys.version_info.minor}"
        if version is None or running == version or running.startswith(version + "."):
            return sys.executable
        found = shutil.which(f"python{version}")
        if found is None:
            raise BackendUnavailableError(
                f"the template wants Python {version} (base='python', base_version={version!r}) "
                f"but there is no python{version} on this host's PATH (running Python is {running})",
                backend=_BACKEND,
                hint=f"install Python {version} on the host, drop base_version to use Python "
                f"{running}, or use the e2b backend",
            )
        return found

    def _check_node(self, spec: TemplateSpec) -> None:
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or (spec.npm_packages and npm is None):
            lacking = " and ".join(
                name for name, path in (("node", node), ("npm", npm)) if not path
            )
            raise BackendUnavailableError(
                f"the template needs {lacking} (base={spec.base!r}, npm_packages="
                f"{list(spec.npm_packages)}) but this host has none on PATH",
                backend=_BACKEND,
                hint="install Node.js on the host (`sudo apt-get install -y nodejs npm`), "
                "or use the e2b backend",
            )
        if spec.base == "node" and spec.base_version and spec.base_version != "lts":
            found = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
            major = found.stdout.strip().lstrip("v").split(".")[0]
            if major != spec.base_version.split(".")[0]:
                raise BackendUnavailableError(
                    f"the template wants Node {spec.base_version} but the host has "
                    f"{found.stdout.strip() or 'an unknown version'}",
                    backend=_BACKEND,
                    hint="install that Node version on the host, drop base_version, or use the "
                    "e2b backend",
                )

    # -- cache --------------------------------------------------------------------------------
    def _load(self, directory: Path, digest: str, log: LogCallback) -> LocalTemplate | None:
        try:
            data = json.loads((directory / _READY).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("digest") != digest:
            return None
        log(f"template {digest}: cached at {directory}")
        return LocalTemplate(
            digest=digest,
            directory=directory,
            work_dir=str(data["work_dir"]),
            path_dirs=tuple(data.get("path_dirs", ())),
            envs=tuple((str(k), str(v)) for k, v in data.get("envs", {}).items()),
            shared=tuple(data.get("shared", ())),
            built=False,
        )

    # -- building -----------------------------------------------------------------------------
    def _build(
        self,
        directory: Path,
        digest: str,
        steps: Sequence[BuildStep],
        work_dir: str,
        python: str | None,
        venv: bool,
        log: LogCallback,
        login_profile: bool,
    ) -> LocalTemplate:
        started = time.monotonic()
        if directory.exists():
            log(f"template {digest}: removing an unfinished earlier build")
            shutil.rmtree(directory)
        tree = directory / "tree"
        tree.mkdir(parents=True)
        path_dirs: list[str] = []
        envs: dict[str, str] = {}
        build_envs: dict[str, str] = {}  # ENV steps: build time only, as on E2B
        shared: list[str] = []
        try:
            log(f"template {digest}: building in {directory} (isolation: {self.isolation})")
            venv_dir = directory / "venv"
            if venv or any(step.kind == "pip" for step in steps):
                self._host_run(
                    [python or sys.executable, "-m", "venv", "--without-pip", str(venv_dir)],
                    "create the virtualenv",
                )
                path_dirs.append(str(venv_dir / "bin"))
                envs["VIRTUAL_ENV"] = str(venv_dir)
                shared.append(str(venv_dir))
            npm_dir = directory / "npm"
            if any(step.kind == "npm" for step in steps):
                npm_dir.mkdir()
                path_dirs.append(str(npm_dir / "node_modules" / ".bin"))
                envs["NODE_PATH"] = str(npm_dir / "node_modules")
                shared.append(str(npm_dir))
            current = work_dir
            for step in steps:
                if step.kind == "apt":
                    log(f"apt packages present on the host: {' '.join(step.args)}")
                elif step.kind == "pip":
                    self._in_sandbox(
                        log,
                        tree,
                        work_dir,
                        current,
                        path_dirs,
                        {**envs, **build_envs},
                        shared,
                        digest,
                        # pip of the building interpreter, installing into the venv: the venv
                        # itself stays small (no pip of its own), and wheels build in isolation.
                        [
                            python or sys.executable,
                            "-m",
                            "pip",
                            "--python",
                            str(venv_dir / "bin" / "python"),
                            "install",
                            "--no-input",
                            "--disable-pip-version-check",
                            "--no-cache-dir",
                            *step.args,
                        ],
                        f"pip install {' '.join(step.args)}",
                        package_step=True,
                    )
                elif step.kind == "npm":
                    npm = shutil.which("npm") or "npm"
                    self._in_sandbox(
                        log,
                        tree,
                        work_dir,
                        current,
                        path_dirs,
                        {**envs, **build_envs},
                        shared,
                        digest,
                        [
                            npm,
                            "install",
                            "--no-audit",
                            "--no-fund",
                            "--prefix",
                            str(npm_dir),
                            *step.args,
                        ],
                        f"npm install {' '.join(step.args)}",
                        package_step=True,
                    )
                elif step.kind == "workdir":
                    current = step.args[0]
                    if not _below(current, work_dir):
                        raise ConfigError(
                            f"template workdir {current!r} is outside the sandbox's work_dir "
                            f"{work_dir!r}; the local backend keeps a template's files below "
                            "work_dir",
                        )
                    (tree / os.path.relpath(current, work_dir)).mkdir(parents=True, exist_ok=True)
                elif step.kind == "env":
                    build_envs.update(zip(step.args[::2], step.args[1::2], strict=True))
                else:
                    self._in_sandbox(
                        log,
                        tree,
                        work_dir,
                        current,
                        path_dirs,
                        {**envs, **build_envs},
                        shared,
                        digest,
                        ["bash", "-c", step.args[0]],
                        step.args[0],
                    )
            if login_profile and (path_dirs or envs):
                # A login shell (`bash -l`, as the e2b SDK runs commands) resets PATH in
                # /etc/profile, then reads ~/.profile: put the template's additions there.
                exports = [f'export PATH={shlex.quote(":".join(path_dirs))}:"$PATH"']
                exports += [f"export {key}={shlex.quote(value)}" for key, value in envs.items()]
                with open(tree / ".profile", "a", encoding="utf-8") as profile:
                    profile.write("\n".join(exports) + "\n")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        data: dict[str, Any] = {
            "digest": digest,
            "work_dir": work_dir,
            "path_dirs": path_dirs,
            "envs": envs,
            "shared": shared,
            "isolation": self.isolation,
            "built_at": time.time(),
            "build_s": round(time.monotonic() - started, 3),
        }
        ready = directory / _READY
        temporary = directory / f".{_READY}.tmp"
        temporary.write_text(json.dumps(data, sort_keys=True), "utf-8")
        os.replace(temporary, ready)
        log(f"template {digest}: ready in {data['build_s']:.1f}s")
        return LocalTemplate(
            digest=digest,
            directory=directory,
            work_dir=work_dir,
            path_dirs=tuple(path_dirs),
            envs=tuple(envs.items()),
            shared=tuple(shared),
            built=True,
        )

    def _host_run(self, argv: list[str], what: str) -> None:
        # Only for creating the empty virtualenv: no user-supplied code runs on the host.
        completed = subprocess.run(argv, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise SandboxCreateError(
                f"template build failed to {what}: {completed.stderr.strip() or completed.stdout.strip()}",
                backend=_BACKEND,
                hint="check that the host's Python has the venv module (Debian: python3-venv)",
            )

    def _in_sandbox(
        self,
        log: LogCallback,
        tree: Path,
        work_dir: str,
        cwd: str,
        path_dirs: list[str],
        envs: dict[str, str],
        shared: list[str],
        digest: str,
        argv: list[str],
        what: str,
        *,
        package_step: bool = False,
    ) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if key in ("LANG", "LANGUAGE") or key.startswith("LC_") or _PIP_ENV.fullmatch(key)
        }
        env.update(envs)
        env["PATH"] = os.pathsep.join([*path_dirs, os.environ.get("PATH") or _DEFAULT_PATH])
        # Package managers get a scratch HOME and cache, so their dot-files (pip, npm, even
        # rustup probes) never land in the tree every sandbox starts from.
        scratch = tree.parent / ".scratch"
        scratch.mkdir(exist_ok=True)
        env["npm_config_cache"] = str(scratch / "npm-cache")
        bwrap = self.isolation == "bwrap"
        env["HOME"] = str(scratch) if package_step else work_dir if bwrap else str(tree)
        log(f"$ {what}")
        if bwrap:
            from pytest_kode.backends.local import _bwrap

            binds = [(path, True) for path in [*shared, str(scratch)]]
            binds += [(path, False) for path in _find_links(env)]
            prefix = _bwrap.bwrap_argv(str(tree), work_dir, cwd=cwd, binds=binds)
            host_cwd = None
        else:
            prefix = []
            host_cwd = str(tree / os.path.relpath(cwd, work_dir))
        try:
            code, tail = _stream([*prefix, *argv], cwd=host_cwd, env=env, on_line=log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if code != 0:
            raise SandboxCreateError(
                f"template {digest}: build step `{what}` failed with exit code {code}:\n{tail}",
                backend=_BACKEND,
                hint="fix the step (the output above is its last lines); for offline pip "
                "installs set PIP_NO_INDEX=1 and PIP_FIND_LINKS=<wheel dir>",
            )


def _quiet(line: str) -> None:
    del line


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _find_links(env: dict[str, str]) -> list[str]:
    """Local directories named by PIP_FIND_LINKS, which the build must be able to read."""
    found = []
    for item in env.get("PIP_FIND_LINKS", "").split():
        path = item[len("file://") :] if item.startswith("file://") else item
        if os.path.isabs(path) and os.path.exists(path):
            found.append(os.path.realpath(path))
    return found


def _stream(
    argv: list[str], *, cwd: str | None, env: dict[str, str], on_line: LogCallback
) -> tuple[int, str]:
    """Run ``argv``, passing each output line on as it comes; the exit code and the last lines."""
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise KodeError(
            f"cannot start template build step {argv[0]!r}: {exc}",
            backend=_BACKEND,
            hint="check that the tool is installed on the host",
        ) from exc
    timer = threading.Timer(_STEP_TIMEOUT_S, _kill_group, (proc.pid,))
    timer.daemon = True
    timer.start()
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            on_line(line)
            tail = [*tail[-19:], line]
        code = proc.wait()
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    finally:
        timer.cancel()
        if proc.stdout is not None:
            proc.stdout.close()
        _kill_group(proc.pid)  # whatever a step left running in the background dies with it
    return code, "\n".join(tail)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
