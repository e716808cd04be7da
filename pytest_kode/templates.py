"""Templates (SPEC 5): ``TemplateSpec`` built once, cached by content hash, on every backend.

* :class:`E2BTemplateBuilder` builds a :class:`~pytest_kode.options.TemplateSpec` with E2B's
  template build API through the official SDK (``e2b.Template``, imported lazily), streaming
  the build log to a callback.
* :func:`prepare_template` is what the provisioner calls before creating a sandbox whose
  ``template`` is a ``TemplateSpec``: it makes sure the template is built (once per run, locked
  across xdist workers with a file lock, cached across runs by ``spec.digest()``) and returns
  the options and backend arguments that create sandboxes from it:

  - ``local``: a template directory prepared once (see :mod:`pytest_kode._template_local`),
    copied into each sandbox; pip packages in a shared read-only venv on ``PATH``;
  - ``e2b`` (and the emulator): an E2B template named :func:`template_name` (``kode-<digest>``),
    built when it does not exist yet, which the sandbox is then created from.

``template.work_dir``, when set, becomes the sandbox's ``work_dir`` on every backend.

Local sources (paths in ``pip_packages``/``npm_packages``, ``files``, a Dockerfile and its
context) are resolved against the pytest rootdir (the current directory outside pytest) and
hashed by content (:mod:`pytest_kode._template_sources`): the template's name / cache key covers
them, so an edit rebuilds and the build log says which source changed. Locally they are copied
into the build; on E2B they go up with the SDK's ``copy`` (a tar of a staged context directory).
This layer sits above the backends; they never import it (a backend gets plain data, or the
built template's name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_kode._template_sources import (
    NPM_COPY,
    SOURCES_DIR,
    LocalSource,
    content_digest,
    copy_filtered,
    rebuild_reason,
    remember_build,
    resolve_sources,
    sandbox_entry,
)
from pytest_kode.errors import ConfigError, KodeError, SandboxCreateError, TemplateBuildError
from pytest_kode.options import SandboxOptions, TemplateSpec

if TYPE_CHECKING:
    from pytest_kode._template_local import LocalTemplate, LocalTemplateBuilder
    from pytest_kode.sandbox import Sandbox

__all__ = [
    "BuildInfo",
    "attach_template",
    "E2BTemplateBuilder",
    "LogCallback",
    "ensure_e2b_template",
    "forget_e2b_template",
    "local_template",
    "prepare_template",
    "template_name",
]

LogCallback = Callable[[str], None]
_E2B_LOCK_TIMEOUT_S = 3600.0

_memo_lock = threading.Lock()
# Process-wide: what this process already built or found (per API endpoint / cache dir), so a
# run asks E2B (or stats the cache) once per template rather than once per sandbox.
_e2b_known: dict[tuple[str, str], str] = {}
_local_builders: dict[tuple[str, str], LocalTemplateBuilder] = {}


def template_name(
    spec: TemplateSpec,
    root: str | os.PathLike[str] | None = None,
    sources: list[LocalSource] | None = None,
) -> str:
    """The E2B template name a spec is built under: ``kode-<digest>``; equal specs with equal
    local sources (by content, resolved against ``root``) share it."""
    if sources is None:
        sources = resolve_sources(spec, _root(root))
    return f"kode-{content_digest(spec, sources)}"


def _root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root) if root is not None else Path.cwd()


_sources_memo: dict[tuple[str, str], list[LocalSource]] = {}


def _sources_once(spec: TemplateSpec, root: str | os.PathLike[str] | None) -> list[LocalSource]:
    """``spec``'s local sources, resolved and hashed once per process: a run reads the project
    once, not once per sandbox (an edit during the run counts from the next run)."""
    key = (spec.model_dump_json(), str(_root(root)))
    with _memo_lock:
        known = _sources_memo.get(key)
    if known is None:
        known = resolve_sources(spec, _root(root))
        with _memo_lock:
            _sources_memo[key] = known
    return known


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """The result of :meth:`E2BTemplateBuilder.build`."""

    template_id: str
    build_id: str | None
    name: str
    cached: bool
    """True when the template already existed and nothing was built."""
    duration_s: float


class E2BTemplateBuilder:
    """Builds :class:`TemplateSpec` templates on E2B with the official SDK's ``Template`` API.

    ``E2BTemplateBuilder.build(alias="py-data", base="python", pip_packages=["pandas"])`` builds
    and waits; build log lines go to ``on_log`` as they arrive. Connection settings
    (``api_key``, ``domain``, ``api_url``) default to the SDK's environment variables.
    """

    @staticmethod
    def to_sdk(
        spec: TemplateSpec,
        sources: list[LocalSource] | None = None,
        context: str | os.PathLike[str] | None = None,
    ) -> Any:
        """The SDK ``TemplateBuilder`` for ``spec`` (offline: nothing is sent).

        ``sources`` (``spec``'s resolved local sources) must have been staged into ``context``
        with :func:`stage_context`; the builder's COPY steps (and a Dockerfile's) name paths in
        it, never in this library's directory (the SDK's default context).
        """
        from e2b import Template

        if spec.system_site_packages:
            raise TemplateBuildError(
                "TemplateSpec(system_site_packages=True) shows the packages installed on this "
                "machine to a local template's venv; an E2B image cannot see them",
                backend="e2b",
                hint="install the dependencies in the template instead (for_project("
                "dependencies='install')), or run these tests with --sandbox-backend=local",
            )
        sources = sources or []
        by_step: dict[tuple[str, str], tuple[int, LocalSource]] = {
            (s.step, s.entry): (index, s) for index, s in enumerate(sources)
        }
        dockerfile = next((s for s in sources if s.step == "dockerfile"), None)
        if sources and context is None:
            raise ConfigError(
                "E2BTemplateBuilder.to_sdk: a spec with local sources needs context= (the "
                "directory stage_context() copied them into)"
            )
        # The SDK resolves COPY sources against the context, by default the *caller's*
        # directory (this library's): always name it.
        template = Template(file_context_path=str(context) if context is not None else ".")
        version = spec.base_version
        if spec.base == "custom":
            assert spec.dockerfile is not None  # TemplateSpec checks it
            text = dockerfile.path.read_text("utf-8") if dockerfile is not None else spec.dockerfile
            builder = template.from_dockerfile(text)
        elif spec.base == "python":
            builder = template.from_python_image(version or "3")
        elif spec.base == "node":
            builder = template.from_node_image(version or "lts")
        elif spec.base == "debian":
            builder = template.from_debian_image(version or "stable")
        else:
            builder = template.from_ubuntu_image(version or "latest")
        # The SDK joins package names into one `bash -l -c` line unquoted: `pandas>=2.0` would
        # become a redirection and `numpy<2` a missing input file.
        if spec.apt_packages:
            builder = builder.apt_install([shlex.quote(p) for p in spec.apt_packages])
        for index, source in enumerate(sources):
            if source.step == "files":
                builder = builder.copy(_staged(source, index), source.destination)
        staged = False
        for step, entries in (
            ("pip_packages", spec.pip_packages),
            ("npm_packages", spec.npm_packages),
        ):
            if not entries:
                continue
            args = []
            for entry in entries:
                found = by_step.get((step, entry))
                if found is None:
                    args.append(shlex.quote(entry))
                    continue
                index, source = found
                folder, installed = sandbox_entry(source, index)
                builder = builder.copy(_staged(source, index), folder + "/")
                args.append(installed)
                if source.kind == "npm-dir" and NPM_COPY not in args:
                    args.insert(0, NPM_COPY)
                staged = True
            if step == "pip_packages":
                builder = builder.pip_install(args)
            else:
                builder = builder.npm_install(args, g=True)
        if staged:
            builder = builder.run_cmd(f"rm -rf {SOURCES_DIR}", user="root")
        if spec.work_dir:
            builder = builder.set_workdir(spec.work_dir)
        for command in spec.build_commands:
            builder = builder.run_cmd(command)
        return builder

    @classmethod
    def build(
        cls,
        alias: str | None = None,
        *,
        spec: TemplateSpec | None = None,
        api_key: str | None = None,
        domain: str | None = None,
        api_url: str | None = None,
        on_log: LogCallback | None = None,
        skip_cache: bool = False,
        request_timeout: float | None = None,
        root: str | os.PathLike[str] | None = None,
        sources: list[LocalSource] | None = None,
        **fields: Any,
    ) -> BuildInfo:
        """Build ``spec`` (or a TemplateSpec of ``fields``) as E2B template ``alias`` and wait.

        ``alias`` defaults to :func:`template_name`. Local sources are resolved against
        ``root`` (default: the current directory) and uploaded with the SDK's ``copy``.
        Raises :class:`SandboxCreateError` when the build fails (with the last log lines),
        other KodeErrors for auth/network failures.
        """
        if spec is not None and fields:
            raise ConfigError(
                f"pass either spec= or TemplateSpec fields, not both (got spec and "
                f"{', '.join(sorted(fields))})"
            )
        spec = spec if spec is not None else TemplateSpec(**fields)
        if sources is None:
            sources = resolve_sources(spec, _root(root))
        name = alias or template_name(spec, sources=sources)
        with tempfile.TemporaryDirectory(prefix="kode-e2b-context-") as staging:
            context = stage_context(sources, Path(staging))
            template = cls.to_sdk(spec, sources, context)
            return cls._build_sdk(
                template, spec, name, api_key, domain, api_url, request_timeout, on_log, skip_cache
            )

    @staticmethod
    def _build_sdk(
        template: Any,
        spec: TemplateSpec,
        name: str,
        api_key: str | None,
        domain: str | None,
        api_url: str | None,
        request_timeout: float | None,
        on_log: LogCallback | None,
        skip_cache: bool,
    ) -> BuildInfo:
        params = _api_params(api_key, domain, api_url, request_timeout)
        from e2b import Template

        tail: list[str] = []

        def on_build_logs(entry: Any) -> None:
            line = f"{entry.level}: {entry.message}"
            tail.append(line)
            del tail[:-20]
            if on_log is not None:
                on_log(line)

        started = time.monotonic()
        try:
            info = Template.build(
                template,
                name=name,
                cpu_count=spec.cpu_count,
                memory_mb=spec.memory_mb,
                skip_cache=skip_cache,
                on_build_logs=on_build_logs,
                **params,
            )
        except Exception as exc:
            raise _build_error(exc, name, tail, params.get("api_key")) from exc
        return BuildInfo(
            template_id=str(info.template_id),
            build_id=str(info.build_id),
            name=name,
            cached=False,
            duration_s=time.monotonic() - started,
        )

    @classmethod
    def exists(
        cls,
        alias: str,
        *,
        api_key: str | None = None,
        domain: str | None = None,
        api_url: str | None = None,
    ) -> bool:
        """Whether E2B has a template called ``alias`` (one API call)."""
        from e2b import Template

        params = _api_params(api_key, domain, api_url, None)
        try:
            return bool(Template.exists(alias, **params))
        except Exception as exc:
            raise _build_error(exc, alias, [], params.get("api_key"), checking=True) from exc


def stage_context(sources: list[LocalSource], context: Path) -> Path | None:
    """Copy ``sources`` into the (new or empty) directory ``context``: the SDK's file context.

    The Dockerfile's context (when there is one) is the context's root, so the Dockerfile's
    own COPY lines work; every other source sits under ``.kode-src/<n>``. Returns the directory
    to use as the context (None: no local sources).
    """
    if not sources:
        return None
    context.mkdir(parents=True, exist_ok=True)
    for index, source in enumerate(sources):
        if source.step == "dockerfile_context":
            copy_filtered(source.path, "files", context)
        elif source.step != "dockerfile":
            target = context / _staged_dir(index)
            target.mkdir(parents=True)
            copy_filtered(source.path, source.filter, target)
    return context


def _staged_dir(index: int) -> str:
    return f".kode-src/{index}"


def _staged(source: LocalSource, index: int) -> str:
    """A staged source's path in the context, as the SDK's ``copy`` takes it."""
    folder = _staged_dir(index)
    return folder if source.path.is_dir() else f"{folder}/{source.path.name}"


def _api_params(
    api_key: str | None, domain: str | None, api_url: str | None, request_timeout: float | None
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if api_key:
        params["api_key"] = api_key
    if domain:
        params["domain"] = domain
    if api_url:
        params["api_url"] = api_url
    if request_timeout is not None:
        params["request_timeout"] = request_timeout
    return params


def _build_error(
    exc: BaseException, name: str, tail: list[str], secret: str | None, *, checking: bool = False
) -> KodeError:
    from e2b import exceptions as ex

    from pytest_kode.backends._e2b_errors import to_kode_error

    if isinstance(exc, KodeError):
        return exc
    action = f"checking template {name!r}" if checking else f"building template {name!r}"
    if isinstance(exc, (ex.BuildException, ex.FileUploadException, ex.TemplateException)) and not (
        isinstance(exc, ex.AuthenticationException)
    ):
        text = str(exc).strip() or type(exc).__name__
        if secret:
            text = text.replace(secret, "<hidden>")
        logs = "\n".join(tail)
        return TemplateBuildError(
            f"E2B template build {name!r} failed: {type(exc).__name__}: {text}"
            + (f"\nlast build log lines:\n{logs}" if logs else ""),
            backend="e2b",
            hint="fix the failing step of the TemplateSpec (see the build log above); package "
            "names and build commands run inside the template image, not on this machine",
        )
    return to_kode_error(exc, action=action, sandbox_id=None, secret=secret, creating=True)


def ensure_e2b_template(
    spec: TemplateSpec,
    *,
    api_key: str | None = None,
    domain: str | None = None,
    api_url: str | None = None,
    on_log: LogCallback | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> str:
    """The name of an E2B template built from ``spec``: built now unless it already exists.

    Once per process per endpoint and content; concurrent processes (xdist workers) serialise
    on a file lock in ``lock_dir`` (default: the template cache directory) so only one of them
    builds. Local sources are resolved against ``root`` (default: the current directory).
    """
    import filelock

    sources = _sources_once(spec, root)
    name = template_name(spec, sources=sources)
    key = (_endpoint(domain, api_url), name)
    with _memo_lock:
        if key in _e2b_known:
            return _e2b_known[key]
    built = _built_marker(name, domain=domain, api_url=api_url, lock_dir=lock_dir)
    lock = filelock.FileLock(str(built.with_suffix(".lock")))
    history = built.parent / "history"
    try:
        with lock.acquire(timeout=_E2B_LOCK_TIMEOUT_S):
            # Template.exists() says a build was *requested* under the name (the cloud registers
            # it then, and a failed or interrupted build leaves it registered), not that one
            # finished. Only our own record of a finished build skips the build; E2B's layer
            # cache makes rebuilding an unchanged spec cheap.
            if built.exists():
                if on_log is not None:
                    on_log(f"template {name}: built on E2B before, reusing it")
            else:
                if on_log is not None:
                    reason = rebuild_reason(history, "e2b", spec, sources)
                    on_log(f"template {name}: building on E2B ({reason})")
                E2BTemplateBuilder.build(
                    name,
                    spec=spec,
                    sources=sources,
                    on_log=on_log,
                    api_key=api_key,
                    domain=domain,
                    api_url=api_url,
                )
                remember_build(history, "e2b", spec, sources, name)
                built.write_text(f"{name}\n", encoding="utf-8")
    except filelock.Timeout as exc:
        raise SandboxCreateError(
            f"gave up waiting {_E2B_LOCK_TIMEOUT_S:.0f}s for another process building E2B "
            f"template {name!r} ({lock.lock_file})",
            backend="e2b",
            hint="a build is stuck; stop the other run, or delete the lock file",
        ) from exc
    with _memo_lock:
        _e2b_known[key] = name
    return name


def forget_e2b_template(
    name: str,
    *,
    domain: str | None = None,
    api_url: str | None = None,
    lock_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Drop what this machine believes about E2B template ``name`` (creating from it answered
    404: deleted, or its last build never finished), so the next use builds it again."""
    with _memo_lock:
        _e2b_known.pop((_endpoint(domain, api_url), name), None)
    _built_marker(name, domain=domain, api_url=api_url, lock_dir=lock_dir).unlink(missing_ok=True)


