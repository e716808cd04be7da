"""Every sandbox a run creates is disposed before pytest exits, however the tests end."""

from __future__ import annotations

from pathlib import Path

import pytest

SCENARIOS = """
import pytest

pytestmark = pytest.mark.sandbox(scope="{scope}")

@pytest.fixture
def broken_fixture(sandbox):
    sandbox.exec("touch made-by-fixture")
    raise RuntimeError("user fixture broke")

@pytest.fixture
def failing_setup(sandbox):
    pytest.fail("setup says no")

def test_pass(sandbox):
    assert sandbox.exec("true").ok

def test_fail(sandbox):
    assert sandbox.exec("false").ok

def test_fixture_error(broken_fixture):
    pass

def test_fail_in_setup(failing_setup):
    pass

def test_factory_then_fail(sandbox_factory):
    sandbox_factory(); sandbox_factory()
    raise AssertionError("after making two")
"""


@pytest.mark.parametrize("scope", ["function", "module", "session"])
def test_pass_fail_and_errors_all_dispose(
    pytester: pytest.Pytester, kode_root: Path, scope: str
) -> None:
    pytester.makepyfile(SCENARIOS.format(scope=scope))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=2, errors=2)
    result.stdout.fnmatch_lines(
        ["sandboxes: * created, *0 resumed, 0 reused, * disposed, 0 kept, 0 leaked*"]
    )
    assert list(kode_root.iterdir()) == []


def test_keyboard_interrupt_disposes(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(scope="module")
        def test_module(sandbox):
            sandbox.exec("sleep 0.01")

        def test_interrupted(sandbox, sandbox_factory):
            sandbox_factory()
            raise KeyboardInterrupt

        def test_never_runs(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert list(kode_root.iterdir()) == []


def test_exitfirst_disposes_shared_sandboxes(pytester: pytest.Pytester, kode_root: Path) -> None:
    pytester.makepyfile(
        test_a="""
        import pytest
        pytestmark = pytest.mark.sandbox(scope="module")

        def test_first(sandbox, worker_sandbox):
            assert False

        def test_second(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-x")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*2 created, 0 resumed, 0 reused, 2 disposed*"])
    assert list(kode_root.iterdir()) == []
