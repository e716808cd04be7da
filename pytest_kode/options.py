"""Validated configuration: :class:`SandboxOptions` and :class:`TemplateSpec`.

Both are frozen pydantic models with ``extra="forbid"``; bad input raises
:class:`~pytest_kode.errors.ConfigError` naming the field, the value and what is allowed. This
module imports pydantic, so the pytest plugin imports it only when a sandbox is needed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import posixpath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pytest_kode.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "MARKER_KEYS",
    "SCOPES",
    "MarkerSettings",
    "SandboxOptions",
    "TemplateSpec",
    "merge_marker_kwargs",
]

DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024

_PositiveInt = Annotated[StrictInt, Field(gt=0)]
_SECRET_FIELDS = frozenset({"api_key"})


def _config_error(model: str, error: ValidationError, fields: dict[str, Any]) -> ConfigError:
    """Turn pydantic's report into one message per offending field (secrets never echoed)."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(options)"
        top = str(item["loc"][0]) if item["loc"] else ""
        if item["type"] == "extra_forbidden" and loc in fields:
            # populate_by_name: the alias filled the field, so the name itself looks "extra".
            alias = fields[loc].alias
            lines.append(
                f"- option {loc!r} given twice (as {loc!r} and as {alias!r}); pass it once"
            )
            continue
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(fields))
            lines.append(f"- unknown option {loc!r}; allowed options: {allowed}")
            continue
        shown = "<hidden>" if top in _SECRET_FIELDS or top == "apiKey" else repr(item.get("input"))
        lines.append(f"- {loc}={shown}: {item['msg']}")
    return ConfigError(f"invalid {model}:\n" + "\n".join(lines))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(type(self).__name__, exc, type(self).model_fields) from None

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation)."""
        fields = type(self).model_fields
        names = {info.alias: name for name, info in fields.items() if info.alias}
        data = {name: getattr(self, name) for name in fields}
        seen: dict[str, str] = {}
        for key, value in changes.items():
            # A camelCase change must replace the field, not collide with its current value.
            name = names.get(key, key)
            if name in seen:
                raise ConfigError(
                    f"invalid {type(self).__name__}.replace(): option {name!r} given twice "
                    f"(as {seen[name]!r} and as {key!r}); pass it once"
                )
            seen[name] = key
            data[name] = value
        return type(self)(**data)


class TemplateSpec(_Frozen):
    """What a sandbox image holds: a base plus packages, files and build steps (SPEC 5).

    Local sources: ``pip_packages`` entries that are paths (``"."`` = the pytest rootdir,
    ``"./pkg"``, ``"../x"``, ``"/abs/dist/p-1.0-py3-none-any.whl"``, ``"sub/p-1.0.tar.gz"``,
    optionally with ``[extras]``) and ``npm_packages`` entries that are paths (directories,
    ``.tgz`` tarballs) are read from this machine, relative to the rootdir, copied into the
    build and installed there; entries starting with ``-`` are pip/npm options
    (``"--no-deps"``). ``files`` copies host files and directories (modes kept) to sandbox paths
    (absolute, or relative to the template's ``work_dir``), as Docker's ``COPY`` does: a
    directory's contents go into the destination. The template is cached by the *content* of
    these sources: editing them rebuilds. ``system_site_packages=True`` lets a local template's
    venv see the packages installed in the Python that builds it (local backend only).
    ``dockerfile`` is the Dockerfile's text or path (relative to the rootdir); its COPY lines
    read from ``dockerfile_context`` (default: the Dockerfile's directory, or the rootdir for
    text), and the template is rebuilt when the Dockerfile or its context changes.
    """

    base: Literal["python", "node", "debian", "ubuntu", "custom"] = "python"
    base_version: StrictStr | None = None
    apt_packages: tuple[StrictStr, ...] = ()
    pip_packages: tuple[StrictStr, ...] = ()
    npm_packages: tuple[StrictStr, ...] = ()
    files: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    build_commands: tuple[StrictStr, ...] = ()
    work_dir: StrictStr | None = None
    cpu_count: _PositiveInt = 2
    memory_mb: _PositiveInt = 512
    dockerfile: StrictStr | None = None
    dockerfile_context: StrictStr | None = None
    system_site_packages: StrictBool = False

    def __init__(self, /, **data: Any) -> None:
        super().__init__(**data)
        for source, destination in self.files.items():
            if not destination.startswith("/") and posixpath.normpath(destination).startswith(".."):
                from pytest_kode.errors import TemplateBuildError

                raise TemplateBuildError(
                    f"TemplateSpec files step {source!r} -> {destination!r}: the destination "
                    "escapes the sandbox (it climbs above the template's work_dir)",
                    hint="give a path below work_dir (e.g. 'data/x') or an absolute sandbox "
                    "path (e.g. '/home/user/data/x')",
                )

    @field_validator("work_dir")
    @classmethod
    def _absolute_work_dir(cls, value: str | None) -> str | None:
        return None if value is None else _absolute(value)

    @field_validator("cpu_count")
    @classmethod
    def _cloud_cpu_count(cls, value: int) -> int:
        # E2B answers 400 to anything else (e2b-dev/infra team/limits.go); refuse it on every
        # backend, at collection, rather than at the first E2B build.
        if value != 1 and value % 2:
            raise ValueError(
                f"must be 1 or an even number (E2B allocates vCPUs in pairs), got {value}"
            )
        return value

    @field_validator("memory_mb")
    @classmethod
    def _cloud_memory(cls, value: int) -> int:
        if value < 128 or value % 2:
            raise ValueError(
                f"must be an even number of MiB, at least 128 (E2B's rule), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _tools_on_base(self) -> TemplateSpec:
        # The cloud builds from the plain images: debian/ubuntu ship neither pip nor npm and
        # python has no npm, so such a spec fails there; refuse it everywhere, up front.
        if self.dockerfile is not None and self.base != "custom":
            raise ValueError(
                f"dockerfile= needs base='custom', got base={self.base!r}; set base='custom' "
                "(the Dockerfile says which image it starts from)"
            )
        if self.base == "custom" and self.dockerfile is None:
            raise ValueError(
                "base='custom' needs dockerfile= (the Dockerfile's text or path); or pick "
                "base='python'|'node'|'debian'|'ubuntu'"
            )
        if self.pip_packages and self.base not in ("python", "custom"):
            raise ValueError(
                f"pip_packages need base='python': the {self.base} image has no pip (and its "
                "system Python refuses pip installs, PEP 668); use base='python', or "
                "apt_packages=['python3-<name>'] for Debian's packaged modules"
            )
        apt_npm = any(p.split("=")[0] in ("npm", "nodejs") for p in self.apt_packages)
        if self.npm_packages and self.base not in ("node", "custom") and not apt_npm:
            raise ValueError(
                f"npm_packages need base='node' (the {self.base} image has no npm), or 'npm' "
                "in apt_packages"
            )
        return self

    def digest(self) -> str:
        """Hash of the spec as written; the template layer adds the content of local sources."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def for_project(
        cls,
        path: str = ".",
        *,
        extras: tuple[str, ...] | list[str] = (),
        dependencies: Literal["install", "host"] = "install",
        **fields: Any,
    ) -> TemplateSpec:
        """A Python template with the project at ``path`` (default: the pytest rootdir) installed.

        ``dependencies="install"`` installs the project with its dependencies from the package
        index pip is configured with (on every backend). ``"host"`` installs the project alone
        (``--no-deps --no-build-isolation --no-index``) into a venv that sees the packages
        already installed in the Python running the tests (its dependencies, its build
        backend): for machines without an index (local backend only). ``extras`` are
        the project's optional dependency groups; other ``fields`` are TemplateSpec fields
        (``build_commands``, ``files``, ...); ``pip_packages`` given there are installed after.
        """
        if dependencies not in ("install", "host"):
            raise ConfigError(
                f"TemplateSpec.for_project(dependencies={dependencies!r}): allowed are "
                "'install' (from the package index) and 'host' (the packages installed here)"
            )
        if not path.startswith(("/", "./", "../", "~")) and path not in (".", ".."):
            path = "./" + path  # a bare name would be a package on the index
        entry = path + (f"[{','.join(extras)}]" if extras else "")
        # "host": nothing comes from an index, not even the build backend (the host's own
        # setuptools/hatchling build the project, seen through the system site packages).
        offline = ["--no-deps", "--no-build-isolation", "--no-index"]
        pip = [*offline, entry] if dependencies == "host" else [entry]
        pip += list(fields.pop("pip_packages", ()))
        fields.setdefault("base", "python")
        if dependencies == "host":
            fields["system_site_packages"] = True
        return cls(pip_packages=tuple(pip), **fields)


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path such as '/home/user', got {value!r}")
    return posixpath.normpath(value)


