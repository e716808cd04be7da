"""The plugin against a cloud as strict as E2B: plan choice, paced creates, kept sandboxes that
``pytest-kode gc`` spares and ``ls`` marks, the 404-on-create template rebuild."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_kode.cli import main as cli_main


def test_an_unknown_plan_is_a_usage_error_naming_the_allowed_ones(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--sandbox-plan", "enterprise")
    result.stderr.fnmatch_lines(
        ["*--sandbox-plan: unknown E2B plan 'enterprise'; choose one of: hobby, pro*"]
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    pytester.makeini("[pytest]\nsandbox_plan = team\n")
    result = pytester.runpytest_subprocess()
    result.stderr.fnmatch_lines(["*unknown E2B plan 'team'*"])


def test_creates_are_paced_to_the_plan_across_workers(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # Six creates from two workers against the plugin's hobby emulator (1/s, burst 2): paced,
    # none turned away, all pass. Waiting shows in the summary.
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_each(sandbox, n):
            assert sandbox.exec("echo ok").stdout == "ok\\n"
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--sandbox-backend=emulator")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(
        ["sandboxes: 6 created, *0 leaked*paced to the E2B plan's create rate *s (--sandbox-plan)"]
    )


def test_kept_sandboxes_are_marked_by_ls_and_spared_by_gc(
    pytester: pytest.Pytester,
    kode_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("KODE_RUNS_ROOT", str(runs))
    pytester.makepyfile(
        """
        def test_fails(sandbox):
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-keep-failed")
    result.assert_outcomes(failed=1)
    line = next(ln for ln in result.stdout.lines if ln.startswith("kept sandbox"))
    sandbox_id = line.split()[2]
    assert sandbox_id in os.listdir(kode_root)

    capsys.readouterr()  # pytester echoes the inner run
    assert cli_main(["ls", "--backend", "local"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if sandbox_id in ln)
    assert "no (kept until " in row  # its run is over, and it is kept on purpose
    assert cli_main(["gc", "--backend", "local"]) == 0
    assert "0 disposed, 1 left alone" in capsys.readouterr().out
    assert sandbox_id in os.listdir(kode_root)

    from pytest_kode import LocalSandbox

    LocalSandbox(sandbox_id=sandbox_id).init().dispose()


def test_a_template_the_cloud_no_longer_has_ready_is_rebuilt(
    pytester: pytest.Pytester, kode_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This machine recorded a finished build, but the cloud has none ready (deleted, or a new
    # account behind the same URL: here a fresh emulator on the same port): create answers 404,
    # the plugin rebuilds once and goes on.
    from pytest_kode.emulator import E2BEmulator

    monkeypatch.setenv("KODE_TEMPLATE_CACHE", str(tmp_path / "templates"))
    pytester.makepyfile(
        """
        import pytest
        from pytest_kode import TemplateSpec

        @pytest.mark.sandbox(template=TemplateSpec(build_commands=("echo built > made.txt",)))
        def test_uses_it(sandbox):
            assert sandbox.fs.read("made.txt") == "built\\n"
        """
    )
    with E2BEmulator(root_dir=tmp_path / "first") as first:
        port, key = first.port, first.api_key
        for name, value in first.env.items():
            monkeypatch.setenv(name, value)
        result = pytester.runpytest_subprocess("--sandbox-backend=e2b", "-s")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["*template kode-*: building on E2B*"])
    with E2BEmulator(port=port, api_key=key, root_dir=tmp_path / "second"):
        result = pytester.runpytest_subprocess("--sandbox-backend=e2b", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*template kode-*: built on E2B before, reusing it*",
            "*template kode-*: not ready on E2B, rebuilding*",
            "*template kode-*: building on E2B*",
        ]
    )


def test_a_lifetime_beyond_the_plan_is_refused_up_front(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(timeout_ms=2 * 3600 * 1000)
        def test_long(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*timeout_ms=7200000 is beyond the E2B hobby plan's maximum sandbox lifetime of 3600s*"]
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=emulator", "--sandbox-plan=pro")
    result.assert_outcomes(passed=1)


def test_a_spec_the_cloud_would_refuse_fails_at_collection(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        test_pip="""
        import pytest

        @pytest.mark.sandbox(template={"base": "debian", "pip_packages": ["pandas>=2"]})
        def test_pip_on_debian(sandbox):
            pass
        """,
        test_cpus="""
        import pytest

        @pytest.mark.sandbox(template={"cpu_count": 3})
        def test_odd_cpus(sandbox):
            pass
        """,
    )
    result = pytester.runpytest_subprocess("--collect-only")
    result.stdout.fnmatch_lines(
        [
            "*cpu_count=3*must be 1 or an even number*",
            "*pip_packages need base='python': the debian image has no pip*",
        ],
        consecutive=False,
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
