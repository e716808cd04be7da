"""Local sources of a template, below the pytest layer: what counts as a path, what the content
hash covers, how the E2B builder stages and names them (COPY steps in a context that is never
this library's directory, a Dockerfile's own directory), and that a LocalSandbox used on its own
builds a spec with local files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _wheels import make_wheel

from pytest_kode._template_sources import is_local_entry, resolve_sources
from pytest_kode.backends.local import LocalSandbox
from pytest_kode.errors import TemplateBuildError
from pytest_kode.options import TemplateSpec
from pytest_kode.templates import (
    E2BTemplateBuilder,
    local_template,
    stage_context,
    template_name,
)


@pytest.mark.parametrize(
    ("entry", "local"),
    [
        (".", True),
        ("./pkg", True),
        ("../pkg[extra]", True),
        ("/abs/dist/p-1.0-py3-none-any.whl", True),
        ("dist/p-1.0.tar.gz", True),
        ("requests", False),
        ("requests[socks]>=2", False),
        ("--no-deps", False),
        ("pkg @ file:///x", False),
        ("git+https://example.com/x.git", False),
    ],
)
def test_which_entries_are_local_paths(entry: str, local: bool) -> None:
    assert is_local_entry(entry) is local


def _project(root: Path) -> Path:
    project = root / "proj"
    (project / "src" / "demo").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'demo'\nversion = '1'\n")
    (project / "src" / "demo" / "__init__.py").write_text("X = 1\n")
    return project


def _name(spec: TemplateSpec, root: Path) -> str:
    return template_name(spec, root)


def test_the_name_follows_content_not_mtimes_caches_or_build_products(tmp_path: Path) -> None:
    project = _project(tmp_path)
    module = project / "src" / "demo" / "__init__.py"
    spec = TemplateSpec(pip_packages=("./proj",), files={"proj/src": "src"})
    name = _name(spec, tmp_path)
    assert name.startswith("kode-") and name != f"kode-{spec.digest()}"
    os.utime(module, (1, 1))
    junk = [
        "src/demo/__pycache__/x.pyc",
        ".git/HEAD",
        "build/lib/x.py",
        "dist/x.whl",
        "a.egg-info/P",
    ]
    for relative in junk:
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("junk")
    (project / ".venv").mkdir()
    (project / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    assert _name(spec, tmp_path) == name
    module.write_text("X = 2\n")
    changed = _name(spec, tmp_path)
    assert changed != name
    os.chmod(module, 0o755)  # the executable bit counts
    assert _name(spec, tmp_path) != changed


@pytest.mark.skipif(not shutil.which("git"), reason="git is not installed")
def test_inside_a_git_checkout_ignored_files_do_not_count(tmp_path: Path) -> None:
    project = _project(tmp_path)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    (project / ".gitignore").write_text(".coverage\nscratch/\n")
    spec = TemplateSpec(pip_packages=("./proj",))
    name = _name(spec, tmp_path)
    (project / ".coverage").write_text("changes every run")
    (project / "scratch").mkdir()
    (project / "scratch" / "notes.txt").write_text("local notes")
    assert _name(spec, tmp_path) == name
    (project / "new_module.py").write_text("untracked but not ignored: part of the project\n")
    assert _name(spec, tmp_path) != name
    # A package folder that git ignores altogether (generated) is taken whole.
    (project / ".gitignore").write_text("*\n")
    ignored_whole = _name(spec, tmp_path)
    shutil.rmtree(project / ".git")
    assert ignored_whole == _name(spec, tmp_path)  # as if outside git: every file counts


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TemplateSpec(pip_packages=("./nope",)), "pip_packages entry './nope'.*does not exist"),
        (TemplateSpec(pip_packages=("./plain",)), "is not a Python project"),
        (TemplateSpec(pip_packages=("./plain/readme.txt",)), "not a wheel or an sdist"),
        (TemplateSpec(base="node", npm_packages=("./plain",)), "is not an npm package"),
        (TemplateSpec(files={"nope": "x"}), "files entry 'nope'.*does not exist"),
        (
            TemplateSpec(base="custom", dockerfile="docker/Missingfile"),
            "dockerfile entry 'docker/Missingfile'.*does not exist",
        ),
    ],
)
def test_bad_sources_name_the_step(tmp_path: Path, spec: TemplateSpec, message: str) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "readme.txt").write_text("not a project")
    with pytest.raises(TemplateBuildError, match=message):
        resolve_sources(spec, tmp_path)


def test_a_files_destination_may_not_climb_out() -> None:
    with pytest.raises(TemplateBuildError, match="escapes the sandbox"):
        TemplateSpec(files={"data": "../outside"})
    assert TemplateSpec(files={"data": "a/../b"}).files == {"data": "a/../b"}


def test_the_e2b_builder_copies_staged_sources_and_installs_them(tmp_path: Path) -> None:
    from e2b import Template

    make_wheel(tmp_path / "dist")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("x")
    spec = TemplateSpec(
        pip_packages=("requests", "./dist/kodetiny-1.0-py3-none-any.whl"),
        files={"data": "data"},
    )
    sources = resolve_sources(spec, tmp_path)
    context = stage_context(sources, tmp_path / "context")
    assert context is not None
    assert (context / ".kode-src/0/kodetiny-1.0-py3-none-any.whl").is_file()
    assert (context / ".kode-src/1/x.txt").read_text() == "x"
    steps = json.loads(Template.to_json(E2BTemplateBuilder.to_sdk(spec, sources, context)))["steps"]
    assert [(step["type"], step["args"][:2]) for step in steps] == [
        ("COPY", [".kode-src/1", "/home/user/data"]),
        ("COPY", [".kode-src/0/kodetiny-1.0-py3-none-any.whl", "/tmp/kode-sources/0/"]),
        ("RUN", ["pip install requests /tmp/kode-sources/0/kodetiny-1.0-py3-none-any.whl", "root"]),
        ("RUN", ["rm -rf /tmp/kode-sources", "root"]),
    ]
    assert all(step.get("filesHash") for step in steps if step["type"] == "COPY")


def test_a_dockerfile_reads_its_own_directory_and_editing_it_rebuilds(tmp_path: Path) -> None:
    from e2b import Template

    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "Dockerfile").write_text("FROM python:3.12\nCOPY app.py /app/app.py\n")
    (docker / "app.py").write_text("print('v1')\n")
    spec = TemplateSpec(base="custom", dockerfile="docker/Dockerfile")
    sources = resolve_sources(spec, tmp_path)
    name = template_name(spec, tmp_path)
    context = stage_context(sources, tmp_path / "context")
    data = json.loads(Template.to_json(E2BTemplateBuilder.to_sdk(spec, sources, context)))
    assert data["fromImage"] == "python:3.12"
    (copy,) = [step for step in data["steps"] if step["type"] == "COPY"]
    assert copy["args"][:2] == ["app.py", "/app/app.py"] and copy["filesHash"]
    (docker / "app.py").write_text("print('v2')\n")  # a file the Dockerfile copies
    assert template_name(spec, tmp_path) != name
    (docker / "app.py").write_text("print('v1')\n")
    assert template_name(spec, tmp_path) == name
    (docker / "Dockerfile").write_text("FROM python:3.13\nCOPY app.py /app/app.py\n")
    assert template_name(spec, tmp_path) != name


def test_system_site_packages_is_refused_on_e2b() -> None:
    with pytest.raises(TemplateBuildError, match="system_site_packages.*cannot see them"):
        E2BTemplateBuilder.to_sdk(TemplateSpec.for_project("/x", dependencies="host"))


def test_a_local_sandbox_on_its_own_builds_a_spec_with_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: Path
) -> None:
    monkeypatch.setenv("KODE_TEMPLATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # local sources resolve against the current directory here
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.toml").write_text("x = 1\n")
    spec = TemplateSpec(base="debian", files={"conf": "etc/", "conf/app.toml": "one.toml"})
    with LocalSandbox(template=spec, root_dir=root) as sandbox:
        assert sandbox.fs.read("etc/app.toml") == "x = 1\n"
        assert sandbox.fs.read("one.toml") == "x = 1\n"


@pytest.mark.skipif(not shutil.which("npm"), reason="npm is not installed")
def test_a_local_npm_package_is_installed_with_its_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: Path
) -> None:
    monkeypatch.setenv("KODE_TEMPLATE_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "js"
    package.mkdir()
    (package / "package.json").write_text(
        json.dumps({"name": "kode-hello", "version": "1.0.0", "bin": {"kode-hello": "hello.js"}})
    )
    (package / "hello.js").write_text("#!/usr/bin/env node\nconsole.log('hello from js')\n")
    (package / "hello.js").chmod(0o755)
    spec = TemplateSpec(base="node", npm_packages=("./js",))
    template = local_template(spec, work_dir="/home/user", root=tmp_path)
    with LocalSandbox(root_dir=root, local_template=template) as sandbox:
        result = sandbox.exec("kode-hello")
        assert result.stdout == "hello from js\n", result.stderr


def test_the_backends_never_import_the_template_layer() -> None:
    code = (
        "import sys, pytest_kode.backends.local._sandbox, pytest_kode.backends.e2b; "
        "print(sorted(m for m in sys.modules if 'template' in m and m.startswith('pytest_kode')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert found.strip() == "[]"


@pytest.mark.parametrize("destination", ["/tmp/data", "/etc/kode"])
def test_a_local_template_refuses_files_outside_work_dir_and_keeps_no_half_build(
    tmp_path: Path, destination: str
) -> None:
    # /tmp included: a local sandbox's /tmp is its own and starts empty, so the file would
    # silently vanish, where on E2B it stays in the image.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").write_text("x")
    cache = tmp_path / "cache"
    spec = TemplateSpec(base="debian", files={"data": destination})
    with pytest.raises(TemplateBuildError, match=rf"files\['data'\] copies to '{destination}'"):
        local_template(
            spec, work_dir="/home/user", isolation="none", cache_dir=cache, root=tmp_path
        )
    assert [path.name for path in cache.iterdir() if path.is_dir()] == []
