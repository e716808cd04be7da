"""Hypothesis strategies for sandbox tests, and the supported way to use a sandbox in ``@given``.

This module imports Hypothesis; the pytest plugin never imports it (install the ``hypothesis``
extra). The strategies make values that every backend accepts:

* :func:`path_components` / :func:`safe_relative_paths`: relative paths without ``..``, a
  leading ``/``, NUL, control characters or surrogates, with components valid on Linux and
  bounded lengths;
* :func:`text_contents` / :func:`binary_contents` / :func:`file_contents`: file bodies;
* :func:`file_trees`: ``{relative path: contents}`` where no file is another's parent directory;
* :func:`shell_safe_arguments`: strings that survive ``shlex.quote`` through ``bash`` (``printf
  %s``) and the UTF-8 transport of every backend unchanged.

Sandboxes inside ``@given`` tests
---------------------------------
Hypothesis runs a test body many times per test function call, so a function-scoped fixture is
shared by all examples and Hypothesis refuses it (the ``function_scoped_fixture`` health check).
The supported pattern shares one sandbox across examples *on purpose* and gives every example a
clean directory of its own with :func:`clean_directory`; :func:`sandbox_settings` is the
``@settings`` that says so (it suppresses only that health check, and turns the per-example
deadline off because a sandbox round trip is slower than Hypothesis expects)::

    from hypothesis import given
    from pytest_kode.strategies import clean_directory, file_trees, sandbox_settings

    @pytest.mark.sandbox(scope="module")          # one sandbox for the module's examples
    @sandbox_settings(max_examples=25)
    @given(tree=file_trees())
    def test_round_trip(sandbox, tree):
        with clean_directory(sandbox) as where:    # fresh, empty, removed afterwards
            for rel, data in tree.items():
                sandbox.fs.write(f"{where}/{rel}", data)
            assert sandbox.exec("find . -type f | wc -l", cwd=where).stdout.strip() == str(len(tree))

Outside pytest, use any :class:`~pytest_kode.sandbox.Sandbox` the same way (create it once, then
``clean_directory`` per example).
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pytest_kode.sandbox import Sandbox

__all__ = [
    "EXAMPLES_DIR",
    "binary_contents",
    "clean_directory",
    "file_contents",
    "file_trees",
    "path_components",
    "safe_relative_paths",
    "sandbox_settings",
    "shell_safe_arguments",
    "text_contents",
]

EXAMPLES_DIR = ".kode-examples"
"""The directory below ``work_dir`` that holds the per-example directories."""

# Linux allows any byte but "/" and NUL in a name (up to 255 bytes). Control characters and
# surrogates are left out: they cannot cross the e2b SDK's JSON/UTF-8 transport and make
# `ls`/`find` output ambiguous, which is never what a property test is about.
_EXCLUDED_CATEGORIES = ("Cc", "Cs", "Co", "Cn")
_NAME_MAX_BYTES = 255


def _characters(extra_excluded: str = "") -> st.SearchStrategy[str]:
    return st.characters(
        exclude_categories=_EXCLUDED_CATEGORIES,  # type: ignore[arg-type]
        exclude_characters="\x00/" + extra_excluded,
    )


def path_components(*, max_len: int = 24, ascii_only: bool = False) -> st.SearchStrategy[str]:
    """One file or directory name that is valid on Linux and harmless in commands.

    Never ``.``/``..``, empty, or containing ``/``, NUL, control characters or surrogates; never
    starts with ``-`` (it would read as an option to ``cat``, ``rm``...) and never starts or ends
    with whitespace. At most ``max_len`` characters and 255 UTF-8 bytes. ``ascii_only`` keeps
    to letters, digits and ``._-+=@,~``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    alphabet: st.SearchStrategy[str] = (
        st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+=@,~")
        if ascii_only
        else _characters()
    )
    return st.text(alphabet, min_size=1, max_size=max_len).filter(_usable_component)


def _usable_component(name: str) -> bool:
    return (
        name not in (".", "..")
        and not name.startswith("-")
        and name == name.strip()
        and len(name.encode("utf-8")) <= _NAME_MAX_BYTES
    )


def safe_relative_paths(
    *,
    max_depth: int = 4,
    max_component_len: int = 24,
    max_len: int = 200,
    ascii_only: bool = False,
) -> st.SearchStrategy[str]:
    """A normalised relative path of 1..``max_depth`` components, at most ``max_len`` chars.

    It stays inside the directory it is joined to: no ``..``, no ``.``, no leading ``/``, no
    empty component, and ``posixpath.normpath`` leaves it unchanged.
    """
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    parts = st.lists(
        path_components(max_len=max_component_len, ascii_only=ascii_only),
        min_size=1,
        max_size=max_depth,
    )
    return parts.map("/".join).filter(lambda path: len(path) <= max_len)


def text_contents(*, max_size: int = 2048) -> st.SearchStrategy[str]:
    """Text a file can hold and give back unchanged: any characters but surrogates.

    Includes NUL, ``\\r\\n`` and non-ASCII, which is what round-trip bugs are made of.
    """
    return st.text(st.characters(exclude_categories=("Cs",)), max_size=max_size)  # type: ignore[arg-type]