def _endpoint(domain: str | None, api_url: str | None) -> str:
    return (
        api_url
        or domain
        or os.environ.get("E2B_API_URL")
        or os.environ.get("E2B_DOMAIN")
        or "e2b.app"
    )


def _built_marker(
    name: str,
    *,
    domain: str | None,
    api_url: str | None,
    lock_dir: str | os.PathLike[str] | None,
) -> Path:
    """The local record that template ``name`` finished building on this endpoint."""
    from pytest_kode._template_local import default_cache_dir

    directory = Path(lock_dir) if lock_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(_endpoint(domain, api_url).encode()).hexdigest()[:8]
    return directory / f"e2b-{tag}-{name}.built"


def local_template(
    spec: TemplateSpec,
    *,
    work_dir: str,
    isolation: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    on_log: LogCallback | None = None,
    root: str | os.PathLike[str] | None = None,
) -> LocalTemplate:
    """The local template directory for ``spec`` with its files at ``work_dir`` (built once).

    Local sources are resolved against ``root`` (default: the current directory) and hashed,
    once per process: a changed source is a new template, and the log says which changed.
    """
    from pytest_kode._template_local import LocalTemplateBuilder, default_cache_dir
    from pytest_kode.backends.local import detect_isolation

    resolved = isolation if isolation in ("bwrap", "none") else detect_isolation()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (str(directory), resolved)
    with _memo_lock:
        builder = _local_builders.get(key)
        if builder is None:
            builder = _local_builders[key] = LocalTemplateBuilder(directory, isolation=resolved)
    sources = _sources_once(spec, root)
    history = directory / "history"
    log = on_log or _quiet

    def explain() -> None:
        log(f"template: building ({rebuild_reason(history, 'local', spec, sources)})")

    template = builder.prepare(
        spec, work_dir=work_dir, on_log=on_log, sources=sources, on_build=explain
    )
    if template.built:
        remember_build(history, "local", spec, sources, template.digest)
    return template


