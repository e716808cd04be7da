"""assert_exec / assert_file / assert_tree: what passes, what fails, and what a failure says."""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _dirsandbox import DirSandbox

from pytest_kode.assertions import ExecAssertion, assert_exec, assert_file, assert_tree
from pytest_kode.sandbox import ExecResult, Sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent


def _result(**fields: Any) -> ExecResult:
    data: dict[str, Any] = {"command": "make check", "exit_code": 0, "duration_ms": 12.5}
    data.update(fields)
    return ExecResult(**data)


def _message(check: Callable[[], object]) -> str:
    with pytest.raises(AssertionError) as info:
        check()
    return str(info.value)


@pytest.fixture(params=["dirtest", "local"])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    """The checkers use only the public Sandbox API, so they must agree on every backend."""
    if request.param == "dirtest":
        with DirSandbox(tmp_path / "sb") as sb:
            yield sb
        return
    local = pytest.importorskip("pytest_kode.backends.local")
    with local.LocalSandbox() as sb:
        yield sb


# -- assert_exec ----------------------------------------------------------------------------
def test_passing_checks_chain_and_return_the_same_checker() -> None:
    result = _result(stdout='{"a": [1, 2]}\n', stderr="")
    checker = assert_exec(result)
    chained = (
        checker.succeeded()
        .exit_code(0)
        .stdout_contains('"a"')
        .stdout_matches(r"\[1, \d\]")
        .stdout_equals('{"a": [1, 2]}\n')
        .stderr_empty()
        .finished_within(50)
    )
    assert chained is checker
    assert isinstance(chained, ExecAssertion)
    assert checker.stdout_json() == {"a": [1, 2]}


def test_real_command_results_pass_and_fail_as_expected(sandbox: Sandbox) -> None:
    ok = sandbox.exec("printf 'hello\\n'; printf 'warn\\n' >&2")
    assert_exec(ok).succeeded().stdout_equals("hello\n").stderr_equals("warn\n")
    bad = sandbox.exec("echo partial; exit 7")
    assert_exec(bad).failed(7).exit_code(7).stdout_equals("partial", strip=True)
    message = _message(lambda: assert_exec(bad).succeeded())
    assert "command:   echo partial; exit 7" in message
    assert "exit code: 7" in message


@pytest.mark.parametrize(
    ("result", "check", "expectation"),
    [
        (_result(exit_code=3), lambda c: c.succeeded(), "the command to succeed"),
        (_result(exit_code=124, timed_out=True), lambda c: c.succeeded(), "the command to succeed"),
        (_result(exit_code=0), lambda c: c.failed(), "the command to fail, but it exited 0"),
        (_result(exit_code=2), lambda c: c.failed(1), "fail with exit code 1, but it exited 2"),
        (_result(exit_code=124, timed_out=True), lambda c: c.failed(), "but it timed out"),
        (_result(exit_code=1), lambda c: c.exit_code(0), "exit code 0"),
        (_result(exit_code=0), lambda c: c.timed_out(), "the command to time out"),
        (_result(duration_ms=80.0), lambda c: c.finished_within(50), "within 50 ms (took 80.0 ms)"),
        (_result(timed_out=True, exit_code=124), lambda c: c.finished_within(1e9), "within"),
        (_result(stdout="abc"), lambda c: c.stdout_contains("abd"), "stdout to contain 'abd'"),
        (
            _result(stdout="abc"),
            lambda c: c.stdout_matches(r"^b"),
            "stdout to match the regex '^b'",
        ),
        (_result(stdout="abc"), lambda c: c.stdout_equals("abd"), "stdout to equal"),
        (_result(stderr="xyz"), lambda c: c.stderr_contains("q"), "stderr to contain 'q'"),
        (_result(stderr="xyz"), lambda c: c.stderr_matches("Z"), "stderr to match the regex 'Z'"),
        (_result(stderr="xyz"), lambda c: c.stderr_equals(""), "stderr to equal"),
        (_result(stderr="xyz"), lambda c: c.stderr_empty(), "stderr to be empty"),
        (_result(stdout="not json"), lambda c: c.stdout_json(), "stdout to be JSON"),
    ],
)
def test_every_failing_check_reports_the_whole_result(
    result: ExecResult, check: Callable[[ExecAssertion], object], expectation: str
) -> None:
    message = _message(lambda: check(assert_exec(result)))
    assert message.startswith("assert_exec: expected ")
    assert expectation in message
    assert f"command:   {result.command}" in message
    assert f"exit code: {result.exit_code}" in message
    assert f"duration:  {result.duration_ms:.1f} ms" in message
    assert f"timed out: {result.timed_out}" in message
    assert "stdout:" in message and "stderr:" in message


