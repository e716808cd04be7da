"""The marker's validation, the options' precedence and validation, backends and their hooks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("kode_root")


def test_markers_help_shows_the_full_signature(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.sandbox(*, backend=None, template='base', scope='function',*artifacts=*"]
    )


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ("'base'", "*test_bad: @pytest.mark.sandbox takes keyword arguments only*"),
        (
            "tmeplate='base'",
            "*test_bad: unknown @pytest.mark.sandbox key(s) tmeplate; 'tmeplate': did you mean "
            "'template'?; allowed keys:*",
        ),
        ("timout_ms=5", "*key(s) timout_ms; 'timout_ms': did you mean 'timeout_ms'?; allowed*"),
        ("execTimeout=5", "*'execTimeout': did you mean 'execTimeoutMs'?*"),
        ("colour=1", "*key(s) colour; allowed keys:*"),
        ("scope='package'", "*scope='package': Input should be 'function', 'class', 'module',*"),
        ("exec_timeout_ms=-5", "*exec_timeout_ms=-5: Input should be greater than 0*"),
        ("envs={'A': 1}", "*envs.A=1: Input should be a valid string*"),
        ("api_key='e2b_0'", "*api_key is never taken from a marker*"),
    ],
)
def test_bad_marker_fails_collection_naming_test_and_key(
    pytester: pytest.Pytester, marker: str, expected: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        def test_fine():
            pass

        @pytest.mark.sandbox({marker})
        def test_bad(sandbox):
            pass
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*ERROR collecting*", expected])
    assert result.ret == pytest.ExitCode.INTERRUPTED


def test_bad_class_marker_names_each_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(reuse="yes")
        class TestX:
            def test_one(self):
                pass
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(
        ["*TestX::test_one: invalid @pytest.mark.sandbox*", "*reuse='yes'*"]
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--sandbox-backend=nope"],
            "*--sandbox-backend: unknown backend 'nope'; choose one of: auto, emulator, e2b, local*",
        ),
        (["--sandbox-prewarm=-1"], "*--sandbox-prewarm: expected a whole number >= 0, got '-1'*"),
        (
            ["--sandbox-prewarm=lots"],
            "*--sandbox-prewarm: expected a whole number >= 0, got 'lots'*",
        ),
    ],
)
def test_bad_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], expected: str
) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


def test_backend_precedence_command_line_ini_environment(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_x(): pass")
    monkeypatch.setenv("KODE_SANDBOX_BACKEND", "bogus-from-env")
    assert pytester.runpytest().ret == pytest.ExitCode.USAGE_ERROR
    pytester.makeini("[pytest]\nsandbox_backend = local\n")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["kode: backend=local, isolation=*, run=*"])
    result = pytester.runpytest("--sandbox-backend=auto")
    result.stdout.fnmatch_lines(["kode: backend=auto (local), isolation=*"])


def test_e2b_without_key_is_skipped_under_auto_and_an_error_when_chosen(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(backend="e2b")
        def test_cloud(sandbox):
            pass

        def test_local(sandbox):
            assert sandbox.backend == "local"
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*backend 'e2b' needs an API key: set E2B_API_KEY*"])
    result = pytester.runpytest("--sandbox-backend=e2b", "-k", "cloud")
    result.assert_outcomes(errors=1, deselected=1)
    result.stdout.fnmatch_lines(["*BackendUnavailableError*backend 'e2b' needs an API key*"])


def test_a_plugin_registers_and_selects_its_own_backend(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makeconftest(
        """
        from pytest_kode import LocalSandbox

        class Shouty(LocalSandbox):
            backend = "shouty"

            def _exec(self, command, **kwargs):
                return super()._exec(command.lower(), **kwargs)

        def pytest_kode_register_backends(registry):
            registry["shouty"] = Shouty
        """
    )
    pytester.makepyfile(
        """
        def test_uses_it(sandbox):
            assert sandbox.backend == "shouty"
            assert sandbox.exec("ECHO Hi").stdout == "hi\\n"
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-backend=shouty")
    result.assert_outcomes(passed=1)
    assert list(kode_root.iterdir()) == []


def test_registering_a_non_sandbox_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_kode_register_backends(registry):
            registry["broken"] = object
        """
    )
    pytester.makepyfile("def test_x(sandbox): pass")
    result = pytester.runpytest("--sandbox-backend=broken")
    result.stdout.fnmatch_lines(
        ["*backend 'broken' is registered as*not a pytest_kode.Sandbox subclass*"]
    )
