"""pytest_kode.strategies: the values are what they promise, and they round-trip through a real
LocalSandbox (fs.write/fs.read_bytes, exec through bash)."""

from __future__ import annotations

import posixpath
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_kode.backends.local import LocalSandbox, detect_isolation
from pytest_kode.strategies import (
    EXAMPLES_DIR,
    binary_contents,
    clean_directory,
    file_contents,
    file_trees,
    path_components,
    safe_relative_paths,
    sandbox_settings,
    shell_safe_arguments,
    text_contents,
)

pytest_plugins = "pytester"

ISOLATION = detect_isolation()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSandbox]:
    # Module-scoped on purpose: the documented pattern shares one sandbox across examples.
    root = tmp_path_factory.mktemp("strategies-root")
    with LocalSandbox(root_dir=root) as sandbox:
        yield sandbox
    assert list(root.iterdir()) == [], "the sandbox left files behind"


# -- the values themselves -----------------------------------------------------------------
@given(path=safe_relative_paths())
def test_safe_relative_paths_stay_inside_and_are_normalised(path: str) -> None:
    assert path and not path.startswith("/")
    assert posixpath.normpath(path) == path
    parts = path.split("/")
    assert ".." not in parts and "." not in parts and "" not in parts
    assert "\x00" not in path and len(path) <= 200 and len(parts) <= 4
    assert all(len(part.encode()) <= 255 and not part.startswith("-") for part in parts)
    joined = posixpath.normpath(posixpath.join("/home/user", path))
    assert joined.startswith("/home/user/")


@given(name=path_components(ascii_only=True, max_len=5))
def test_ascii_components_keep_to_the_portable_alphabet(name: str) -> None:
    assert 1 <= len(name) <= 5 and name.isascii() and name not in (".", "..")
    assert set(name) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+=@,~"
    )


@settings(max_examples=50)
@given(tree=file_trees(min_files=3, max_files=6))
def test_file_trees_never_make_a_file_a_directory(tree: dict[str, str | bytes]) -> None:
    assert 3 <= len(tree) <= 6 + 3
    for path in tree:
        parent = posixpath.dirname(path)
        while parent:
            assert parent not in tree, f"{parent!r} is both a file and the parent of {path!r}"
            parent = posixpath.dirname(parent)


@given(text=text_contents(), data=binary_contents(), either=file_contents())
def test_contents_encode(text: str, data: bytes, either: str | bytes) -> None:
    assert text.encode("utf-8").decode("utf-8") == text  # no surrogates
    assert isinstance(data, bytes)
    assert isinstance(either, (str, bytes))


@settings(max_examples=40, deadline=None)
@given(arg=shell_safe_arguments())
def test_shell_safe_arguments_survive_bash_on_the_host(arg: str) -> None:
    out = subprocess.run(
        ["bash", "-c", "printf %s " + shlex.quote(arg)], capture_output=True, check=True
    ).stdout
    assert out == arg.encode("utf-8")


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        safe_relative_paths(max_depth=0)
    with pytest.raises(ValueError, match="min_files"):
        file_trees(min_files=3, max_files=1)
    with pytest.raises(ValueError, match="max_len"):
        path_components(max_len=0)


# -- through a real sandbox -----------------------------------------------------------------
@sandbox_settings(max_examples=20)
@given(tree=file_trees(max_files=5))
def test_file_trees_round_trip_through_a_local_sandbox(
    box: LocalSandbox, tree: dict[str, str | bytes]
) -> None:
    with clean_directory(box) as where:
        for rel, data in tree.items():
            box.fs.write(f"{where}/{rel}", data)
        for rel, data in tree.items():
            expected = data.encode("utf-8") if isinstance(data, str) else data
            assert box.fs.read_bytes(f"{where}/{rel}") == expected
        # The sandbox's own view agrees: exactly these files, nothing left from earlier examples.
        found = box.exec("find . -type f -printf '%P\\0'", cwd=where)
        assert found.ok, found.stderr
        assert sorted(filter(None, (found.stdout_bytes or b"").split(b"\0"))) == sorted(
            rel.encode() for rel in tree
        )


@sandbox_settings(max_examples=25)
@given(args=st.lists(shell_safe_arguments(max_size=24), min_size=1, max_size=4))
def test_shell_safe_arguments_survive_exec_in_a_local_sandbox(
    box: LocalSandbox, args: list[str]
) -> None:
    command = "printf '%s\\0' " + " ".join(shlex.quote(arg) for arg in args)
    result = box.exec(command)
    assert result.ok, result.stderr
    assert result.stdout_bytes == b"".join(arg.encode() + b"\0" for arg in args)


def test_clean_directory_is_fresh_and_removed_even_on_failure(box: LocalSandbox) -> None:
    with pytest.raises(RuntimeError):
        with clean_directory(box, name="fixed") as where:
            box.fs.write(f"{where}/left.txt", "x")
            raise RuntimeError("the example failed")
    assert not box.fs.exists(where)
    # A leftover of a crashed run under the same name is wiped before the next example.
    box.fs.write(f"{where}/stale.txt", "old")
    with clean_directory(box, name="fixed") as again:
        assert again == where and box.fs.list(again) == []
    assert box.fs.list(posixpath.join(box.options.work_dir, EXAMPLES_DIR)) == []
    with pytest.raises(ValueError, match="one plain path component"):
        with clean_directory(box, name="a/b"):
            pass


def test_sandbox_settings_keep_other_suppressions() -> None:
    chosen = sandbox_settings(max_examples=3, suppress_health_check=[HealthCheck.too_slow])
    assert chosen.max_examples == 3 and chosen.deadline is None
    assert set(chosen.suppress_health_check) == {
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
    }


def test_documented_pattern_works_with_the_plugin_fixture(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(tmp_path / "root"))
    pytester.makepyfile(
        """
        import pytest
        from hypothesis import given
        from pytest_kode.strategies import clean_directory, file_trees, sandbox_settings

        @pytest.mark.sandbox(scope="module")
        @sandbox_settings(max_examples=8)
        @given(tree=file_trees(min_files=1, max_files=3))
        def test_round_trip(sandbox, tree):
            with clean_directory(sandbox) as where:
                for rel, data in tree.items():
                    sandbox.fs.write(f"{where}/{rel}", data)
                out = sandbox.exec("find . -type f | wc -l", cwd=where).stdout.strip()
                assert out == str(len(tree))

        @given(tree=file_trees(max_files=1))
        def test_without_the_settings_hypothesis_refuses(sandbox, tree):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--sandbox-backend=local")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*function_scoped_fixture*"])
    assert list((tmp_path / "root").iterdir()) == []
