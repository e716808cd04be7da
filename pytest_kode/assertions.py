"""Chainable assertions over exec results, sandbox files and sandbox trees (SPEC 4).

``assert_exec(result).succeeded().stdout_contains("ok")`` reads like the intent and, when it
fails, raises an :class:`AssertionError` whose message carries everything needed to debug without
re-running: the command, exit code, duration, timed-out flag and the tails of both streams; for
files the path and a unified diff. The messages are built here, not by pytest's assertion
rewriting, so they are the same under ``--assert=plain``. Every function on the failure path sets
``__tracebackhide__`` so the user's test line is the last frame pytest shows.

The checkers use only the public :class:`~pytest_kode.sandbox.Sandbox` API (``sandbox.fs``), so
they work on every backend.
"""

from __future__ import annotations

import difflib
import json
import posixpath
import re
from collections.abc import Iterable, Mapping
from types import EllipsisType
from typing import TYPE_CHECKING, Any, NoReturn, Self

from pytest_kode.errors import KodeError
from pytest_kode.reports import clip_tail

if TYPE_CHECKING:
    from pytest_kode.sandbox import ExecResult, FileEntry, Sandbox

__all__ = [
    "ExecAssertion",
    "FileAssertion",
    "TreeAssertion",
    "assert_exec",
    "assert_file",
    "assert_tree",
]

_TAIL_LINES = 40
_TAIL_BYTES = 4096
_DIFF_LINES = 200
# Deep enough for any real tree; a backend lists at most this many levels.
_TREE_DEPTH = 10_000

_Pattern = str | re.Pattern[str]
_UNSET: Any = object()  # stdout_json() without an expected value: None is a JSON value too
_TreeContent = str | bytes | EllipsisType


def _fail(message: str) -> NoReturn:
    __tracebackhide__ = True
    raise AssertionError(message)


# -- formatting helpers ---------------------------------------------------------------------
def _tail(text: str, label: str) -> str:
    """``label`` and the last lines of ``text``, marked as a tail when anything was cut."""
    if not text:
        return f"{label}: (empty)"
    body, cut = clip_tail(text, _TAIL_LINES, _TAIL_BYTES)
    if cut:
        kept = body.count("\n") + 1
        total = len(text.splitlines())
        header = f"{label} (tail: last {kept} of {total} lines, at most {_TAIL_BYTES} bytes):"
    else:
        header = f"{label}:"
    return header + "\n" + _indent(body)


def _indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


def _diff(expected: str, actual: str, name: str) -> str:
    lines = list(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            actual.splitlines(keepends=True),
            fromfile=f"expected {name}",
            tofile=f"actual {name}",
        )
    )
    if len(lines) > _DIFF_LINES:
        more = len(lines) - _DIFF_LINES
        lines = [*lines[:_DIFF_LINES], f"... ({more} more diff lines)\n"]
    text = "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end\n" for line in lines
    )
    return text.rstrip("\n")


def _bytes_diff(expected: bytes, actual: bytes, name: str) -> str:
    try:
        texts = expected.decode("utf-8"), actual.decode("utf-8")
    except UnicodeDecodeError:
        texts = None
    # Control bytes decode as UTF-8 but would garble a text diff in the terminal.
    if texts is not None and all(_printable(text) for text in texts):
        return _diff(*texts, name)
    at = next(
        (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
        min(len(expected), len(actual)),
    )
    return (
        f"(binary) expected {len(expected)} bytes, actual {len(actual)} bytes; first difference at "
        f"offset {at}: expected {expected[at : at + 16]!r}, actual {actual[at : at + 16]!r}"
    )


def _printable(text: str) -> bool:
    return all(char.isprintable() or char in "\t\n\r" for char in text)


def _compile(pattern: _Pattern, flags: int) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)


def _where(sandbox: Sandbox) -> str:
    try:
        ident = sandbox.sandbox_id
    except KodeError:
        # No id yet must not replace the assertion being reported.
        ident = "-"
    return f"{sandbox.backend} sandbox {ident}"