def _api_key_from_env() -> SecretStr | None:
    key = os.environ.get("E2B_API_KEY")
    return SecretStr(key) if key else None


class SandboxOptions(_Frozen):
    """How to create (or resume) a sandbox. Accepts snake_case and the KODE SDK's camelCase."""

    api_key: SecretStr | None = Field(default_factory=_api_key_from_env, alias="apiKey", repr=False)
    template: StrictStr | TemplateSpec = "base"
    timeout_ms: _PositiveInt = Field(300_000, alias="timeoutMs")
    work_dir: StrictStr = Field("/home/user", alias="workDir")
    envs: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    metadata: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    allow_internet_access: StrictBool = Field(True, alias="allowInternetAccess")
    exec_timeout_ms: _PositiveInt = Field(120_000, alias="execTimeoutMs")
    sandbox_id: StrictStr | None = Field(None, alias="sandboxId")
    domain: StrictStr | None = None
    max_output_bytes: _PositiveInt = Field(DEFAULT_MAX_OUTPUT_BYTES, alias="maxOutputBytes")

    @field_validator("work_dir")
    @classmethod
    def _absolute_work_dir(cls, value: str) -> str:
        return _absolute(value)

    @field_validator("sandbox_id")
    @classmethod
    def _non_empty_id(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty sandbox id or None")
        return value

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes a sandbox, secrets and the resume id excluded.

        Two tests may share a sandbox only when their fingerprints (and scopes) are equal.
        """
        data = self.model_dump(mode="json", exclude={"api_key", "sandbox_id"})
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# -- the @pytest.mark.sandbox marker -------------------------------------------------------------

Scope = Literal["function", "class", "module", "worker", "session"]
SCOPES: tuple[str, ...] = ("function", "class", "module", "worker", "session")


class MarkerSettings(_Frozen):
    """The marker's keys that steer the plugin rather than shape the sandbox."""

    backend: StrictStr | None = None
    scope: Scope = "function"
    reuse: StrictBool = False
    keep_on_failure: StrictBool = False
    artifacts: tuple[StrictStr, ...] = ()


_OPTION_NAMES: dict[str, str] = {}
for _name, _field in SandboxOptions.model_fields.items():
    if _name not in _SECRET_FIELDS:
        _OPTION_NAMES[_name] = _name
        if _field.alias:
            _OPTION_NAMES[_field.alias] = _name
MARKER_KEYS: tuple[str, ...] = (*MarkerSettings.model_fields, *sorted(set(_OPTION_NAMES.values())))


def merge_marker_kwargs(
    marks: list[tuple[tuple[Any, ...], dict[str, Any]]], where: str
) -> tuple[MarkerSettings, dict[str, Any]]:
    """Merge ``sandbox`` marks (closest first, as ``iter_markers`` yields them), key by key.

    Returns the plugin settings and the validated option overrides (field names, not aliases).
    Raises ConfigError naming ``where`` (the test id) and the offending key.
    """
    merged: dict[str, Any] = {}
    for args, kwargs in reversed(marks):
        if args:
            raise ConfigError(
                f"{where}: @pytest.mark.sandbox takes keyword arguments only, got positional "
                f'{args!r}; name each one, e.g. @pytest.mark.sandbox(template="base", scope="module")'
            )
        for key, value in kwargs.items():
            merged[_OPTION_NAMES.get(key, key)] = value
    unknown = sorted(key for key in merged if key not in MARKER_KEYS)
    if unknown:
        secret = [key for key in unknown if key in ("api_key", "apiKey")]
        why = (
            "api_key is never taken from a marker (set E2B_API_KEY in the environment)"
            if secret
            else _suggest(unknown) + f"allowed keys: {', '.join(MARKER_KEYS)}"
        )
        raise ConfigError(
            f"{where}: unknown @pytest.mark.sandbox key(s) {', '.join(unknown)}; {why}"
        )
    plugin_keys = {
        key: merged.pop(key) for key in list(merged) if key in MarkerSettings.model_fields
    }
    try:
        settings = MarkerSettings(**plugin_keys)
        # By alias: mypy (without the pydantic plugin) knows only aliases as __init__ keywords.
        SandboxOptions(apiKey=None, **merged)
    except ConfigError as exc:
        details = exc.message.partition("\n")[2]
        raise ConfigError(
            f"{where}: invalid @pytest.mark.sandbox argument(s):\n{details}"
        ) from None
    if settings.reuse and settings.scope == "function":
        raise ConfigError(
            f"{where}: @pytest.mark.sandbox(reuse=True) keeps a shared sandbox for the next run, "
            "but this test's sandbox has scope='function'; add scope='class', 'module', "
            "'worker' or 'session'"
        )
    return settings, merged


def _suggest(unknown: list[str]) -> str:
    """``did you mean 'timeout_ms'?`` for the keys that are one typo away from a real one."""
    known = [*MARKER_KEYS, *(alias for alias in _OPTION_NAMES if alias not in MARKER_KEYS)]
    hints = []
    for key in unknown:
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if near:
            hints.append(f"{key!r}: did you mean {near[0]!r}?")
    return "; ".join(hints) + "; " if hints else ""
