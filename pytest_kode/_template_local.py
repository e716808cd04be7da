"""Templates for local sandboxes: build a template directory once, copy it into each sandbox.

A built template lives in ``<cache>/<digest>/`` (see :func:`default_cache_dir`):

* ``tree/``  what the sandbox's ``work_dir`` starts with; every sandbox gets its own full copy
  (made by the backend from the :class:`LocalTemplate` seed, see
  :mod:`pytest_kode.backends.local._seed`; never hardlinks).
* ``venv/``  the pip packages, in a virtualenv shared by every sandbox of the template. It is
  not copied: sandboxes see it read-only (a read-only bind mount under bubblewrap) at its real
  path, with its ``bin`` first on ``PATH``.
* ``npm/``   npm packages (``node_modules/.bin`` on ``PATH``, ``NODE_PATH``), shared the same way.
* ``ready.json``  written last; a directory without it is a build that died and is redone.

Builds run inside the same isolation as the sandboxes (bubblewrap when it works): the tree is
mounted at ``work_dir`` and only the tree, the venv, the npm prefix and the build's own ``/tmp``
are writable, so a build command can never change the host. Local sources (``files``, paths in
``pip_packages``/``npm_packages``) are copied in by COPY steps on this side: into the tree, or
into the build's ``/tmp/kode-sources`` from which pip/npm install them (gone after the build). A ``filelock`` per digest makes concurrent processes (xdist
workers, parallel runs) build once and wait for each other.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import json
import os
import posixpath
import re
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
from typing import Any, Literal, cast

from pytest_kode._template_sources import (
    NPM_COPY,
    SOURCES_DIR,
    Filter,
    LocalSource,
    check_wheel,
    content_digest,
    copy_filtered,
    resolve_sources,
    sandbox_entry,
)
from pytest_kode.backends.local._network import agent_python
from pytest_kode.backends.local._seed import TemplateSeed, copy_tree
from pytest_kode.errors import (
    BackendUnavailableError,
    KodeError,
    SandboxCreateError,
    TemplateBuildError,
)
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
StepKind = Literal["apt", "copy", "pip", "npm", "run", "workdir", "env"]

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
    """One thing a template build does, whatever produced it (a TemplateSpec, E2B build steps).

    ``copy`` steps are ``(host path, sandbox destination, filter)``: a directory's contents go
    into the destination, a file goes to it (or into it when it ends with ``/``), as Docker's
    COPY does; ``filter`` names what a source walk leaves out ("" for nothing, else a
    :data:`~pytest_kode._template_sources.Filter`).
    """

    kind: StepKind
    args: tuple[str, ...] = ()
    label: str = ""
    """The spec step this came from, for error messages (e.g. ``files['data']``)."""


def steps_from_spec(spec: TemplateSpec, sources: Sequence[LocalSource] = ()) -> list[BuildStep]:
    """The build steps of ``spec``, in the order E2B runs them: apt, files, pip, npm, workdir,
    commands. Local pip/npm sources are first copied to ``/tmp/kode-sources/<n>`` (the build's
    own /tmp) and installed from there; ``sources`` are ``spec``'s, from
    :func:`~pytest_kode._template_sources.resolve_sources`."""
    steps: list[BuildStep] = []
    if spec.apt_packages:
        steps.append(BuildStep("apt", spec.apt_packages))
    for source in sources:
        if source.step == "files":
            steps.append(
                BuildStep(
                    "copy",
                    (str(source.path), source.destination, source.filter),
                    source.label,
                )
            )
    by_entry: dict[tuple[str, str], tuple[int, LocalSource]] = {
        (s.step, s.entry): (index, s) for index, s in enumerate(sources)
    }
    for step, kind, entries in (
        ("pip_packages", "pip", spec.pip_packages),
        ("npm_packages", "npm", spec.npm_packages),
    ):
        if not entries:
            continue
        args: list[str] = []
        for entry in entries:
            found = by_entry.get((step, entry))
            if found is None:
                args.append(entry)
                continue
            index, source = found
            folder, installed = sandbox_entry(source, index)
            steps.append(
                BuildStep("copy", (str(source.path), folder + "/", source.filter), source.label)
            )
            args.append(installed)
            if kind == "npm" and source.kind == "npm-dir" and NPM_COPY not in args:
                args.insert(0, NPM_COPY)
        steps.append(BuildStep(kind, tuple(args), step))  # type: ignore[arg-type]
    if spec.work_dir:
        steps.append(BuildStep("workdir", (spec.work_dir,)))
    steps += [BuildStep("run", (command,)) for command in spec.build_commands]
    return steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalTemplate(TemplateSeed):
    """A built local template: the seed a LocalSandbox starts from, plus where it is cached."""

    digest: str
    directory: Path
    built: bool = False
    """True when this call built it, False when it came from the cache."""


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
        root: str | os.PathLike[str] | None = None,
        sources: Sequence[LocalSource] | None = None,
        on_build: Callable[[], None] | None = None,
    ) -> LocalTemplate:
        """The built template for ``spec`` with its files at ``work_dir`` (built, or cached).

        ``spec.work_dir`` must be ``work_dir`` or below it (the template layer makes the
        sandbox's work_dir the template's, so that holds there). Local sources are resolved
        against ``root`` (default: the current directory) unless already resolved
        (``sources``); the cache key covers their content.
        """
        if spec.base == "custom" or spec.dockerfile is not None:
            raise BackendUnavailableError(
                "the local backend cannot build a Dockerfile template (base='custom' / "
                "dockerfile=...)",
                backend=_BACKEND,
                hint="use the e2b backend (--sandbox-backend=e2b) for Dockerfile templates, or "
                "describe the image with base/apt_packages/pip_packages/build_commands",
            )
        if sources is None:
            sources = resolve_sources(spec, Path(root) if root is not None else Path.cwd())
        interpreter = self._python_for(spec) if spec.base == "python" or spec.pip_packages else None
        if interpreter is not None:
            version = None if interpreter == agent_python() else _version_of(spec)
            for source in sources:
                check_wheel(source, version)
        if spec.base == "node" or spec.npm_packages:
            self._check_node(spec)
        digest = content_digest(spec, sources)
        if work_dir != (spec.work_dir or "/home/user"):
            # The tree's absolute paths depend on where it is built: another work_dir is
            # another template.
            digest += "-" + hashlib.sha256(work_dir.encode()).hexdigest()[:8]
        return self.prepare_steps(
            digest,
            steps_from_spec(spec, sources),
            work_dir=work_dir,
            python=interpreter,
            venv=interpreter is not None,
            system_site_packages=spec.system_site_packages,
            on_log=on_log,
            on_build=on_build,
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
        system_site_packages: bool = False,
        on_build: Callable[[], None] | None = None,
    ) -> LocalTemplate:
        """The built template ``digest`` made of ``steps`` (what the emulator builds from).

        ``login_profile`` also writes the template's PATH and variables to ``~/.profile`` in the
        tree, for sandboxes whose commands run in login shells (the emulator's).
        ``system_site_packages`` lets the venv see the building Python's packages.
        ``on_build`` is called (under the build lock) just before a build starts, when the
        cache does not have it: the template layer logs why it is rebuilt there.
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
                if on_build is not None:
                    on_build()
                template = self._build(
                    directory,
                    digest,
                    steps,
                    work_dir,
                    python,
                    venv,
                    log,
                    login_profile,
                    system_site_packages,
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
            # The base interpreter, out of any venv: builds run it inside the isolation, which
            # shows the Python installation but not a venv in the project checkout.
            return agent_python()
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
            label=digest,
            tree=directory / "tree",
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
        system_site_packages: bool = False,
    ) -> LocalTemplate:
        started = time.monotonic()
        if directory.exists():
            log(f"template {digest}: removing an unfinished earlier build")
            shutil.rmtree(directory)
        tree = directory / "tree"
        tree.mkdir(parents=True)
        job = _Job(
            digest=digest,
            tree=tree,
            work_dir=work_dir,
            # The build's own /tmp, kept from step to step (local sources are copied there
            # and installed from there) and removed with the build's scratch space.
            tmp=directory / ".build-tmp",
            log=log,
        )
        job.tmp.mkdir(mode=0o700)
        try:
            log(f"template {digest}: building in {directory} (isolation: {self.isolation})")
            venv_dir = directory / "venv"
            if venv or any(step.kind == "pip" for step in steps):
                self._host_run(
                    [
                        python or agent_python(),
                        "-m",
                        "venv",
                        "--without-pip",
                        *(["--system-site-packages"] if system_site_packages else []),
                        str(venv_dir),
                    ],
                    "create the virtualenv",
                )
                job.path_dirs.append(str(venv_dir / "bin"))
                job.envs["VIRTUAL_ENV"] = str(venv_dir)
                job.shared.append(str(venv_dir))
            npm_dir = directory / "npm"
            if any(step.kind == "npm" for step in steps):
                npm_dir.mkdir()
                job.path_dirs.append(str(npm_dir / "node_modules" / ".bin"))
                job.envs["NODE_PATH"] = str(npm_dir / "node_modules")
                job.shared.append(str(npm_dir))
            for step in steps:
                if step.kind == "apt":
                    log(f"apt packages present on the host: {' '.join(step.args)}")
                elif step.kind == "copy":
                    self._copy(job, step)
                elif step.kind == "pip":
                    # pip of the building interpreter, installing into the venv: the venv
                    # itself stays small (no pip of its own), and wheels build in isolation.
                    argv = [python or agent_python(), "-m", "pip", "--python"]
                    argv += [str(venv_dir / "bin" / "python"), "install", "--no-input"]
                    argv += ["--disable-pip-version-check", "--no-cache-dir"]
                    args = [self._host_arg(job, arg) for arg in step.args]
                    self._in_sandbox(
                        job, [*argv, *args], f"pip install {' '.join(step.args)}", package=True
                    )
                elif step.kind == "npm":
                    npm = shutil.which("npm") or "npm"
                    argv = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(npm_dir)]
                    args = [self._host_arg(job, arg) for arg in step.args]
                    self._in_sandbox(
                        job, [*argv, *args], f"npm install {' '.join(step.args)}", package=True
                    )
                elif step.kind == "workdir":
                    job.cwd = step.args[0]
                    if not _below(job.cwd, work_dir):
                        raise TemplateBuildError(
                            f"template workdir {job.cwd!r} is outside the sandbox's work_dir "
                            f"{work_dir!r}; the local backend keeps a template's files below "
                            "work_dir",
                            backend=_BACKEND,
                            hint="set TemplateSpec(work_dir=...) to a directory below the "
                            "sandbox's work_dir, or leave it unset",
                        )
                    (tree / os.path.relpath(job.cwd, work_dir)).mkdir(parents=True, exist_ok=True)
                elif step.kind == "env":
                    job.build_envs.update(zip(step.args[::2], step.args[1::2], strict=True))
                else:
                    self._in_sandbox(job, ["bash", "-c", step.args[0]], step.args[0])
            if login_profile and (job.path_dirs or job.envs):
                # A login shell (`bash -l`, as the e2b SDK runs commands) resets PATH in
                # /etc/profile, then reads ~/.profile: put the template's additions there.
                exports = [f'export PATH={shlex.quote(":".join(job.path_dirs))}:"$PATH"']
                exports += [f"export {key}={shlex.quote(value)}" for key, value in job.envs.items()]
                with open(tree / ".profile", "a", encoding="utf-8") as profile:
                    profile.write("\n".join(exports) + "\n")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(job.tmp, ignore_errors=True)
        data: dict[str, Any] = {
            "digest": digest,
            "work_dir": work_dir,
            "path_dirs": job.path_dirs,
            "envs": job.envs,
            "shared": job.shared,
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
            label=digest,
            tree=tree,
            digest=digest,
            directory=directory,
            work_dir=work_dir,
            path_dirs=tuple(job.path_dirs),
            envs=tuple(job.envs.items()),
            shared=tuple(job.shared),
            built=True,
        )

    def _host_path(self, job: _Job, path: str, step: BuildStep) -> Path:
        """Where the sandbox path ``path`` of the build lives on this machine (a relative one
        is relative to the current WORKDIR, as in a Dockerfile)."""
        path = posixpath.normpath(posixpath.join(job.cwd, path))
        if _below(path, job.work_dir):
            return job.tree / os.path.relpath(path, job.work_dir)
        if _below(path, SOURCES_DIR):  # the build's own /tmp, gone when the build ends
            return job.tmp / os.path.relpath(path, "/tmp")
        raise TemplateBuildError(
            f"template {job.digest}: {step.label or 'copy step'} copies to {path!r}, outside "
            f"the sandbox's work_dir {job.work_dir!r}; a local template keeps its files below "
            "work_dir",
            backend=_BACKEND,
            hint="copy to a path below work_dir (relative destinations are), or use the e2b "
            "backend for files elsewhere in the image",
        )

    def _host_arg(self, job: _Job, arg: str) -> str:
        # Without isolation a package manager runs on the host: the build's /tmp is a folder.
        if self.isolation == "bwrap" or not _below(arg, SOURCES_DIR):
            return arg
        return str(job.tmp / os.path.relpath(arg, "/tmp"))

    def _copy(self, job: _Job, step: BuildStep) -> None:
        """A COPY: on this machine, with Docker's rules (see :class:`BuildStep`)."""
        origin, destination, kind = step.args
        source = Path(origin)
        job.log(f"COPY {origin} {destination}")
        into = destination.endswith("/")
        target = self._host_path(job, destination, step)
        if not source.exists():
            raise TemplateBuildError(
                f"template {job.digest}: {step.label or 'copy step'}: {origin} does not exist",
                backend=_BACKEND,
                hint="fix the source path",
            )
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            if kind in ("python", "npm", "files"):
                copy_filtered(source, cast(Filter, kind), target)
            else:
                copy_tree(source, target)
            return
        if into or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target = target / source.name
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_file():
            raise TemplateBuildError(
                f"template {job.digest}: {step.label or 'copy step'}: {destination} exists "
                "and is not a file",
                backend=_BACKEND,
                hint="copy into it with a destination ending in '/'",
            )
        target.unlink(missing_ok=True)
        shutil.copyfile(source, target)
        os.chmod(target, stat.S_IMODE(source.stat().st_mode))

    def _host_run(self, argv: list[str], what: str) -> None:
        # Only for creating the empty virtualenv: no user-supplied code runs on the host.
        completed = subprocess.run(argv, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise SandboxCreateError(
                f"template build failed to {what}: {completed.stderr.strip() or completed.stdout.strip()}",
                backend=_BACKEND,
                hint="check that the host's Python has the venv module (Debian: python3-venv)",
            )

    def _in_sandbox(self, job: _Job, argv: list[str], what: str, *, package: bool = False) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if key in ("LANG", "LANGUAGE") or key.startswith("LC_") or _PIP_ENV.fullmatch(key)
        }
        env.update({**job.envs, **job.build_envs})
        env["PATH"] = os.pathsep.join([*job.path_dirs, os.environ.get("PATH") or _DEFAULT_PATH])
        # Package managers get a scratch HOME and cache, so their dot-files (pip, npm, even
        # rustup probes) never land in the tree every sandbox starts from.
        scratch = job.tree.parent / ".scratch"
        scratch.mkdir(exist_ok=True)
        env["npm_config_cache"] = str(scratch / "npm-cache")
        bwrap = self.isolation == "bwrap"
        env["HOME"] = str(scratch) if package else job.work_dir if bwrap else str(job.tree)
        if package and "PIP_CONFIG_FILE" not in env:
            # The scratch HOME hides the user's pip config (an index mirror, find-links):
            # name it, so pip in the build looks where pip on this machine does.
            user_config = _user_pip_config()
            if user_config is not None:
                env["PIP_CONFIG_FILE"] = user_config
        job.log(f"$ {what}")
        if bwrap:
            from pytest_kode.backends.local import _bwrap

            binds = [(path, True) for path in [*job.shared, str(scratch)]]
            binds += [(path, False) for path in _pip_sources(env)]
            prefix = _bwrap.bwrap_argv(
                str(job.tree), job.work_dir, cwd=job.cwd, binds=binds, tmp_dir=str(job.tmp)
            )
            host_cwd = None
        else:
            prefix = []
            host_cwd = str(job.tree / os.path.relpath(job.cwd, job.work_dir))
        try:
            code, tail = _stream([*prefix, *argv], cwd=host_cwd, env=env, on_line=job.log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if code != 0:
            raise TemplateBuildError(
                f"template {job.digest}: build step `{what}` failed with exit code {code}:\n{tail}",
                backend=_BACKEND,
                hint="fix the step (the output above is its last lines); for offline pip "
                "installs set PIP_NO_INDEX=1 and PIP_FIND_LINKS=<wheel dir>",
            )


@dataclasses.dataclass
class _Job:
    """One build in progress: where it writes and what it has set up so far."""

    digest: str
    tree: Path
    work_dir: str
    tmp: Path
    log: LogCallback
    cwd: str = ""
    path_dirs: list[str] = dataclasses.field(default_factory=list)
    envs: dict[str, str] = dataclasses.field(default_factory=dict)
    build_envs: dict[str, str] = dataclasses.field(default_factory=dict)  # ENV: build time only
    shared: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.cwd = self.cwd or self.work_dir


def _version_of(spec: TemplateSpec) -> tuple[int, int] | None:
    found = re.fullmatch(r"(\d+)\.(\d+)(\..*)?", spec.base_version or "")
    return (int(found[1]), int(found[2])) if found else None


def _quiet(line: str) -> None:
    del line


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _user_pip_config() -> str | None:
    home = Path(os.path.expanduser("~"))
    base = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    for candidate in (base / "pip" / "pip.conf", home / ".pip" / "pip.conf"):
        if candidate.is_file():
            return str(candidate)
    return None


def _pip_sources(env: dict[str, str]) -> list[str]:
    """Local paths pip in the build must be able to read: the config file named by
    PIP_CONFIG_FILE and the local indexes / find-links directories it or the environment
    names (the isolation shows little of the host)."""
    values = [env.get("PIP_FIND_LINKS", ""), env.get("PIP_INDEX_URL", "")]
    values.append(env.get("PIP_EXTRA_INDEX_URL", ""))
    found = []
    config = env.get("PIP_CONFIG_FILE")
    if config and os.path.isfile(config):
        found.append(os.path.realpath(config))
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(config, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            pass
        for section in parser.sections():
            for key in ("find-links", "index-url", "extra-index-url"):
                values.append(parser.get(section, key, fallback=""))
    for item in " ".join(values).split():
        path = item[len("file://") :] if item.startswith("file://") else item
        if os.path.isabs(path) and os.path.exists(path):
            real = os.path.realpath(path)
            # A file index's pages link to ../../files/...: show the mirror, not just simple/.
            found.append(os.path.dirname(real) if os.path.basename(real) == "simple" else real)
    return sorted(set(found))


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