# -- exec -----------------------------------------------------------------------------------
class ExecAssertion:
    """Checks on one :class:`~pytest_kode.sandbox.ExecResult`; every check returns ``self``."""

    def __init__(self, result: ExecResult) -> None:
        self.result = result

    def _fail(self, expectation: str, detail: str | None = None) -> NoReturn:
        __tracebackhide__ = True
        r = self.result
        parts = [
            f"assert_exec: expected {expectation}",
            f"  command:   {r.command}",
            f"  exit code: {r.exit_code}",
            f"  duration:  {r.duration_ms:.1f} ms",
            f"  timed out: {r.timed_out}",
        ]
        if r.truncated:
            parts.append("  truncated: True (the backend elided the middle of the output)")
        if detail:
            parts.append(detail)
        parts.append(_tail(r.stdout, "stdout"))
        parts.append(_tail(r.stderr, "stderr"))
        _fail("\n".join(parts))

    # status
    def succeeded(self) -> Self:
        """Exit code 0 and not timed out."""
        __tracebackhide__ = True
        if not self.result.ok:
            self._fail("the command to succeed (exit code 0, not timed out)")
        return self

    def failed(self, exit_code: int | None = None) -> Self:
        """A non-zero exit (``exit_code`` when given) that is not a timeout.

        A timeout is reported as a failure of this check: a command that hangs is a different
        bug from one that exits with an error, and ``timed_out()`` says that explicitly.
        """
        __tracebackhide__ = True
        r = self.result
        if exit_code is not None and exit_code == 0:
            raise ValueError("failed(exit_code=0) can never hold; use succeeded() instead")
        want = "the command to fail" + (
            f" with exit code {exit_code}" if exit_code is not None else ""
        )
        if r.timed_out:
            self._fail(want + ", but it timed out")
        if r.exit_code == 0:
            self._fail(want + ", but it exited 0")
        if exit_code is not None and r.exit_code != exit_code:
            self._fail(want + f", but it exited {r.exit_code}")
        return self

    def exit_code(self, code: int) -> Self:
        """Exactly this exit code."""
        __tracebackhide__ = True
        if self.result.exit_code != code:
            self._fail(f"exit code {code}")
        return self

    def timed_out(self) -> Self:
        """The command was killed at its timeout."""
        __tracebackhide__ = True
        if not self.result.timed_out:
            self._fail("the command to time out")
        return self

    def finished_within(self, ms: float) -> Self:
        """Took at most ``ms`` milliseconds (and did not time out)."""
        __tracebackhide__ = True
        r = self.result
        if r.timed_out or r.duration_ms > ms:
            self._fail(f"the command to finish within {ms} ms (took {r.duration_ms:.1f} ms)")
        return self

    # streams
    def _equals(self, stream: str, expected: str, strip: bool) -> None:
        __tracebackhide__ = True
        actual = getattr(self.result, stream)
        if strip:
            actual, expected = actual.strip(), expected.strip()
        if actual != expected:
            how = " (surrounding whitespace ignored)" if strip else ""
            self._fail(f"{stream} to equal the text below{how}", _diff(expected, actual, stream))

    def _contains(self, stream: str, text: str) -> None:
        __tracebackhide__ = True
        if text not in getattr(self.result, stream):
            self._fail(f"{stream} to contain {text!r}")

    def _matches(self, stream: str, pattern: _Pattern, flags: int) -> None:
        __tracebackhide__ = True
        regex = _compile(pattern, flags)
        if regex.search(getattr(self.result, stream)) is None:
            self._fail(f"{stream} to match the regex {regex.pattern!r} (re.search)")

    def stdout_equals(self, expected: str, *, strip: bool = False) -> Self:
        """stdout is exactly ``expected`` (``strip=True`` ignores surrounding whitespace)."""
        __tracebackhide__ = True
        self._equals("stdout", expected, strip)
        return self

    def stdout_contains(self, text: str) -> Self:
        """``text`` occurs in stdout."""
        __tracebackhide__ = True
        self._contains("stdout", text)
        return self

    def stdout_matches(self, pattern: _Pattern, flags: int = 0) -> Self:
        """``re.search(pattern, stdout)`` finds a match."""
        __tracebackhide__ = True
        self._matches("stdout", pattern, flags)
        return self

    def stderr_equals(self, expected: str, *, strip: bool = False) -> Self:
        """stderr is exactly ``expected`` (``strip=True`` ignores surrounding whitespace)."""
        __tracebackhide__ = True
        self._equals("stderr", expected, strip)
        return self

    def stderr_contains(self, text: str) -> Self:
        """``text`` occurs in stderr."""
        __tracebackhide__ = True
        self._contains("stderr", text)
        return self

    def stderr_matches(self, pattern: _Pattern, flags: int = 0) -> Self:
        """``re.search(pattern, stderr)`` finds a match."""
        __tracebackhide__ = True
        self._matches("stderr", pattern, flags)
        return self

    def stderr_empty(self) -> Self:
        """Nothing at all was written to stderr."""
        __tracebackhide__ = True
        if self.result.stderr:
            self._fail("stderr to be empty")
        return self

    def stdout_json(self, expected: Any = _UNSET) -> Any:
        """stdout parsed as JSON (the parsed value, not the checker).

        With ``expected``, the parsed value must also equal it (as ``assert_file(...).json_equals``
        checks a file); the message then shows a diff.
        """
        __tracebackhide__ = True
        try:
            actual = json.loads(self.result.stdout)
        except json.JSONDecodeError as exc:
            self._fail(
                "stdout to be JSON",
                f"  json error: {exc.msg} at line {exc.lineno} column {exc.colno}",
            )
        if expected is not _UNSET and actual != expected:
            self._fail(
                "stdout to hold the expected JSON",
                _diff(_pretty_json(expected), _pretty_json(actual), "stdout"),
            )
        return actual