def test_failed_with_zero_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="succeeded"):
        assert_exec(_result(exit_code=0)).failed(0)


def test_failed_accepts_any_nonzero_exit_without_a_code() -> None:
    assert_exec(_result(exit_code=1)).failed()
    assert_exec(_result(exit_code=255)).failed().failed(255)


def test_matches_accepts_flags_and_compiled_patterns() -> None:
    checker = assert_exec(_result(stdout="Line one\nSECOND line\n", stderr="Oops"))
    checker.stdout_matches("^second", re.IGNORECASE | re.MULTILINE)
    checker.stdout_matches(re.compile(r"one$", re.MULTILINE))
    checker.stderr_matches(re.compile("oops", re.IGNORECASE))
    with pytest.raises(AssertionError):
        checker.stdout_matches("^second")


def test_equals_failure_shows_a_unified_diff() -> None:
    result = _result(stdout="alpha\nbeta\ngamma\n")
    message = _message(lambda: assert_exec(result).stdout_equals("alpha\nBETA\ngamma\n"))
    assert "--- expected stdout" in message
    assert "+++ actual stdout" in message
    assert "-BETA" in message
    assert "+beta" in message


def test_equals_strip_ignores_only_surrounding_whitespace() -> None:
    checker = assert_exec(_result(stdout="  42\n"))
    checker.stdout_equals("42", strip=True)
    with pytest.raises(AssertionError, match="surrounding whitespace ignored"):
        checker.stdout_equals("4 2", strip=True)
    with pytest.raises(AssertionError):
        checker.stdout_equals("42")


def test_stream_tails_keep_the_last_lines_and_say_they_are_tails() -> None:
    stdout = "".join(f"out line {n}\n" for n in range(1, 101))
    message = _message(lambda: assert_exec(_result(exit_code=1, stdout=stdout)).succeeded())
    assert "stdout (tail: last 40 of 100 lines" in message
    assert "out line 100" in message
    assert "out line 61\n" in message
    assert "out line 60\n" not in message
    assert "stderr: (empty)" in message


def test_short_output_is_shown_whole_without_a_tail_marker() -> None:
    message = _message(lambda: assert_exec(_result(exit_code=1, stderr="boom\nbang")).succeeded())
    assert "stderr:\n    | boom\n    | bang" in message
    assert "tail" not in message


def test_a_huge_line_is_cut_to_a_few_kilobytes() -> None:
    stdout = "x" * 100_000 + "END"
    message = _message(lambda: assert_exec(_result(exit_code=1, stdout=stdout)).succeeded())
    assert message.count("x") < 5_000
    assert "END" in message
    assert "stdout (tail:" in message


def test_truncated_output_is_flagged() -> None:
    message = _message(lambda: assert_exec(_result(exit_code=1, truncated=True)).succeeded())
    assert "truncated: True" in message


def test_stdout_json_failure_says_where_parsing_stopped() -> None:
    message = _message(lambda: assert_exec(_result(stdout='{"a": 1,\n oops}')).stdout_json())
    assert "json error:" in message
    assert "line 2" in message


