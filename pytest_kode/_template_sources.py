"""Local sources of a template: paths in ``pip_packages`` / ``npm_packages`` and ``files`` steps.

They are resolved on this machine (relative to the pytest rootdir), checked (exists, is a Python
project / an npm package / a wheel this Python can install), hashed by content (what goes into
the template, not mtimes: editing a source rebuilds, an unchanged one reuses the cache) and
copied where a build can read them. The same walk decides what is hashed and what is copied,
so the hash is exactly the content the template gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from pytest_kode.errors import TemplateBuildError
from pytest_kode.options import TemplateSpec

__all__ = [
    "NPM_COPY",
    "SOURCES_DIR",
    "LocalSource",
    "content_digest",
    "copy_filtered",
    "is_local_entry",
    "rebuild_reason",
    "remember_build",
    "resolve_sources",
    "sandbox_entry",
]

SourceKind = Literal["wheel", "sdist", "project", "npm-dir", "npm-tarball", "file", "dir"]
Filter = Literal["python", "npm", "files"]

SOURCES_DIR = "/tmp/kode-sources"
"""Where a build sees the pip/npm sources it installs (removed when the build ends)."""

NPM_COPY = "--install-links"
"""npm links a local directory instead of installing it; the build's copy goes away."""

_VCS = frozenset({".git", ".hg", ".svn", ".bzr"})
# Build products and caches of a Python project: not part of what the project is.
_PY_SKIP = _VCS | {
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".tox",
    ".nox",
    ".eggs",
    "node_modules",
}
_PY_SKIP_TOP = frozenset({"build", "dist"})  # only at the project's top: a package may own "dist/"
_NPM_SKIP = _VCS | {"node_modules"}
_FILES_SKIP = _VCS | {"__pycache__"}
_EXTRAS = re.compile(r"^(?P<path>.*?)(?P<extras>\[[A-Za-z0-9_.,\- ]*\])?$")
_ARCHIVE = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2")
_PY_PROJECT = ("pyproject.toml", "setup.py", "setup.cfg")


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """One local source of a template, resolved and hashed."""

    step: Literal["pip_packages", "npm_packages", "files", "dockerfile", "dockerfile_context"]
    entry: str
    """As written in the spec (for ``files``: the host path key)."""
    path: Path
    kind: SourceKind
    digest: str
    extras: str = ""
    destination: str = ""
    """``files`` only: the absolute sandbox path (a trailing ``/`` means "into this directory")."""

    @property
    def label(self) -> str:
        return f"{self.step}[{self.entry!r}]"

    @property
    def filter(self) -> Filter:
        if self.step in ("files", "dockerfile", "dockerfile_context"):
            return "files"
        return "npm" if self.step == "npm_packages" else "python"


def is_local_entry(entry: str) -> bool:
    """Whether a pip/npm entry names a path on this machine rather than a package."""
    if entry.startswith("-") or "://" in entry or " @ " in entry:
        return False
    path = _EXTRAS.match(entry)["path"]  # type: ignore[index]
    return (
        path in (".", "..") or path.startswith(("./", "../", "/", "~/")) or path.endswith(_ARCHIVE)
    )


def _absolute_destination(destination: str, work_dir: str) -> str:
    joined = posixpath.normpath(posixpath.join(work_dir, destination))
    return joined + "/" if destination.endswith("/") and joined != "/" else joined


def resolve_sources(spec: TemplateSpec, root: Path) -> list[LocalSource]:
    """The local sources of ``spec``, resolved against ``root`` and hashed.

    Raises TemplateBuildError naming the step for a path that does not exist, a directory that
    is not a Python project (pip) or an npm package (npm).
    """
    sources: list[LocalSource] = []
    for entry in spec.pip_packages:
        if is_local_entry(entry):
            sources.append(_pip_source(entry, root))
    for entry in spec.npm_packages:
        if is_local_entry(entry):
            sources.append(_npm_source(entry, root))
    work_dir = spec.work_dir or "/home/user"
    for host, destination in spec.files.items():
        path = _existing(root, host, "files", host, "fix the host path (relative to the rootdir)")
        kind: SourceKind = "dir" if path.is_dir() else "file"
        sources.append(
            LocalSource(
                "files",
                host,
                path,
                kind,
                _hash(path, "files"),
                destination=_absolute_destination(destination, work_dir),
            )
        )
    sources += _dockerfile_sources(spec, root)
    return sources


