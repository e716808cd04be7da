"""Templates with local sources through the marker, end to end: a wheel and files on this
machine, on the local backend and the emulator (the real e2b SDK uploading them with ``copy``);
the next run reuses the cached template, an edit rebuilds it and the log says what changed; the
project under test installed with ``TemplateSpec.for_project``; bad sources fail the test with a
TemplateBuildError naming the step, and leave nothing half-built in the cache."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from _wheels import make_wheel

pytest_plugins = "pytester"

SOURCES = """
import os
import pytest
from pytest_kode import TemplateSpec

SPEC = TemplateSpec(
    pip_packages=["--no-deps", "./dist/kodetiny-1.0-py3-none-any.whl"],
    files={"data": "data", "tool.sh": "bin/tool.sh"},
)

@pytest.mark.sandbox(template=SPEC)
@pytest.mark.parametrize("n", range(2))
def test_sources_are_in_the_sandbox(sandbox, n):
    result = sandbox.exec("kodetiny && cat data/msg.txt && bin/tool.sh && stat -c %a bin/tool.sh")
    with open("data/msg.txt") as host:
        expected = host.read()
    assert result.stdout == "tiny says 42\\n" + expected + "tool ran\\n755\\n", result.stderr
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    cache = tmp_path / "cache"
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("KODE_TEMPLATE_CACHE", str(cache))
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(root))
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.delenv("KODE_SANDBOX_BACKEND", raising=False)
    yield cache
    assert os.listdir(root) == [], "sandboxes left behind"


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    """The rootdir of the inner run: a wheel in dist/, a data folder and an executable."""
    pytester.makeini("[pytest]\n")
    make_wheel(pytester.path / "dist")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "msg.txt").write_text("first\n")
    (pytester.path / "data" / "__pycache__").mkdir()  # not part of the content
    tool = pytester.path / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    return pytester.path


def _builds(cache: Path) -> list[str]:
    """The finished builds in the cache (a directory with ready.json)."""
    return sorted(path.parent.name for path in cache.glob("*/ready.json"))


def _half_built(cache: Path) -> list[str]:
    if not cache.is_dir():
        return []
    return sorted(
        path.name
        for path in cache.iterdir()
        if path.is_dir() and path.name != "history" and not (path / "ready.json").exists()
    )