def test_stdout_json_compares_with_an_expected_value(sandbox: Sandbox) -> None:
    result = sandbox.exec("""printf '{"a": [1, 2], "b": null}'""")
    assert assert_exec(result).stdout_json({"a": [1, 2], "b": None}) == {"a": [1, 2], "b": None}
    message = _message(lambda: assert_exec(result).stdout_json({"a": [1, 3], "b": None}))
    assert "stdout to hold the expected JSON" in message
    assert "-    3" in message and "+    2" in message
    # None is a JSON value: expecting null is a real check, not "no expected value".
    assert "expected JSON" in _message(lambda: assert_exec(result).stdout_json(None))


# -- assert_file ----------------------------------------------------------------------------
def test_file_checks_pass_on_real_files(sandbox: Sandbox) -> None:
    sandbox.fs.write("out/report.txt", "status: ok\ncount: 3\n")
    sandbox.fs.write("out/data.json", json.dumps({"b": [1, 2], "a": None}))
    sandbox.fs.write("out/blob.bin", b"\x00\xff\x10")
    sandbox.exec("chmod 755 out/report.txt")
    checker = assert_file(sandbox, "out/report.txt")
    assert (
        checker.exists()
        .equals("status: ok\ncount: 3\n")
        .equals(b"status: ok\ncount: 3\n")
        .contains("count: 3")
        .contains(b"status")
        .matches(r"count: \d+")
        .has_mode(0o755)
    ) is checker
    assert_file(sandbox, "/home/user/out/data.json").json_equals({"a": None, "b": [1, 2]})
    assert_file(sandbox, "out/blob.bin").equals(b"\x00\xff\x10")
    assert_file(sandbox, "out").exists().is_dir()
    assert_file(sandbox, "out/nothing-here").missing()


def test_file_equals_failure_names_the_path_and_shows_a_diff(sandbox: Sandbox) -> None:
    sandbox.fs.write("cfg/app.ini", "[main]\nport = 8080\ndebug = false\n")
    message = _message(
        lambda: assert_file(sandbox, "cfg/app.ini").equals("[main]\nport = 9090\ndebug = false\n")
    )
    assert (
        "assert_file: expected cfg/app.ini (/home/user/cfg/app.ini) to have the expected content"
        in message
    )
    assert f"in: {sandbox.backend} sandbox {sandbox.sandbox_id}" in message
    assert "--- expected cfg/app.ini" in message
    assert "+++ actual cfg/app.ini" in message
    assert "-port = 9090" in message
    assert "+port = 8080" in message
    assert " debug = false" in message


def test_missing_final_newline_is_visible_in_the_diff(sandbox: Sandbox) -> None:
    sandbox.fs.write("a.txt", "one\n")
    message = _message(lambda: assert_file(sandbox, "a.txt").equals("one"))
    assert "No newline at end" in message


def test_binary_mismatch_reports_sizes_and_first_difference(sandbox: Sandbox) -> None:
    sandbox.fs.write("b.bin", b"\x00\x01\x02\xff")
    message = _message(lambda: assert_file(sandbox, "b.bin").equals(b"\x00\x01\x03\xff\xfe"))
    assert "expected 5 bytes, actual 4 bytes" in message
    assert "offset 2" in message


def test_content_checks_on_a_missing_file_say_it_does_not_exist(sandbox: Sandbox) -> None:
    for check in (
        lambda: assert_file(sandbox, "nope.txt").equals("x"),
        lambda: assert_file(sandbox, "nope.txt").contains("x"),
        lambda: assert_file(sandbox, "nope.txt").matches("x"),
        lambda: assert_file(sandbox, "nope.txt").json_equals({}),
        lambda: assert_file(sandbox, "nope.txt").has_mode(0o644),
        lambda: assert_file(sandbox, "nope.txt").is_dir(),
    ):
        message = _message(check)
        assert "/home/user/nope.txt" in message
        assert "but it does not exist" in message


def test_exists_failure_lists_the_parent_directory(sandbox: Sandbox) -> None:
    sandbox.fs.write("logs/app.log", "")
    sandbox.fs.write("logs/db.log", "")
    message = _message(lambda: assert_file(sandbox, "logs/ap.log").exists())
    assert "to exist" in message
    assert "/home/user/logs holds: app.log, db.log" in message
    message = _message(lambda: assert_file(sandbox, "nodir/x").exists())
    assert "its directory /home/user/nodir does not exist either" in message