def assert_exec(result: ExecResult) -> ExecAssertion:
    """A chainable checker for ``result``: ``assert_exec(r).succeeded().stdout_contains("x")``."""
    return ExecAssertion(result)


# -- files ----------------------------------------------------------------------------------
class FileAssertion:
    """Checks on one path inside a sandbox; every check returns ``self``."""

    def __init__(self, sandbox: Sandbox, path: str) -> None:
        self.sandbox = sandbox
        self.path = path

    @property
    def _shown(self) -> str:
        full = self.sandbox.fs.abspath(self.path)
        return full if full == self.path else f"{self.path} ({full})"

    def _fail(self, expectation: str, detail: str | None = None) -> NoReturn:
        __tracebackhide__ = True
        text = f"assert_file: expected {self._shown} {expectation}\n  in: {_where(self.sandbox)}"
        _fail(text + ("\n" + detail if detail else ""))

    def _stat(self) -> FileEntry | None:
        try:
            return self.sandbox.fs.stat(self.path)
        except FileNotFoundError:
            return None

    def _read(self, expectation: str) -> bytes:
        __tracebackhide__ = True
        try:
            return self.sandbox.fs.read_bytes(self.path)
        except FileNotFoundError:
            self._fail(expectation, "  but it does not exist")
        except (IsADirectoryError, KodeError):
            # Backends report reading a directory differently; ask, then re-raise anything else.
            entry = self._stat()
            if entry is not None and entry.type == "dir":
                self._fail(expectation, "  but it is a directory")
            raise

    def _read_text(self, expectation: str) -> str:
        __tracebackhide__ = True
        return self._read(expectation).decode("utf-8", errors="replace")

    def exists(self) -> Self:
        """The path exists (file, directory or symlink)."""
        __tracebackhide__ = True
        if not self.sandbox.fs.exists(self.path):
            self._fail("to exist", _listing_hint(self.sandbox, self.path) or None)
        return self

    def missing(self) -> Self:
        """The path does not exist."""
        __tracebackhide__ = True
        entry = self._stat()
        if entry is not None:
            self._fail("not to exist", f"  but it is a {entry.type} of {entry.size} bytes")
        return self

    def is_dir(self) -> Self:
        """The path is a directory."""
        __tracebackhide__ = True
        entry = self._stat()
        if entry is None:
            self._fail("to be a directory", "  but it does not exist")
        if entry.type != "dir":
            self._fail("to be a directory", f"  but it is a {entry.type}")
        return self

    def equals(self, expected: str | bytes) -> Self:
        """The content is exactly ``expected`` (text compared as UTF-8, bytes byte for byte)."""
        __tracebackhide__ = True
        actual = self._read("to have the expected content")
        if isinstance(expected, bytes):
            if actual != expected:
                self._fail("to have the expected content", _bytes_diff(expected, actual, self.path))
        else:
            text = actual.decode("utf-8", errors="replace")
            if text != expected:
                self._fail("to have the expected content", _diff(expected, text, self.path))
        return self

    def contains(self, text: str | bytes) -> Self:
        """``text`` occurs in the content."""
        __tracebackhide__ = True
        want = f"to contain {text!r}"
        actual = self._read(want)
        found = (
            text in actual if isinstance(text, bytes) else text in actual.decode("utf-8", "replace")
        )
        if not found:
            self._fail(want, _tail(actual.decode("utf-8", "replace"), "content"))
        return self

    def matches(self, pattern: _Pattern, flags: int = 0) -> Self:
        """``re.search(pattern, content)`` finds a match."""
        __tracebackhide__ = True
        regex = _compile(pattern, flags)
        want = f"to match the regex {regex.pattern!r} (re.search)"
        text = self._read_text(want)
        if regex.search(text) is None:
            self._fail(want, _tail(text, "content"))
        return self

    def json_equals(self, expected: Any) -> Self:
        """The content parses as JSON equal to ``expected``."""
        __tracebackhide__ = True
        want = "to hold the expected JSON"
        text = self._read_text(want)
        try:
            actual = json.loads(text)
        except json.JSONDecodeError as exc:
            detail = f"  but it is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            self._fail(want, detail + "\n" + _tail(text, "content"))
        if actual != expected:
            self._fail(want, _diff(_pretty_json(expected), _pretty_json(actual), self.path))
        return self

    def has_mode(self, mode: int) -> Self:
        """The permission bits are ``mode`` (e.g. ``0o755``)."""
        __tracebackhide__ = True
        want = f"to have mode {mode:#o}"
        entry = self._stat()
        if entry is None:
            self._fail(want, "  but it does not exist")
        actual = entry.mode & 0o7777
        if actual != mode & 0o7777:
            self._fail(want, f"  but its mode is {actual:#o}")
        return self


