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
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_kode.errors import ConfigError, KodeError, SandboxCreateError
from pytest_kode.options import SandboxOptions, TemplateSpec

if TYPE_CHECKING:
    from pytest_kode._template_local import LocalTemplate, LocalTemplateBuilder

__all__ = [
    "BuildInfo",
    "E2BTemplateBuilder",
    "LogCallback",
    "ensure_e2b_template",
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


def template_name(spec: TemplateSpec) -> str:
    """The E2B template name a spec is built under: ``kode-<digest>``, equal specs share it."""
    return f"kode-{spec.digest()}"


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
    def to_sdk(spec: TemplateSpec) -> Any:
        """The SDK ``TemplateBuilder`` for ``spec`` (offline: nothing is sent)."""
        from e2b import Template

        if spec.dockerfile is not None and spec.base != "custom":
            raise ConfigError(
                f"TemplateSpec(dockerfile=...) needs base='custom', got base={spec.base!r}; "
                "set base='custom' (the Dockerfile says which image it starts from)"
            )
        version = spec.base_version
        if spec.base == "custom":
            if spec.dockerfile is None:
                raise ConfigError(
                    "TemplateSpec(base='custom') needs dockerfile= (the Dockerfile's text or "
                    "path); or pick base='python'|'node'|'debian'|'ubuntu'"
                )
            builder = Template().from_dockerfile(spec.dockerfile)
        elif spec.base == "python":
            builder = Template().from_python_image(version or "3")
        elif spec.base == "node":
            builder = Template().from_node_image(version or "lts")
        elif spec.base == "debian":
            builder = Template().from_debian_image(version or "stable")
        else:
            builder = Template().from_ubuntu_image(version or "latest")
        if spec.apt_packages:
            builder = builder.apt_install(list(spec.apt_packages))
        if spec.pip_packages:
            builder = builder.pip_install(list(spec.pip_packages))
        if spec.npm_packages:
            builder = builder.npm_install(list(spec.npm_packages), g=True)
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
        **fields: Any,
    ) -> BuildInfo:
        """Build ``spec`` (or a TemplateSpec of ``fields``) as E2B template ``alias`` and wait.

        ``alias`` defaults to :func:`template_name`. Raises :class:`SandboxCreateError` when
        the build fails (with the last log lines), other KodeErrors for auth/network failures.
        """
        if spec is not None and fields:
            raise ConfigError(
                f"pass either spec= or TemplateSpec fields, not both (got spec and "
                f"{', '.join(sorted(fields))})"
            )
        spec = spec if spec is not None else TemplateSpec(**fields)
        name = alias or template_name(spec)
        template = cls.to_sdk(spec)
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
        return SandboxCreateError(
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
) -> str:
    """The name of an E2B template built from ``spec``: built now unless it already exists.

    Once per process per endpoint; concurrent processes (xdist workers) serialise on a file
    lock in ``lock_dir`` (default: the template cache directory) so only one of them builds.
    """
    import filelock

    from pytest_kode._template_local import default_cache_dir

    name = template_name(spec)
    endpoint = (
        api_url
        or domain
        or os.environ.get("E2B_API_URL")
        or os.environ.get("E2B_DOMAIN")
        or "e2b.app"
    )
    key = (endpoint, name)
    with _memo_lock:
        if key in _e2b_known:
            return _e2b_known[key]
    directory = Path(lock_dir) if lock_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(endpoint.encode()).hexdigest()[:8]
    lock = filelock.FileLock(str(directory / f"e2b-{tag}-{name}.lock"))
    try:
        with lock.acquire(timeout=_E2B_LOCK_TIMEOUT_S):
            if E2BTemplateBuilder.exists(name, api_key=api_key, domain=domain, api_url=api_url):
                if on_log is not None:
                    on_log(f"template {name}: already built on E2B, reusing it")
            else:
                if on_log is not None:
                    on_log(f"template {name}: building on E2B")
                E2BTemplateBuilder.build(
                    name, spec=spec, on_log=on_log, api_key=api_key, domain=domain, api_url=api_url
                )
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


def local_template(
    spec: TemplateSpec,
    *,
    work_dir: str,
    isolation: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    on_log: LogCallback | None = None,
) -> LocalTemplate:
    """The local template directory for ``spec`` with its files at ``work_dir`` (built once)."""
    from pytest_kode._template_local import LocalTemplateBuilder, default_cache_dir
    from pytest_kode.backends.local import detect_isolation

    resolved = isolation if isolation in ("bwrap", "none") else detect_isolation()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (str(directory), resolved)
    with _memo_lock:
        builder = _local_builders.get(key)
        if builder is None:
            builder = _local_builders[key] = LocalTemplateBuilder(directory, isolation=resolved)
    return builder.prepare(spec, work_dir=work_dir, on_log=on_log)


def prepare_template(
    options: SandboxOptions,
    backend: str,
    kwargs: dict[str, Any] | None = None,
    *,
    on_log: LogCallback | None = None,
) -> tuple[SandboxOptions, dict[str, Any]]:
    """Options and backend arguments that create a sandbox of ``backend`` from ``options.template``.

    A string template passes through unchanged. For a ``TemplateSpec`` the template is built
    (or found in the cache) first: ``local`` gets ``local_template=`` (and the template's
    ``work_dir``), ``e2b`` gets ``template=<built name>``. Other backends get the spec as is.
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
        )
        return options.replace(template=name), extra
    return options, extra