def _dockerfile_sources(spec: TemplateSpec, root: Path) -> list[LocalSource]:
    """A Dockerfile given as a path, and the file context its COPY lines read from: the
    Dockerfile's own directory unless ``dockerfile_context`` names one (text Dockerfiles: the
    rootdir). Both are hashed, so editing either rebuilds."""
    if spec.dockerfile is None:
        if spec.dockerfile_context is not None:
            raise TemplateBuildError(
                "TemplateSpec(dockerfile_context=...) without dockerfile=",
                hint="set dockerfile= too, or drop dockerfile_context",
            )
        return []
    found: list[LocalSource] = []
    text = spec.dockerfile
    context: Path | None = None
    if "\n" not in text and not text.lstrip().upper().startswith("FROM "):
        path = _existing(
            root, text, "dockerfile", text, "fix the Dockerfile's path (relative to the rootdir)"
        )
        if not path.is_file():
            raise TemplateBuildError(
                f"TemplateSpec dockerfile {text!r}: {path} is not a file",
                hint="name the Dockerfile itself, not its directory",
            )
        found.append(LocalSource("dockerfile", text, path, "file", _hash(path, "files")))
        context = path.parent
    if spec.dockerfile_context is not None:
        context = _existing(
            root,
            spec.dockerfile_context,
            "dockerfile_context",
            spec.dockerfile_context,
            "fix the context directory (relative to the rootdir)",
        )
    elif context is None:
        context = root
    if not context.is_dir():
        raise TemplateBuildError(
            f"TemplateSpec dockerfile_context {str(context)!r} is not a directory",
            hint="name the directory the Dockerfile's COPY lines read from",
        )
    label = spec.dockerfile_context or str(context)
    found.append(LocalSource("dockerfile_context", label, context, "dir", _hash(context, "files")))
    return found


def _existing(root: Path, raw: str, step: str, entry: str, fix: str) -> Path:
    path = (root / os.path.expanduser(raw)).resolve()
    if not path.exists():
        raise TemplateBuildError(
            f"TemplateSpec {step} entry {entry!r}: {path} does not exist (local paths are "
            f"relative to the rootdir {root})",
            hint=fix,
        )
    return path


def _pip_source(entry: str, root: Path) -> LocalSource:
    match = _EXTRAS.match(entry)
    assert match is not None
    raw, extras = match["path"], match["extras"] or ""
    path = _existing(
        root,
        raw,
        "pip_packages",
        entry,
        "build the wheel/sdist first (`python -m build`), or fix the path",
    )
    if path.is_dir():
        if not any((path / name).is_file() for name in _PY_PROJECT):
            raise TemplateBuildError(
                f"TemplateSpec pip_packages entry {entry!r}: {path} is not a Python project "
                f"(it has no {', '.join(_PY_PROJECT)})",
                hint="point at the directory that holds pyproject.toml or setup.py, or copy "
                "plain files with TemplateSpec(files={host_path: sandbox_path})",
            )
        kind: SourceKind = "project"
    elif path.name.endswith(".whl"):
        kind = "wheel"
    elif path.name.endswith(_ARCHIVE):
        kind = "sdist"
    else:
        raise TemplateBuildError(
            f"TemplateSpec pip_packages entry {entry!r}: {path} is a file but not a wheel or "
            "an sdist (.whl, .tar.gz, .zip)",
            hint="name a wheel, an sdist or a project directory",
        )
    return LocalSource("pip_packages", entry, path, kind, _hash(path, "python"), extras=extras)


def _npm_source(entry: str, root: Path) -> LocalSource:
    path = _existing(root, entry, "npm_packages", entry, "run `npm pack` first, or fix the path")
    if path.is_dir():
        if not (path / "package.json").is_file():
            raise TemplateBuildError(
                f"TemplateSpec npm_packages entry {entry!r}: {path} is not an npm package "
                "(it has no package.json)",
                hint="point at the directory that holds package.json, or at a .tgz from `npm pack`",
            )
        kind: SourceKind = "npm-dir"
    else:
        kind = "npm-tarball"
    return LocalSource("npm_packages", entry, path, kind, _hash(path, "npm"))


