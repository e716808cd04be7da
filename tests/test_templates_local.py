"""Local templates: built once inside the sandbox isolation, cached by content hash, copied into
each sandbox so that no sandbox can change the template. Packages come from a wheel built in the
test and installed offline (PIP_NO_INDEX / PIP_FIND_LINKS)."""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from _local import needs_bwrap
from _wheels import make_wheel

from pytest_kode._template_local import LocalTemplate, LocalTemplateBuilder, missing_apt_packages
from pytest_kode.backends.local import Isolation, LocalSandbox
from pytest_kode.errors import BackendUnavailableError, ConfigError, SandboxCreateError
from pytest_kode.options import SandboxOptions, TemplateSpec
from pytest_kode.templates import prepare_template

TINY = TemplateSpec(pip_packages=("kodetiny",), build_commands=("echo original > data.txt",))


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("wheels")
    make_wheel(directory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIP_NO_INDEX", "1")
        patch.setenv("PIP_FIND_LINKS", str(directory))
        yield directory


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _build(cache: Path, isolation: str, spec: TemplateSpec, **kwargs: Any) -> LocalTemplate:
    lines: list[str] = []
    template = LocalTemplateBuilder(cache, isolation=isolation).prepare(
        spec, on_log=lines.append, **kwargs
    )
    return template


def _sandbox(root: Path, isolation: str, template: LocalTemplate, **fields: Any) -> LocalSandbox:
    return LocalSandbox(
        isolation=cast(Isolation, isolation), root_dir=root, local_template=template, **fields
    )


def test_pip_packages_are_on_path_in_the_sandbox(
    wheelhouse: Path, cache: Path, root: Path, isolation: str
) -> None:
    template = _build(cache, isolation, TINY)
    assert template.built
    with _sandbox(root, isolation, template) as sb:
        result = sb.exec("kodetiny && python -c 'import kodetiny, sys; print(sys.prefix)'")
        assert result.ok, result.stderr
        assert result.stdout.splitlines() == ["tiny says 42", str(cache / TINY.digest() / "venv")]
        assert sb.fs.read("data.txt") == "original\n"
    # The host's own Python did not get the package: it went into the template's venv only.
    assert not any(Path(p, "kodetiny").exists() for p in sys.path if p)


def test_a_sandbox_cannot_change_the_template(
    wheelhouse: Path, cache: Path, root: Path, isolation: str
) -> None:
    template = _build(cache, isolation, TINY)
    with _sandbox(root, isolation, template) as first:
        assert first.exec("echo changed > data.txt && rm -f missing").ok
        assert first.fs.read("data.txt") == "changed\n"
        inode = os.stat(first.host_path("data.txt")).st_ino
        assert inode != os.stat(template.tree / "data.txt").st_ino, "a hardlink, not a copy"
        if isolation == "bwrap":
            # The shared venv is read-only inside the sandbox, even for root.
            venv = first.exec('touch "$VIRTUAL_ENV/pwned"')
            assert not venv.ok and "Read-only" in venv.stderr
    assert (template.tree / "data.txt").read_text() == "original\n"
    assert not (cache / TINY.digest() / "venv" / "pwned").exists()
    with _sandbox(root, isolation, template) as second:
        assert second.fs.read("data.txt") == "original\n"


@needs_bwrap
def test_a_recycled_sandbox_gets_the_template_files_again(
    wheelhouse: Path, cache: Path, root: Path
) -> None:
    template = _build(cache, "bwrap", TINY)
    used = _sandbox(root, "bwrap", template).init()
    fresh = None
    try:
        assert used.exec("echo changed > data.txt && touch extra.txt").ok
        fresh = used.recycle(used.options)
        assert fresh is not None
        assert fresh.fs.read("data.txt") == "original\n"
        assert not fresh.fs.exists("extra.txt")
        ran = fresh.exec("kodetiny")
        assert ran.stdout == "tiny says 42\n", ran.stderr
    finally:
        used.dispose()
        if fresh is not None:
            fresh.dispose()
    assert (template.tree / "data.txt").read_text() == "original\n"


@needs_bwrap
def test_build_commands_run_inside_the_isolation_not_on_the_host(
    cache: Path, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "escaped.txt"
    spec = TemplateSpec(
        base="debian",
        build_commands=(f"echo x > {outside} ; echo $HOME > home.txt; pwd > pwd.txt",),
    )
    template = _build(cache, "bwrap", spec)
    assert not outside.exists(), "a build command wrote to the host"
    assert (template.tree / "home.txt").read_text() == "/home/user\n"
    assert (template.tree / "pwd.txt").read_text() == "/home/user\n"
    # The tree holds only what the build made: no pip/npm dot-files.
    assert sorted(os.listdir(template.tree)) == ["home.txt", "pwd.txt"]


def test_second_builder_hits_the_cache_and_does_not_rebuild(wheelhouse: Path, cache: Path) -> None:
    first = _build(cache, "none", TINY)
    ready = cache / TINY.digest() / "ready.json"
    stamp = ready.stat().st_mtime_ns
    lines: list[str] = []
    again = LocalTemplateBuilder(cache, isolation="none").prepare(TINY, on_log=lines.append)
    assert first.built and not again.built
    assert ready.stat().st_mtime_ns == stamp
    assert not any(line.startswith("$ ") for line in lines), lines
    assert again.path_dirs == first.path_dirs


def test_concurrent_builders_build_once(wheelhouse: Path, cache: Path) -> None:
    results: list[LocalTemplate] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(LocalTemplateBuilder(cache, isolation="none").prepare(TINY))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(result.built for result in results) == [False, False, True]


def test_a_failed_step_reports_its_output_and_leaves_no_half_build(cache: Path) -> None:
    spec = TemplateSpec(base="debian", build_commands=("echo about to fail; exit 3",))
    with pytest.raises(SandboxCreateError) as caught:
        _build(cache, "none", spec)
    assert "exit code 3" in str(caught.value) and "about to fail" in str(caught.value)
    assert not (cache / spec.digest()).exists()


def test_missing_apt_packages_are_listed_with_the_fix(cache: Path) -> None:
    if missing_apt_packages(["bash"]):
        pytest.skip("not a Debian host")
    spec = TemplateSpec(apt_packages=("bash", "kode-no-such-package", "kode-nor-this=1.0"))
    with pytest.raises(BackendUnavailableError) as caught:
        _build(cache, "none", spec)
    message = str(caught.value)
    assert "kode-no-such-package, kode-nor-this=1.0" in message
    assert "apt-get install -y kode-no-such-package kode-nor-this=1.0" in message
    assert "bash," not in message and "e2b" in message
    assert not (cache / spec.digest()).exists()


def test_what_local_cannot_do_is_a_clear_error(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(BackendUnavailableError, match="Dockerfile"):
        _build(cache, "none", TemplateSpec(base="custom", dockerfile="FROM python:3.11"))
    with pytest.raises(BackendUnavailableError, match="python3.99"):
        _build(cache, "none", TemplateSpec(base="python", base_version="3.99"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no node, no npm
    with pytest.raises(BackendUnavailableError, match="node and npm"):
        _build(cache, "none", TemplateSpec(base="node", npm_packages=("left-pad",)))


def test_prepare_template_honours_the_template_work_dir(
    wheelhouse: Path, cache: Path, root: Path, isolation: str
) -> None:
    spec = TemplateSpec(
        pip_packages=("kodetiny",), work_dir="/srv/app", build_commands=("pwd > where.txt",)
    )
    options, kwargs = prepare_template(
        SandboxOptions(template=spec),
        "local",
        {"template_cache_dir": cache, "isolation": isolation},
    )
    assert options.work_dir == "/srv/app" and "template_cache_dir" not in kwargs
    with LocalSandbox(options, root_dir=root, **kwargs) as sb:
        assert sb.fs.exists("where.txt")
        if isolation == "bwrap":
            assert sb.fs.read("/srv/app/where.txt") == "/srv/app\n"
            assert sb.exec("pwd && kodetiny").stdout == "/srv/app\ntiny says 42\n"
    with pytest.raises(ConfigError, match="built for work_dir='/srv/app'"):
        LocalSandbox(root_dir=root, local_template=kwargs["local_template"])


def test_library_use_builds_the_template_on_create(
    wheelhouse: Path, cache: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KODE_TEMPLATE_CACHE", str(cache))
    with LocalSandbox(template=TINY, root_dir=root) as sb:
        assert sb.exec("kodetiny").stdout == "tiny says 42\n"
        meta = json.loads(sb.metadata_path.read_text())
        assert meta["template"] == TINY.digest()
