"""Testing this project the way a user gets it: `pytest-kode` built from this checkout and
installed in a clean sandbox, then run as a command.

``TemplateSpec.for_project()`` installs the project at the pytest rootdir (this repository) into
a template, built once and rebuilt only when the project's files change (the template log says
which). ``dependencies="host"`` installs the project alone and lets the template see the
packages already installed here, so nothing is downloaded and this suite runs offline; that
only works on the local backend, hence ``backend="local"``. On a machine with a package index,
``TemplateSpec.for_project()`` installs the dependencies too, on every backend.
"""

import tomllib
from pathlib import Path

import pytest

from pytest_kode import TemplateSpec, assert_exec

pytestmark = pytest.mark.sandbox(
    backend="local",
    template=TemplateSpec.for_project(dependencies="host"),
    scope="module",
)


def test_the_command_is_on_path_and_answers_help(sandbox):
    result = sandbox.exec("command -v pytest-kode && pytest-kode --help")
    assert_exec(result).succeeded().stdout_contains("{ls,gc,emulator}")


def test_it_runs_the_installed_copy_not_the_checkout(sandbox):
    result = sandbox.exec("python -c 'import pytest_kode; print(pytest_kode.__file__)'")
    assert_exec(result).succeeded().stdout_matches(r"/venv/lib/python3\.\d+/site-packages/")


def test_the_installed_version_is_this_checkout(sandbox, pytestconfig):
    pyproject = tomllib.loads(Path(pytestconfig.rootpath, "pyproject.toml").read_text())
    result = sandbox.exec(
        "python -c 'import importlib.metadata as m; print(m.version(\"pytest-kode\"))'"
    )
    assert_exec(result).succeeded().stdout_equals(pyproject["project"]["version"] + "\n")


def test_ls_in_a_clean_machine_finds_no_sandboxes(sandbox):
    result = sandbox.exec("pytest-kode ls")
    assert_exec(result).succeeded()


def test_a_bad_subcommand_is_a_usage_error(sandbox):
    result = sandbox.exec("pytest-kode frobnicate")
    assert_exec(result).exit_code(2).stderr_contains("invalid choice")