def _pretty_json(value: Any) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=repr) + "\n"
    except (TypeError, ValueError):
        # Mixed-type keys cannot be sorted; the unsorted form still diffs usefully.
        return json.dumps(value, indent=2, ensure_ascii=False, default=repr) + "\n"


def _listing_hint(sandbox: Sandbox, path: str) -> str:
    """What the parent directory does hold, so a typo in a name is obvious."""
    parent = posixpath.dirname(sandbox.fs.abspath(path))
    try:
        names = sorted(entry.name for entry in sandbox.fs.list(parent))
    except FileNotFoundError:
        return f"  its directory {parent} does not exist either"
    except (OSError, KodeError):
        # Only a hint: the parent may lie outside the sandbox (work_dir's own parent).
        return ""
    if not names:
        return f"  its directory {parent} is empty"
    shown = ", ".join(names[:30]) + (f", ... ({len(names) - 30} more)" if len(names) > 30 else "")
    return f"  {parent} holds: {shown}"


def assert_file(sandbox: Sandbox, path: str) -> FileAssertion:
    """A chainable checker for ``path`` inside ``sandbox`` (relative paths: against work_dir)."""
    return FileAssertion(sandbox, path)


# -- trees ----------------------------------------------------------------------------------
class TreeAssertion:
    """Checks on the files below one directory inside a sandbox; every check returns ``self``."""

    def __init__(self, sandbox: Sandbox, path: str = ".") -> None:
        self.sandbox = sandbox
        self.path = path

    def _entries(self, expectation: str) -> dict[str, FileEntry]:
        """Every entry below the root, keyed by its path relative to the root."""
        __tracebackhide__ = True
        root = self.sandbox.fs.abspath(self.path)
        try:
            entries = self.sandbox.fs.list(root, depth=_TREE_DEPTH)
        except FileNotFoundError:
            self._fail(expectation, "  but the directory does not exist")
        return {posixpath.relpath(entry.path, root): entry for entry in entries}

    def _fail(self, expectation: str, detail: str) -> NoReturn:
        __tracebackhide__ = True
        root = self.sandbox.fs.abspath(self.path)
        _fail(f"assert_tree: expected {root} {expectation}\n  in: {_where(self.sandbox)}\n{detail}")

    def equals(self, expected: Mapping[str, _TreeContent]) -> Self:
        """The files below the root are exactly ``expected`` (``{relpath: content}``).

        Directories are implied by the file paths; content is ``str`` (compared as UTF-8),
        ``bytes`` or ``...`` (any content).
        """
        __tracebackhide__ = True
        want = "to hold exactly the expected files"
        wanted = {posixpath.normpath(rel): content for rel, content in expected.items()}
        entries = self._entries(want)
        files = {rel: entry for rel, entry in entries.items() if entry.type != "dir"}
        missing = sorted(set(wanted) - set(files))
        unexpected = sorted(set(files) - set(wanted))
        differing: list[str] = []
        for rel in sorted(set(wanted) & set(files)):
            content = wanted[rel]
            if content is ...:
                continue
            problem = self._compare(rel, files[rel], content)
            if problem is not None:
                differing.append(problem)
        if missing or unexpected or differing:
            sections = [f"  expected {len(wanted)} files, found {len(files)}"]
            if missing:
                sections.append("missing files:\n" + "\n".join(f"- {rel}" for rel in missing))
            if unexpected:
                sections.append("unexpected files:\n" + "\n".join(f"- {rel}" for rel in unexpected))
            if differing:
                sections.append("differing files:\n" + "\n".join(differing))
            self._fail(want, "\n".join(sections))
        return self

    def _compare(self, rel: str, entry: FileEntry, expected: str | bytes) -> str | None:
        try:
            actual = self.sandbox.fs.read_bytes(entry.path)
        except (OSError, KodeError) as exc:
            if entry.type != "symlink":
                raise
            # A dangling symlink or one pointing at a directory has no content to compare.
            target = f" -> {entry.symlink_target}" if entry.symlink_target else ""
            return f"- {rel}: unreadable {entry.type}{target} ({type(exc).__name__})"
        if isinstance(expected, bytes):
            if actual == expected:
                return None
            diff = _bytes_diff(expected, actual, rel)
        else:
            text = actual.decode("utf-8", errors="replace")
            if text == expected:
                return None
            diff = _diff(expected, text, rel)
        return f"- {rel}\n" + _indent(diff, "    ")

    def contains_paths(self, paths: Iterable[str]) -> Self:
        """Each of ``paths`` (relative to the root; files or directories) exists."""
        __tracebackhide__ = True
        wanted = [posixpath.normpath(rel) for rel in paths]
        want = "to contain the listed paths"
        entries = self._entries(want)
        missing = [rel for rel in wanted if rel not in entries]
        if missing:
            present = sorted(rel + ("/" if entries[rel].type == "dir" else "") for rel in entries)
            shown = present[:50]
            more = f"\n  ... ({len(present) - 50} more)" if len(present) > 50 else ""
            detail = (
                "missing paths:\n"
                + "\n".join(f"- {rel}" for rel in missing)
                + "\npresent:\n"
                + ("\n".join(f"  {rel}" for rel in shown) or "  (nothing)")
                + more
            )
            self._fail(want, detail)
        return self


def assert_tree(sandbox: Sandbox, path: str = ".") -> TreeAssertion:
    """A chainable checker for the tree below ``path`` inside ``sandbox``."""
    return TreeAssertion(sandbox, path)
