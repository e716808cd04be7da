"""docs/api.md documents every public name, so the reference cannot fall behind the code.

The names come from the code itself (``__all__``, the hook specifications, the fixtures, the
models' fields, the public methods) and from the real ``pytest --help`` and ``pytest-kode --help``
output; a name the page does not mention in backticks fails here."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

import pytest_kode
from pytest_kode import errors, fixtures, hookspecs
from pytest_kode.assertions import ExecAssertion, FileAssertion, TreeAssertion
from pytest_kode.options import MARKER_KEYS, SandboxOptions, TemplateSpec
from pytest_kode.sandbox import ExecResult, FileEntry, ProcessHandle, Sandbox, SandboxFS
from pytest_kode.templates import BuildInfo, E2BTemplateBuilder

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
# Everything the page shows as code: `name`, `name(...)`, `--flag`, table cells.
CODE = " ".join(re.findall(r"`([^`]+)`", DOC)) + "\n" + DOC


def _missing(names: Iterable[str], pattern: str = r"\b{}\b") -> list[str]:
    return sorted(
        name for name in set(names) if not re.search(pattern.format(re.escape(name)), CODE)
    )


def _undocumented_members(cls: type) -> list[str]:
    """Public methods not shown as ``name(`` and properties not named at all."""
    members = [(n, m) for n, m in inspect.getmembers(cls) if not n.startswith("_")]
    methods = [name for name, member in members if callable(member)]
    properties = [name for name, member in members if isinstance(member, property)]
    return _missing(methods, r"\b{}\(") + _missing(properties)


def test_every_exported_name_error_and_fixture_is_documented() -> None:
    assert _missing(pytest_kode.__all__) == []
    assert _missing(errors.__all__) == []
    assert _missing(fixtures.__all__) == []


def test_every_hook_is_documented_with_its_arguments() -> None:
    hooks = {
        name: list(inspect.signature(func).parameters)
        for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("pytest_kode_")
    }
    assert hooks
    for name, params in hooks.items():
        assert f"`{name}({', '.join(params)})`" in DOC, (name, params)


def test_every_method_and_field_of_the_public_classes_is_documented() -> None:
    methods = {
        cls.__name__: _undocumented_members(cls)
        for cls in (
            Sandbox,
            SandboxFS,
            ProcessHandle,
            ExecAssertion,
            FileAssertion,
            TreeAssertion,
            E2BTemplateBuilder,
        )
    }
    assert {name: gaps for name, gaps in methods.items() if gaps} == {}
    fields = {
        model.__name__: _missing(model.model_fields)
        for model in (ExecResult, FileEntry, SandboxOptions, TemplateSpec)
    }
    assert {name: gaps for name, gaps in fields.items() if gaps} == {}
    assert _missing(BuildInfo.__dataclass_fields__) == []
    assert _missing(MARKER_KEYS) == []


def test_every_command_line_and_ini_option_is_documented(pytester: pytest.Pytester) -> None:
    help_text = pytester.runpytest("--help").stdout.str()
    flags = set(re.findall(r"(--sandbox-[a-z-]+)", help_text))
    ini = set(re.findall(r"^\s+(sandbox_[a-z_]+)", help_text, re.MULTILINE))
    assert flags and ini
    assert _missing(flags, r"`{}`") == []
    assert _missing(ini, r"`{}`") == []


def test_every_cli_command_is_documented() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest_kode.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = re.search(r"\{([a-z,]+)\}", out)
    assert commands is not None
    assert _missing(commands.group(1).split(","), r"`pytest-kode {}\b") == []


def test_the_readme_links_the_reference() -> None:
    assert "(docs/api.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