def test_missing_and_is_dir_failures_say_what_is_there(sandbox: Sandbox) -> None:
    sandbox.fs.write("f.txt", "12345")
    assert "but it is a file of 5 bytes" in _message(
        lambda: assert_file(sandbox, "f.txt").missing()
    )
    assert "but it is a file" in _message(lambda: assert_file(sandbox, "f.txt").is_dir())
    sandbox.fs.mkdir("d")
    assert "but it is a directory" in _message(lambda: assert_file(sandbox, "d").equals("x"))


def test_contains_and_matches_failures_show_the_content(sandbox: Sandbox) -> None:
    sandbox.fs.write("log.txt", "started\nlistening on 8000\n")
    message = _message(lambda: assert_file(sandbox, "log.txt").contains("ready"))
    assert "to contain 'ready'" in message
    assert "listening on 8000" in message
    message = _message(lambda: assert_file(sandbox, "log.txt").matches(r"port \d+"))
    assert "to match the regex 'port \\\\d+'" in message
    assert "started" in message
    with pytest.raises(AssertionError, match="to contain b'ready'"):
        assert_file(sandbox, "log.txt").contains(b"ready")


def test_json_equals_failure_diffs_pretty_json(sandbox: Sandbox) -> None:
    sandbox.fs.write("r.json", json.dumps({"name": "kode", "tags": ["a", "b"], "n": 1}))
    message = _message(
        lambda: assert_file(sandbox, "r.json").json_equals(
            {"name": "kode", "tags": ["a", "c"], "n": 1}
        )
    )
    assert '-    "c"' in message
    assert '+    "b"' in message
    assert '   "name": "kode",' in message
    sandbox.fs.write("bad.json", "{'single': 'quotes'}")
    message = _message(lambda: assert_file(sandbox, "bad.json").json_equals({}))
    assert "but it is not JSON" in message
    assert "{'single': 'quotes'}" in message


def test_has_mode_compares_permission_bits_in_octal(sandbox: Sandbox) -> None:
    sandbox.fs.write("run.sh", "#!/bin/sh\n")
    sandbox.exec("chmod 640 run.sh")
    assert_file(sandbox, "run.sh").has_mode(0o640)
    message = _message(lambda: assert_file(sandbox, "run.sh").has_mode(0o755))
    assert "to have mode 0o755" in message
    assert "but its mode is 0o640" in message


# -- assert_tree ----------------------------------------------------------------------------
def test_tree_equals_passes_on_the_exact_file_set(sandbox: Sandbox) -> None:
    sandbox.fs.write("site/index.html", "<h1>hi</h1>")
    sandbox.fs.write("site/assets/app.js", "run()")
    sandbox.fs.write("site/assets/logo.png", b"\x89PNG\x00")
    sandbox.fs.mkdir("site/empty")
    checker = assert_tree(sandbox, "site")
    assert (
        checker.equals(
            {
                "index.html": "<h1>hi</h1>",
                "./assets/app.js": "run()",
                "assets/logo.png": b"\x89PNG\x00",
            }
        )
        .equals({"index.html": ..., "assets/app.js": ..., "assets/logo.png": ...})
        .contains_paths(["assets", "assets/app.js", "empty", "index.html"])
    ) is checker
    assert_tree(sandbox, "/home/user/site/assets").equals({"app.js": "run()", "logo.png": ...})


def test_tree_equals_failure_lists_missing_unexpected_and_differing(sandbox: Sandbox) -> None:
    sandbox.fs.write("out/keep.txt", "same\n")
    sandbox.fs.write("out/changed.txt", "new value\n")
    sandbox.fs.write("out/sub/extra.log", "debug\n")
    sandbox.fs.write("out/raw.bin", b"\x00\x01")
    message = _message(
        lambda: assert_tree(sandbox, "out").equals(
            {
                "keep.txt": "same\n",
                "changed.txt": "old value\n",
                "sub/wanted.txt": "x",
                "raw.bin": b"\x00\x02",
            }
        )
    )
    assert "assert_tree: expected /home/user/out to hold exactly the expected files" in message
    assert "expected 4 files, found 4" in message
    assert "missing files:\n- sub/wanted.txt" in message
    assert "unexpected files:\n- sub/extra.log" in message
    assert "differing files:\n- changed.txt\n" in message
    assert "-old value" in message and "+new value" in message
    assert "- raw.bin\n" in message and "offset 1" in message
    assert "keep.txt" not in message