def _quiet(line: str) -> None:
    del line


def prepare_template(
    options: SandboxOptions,
    backend: str,
    kwargs: dict[str, Any] | None = None,
    *,
    on_log: LogCallback | None = None,
    root: str | os.PathLike[str] | None = None,
) -> tuple[SandboxOptions, dict[str, Any]]:
    """Options and backend arguments that create a sandbox of ``backend`` from ``options.template``.

    A string template passes through unchanged. For a ``TemplateSpec`` the template is built
    (or found in the cache) first: ``local`` gets ``local_template=`` (and the template's
    ``work_dir``), ``e2b`` gets ``template=<built name>``. Other backends get the spec as is.
    Local sources are resolved against ``root`` (the pytest rootdir; default: the current
    directory).
    """
    extra = dict(kwargs or {})
    spec = options.template
    if not isinstance(spec, TemplateSpec):
        return options, extra
    if spec.work_dir and spec.work_dir != options.work_dir:
        options = options.replace(work_dir=spec.work_dir)
    if backend == "local":
        extra["local_template"] = local_template(
            spec,
            work_dir=options.work_dir,
            isolation=extra.get("isolation"),
            cache_dir=extra.pop("template_cache_dir", None),
            on_log=on_log,
            root=root,
        )
        return options, extra
    if backend == "e2b":
        secret = options.api_key.get_secret_value() if options.api_key is not None else None
        name = ensure_e2b_template(
            spec,
            api_key=secret,
            domain=options.domain,
            api_url=extra.get("api_url"),
            on_log=on_log,
            root=root,
        )
        return options.replace(template=name), extra
    return options, extra


def attach_template(sandbox: Sandbox) -> None:
    """Build ``sandbox.options.template`` (a TemplateSpec) and hand the result to the sandbox.

    What :meth:`Sandbox.init` calls when a sandbox is used without the pytest layer: the local
    backend gets the built template as plain data (:class:`TemplateSeed`), the e2b backend the
    built template's name. Local sources resolve against the current directory.
    """
    spec = sandbox.options.template
    if not isinstance(spec, TemplateSpec):
        return
    if sandbox.backend == "local":
        from pytest_kode.backends.local import LocalSandbox

        assert isinstance(sandbox, LocalSandbox)
        sandbox.use_template(
            local_template(spec, work_dir=sandbox.options.work_dir, isolation=sandbox.isolation)
        )
    elif sandbox.backend == "e2b":
        from pytest_kode.backends.e2b import E2BSandbox

        assert isinstance(sandbox, E2BSandbox)
        sandbox.options, _ = prepare_template(sandbox.options, "e2b", {"api_url": sandbox._api_url})