@pytest.mark.parametrize("backend", ["local", pytest.param("emulator", marks=pytest.mark.slow)])
def test_local_sources_reach_the_sandbox_and_an_edit_rebuilds(
    pytester: pytest.Pytester, env: Path, project: Path, backend: str
) -> None:
    pytester.makepyfile(SOURCES)
    args = ["-p", "no:cacheprovider", f"--sandbox-backend={backend}"]
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=2)
    out = first.stdout.str()
    assert out.count("Successfully installed kodetiny-1.0") == 1, out
    assert "not built before with this spec" in out, out
    built = _builds(env)
    assert len(built) == 1

    # Unchanged sources (a new mtime, a __pycache__ file): the cached template is reused.
    os.utime(project / "data" / "msg.txt")
    (project / "data" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    second = pytester.runpytest_subprocess(*args)
    second.assert_outcomes(passed=2)
    assert "Successfully installed" not in second.stdout.str()
    assert _builds(env) == built

    # An edit is a new template, and the log says which source changed.
    (project / "data" / "msg.txt").write_text("second\n")
    third = pytester.runpytest_subprocess(*args)
    third.assert_outcomes(passed=2)
    assert "rebuilding: files['data'] changed (" in third.stdout.str()
    assert "pip_packages" not in third.stdout.str().split("rebuilding:")[1].splitlines()[0]
    assert len(_builds(env)) == 2


@pytest.mark.slow
def test_for_project_installs_the_project_and_workers_share_one_build(
    pytester: pytest.Pytester, env: Path
) -> None:
    pytester.makeini("[pytest]\n")
    project = pytester.path / "proj"  # beside the inner run's basetemp, which changes
    package = project / "src" / "kodedemo"
    package.mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "kodedemo"
version = "0.1"
dependencies = ["pydantic"]

[project.scripts]
kodedemo = "kodedemo:main"
"""
    )
    (package / "__init__.py").write_text(
        "import pydantic\n\nWORD = 'one'\n\ndef main():\n    print('kodedemo', WORD)\n"
    )
    (project / "build").mkdir()  # an old build product: not part of the project
    pytester.makepyfile(
        test_project="""
        import pytest
        from pytest_kode import TemplateSpec

        @pytest.mark.sandbox(template=TemplateSpec.for_project("proj", dependencies="host"))
        @pytest.mark.parametrize("n", range(4))
        def test_the_installed_command(sandbox, n):
            with open("proj/src/kodedemo/__init__.py") as source:
                word = source.read().split("WORD = ")[1].split()[0].strip("'")
            result = sandbox.exec("kodedemo && python -c 'import kodedemo; print(kodedemo.__file__)'")
            assert result.ok, result.stderr
            lines = result.stdout.splitlines()
            assert lines[0] == "kodedemo " + word
            assert "/venv/lib/" in lines[1], lines  # installed, not the checkout
        """
    )
    args = ["-p", "no:cacheprovider", "--sandbox-backend=local", "-n", "2"]
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=4)
    assert len(_builds(env)) == 1
    (project / "build" / "junk.txt").write_text("ignored")
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=4)
    assert len(_builds(env)) == 1
    (package / "__init__.py").write_text(
        (package / "__init__.py").read_text().replace("'one'", "'two'")
    )
    third = pytester.runpytest_subprocess(*args[:-2])  # without xdist, the log is shown
    third.assert_outcomes(passed=4)
    assert "rebuilding: pip_packages['./proj'] changed (" in third.stdout.str()
    assert len(_builds(env)) == 2


BAD = """
import pytest
from pytest_kode import TemplateSpec

@pytest.mark.sandbox(template=TemplateSpec({fields}))
def test_bad(sandbox):
    pass
"""


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            'pip_packages=["./dist/missing-1.0-py3-none-any.whl"]',
            "*TemplateBuildError*pip_packages entry './dist/missing-1.0-py3-none-any.whl'*"
            "does not exist*relative to the rootdir*build the wheel*",
        ),
        (
            'pip_packages=["./dist/kodetiny-1.0-cp27-cp27mu-manylinux1_x86_64.whl"]',
            "*TemplateBuildError*the wheel is for cp27-cp27mu-manylinux1_x86_64*"
            "cannot install*build the wheel for this Python*",
        ),
        (
            'pip_packages=["./data"]',
            "*TemplateBuildError*'./data'*is not a Python project*pyproject.toml*files=*",
        ),
        (
            'files={"data": "/etc/kode"}',
            "*TemplateBuildError*files['data']*copies to '/etc/kode', outside*work_dir*",
        ),
    ],
    ids=["missing", "other-python", "not-a-project", "outside-work-dir"],
)
def test_a_bad_source_fails_the_test_naming_the_step_and_leaves_no_half_build(
    pytester: pytest.Pytester, env: Path, project: Path, fields: str, expected: str
) -> None:
    wheel = project / "dist" / "kodetiny-1.0-py3-none-any.whl"
    os.link(wheel, project / "dist" / "kodetiny-1.0-cp27-cp27mu-manylinux1_x86_64.whl")
    pytester.makepyfile(BAD.replace("{fields}", fields))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-backend=local")
    result.assert_outcomes(errors=1)
    result.stdout.re_match_lines([".*" + ".*".join(map(re.escape, expected.split("*"))) + ".*"])
    assert _builds(env) == [] and _half_built(env) == []


def test_a_files_destination_that_escapes_fails_collection(
    pytester: pytest.Pytester, env: Path, project: Path
) -> None:
    pytester.makepyfile(BAD.replace("{fields}", 'files={"data": "../../etc"}'))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-backend=local")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*TemplateBuildError*files step 'data' -> '../../etc'*escapes the sandbox*"]
    )
    assert not env.exists() or _builds(env) == []


def test_history_records_the_sources_of_the_last_build(
    pytester: pytest.Pytester, env: Path, project: Path
) -> None:
    pytester.makepyfile(SOURCES)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)
    (record,) = [json.loads(path.read_text()) for path in (env / "history").glob("local-*")]
    assert sorted(record["sources"]) == [
        "files['data']",
        "files['tool.sh']",
        "pip_packages['./dist/kodetiny-1.0-py3-none-any.whl']",
    ]
    assert record["built"] == _builds(env)[0]