def binary_contents(*, max_size: int = 4096) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes (invalid UTF-8 included)."""
    return st.binary(max_size=max_size)


def file_contents(*, max_size: int = 2048) -> st.SearchStrategy[str | bytes]:
    """Either text (written UTF-8 encoded) or raw bytes."""
    return st.one_of(text_contents(max_size=max_size), binary_contents(max_size=max_size))


@st.composite
def _trees(
    draw: st.DrawFn,
    paths: st.SearchStrategy[str],
    contents: st.SearchStrategy[str | bytes],
    min_files: int,
    max_files: int,
) -> dict[str, str | bytes]:
    wanted = draw(st.lists(paths, min_size=min_files, max_size=max_files, unique=True))
    tree: dict[str, str | bytes] = {}
    dirs: set[str] = set()
    for path in wanted:
        parents = _parents(path)
        # A name cannot be a file and a directory at once: drop the later of two that clash.
        if path in dirs or any(parent in tree for parent in parents):
            continue
        tree[path] = draw(contents)
        dirs.update(parents)
    if len(tree) < min_files:
        # Clashes ate some files; top up with names in a fresh directory that cannot clash.
        for index in range(min_files - len(tree)):
            tree[f"{_fresh_dir(tree, dirs)}/f{index}"] = draw(contents)
    return tree


def _parents(path: str) -> list[str]:
    parents = []
    parent = posixpath.dirname(path)
    while parent:
        parents.append(parent)
        parent = posixpath.dirname(parent)
    return parents


def _fresh_dir(tree: dict[str, str | bytes], dirs: set[str]) -> str:
    name = "extra"
    while name in tree or name in dirs:
        name += "_"
    dirs.add(name)
    return name


def file_trees(
    *,
    min_files: int = 0,
    max_files: int = 8,
    paths: st.SearchStrategy[str] | None = None,
    contents: st.SearchStrategy[str | bytes] | None = None,
) -> st.SearchStrategy[dict[str, str | bytes]]:
    """A file tree as ``{relative path: contents}`` that can be written file by file.

    No path is an ancestor directory of another path (``a`` and ``a/b`` never both appear), so
    writing every entry with ``fs.write`` (which makes parents) always succeeds. ``paths``
    defaults to :func:`safe_relative_paths` (depth 3), ``contents`` to :func:`file_contents`.
    """
    if not 0 <= min_files <= max_files:
        raise ValueError(f"need 0 <= min_files <= max_files, got {min_files}, {max_files}")
    return _trees(
        paths if paths is not None else safe_relative_paths(max_depth=3, max_component_len=16),
        contents if contents is not None else file_contents(max_size=512),
        min_files,
        max_files,
    )


def shell_safe_arguments(*, max_size: int = 64, ascii_only: bool = False) -> st.SearchStrategy[str]:
    """A string that ``bash -c "printf %s " + shlex.quote(arg)`` prints back unchanged.

    Anything but NUL (argv cannot hold it) and surrogates (UTF-8 cannot encode them): quotes,
    ``$``, backticks, globs, newlines, leading dashes and non-ASCII are all in, because those
    are the cases quoting must get right.
    """
    alphabet = (
        st.characters(min_codepoint=1, max_codepoint=127)
        if ascii_only
        else st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # type: ignore[arg-type]
    )
    return st.text(alphabet, max_size=max_size)


@contextlib.contextmanager
def clean_directory(sandbox: Sandbox, *, name: str | None = None) -> Iterator[str]:
    """A fresh, empty directory inside ``sandbox`` for one Hypothesis example.

    Yields its absolute in-sandbox path (below ``work_dir``/``.kode-examples``); pass it as
    ``cwd=`` to ``exec`` and join paths onto it for ``fs``. The directory is removed afterwards,
    also when the example fails, so examples never see each other's files.
    """
    leaf = name if name is not None else secrets.token_hex(6)
    if not _usable_component(leaf) or "/" in leaf or "\x00" in leaf:
        raise ValueError(f"name must be one plain path component, got {leaf!r}")
    where = posixpath.join(sandbox.options.work_dir, EXAMPLES_DIR, leaf)
    if sandbox.fs.exists(where):
        sandbox.fs.remove(where)
    sandbox.fs.mkdir(where)
    try:
        yield where
    finally:
        sandbox.fs.remove(where)


def sandbox_settings(**overrides: Any) -> settings:
    """``@settings`` for ``@given`` tests that take a sandbox fixture and use :func:`clean_directory`.

    Suppresses only Hypothesis's ``function_scoped_fixture`` health check (the sandbox is shared
    across examples on purpose; each example gets its own directory) and sets ``deadline=None``
    (a sandbox round trip takes milliseconds to seconds). ``overrides`` go to ``settings``, e.g.
    ``max_examples=25``.
    """
    suppressed = list(overrides.pop("suppress_health_check", ()))
    if HealthCheck.function_scoped_fixture not in suppressed:
        suppressed.append(HealthCheck.function_scoped_fixture)
    overrides.setdefault("deadline", None)
    return settings(suppress_health_check=suppressed, **overrides)