def check_wheel(source: LocalSource, python_version: tuple[int, int] | None) -> None:
    """Raise TemplateBuildError when the wheel cannot install on this machine's Python
    ``python_version`` (None: the running one)."""
    if source.kind != "wheel":
        return
    from packaging import tags
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        _, _, _, wheel_tags = parse_wheel_filename(source.path.name)
    except InvalidWheelFilename as exc:
        raise TemplateBuildError(
            f"TemplateSpec pip_packages entry {source.entry!r}: {exc}",
            hint="keep the wheel's file name as the build tool made it",
        ) from exc
    if python_version is None:
        supported = set(tags.sys_tags())
        shown = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    else:
        supported = {
            *tags.cpython_tags(python_version),
            *tags.compatible_tags(python_version),
        }
        shown = f"Python {python_version[0]}.{python_version[1]}"
    if wheel_tags.isdisjoint(supported):
        wanted = ", ".join(sorted(str(tag) for tag in wheel_tags)[:4])
        raise TemplateBuildError(
            f"TemplateSpec pip_packages entry {source.entry!r}: the wheel is for {wanted}, "
            f"which the template's {shown} on this platform cannot install",
            hint="build the wheel for this Python (or a py3-none-any wheel), or set "
            "TemplateSpec(base_version=...) to the Python the wheel is for",
        )