def test_tree_on_a_missing_directory(sandbox: Sandbox) -> None:
    message = _message(lambda: assert_tree(sandbox, "nowhere").equals({}))
    assert "/home/user/nowhere" in message
    assert "the directory does not exist" in message


def test_tree_contains_paths_failure_lists_what_is_missing_and_present(sandbox: Sandbox) -> None:
    sandbox.fs.write("pkg/mod.py", "")
    sandbox.fs.mkdir("pkg/data")
    message = _message(
        lambda: assert_tree(sandbox, "pkg").contains_paths(["mod.py", "__init__.py", "docs"])
    )
    assert "missing paths:\n- __init__.py\n- docs\n" in message
    assert "present:\n  data/\n  mod.py" in message


def test_tree_reports_an_unreadable_symlink_as_differing(sandbox: Sandbox) -> None:
    sandbox.fs.mkdir("t")
    sandbox.exec("ln -s does-not-exist t/link")
    assert_tree(sandbox, "t").equals({"link": ...})
    message = _message(lambda: assert_tree(sandbox, "t").equals({"link": "x"}))
    assert "- link: unreadable symlink -> does-not-exist" in message


# -- as pytest shows them -------------------------------------------------------------------
_FAILING_TESTS = textwrap.dedent(
    """
    from pathlib import Path

    from _dirsandbox import DirSandbox
    from pytest_kode.assertions import assert_exec, assert_file
    from pytest_kode.sandbox import ExecResult, Sandbox


    def test_exec():
        result = ExecResult(
            command="python build.py --strict",
            exit_code=3,
            stdout="step 1\\nstep 2\\nbuild failed here\\n",
            stderr="Traceback: oops\\n",
            duration_ms=1234.5,
        )
        assert_exec(result).stdout_contains("step").succeeded()


    def test_file(tmp_path: Path):
        with DirSandbox(tmp_path / "sb") as sb:
            sb.fs.write("conf.txt", "mode = fast\\n")
            assert_file(sb, "conf.txt").exists().equals("mode = safe\\n")
    """
)


@pytest.mark.parametrize("assert_mode", ["plain", "rewrite"])
def test_pytest_output_shows_the_message_and_hides_plugin_frames(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, assert_mode: str
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    pytester.makepyfile(test_user=_FAILING_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:kode", "-p", "no:cacheprovider", f"--assert={assert_mode}"
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            '*assert_exec(result).stdout_contains("step").succeeded()',
            "E*AssertionError: assert_exec: expected the command to succeed (exit code 0, not timed out)",
            "E*command:   python build.py --strict",
            "E*exit code: 3",
            "E*duration:  1234.5 ms",
            "E*timed out: False",
            "E*stdout:",
            "E*| build failed here",
            "E*stderr:",
            "E*| Traceback: oops",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            '*assert_file(sb, "conf.txt").exists().equals("mode = safe\\n")',
            "E*AssertionError: assert_file: expected conf.txt (/home/user/conf.txt) to have the expected content",
            "E*--- expected conf.txt",
            "E*+++ actual conf.txt",
            "E*-mode = safe",
            "E*+mode = fast",
        ]
    )
    result.stdout.no_fnmatch_line("*pytest_kode/assertions.py*")
    result.stdout.no_fnmatch_line("*def succeeded*")


def test_the_checkers_are_public_api() -> None:
    import pytest_kode
    from pytest_kode import assertions

    assert pytest_kode.assert_exec is assertions.assert_exec
    assert pytest_kode.assert_file is assertions.assert_file
    assert pytest_kode.assert_tree is assertions.assert_tree
