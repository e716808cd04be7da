"""benchmarks/e2b_conformance.py end to end, on a stand-in for the SDK's test tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_TESTS = """
import os

from e2b import Sandbox


def test_runs_a_command_on_the_emulator():
    assert os.environ["E2B_VALIDATE_API_KEY"] == "false"
    sandbox = Sandbox.create()
    try:
        assert sandbox.commands.run("echo hi").stdout == "hi\\n"
    finally:
        sandbox.kill()


def test_fails_on_purpose():
    assert False, "expected failure"
"""


@pytest.mark.slow
def test_runner_counts_per_folder_and_lists_failures(tmp_path: Path) -> None:
    sdk = tmp_path / "python-sdk"
    folder = sdk / "tests" / "sync" / "sandbox_sync"
    folder.mkdir(parents=True)
    (sdk / "tests" / "conftest.py").write_text("")
    (folder / "test_stand_in.py").write_text(_TESTS)
    # Needs the public internet in the real suite: left out, never counted.
    (folder / "test_network.py").write_text("def test_internet():\n    assert False\n")
    (sdk / "tests" / "async" / "api_async").mkdir(parents=True)
    (sdk / "tests" / "async" / "api_async" / "test_ok.py").write_text("def test_ok():\n    pass\n")
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "e2b_conformance.py"),
            "--sdk",
            str(sdk),
            "--jobs",
            "0",
            "--e2b",
            "installed",
            "--folders",
            "sync/sandbox_sync,async/api_async",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = completed.stdout
    assert completed.returncode == 0, completed.stderr + out
    assert "sync/sandbox_sync" in out and "1/2" in out
    assert "async/api_async" in out and "1/1" in out
    assert "overall" in out and "2/3" in out
    assert "sync/sandbox_sync/test_stand_in.py (1)" in out
    assert "test_fails_on_purpose" in out
    assert "test_internet" not in out


def test_runner_refuses_a_directory_that_is_not_the_sdk(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "e2b_conformance.py"), "--sdk", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "not a checkout of packages/python-sdk" in completed.stderr


def _checkout(tmp_path: Path, dependencies: list[str]) -> Path:
    """A stand-in checkout with its own `e2b` package and pyproject.toml."""
    sdk = tmp_path / "python-sdk"
    (sdk / "e2b").mkdir(parents=True)
    (sdk / "e2b" / "__init__.py").write_text('SOURCE = "checkout"\n')
    listed = ", ".join(f'"{dependency}"' for dependency in dependencies)
    (sdk / "pyproject.toml").write_text(
        f'[project]\nname = "e2b"\nversion = "0"\ndependencies = [{listed}]\n'
    )
    folder = sdk / "tests" / "sync" / "api_sync"
    folder.mkdir(parents=True)
    (sdk / "tests" / "conftest.py").write_text("")
    (folder / "test_which_sdk.py").write_text(
        "import e2b\n\n\ndef test_imports_the_checkout():\n"
        "    assert getattr(e2b, 'SOURCE', None) == 'checkout'\n"
    )
    return sdk


def _run(sdk: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "e2b_conformance.py"),
            "--sdk",
            str(sdk),
            "--jobs",
            "0",
            "--folders",
            "sync/api_sync",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_runner_runs_the_tests_with_the_checkouts_own_sdk_by_default(tmp_path: Path) -> None:
    completed = _run(_checkout(tmp_path, ["packaging>=1"]))
    assert completed.returncode == 0, completed.stderr + completed.stdout
    assert "with the checkout e2b" in completed.stdout
    assert "profile unlimited" in completed.stdout
    assert "1/1" in completed.stdout


@pytest.mark.slow
def test_runner_can_use_the_installed_sdk_and_a_plan_profile(tmp_path: Path) -> None:
    completed = _run(
        _checkout(tmp_path, ["packaging>=1"]), "--e2b", "installed", "--profile", "pro"
    )
    assert completed.returncode == 0, completed.stderr + completed.stdout
    assert "profile pro" in completed.stdout
    # The installed e2b has no SOURCE: the stand-in checkout was not imported.
    assert "0/1" in completed.stdout
    assert "test_imports_the_checkout" in completed.stdout


def test_runner_names_what_to_install_when_the_checkouts_sdk_cannot_import(
    tmp_path: Path,
) -> None:
    completed = _run(_checkout(tmp_path, ["packaging>=1", "kode-no-such-distribution>=1.5"]))
    assert completed.returncode == 2
    assert "pip install 'kode-no-such-distribution>=1.5'" in completed.stderr
    assert "--e2b installed" in completed.stderr
    assert "packaging" not in completed.stderr


def test_runner_refuses_an_unknown_profile(tmp_path: Path) -> None:
    completed = _run(_checkout(tmp_path, []), "--profile", "platinum")
    assert completed.returncode == 2
    assert "unknown E2B plan 'platinum'" in completed.stderr