def content_digest(spec: TemplateSpec, sources: Sequence[LocalSource]) -> str:
    """The template's cache key: the spec as written plus the content of its local sources."""
    if not sources:
        return spec.digest()
    blob = json.dumps(
        [spec.digest(), [[s.step, s.entry, s.kind, s.digest] for s in sources]]
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sandbox_entry(source: LocalSource, index: int) -> tuple[str, str]:
    """Where source ``index`` sits in the build (copy destination) and the entry pip/npm gets."""
    folder = f"{SOURCES_DIR}/{index}"
    if source.path.is_dir():
        return folder, folder + source.extras
    return folder, f"{folder}/{source.path.name}{source.extras}"


# -- walking, hashing, copying ----------------------------------------------------------------
def _skipped(name: str, is_dir: bool, top: bool, kind: Filter) -> bool:
    if kind == "files":
        return name in _FILES_SKIP
    if kind == "npm":
        return name in _NPM_SKIP
    if not is_dir:
        return name.endswith((".pyc", ".pyo"))
    return name in _PY_SKIP or name.endswith(".egg-info") or (top and name in _PY_SKIP_TOP)


def walk(path: Path, kind: Filter) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of every entry under directory ``path`` that the template
    gets, parents before children, in a stable order.

    A package (pip/npm) inside a git checkout is what git sees: tracked and untracked files
    that ``.gitignore`` does not exclude (so a coverage file or a local scratch folder never
    rebuilds the template). Otherwise, and for ``files`` steps, the whole tree. Either way VCS
    folders, virtualenvs and the ``kind``'s build products and caches are left out.
    """
    listed = _git_files(path) if kind != "files" else None
    if listed is not None:
        yield from _listed(path, listed, kind)
        return

    def visit(directory: str, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(info.st_mode)
            if _skipped(entry.name, is_dir, not prefix, kind):
                continue
            if is_dir and os.path.exists(os.path.join(entry.path, "pyvenv.cfg")):
                continue  # a virtualenv inside the project
            relative = prefix + entry.name
            yield relative, info
            if is_dir:
                yield from visit(entry.path, relative + "/")

    yield from visit(str(path), "")


def _git_files(path: Path) -> list[str] | None:
    """The files git sees under ``path`` (relative to it), or None outside a git checkout."""
    git = shutil.which("git")
    if git is None or not path.is_dir():
        return None
    try:
        completed = subprocess.run(
            [git, "-C", str(path), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if completed.returncode != 0:
        return None
    names = completed.stdout.decode("utf-8", "surrogateescape").split("\0")
    # Nothing listed: the folder itself is ignored (generated code); take it all.
    return [name for name in names if name] or None


def _listed(path: Path, names: list[str], kind: Filter) -> Iterator[tuple[str, os.stat_result]]:
    wanted: set[str] = set()
    for name in names:
        parts = name.split("/")
        if any(
            _skipped(part, index < len(parts) - 1, index == 0, kind)
            for index, part in enumerate(parts)
        ):
            continue
        try:
            info = os.lstat(path / name)
        except OSError:
            continue  # tracked but deleted in the work tree
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            continue  # a submodule: its files are not listed here
        wanted.add(name)
        wanted.update("/".join(parts[:index]) for index in range(1, len(parts)))
    for relative in sorted(wanted):
        yield relative, os.lstat(path / relative)


def _hash(path: Path, kind: Filter) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        items: Iterator[tuple[str, os.stat_result]] = walk(path, kind)
        base = path
    else:
        items = iter([(path.name, path.stat())])
        base = path.parent
    for relative, info in items:
        digest.update(relative.encode() + b"\0")
        mode = info.st_mode
        # Type and permission bits (an executable bit matters), never owners or times.
        digest.update(f"{stat.S_IFMT(mode)}:{stat.S_IMODE(mode) & 0o777}\0".encode())
        full = base / relative
        if stat.S_ISLNK(mode):
            digest.update(os.readlink(full).encode() + b"\0")
        elif stat.S_ISREG(mode):
            with open(full, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def copy_filtered(path: Path, kind: Filter, target: Path) -> None:
    """Copy ``path`` into the existing directory ``target``: a directory's contents, or the
    file itself under its name; modes kept, the same entries as hashed for ``kind``."""
    if not path.is_dir():
        _copy_one(path, target / path.name, path.stat())
        return
    directories: list[tuple[Path, int]] = []
    for relative, info in walk(path, kind):
        origin, destination = path / relative, target / relative
        if stat.S_ISDIR(info.st_mode):
            destination.mkdir(mode=0o700)
            directories.append((destination, stat.S_IMODE(info.st_mode)))
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(origin), destination)
        elif stat.S_ISREG(info.st_mode):
            _copy_one(origin, destination, info)
    for directory, mode in reversed(directories):  # children first: a read-only dir comes last
        os.chmod(directory, mode)


def _copy_one(origin: Path, destination: Path, info: os.stat_result) -> None:
    with open(origin, "rb") as reader, open(destination, "xb") as writer:
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
    os.chmod(destination, stat.S_IMODE(info.st_mode))


# -- why a template is rebuilt ------------------------------------------------------------------
def _history_file(history: Path, backend: str, spec: TemplateSpec) -> Path:
    return history / f"{backend}-{spec.digest()}.json"


def rebuild_reason(
    history: Path, backend: str, spec: TemplateSpec, sources: Sequence[LocalSource]
) -> str:
    """Why ``spec`` is being built: which local sources changed since its last build here."""
    try:
        last = json.loads(_history_file(history, backend, spec).read_text("utf-8"))
        before: dict[str, str] = dict(last["sources"])
    except (OSError, ValueError, KeyError, TypeError):
        return "not built before with this spec" + (
            f" ({len(sources)} local source{'s' if len(sources) != 1 else ''})" if sources else ""
        )
    now = {source.label: source.digest for source in sources}
    changed = [
        f"{label} changed ({before[label][:8]} -> {digest[:8]})"
        for label, digest in now.items()
        if label in before and before[label] != digest
    ]
    changed += [f"{label} is new" for label in now if label not in before]
    changed += [f"{label} is gone" for label in before if label not in now]
    if changed:
        return "rebuilding: " + "; ".join(changed)
    return "the cached build of this content is missing (removed, or an earlier build failed)"


def remember_build(
    history: Path, backend: str, spec: TemplateSpec, sources: Sequence[LocalSource], built: str
) -> None:
    """Record what ``spec``'s last build here was made of (for :func:`rebuild_reason`)."""
    data = {"built": built, "sources": {source.label: source.digest for source in sources}}
    target = _history_file(history, backend, spec)
    try:
        history.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, sort_keys=True), "utf-8")
        os.replace(temporary, target)
    except OSError:
        pass  # only the log's explanation depends on it
