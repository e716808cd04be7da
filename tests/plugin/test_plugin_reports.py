"""What a user reads: header, transcripts of failed tests, kept sandboxes, artifacts, summary."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("kode_root")


def test_header_names_backend_isolation_and_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--sandbox-backend=local")
    result.stdout.fnmatch_lines(["kode: backend=local, isolation=*, run=*"])


def test_failed_test_shows_the_commands_it_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.sandbox(scope="module")

        def test_earlier(sandbox):
            sandbox.exec("echo from-the-earlier-test")

        def test_broken(sandbox):
            sandbox.exec("echo hello; echo oops >&2; exit 3")
            assert False, "boom"

        def test_passing(sandbox):
            sandbox.exec("echo never-shown")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- sandbox local-* (local) transcript -*",
            "$ echo hello; echo oops >&2; exit 3",
            "  exit code 3 after * ms",
            "  stdout (tail):",
            "    hello",
            "  stderr (tail):",
            "    oops",
        ]
    )
    # Only the failing test's own commands, not those of earlier tests sharing the sandbox.
    result.stdout.no_fnmatch_line("*from-the-earlier-test*")
    result.stdout.no_fnmatch_line("*never-shown*")


def test_keep_failed_keeps_and_says_how_to_get_in(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        def test_fails(sandbox):
            sandbox.fs.write("evidence.txt", "look here")
            assert False

        def test_passes(sandbox):
            pass
        """
    )
    # No spares (local sandboxes are prewarmed by default): the counts are the tests' own.
    result = pytester.runpytest_subprocess("--sandbox-keep-failed", "--sandbox-prewarm=0")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "sandboxes: 2 created, 0 resumed, 0 reused, 1 disposed, 1 kept, 0 leaked*",
            "kept sandbox local-* (local) of test_keep_failed_keeps_and_says_how_to_get_in.py::test_fails: directory *; enter it with: cd * && bash",
        ]
    )
    line = next(ln for ln in result.stdout.lines if ln.startswith("kept sandbox"))
    directory = Path(line.split("directory ", 1)[1].split(";", 1)[0])
    assert (directory / "evidence.txt").read_text() == "look here"
    from pytest_kode import LocalSandbox

    sandbox_id = line.split()[2]
    LocalSandbox(sandbox_id=sandbox_id).init().dispose()
    assert not directory.exists()


def test_keep_on_failure_marker_keeps_only_failed_shared_sandbox(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(scope="module", keep_on_failure=True)
        def test_fails(sandbox):
            assert False

        def test_other(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["*1 kept*", "kept sandbox local-*::test_fails*"])
    sandbox_id = next(ln for ln in result.stdout.lines if ln.startswith("kept sandbox")).split()[2]
    from pytest_kode import LocalSandbox

    LocalSandbox(sandbox_id=sandbox_id).init().dispose()


def test_artifacts_of_failed_tests_are_copied(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(artifacts=["logs/*.log", "**/*.json"])
        def test_fails(sandbox):
            sandbox.fs.write("logs/app.log", "line 1\\n")
            sandbox.fs.write("logs/skip.txt", "no")
            sandbox.fs.write("deep/er/state.json", "{}")
            assert False

        @pytest.mark.sandbox(artifacts=["*.log"])
        def test_passes(sandbox):
            sandbox.fs.write("ok.log", "fine")
        """
    )
    out = tmp_path / "arts"
    result = pytester.runpytest_subprocess(f"--sandbox-artifacts={out}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*::test_fails: 2 artifact file(s) copied to *"])
    folders = list(out.iterdir())
    assert len(folders) == 1 and "test_fails" in folders[0].name
    assert (folders[0] / "logs" / "app.log").read_text() == "line 1\n"
    assert (folders[0] / "deep" / "er" / "state.json").read_text() == "{}"
    assert not (folders[0] / "logs" / "skip.txt").exists()


def test_junitxml_records_the_sandbox_id(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_uses(sandbox):
            pass

        def test_does_not():
            pass
        """
    )
    report = pytester.path / "junit.xml"
    pytester.runpytest(f"--junitxml={report}", "-o", "junit_family=xunit1").assert_outcomes(
        passed=2
    )
    cases = {case.get("name"): case for case in ET.parse(report).iter("testcase")}
    props = cases["test_uses"].findall("properties/property")
    assert [(p.get("name"), p.get("value")[:6]) for p in props] == [("sandbox_id", "local-")]
    assert cases["test_does_not"].find("properties") is None


def test_summary_counts_and_times(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_a(sandbox):
            sandbox.exec("sleep 0.2")

        def test_b(sandbox):
            pass
        """
    )
    result = pytester.runpytest("--sandbox-prewarm=0")  # the tests' own sandboxes only
    result.stdout.fnmatch_lines(
        [
            "*- sandboxes -*",
            "sandboxes: 2 created, 0 resumed, 0 reused, 2 disposed, 0 kept, 0 leaked; provisioning *s, exec 0.[2-9]*s",
        ]
    )


def test_no_summary_when_no_sandbox_was_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest()
    result.stdout.no_fnmatch_line("*sandboxes:*")
