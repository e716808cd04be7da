"""The backend-neutral layer: BoundedOutput, Transcript, SandboxFS.glob, errors, Sandbox life-cycle."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from _dirsandbox import DirSandbox
from hypothesis import given
from hypothesis import strategies as st

from pytest_kode import errors
from pytest_kode.errors import (
    BackendUnavailableError,
    ConfigError,
    KodeError,
    RateLimitError,
    SandboxConnectionError,
    SandboxCreateError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
    SandboxPathError,
)
from pytest_kode.options import SandboxOptions
from pytest_kode.sandbox import ELISION_MARKER, BoundedOutput, ExecResult, Transcript


def _marker(n: int) -> bytes:
    return ELISION_MARKER.format(n=n).encode()


# -- BoundedOutput --------------------------------------------------------------------------
def test_output_under_the_limit_is_kept_whole() -> None:
    out = BoundedOutput(10)
    out.write(b"hello")
    out.write(b"world")
    assert out.getvalue() == b"helloworld"
    assert not out.truncated and out.elided == 0


def test_output_over_the_limit_keeps_head_and_tail_with_a_counting_marker() -> None:
    out = BoundedOutput(10)
    for chunk in (b"0123456789", b"abcdefghij", b"KLMNO"):
        out.write(chunk)
    assert out.truncated
    assert out.elided == 15
    assert out.getvalue() == b"01234" + _marker(15) + b"KLMNO"
    assert b"15 bytes elided" in out.getvalue()


def test_text_decodes_with_replacement() -> None:
    out = BoundedOutput(100)
    out.write("grüße ".encode() + b"\xff")
    assert out.text() == "grüße \ufffd"


@given(
    data=st.binary(max_size=300),
    limit=st.integers(min_value=0, max_value=80),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=12),
)
def test_any_chunking_gives_the_input_or_head_marker_tail(
    data: bytes, limit: int, cuts: list[int]
) -> None:
    out = BoundedOutput(limit)
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut <= len(data))})
    for start, end in zip(bounds, bounds[1:], strict=False):
        out.write(data[start:end])
    value = out.getvalue()
    if len(data) <= limit:
        assert value == data
        assert not out.truncated
    else:
        head = limit // 2
        tail = limit - head
        elided = len(data) - limit
        assert value == data[:head] + _marker(elided) + data[len(data) - tail :]
        assert out.truncated and out.elided == elided
    assert len(value) <= limit + len(_marker(out.elided))


# -- Transcript -----------------------------------------------------------------------------
def _exec_result(n: int, **fields: object) -> ExecResult:
    return ExecResult(command=f"cmd {n}", exit_code=0, **fields)  # type: ignore[arg-type]


def test_transcript_keeps_the_last_200_entries_in_order() -> None:
    transcript = Transcript()
    for n in range(250):
        transcript.append(_exec_result(n))
    assert len(transcript) == Transcript.MAX_ENTRIES == 200
    commands = [entry.command for entry in transcript]
    assert commands == [f"cmd {n}" for n in range(50, 250)]
    assert transcript[0].command == "cmd 50" and transcript[-1].command == "cmd 249"


def test_transcript_clips_each_stream_to_64_kib_keeping_head_and_tail() -> None:
    big = "H" * 40_000 + "m" * 100_000 + "T" * 40_000
    transcript = Transcript()
    transcript.append(_exec_result(1, stdout=big, stderr="small", stdout_bytes=big.encode()))
    entry = transcript[0]
    assert Transcript.MAX_STREAM_BYTES == 64 * 1024
    elided = len(big) - 64 * 1024
    assert entry.stdout == "H" * 32_768 + _marker(elided).decode() + "T" * 32_768
    assert entry.stderr == "small"
    assert entry.stdout_bytes is None


def test_transcript_since_returns_what_came_after_a_mark() -> None:
    transcript = Transcript()
    transcript.append(_exec_result(0))
    mark = transcript.total
    transcript.append(_exec_result(1))
    transcript.append(_exec_result(2))
    assert [entry.command for entry in transcript.since(mark)] == ["cmd 1", "cmd 2"]
    assert transcript.since(transcript.total) == []
    for n in range(300):
        transcript.append(_exec_result(n))
    assert len(transcript.since(mark)) == 200


# -- SandboxFS.glob -------------------------------------------------------------------------
@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[DirSandbox]:
    with DirSandbox(tmp_path / "sb") as sb:
        yield sb


@pytest.fixture
def tree(sandbox: DirSandbox) -> DirSandbox:
    for path in (
        "a.txt",
        "b.txt",
        "ab.txt",
        "c.log",
        "a+b.txt",
        "src/x.py",
        "src/pkg/y.py",
        "src/pkg/sub/z.py",
        "src/pkg/sub/data.json",
        "docs/readme.md",
    ):
        sandbox.fs.write(path, path)
    return sandbox


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*.txt", ["a+b.txt", "a.txt", "ab.txt", "b.txt"]),
        ("?.txt", ["a.txt", "b.txt"]),
        ("[ab].txt", ["a.txt", "b.txt"]),
        ("[!a].txt", ["b.txt"]),
        ("[a-b]?.txt", ["ab.txt"]),
        ("a+*.txt", ["a+b.txt"]),
        ("*.py", []),
        ("src/*.py", ["src/x.py"]),
        ("*/*.py", ["src/x.py"]),
        ("**/*.py", ["src/pkg/sub/z.py", "src/pkg/y.py", "src/x.py"]),
        ("src/**/*.py", ["src/pkg/sub/z.py", "src/pkg/y.py", "src/x.py"]),
        ("src/**/sub/*", ["src/pkg/sub/data.json", "src/pkg/sub/z.py"]),
        ("**/sub/z.py", ["src/pkg/sub/z.py"]),
        (
            "src/**",
            [
                "src/pkg",
                "src/pkg/sub",
                "src/pkg/sub/data.json",
                "src/pkg/sub/z.py",
                "src/pkg/y.py",
                "src/x.py",
            ],
        ),
        ("docs/*", ["docs/readme.md"]),
        ("src/pkg/../x.py", ["src/x.py"]),
        ("a.txt", ["a.txt"]),
        ("nope.txt", []),
        ("missing/*.txt", []),
        ("missing/**", []),
    ],
)
def test_glob_relative_patterns(tree: DirSandbox, pattern: str, expected: list[str]) -> None:
    assert tree.fs.glob(pattern) == expected


def test_glob_absolute_patterns_return_absolute_paths(tree: DirSandbox) -> None:
    assert tree.fs.glob("/home/user/src/*.py") == ["/home/user/src/x.py"]
    assert tree.fs.glob("/home/user/**/z.py") == ["/home/user/src/pkg/sub/z.py"]
    assert tree.fs.glob("/home/user/?.txt") == ["/home/user/a.txt", "/home/user/b.txt"]
    assert tree.fs.glob("/home/user/a.txt") == ["/home/user/a.txt"]


def test_glob_follows_a_changed_work_dir(tmp_path: Path) -> None:
    with DirSandbox(tmp_path / "w", work_dir="/srv/app") as sb:
        sb.fs.write("lib/m.py", "")
        assert sb.fs.glob("**/*.py") == ["lib/m.py"]
        assert sb.fs.glob("/srv/app/lib/*") == ["/srv/app/lib/m.py"]


# -- errors ---------------------------------------------------------------------------------
def test_error_message_names_backend_sandbox_and_hint() -> None:
    error = SandboxNotFoundError(
        "the sandbox is gone", backend="e2b", sandbox_id="sbx-9", hint="create a new one"
    )
    assert str(error) == "[backend=e2b sandbox=sbx-9] the sandbox is gone -- create a new one"
    assert (error.message, error.backend, error.sandbox_id, error.hint) == (
        "the sandbox is gone",
        "e2b",
        "sbx-9",
        "create a new one",
    )
    assert str(KodeError("plain")) == "plain"
    assert str(KodeError("x", backend="local")) == "[backend=local] x"
    assert str(KodeError("x", hint="do y")) == "x -- do y"


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_pickles_with_its_fields(name: str) -> None:
    cls = getattr(errors, name)
    error = cls("it broke", backend="local", sandbox_id="dir-1", hint="retry")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert str(again) == str(error)
    assert (again.backend, again.sandbox_id, again.hint) == ("local", "dir-1", "retry")


def test_error_class_relations() -> None:
    assert issubclass(SandboxFileNotFoundError, FileNotFoundError)
    assert issubclass(SandboxFileNotFoundError, OSError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(SandboxPathError, ValueError)
    assert issubclass(RateLimitError, SandboxConnectionError)
    for cls in (
        BackendUnavailableError,
        ConfigError,
        RateLimitError,
        SandboxConnectionError,
        SandboxCreateError,
        SandboxFileNotFoundError,
        SandboxNotFoundError,
        SandboxPathError,
    ):
        assert issubclass(cls, KodeError)
    with pytest.raises(FileNotFoundError):
        raise SandboxFileNotFoundError("no such file: /x", backend="local")


def test_fs_missing_path_is_catchable_as_file_not_found(sandbox: DirSandbox) -> None:
    with pytest.raises(FileNotFoundError):
        sandbox.fs.read("no-such-file")


# -- Sandbox life-cycle ---------------------------------------------------------------------
def test_init_is_idempotent_and_returns_self(tmp_path: Path) -> None:
    sb = DirSandbox(tmp_path / "sb")
    try:
        assert sb.init() is sb
        assert sb.init() is sb
        assert sb.calls == ["create"]
        assert not sb.resumed
        assert sb.sandbox_id.startswith("dir-")
        assert repr(sb) == f"<DirSandbox {sb.sandbox_id} live>"
    finally:
        sb.dispose()


def test_dispose_is_idempotent(tmp_path: Path) -> None:
    sb = DirSandbox(tmp_path / "sb").init()
    sb.dispose()
    sb.dispose()
    assert sb.calls == ["create", "dispose"]
    assert sb.disposed
    assert not (tmp_path / "sb").exists()
    assert repr(sb).endswith(" disposed>")


def test_dispose_before_init_is_harmless(tmp_path: Path) -> None:
    sb = DirSandbox(tmp_path / "sb")
    sb.dispose()
    assert sb.disposed


def test_with_disposes_on_normal_exit_and_on_error(tmp_path: Path) -> None:
    with DirSandbox(tmp_path / "one") as sb:
        assert sb.is_alive()
    assert sb.calls == ["create", "dispose"]
    with pytest.raises(ZeroDivisionError):
        with DirSandbox(tmp_path / "two") as other:
            1 / 0  # noqa: B018
    assert other.calls == ["create", "dispose"]


def test_with_disposes_when_init_fails_half_way(tmp_path: Path) -> None:
    sb = DirSandbox(tmp_path / "sb", fail_create=True)
    with pytest.raises(RuntimeError, match="half-way"):
        with sb:
            pytest.fail("the body must not run when init failed")
    assert sb.calls == ["create", "dispose"]
    assert sb.disposed
    assert not (tmp_path / "sb").exists()


def test_exec_outside_the_life_cycle_raises_kode_error(tmp_path: Path) -> None:
    sb = DirSandbox(tmp_path / "sb")
    with pytest.raises(KodeError, match="not initialised") as info:
        sb.exec("true")
    assert info.value.backend == "dirtest"
    assert "init()" in str(info.value)
    with pytest.raises(KodeError, match="no id yet"):
        _ = sb.sandbox_id
    sb.init()
    sb.dispose()
    with pytest.raises(KodeError, match="disposed"):
        sb.exec("true")
    with pytest.raises(KodeError, match="disposed") as again:
        sb.init()
    assert again.value.sandbox_id == sb.sandbox_id
    assert "exec" not in " ".join(sb.calls)


def test_exec_records_the_transcript_and_applies_the_default_timeout(tmp_path: Path) -> None:
    with DirSandbox(tmp_path / "sb", execTimeoutMs=4_321) as sb:
        first = sb.exec("echo one")
        second = sb.exec("echo two >&2; exit 3", timeout_ms=999)
        assert first.ok and first.stdout == "one\n"
        assert second.exit_code == 3 and second.stderr == "two\n" and not second.ok
        assert [entry.command for entry in sb.transcript] == ["echo one", "echo two >&2; exit 3"]
        assert sb.calls[1:] == ["exec timeout_ms=4321", "exec timeout_ms=999"]
        assert sb.exec_time_ms == pytest.approx(first.duration_ms + second.duration_ms)
        for bad in (0, -5, 1.5, True, "100"):
            with pytest.raises(ConfigError, match=r"needs an int > 0 \(milliseconds\)"):
                sb.exec("true", timeout_ms=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="needs the command as a str"):
            sb.exec(["echo", "x"])  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"needs str or bytes"):
            sb.exec("cat", stdin=123)  # type: ignore[arg-type]
        assert len(sb.transcript) == 2  # rejected calls never ran


def test_a_sandbox_id_makes_init_connect_and_resume(tmp_path: Path) -> None:
    with DirSandbox(tmp_path / "sb", sandbox_id="dir-existing") as sb:
        assert sb.resumed
        assert sb.calls == ["connect"]
        assert sb.sandbox_id == "dir-existing"


def test_options_and_field_overrides(tmp_path: Path) -> None:
    base = SandboxOptions(timeout_ms=1_000, envs={"A": "1"})
    sb = DirSandbox(tmp_path / "sb", base, timeoutMs=2_000)
    assert sb.options.timeout_ms == 2_000 and sb.options.envs == {"A": "1"}
    assert DirSandbox(tmp_path / "x", base).options is base
    with pytest.raises(ConfigError, match="work_dir='rel'"):
        DirSandbox(tmp_path / "y", work_dir="rel")
    assert not os.path.exists(tmp_path / "sb")
