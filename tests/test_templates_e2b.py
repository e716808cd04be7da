"""E2BTemplateBuilder over the real e2b SDK, against the loopback emulator (which applies the
build's steps: pip into a venv, RUN inside the sandbox isolation, apt checked on the host)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _local import needs_bwrap
from _wheels import make_wheel

from pytest_kode import templates
from pytest_kode._template_local import missing_apt_packages
from pytest_kode.backends.e2b import E2BSandbox
from pytest_kode.emulator import E2BEmulator
from pytest_kode.errors import BackendUnavailableError, ConfigError, SandboxCreateError
from pytest_kode.options import SandboxOptions, TemplateSpec
from pytest_kode.templates import (
    E2BTemplateBuilder,
    ensure_e2b_template,
    prepare_template,
    template_name,
)

TINY = TemplateSpec(pip_packages=("kodetiny",), build_commands=("echo built > made.txt",))


@pytest.fixture(scope="module")
def offline_pip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("wheels")
    make_wheel(directory)
    cache = tmp_path_factory.mktemp("template-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIP_NO_INDEX", "1")
        patch.setenv("PIP_FIND_LINKS", str(directory))
        patch.setenv("KODE_TEMPLATE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def emu(offline_pip: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BEmulator]:
    root = tmp_path_factory.mktemp("emu-root")
    with E2BEmulator(root_dir=root) as emulator:
        yield emulator
    assert os.listdir(root) == [], "emulated sandboxes left files behind"


def _conn(emu: E2BEmulator) -> dict[str, str]:
    return {"api_key": emu.api_key, "api_url": emu.url}


# -- translation (offline) ------------------------------------------------------------------
def test_spec_translates_to_the_sdk_builder_calls() -> None:
    from e2b import Template

    spec = TemplateSpec(
        base="python",
        base_version="3.11",
        apt_packages=("graphviz", "npm"),
        pip_packages=("pandas==2.2",),
        npm_packages=("left-pad",),
        work_dir="/app",
        build_commands=("echo one", "echo two"),
    )
    data = json.loads(Template.to_json(E2BTemplateBuilder.to_sdk(spec)))
    assert data["fromImage"] == "python:3.11"
    runs = [(step["type"], step["args"][0]) for step in data["steps"]]
    assert runs[0][0] == "RUN" and runs[0][1].endswith("apt-get install -y graphviz npm")
    assert runs[1:] == [
        ("RUN", "pip install pandas==2.2"),
        ("RUN", "npm install -g left-pad"),
        ("WORKDIR", "/app"),
        ("RUN", "echo one"),
        ("RUN", "echo two"),
    ]


@pytest.mark.parametrize(
    ("spec", "image"),
    [
        (TemplateSpec(base="node"), "node:lts"),
        (TemplateSpec(base="debian", base_version="bookworm"), "debian:bookworm"),
        (TemplateSpec(base="ubuntu"), "ubuntu:latest"),
        (TemplateSpec(base="custom", dockerfile="FROM alpine:3.20\nRUN echo hi"), "alpine:3.20"),
    ],
)
def test_every_base_has_its_image(spec: TemplateSpec, image: str) -> None:
    from e2b import Template

    assert json.loads(Template.to_json(E2BTemplateBuilder.to_sdk(spec)))["fromImage"] == image


def test_inconsistent_specs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs dockerfile="):
        E2BTemplateBuilder.to_sdk(TemplateSpec(base="custom"))
    with pytest.raises(ConfigError, match="needs base='custom'"):
        E2BTemplateBuilder.to_sdk(TemplateSpec(base="python", dockerfile="FROM x"))
    with pytest.raises(ConfigError, match="either spec= or TemplateSpec fields"):
        E2BTemplateBuilder.build("x", spec=TINY, pip_packages=["y"])


def test_template_names_follow_the_content_hash() -> None:
    assert template_name(TINY) == f"kode-{TINY.digest()}"
    assert template_name(TINY) != template_name(TINY.replace(pip_packages=("other",)))


# -- building on the emulator ---------------------------------------------------------------
@needs_bwrap  # the /home/user paths and the read-only venv are bwrap's view
def test_build_streams_logs_and_sandboxes_start_from_the_template(emu: E2BEmulator) -> None:
    lines: list[str] = []
    info = E2BTemplateBuilder.build(
        alias="kode-test-tiny", spec=TINY, on_log=lines.append, **_conn(emu)
    )
    assert info.name == "kode-test-tiny" and info.template_id and info.build_id and not info.cached
    assert any("Successfully installed kodetiny-1.0" in line for line in lines), lines
    assert E2BTemplateBuilder.exists("kode-test-tiny", **_conn(emu))
    assert not E2BTemplateBuilder.exists("kode-never-built", **_conn(emu))
    options = SandboxOptions(apiKey=emu.api_key, template="kode-test-tiny")
    with E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url) as sb:
        result = sb.exec("kodetiny && cat made.txt")
        assert result.stdout == "tiny says 42\nbuilt\n", result.stderr
        # The shared venv is the template's: read-only for every sandbox.
        assert not sb.exec('touch "$VIRTUAL_ENV/pwned"').ok
        sb.fs.write("made.txt", "changed")
    with E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url) as again:
        assert again.fs.read("made.txt") == "built\n"


def test_a_failing_step_is_a_create_error_with_the_log_tail(emu: E2BEmulator) -> None:
    spec = TemplateSpec(base="debian", build_commands=("echo step output; exit 7",))
    with pytest.raises(SandboxCreateError) as caught:
        E2BTemplateBuilder.build(alias="kode-test-fails", spec=spec, **_conn(emu))
    message = str(caught.value)
    assert "kode-test-fails" in message and "exit code 7" in message and "step output" in message
    # As in the cloud: the name is registered by the build request, built or not.
    assert E2BTemplateBuilder.exists("kode-test-fails", **_conn(emu))
    options = SandboxOptions(apiKey=emu.api_key, template="kode-test-fails")
    with pytest.raises(SandboxCreateError, match="no ready template") as refused:
        E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url).init()
    assert "(HTTP 404)" in str(refused.value)


def test_missing_apt_packages_fail_the_emulated_build(emu: E2BEmulator) -> None:
    if missing_apt_packages(["bash"]):
        pytest.skip("not a Debian host")
    spec = TemplateSpec(base="debian", apt_packages=("kode-no-such-package",))
    with pytest.raises(SandboxCreateError, match="apt-get install -y kode-no-such-package"):
        E2BTemplateBuilder.build(alias="kode-test-apt", spec=spec, **_conn(emu))


def test_a_bad_api_key_is_an_auth_error(emu: E2BEmulator) -> None:
    with pytest.raises(BackendUnavailableError, match="rejected the credentials") as caught:
        E2BTemplateBuilder.build(
            alias="kode-x", spec=TINY, api_key="e2b_" + "0" * 40, api_url=emu.url
        )
    assert emu.api_key not in str(caught.value)


def test_ensure_builds_once_then_reuses_across_processes(emu: E2BEmulator, tmp_path: Path) -> None:
    spec = TINY.replace(build_commands=("echo ensure > made.txt",))
    before = emu.calls["template.build"]
    name = ensure_e2b_template(spec, lock_dir=tmp_path, **_conn(emu))
    assert name == template_name(spec) and emu.calls["template.build"] == before + 1
    # Another process (a later run, an xdist worker) knows nothing in memory: it reads the
    # local record of the finished build. Template.exists() is never asked: it is true from the
    # build *request* on, finished or not.
    templates._e2b_known.clear()
    asked = emu.calls["template.alias"]
    assert ensure_e2b_template(spec, lock_dir=tmp_path, **_conn(emu)) == name
    assert emu.calls["template.build"] == before + 1 and emu.calls["template.alias"] == asked


def test_a_build_that_failed_is_built_again_next_time(emu: E2BEmulator, tmp_path: Path) -> None:
    # The first build of this spec is cut short on the server (the emulator's apt step fails on
    # a package the host lacks); the name stays registered, as in the cloud.
    spec = TINY.replace(build_commands=("echo second > made.txt",))
    name = template_name(spec)
    broken = E2BTemplateBuilder.to_sdk(spec).apt_install(["kode-no-such-package"])
    from e2b import Template

    with pytest.raises(Exception, match="kode-no-such-package"):
        Template.build(broken, name=name, api_key=emu.api_key, api_url=emu.url)
    assert E2BTemplateBuilder.exists(name, **_conn(emu))
    # The next run builds it again (no local record of a finished build) and it works.
    templates._e2b_known.clear()
    before = emu.calls["template.build"]
    assert ensure_e2b_template(spec, lock_dir=tmp_path, **_conn(emu)) == name
    assert emu.calls["template.build"] == before + 1
    options = SandboxOptions(apiKey=emu.api_key, template=name)
    with E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url) as sb:
        assert sb.fs.read("made.txt") == "second\n"


def test_package_specs_reach_the_build_quoted(emu: E2BEmulator) -> None:
    from e2b import Template

    spec = TemplateSpec(pip_packages=("kodetiny>=1.0", "kodetiny<2"))
    steps = json.loads(Template.to_json(E2BTemplateBuilder.to_sdk(spec)))["steps"]
    assert steps[0]["args"][0] == "pip install 'kodetiny>=1.0' 'kodetiny<2'"
    # Unquoted, the cloud's `bash -l -c` reads `<2` as a missing input file; so does the
    # emulator.
    raw = Template().from_python_image("3").pip_install(["kodetiny<2"])
    with pytest.raises(Exception, match="2: No such file or directory"):
        Template.build(raw, name="kode-test-unquoted", api_key=emu.api_key, api_url=emu.url)


def test_pip_on_a_base_without_pip_fails_as_in_the_cloud(emu: E2BEmulator) -> None:
    from e2b import Template

    raw = Template().from_debian_image().pip_install(["requests"])
    with pytest.raises(Exception, match="pip: command not found"):
        Template.build(raw, name="kode-test-nopip", api_key=emu.api_key, api_url=emu.url)
    with pytest.raises(ConfigError, match="pip_packages need base='python'"):
        TemplateSpec(base="debian", pip_packages=["requests"])


@pytest.mark.parametrize(
    ("cpu", "memory", "message"),
    [
        (3, 512, "CPU count must be 1 or an even number"),
        (2, 100, "at least 128"),
        (2, 513, "even number of MiB"),
    ],
)
def test_cpu_and_memory_the_cloud_refuses(
    emu: E2BEmulator, cpu: int, memory: int, message: str
) -> None:
    from e2b import Template

    raw = Template().from_python_image("3").run_cmd("true")
    with pytest.raises(Exception, match=message):
        Template.build(
            raw,
            name="kode-test-res",
            cpu_count=cpu,
            memory_mb=memory,
            api_key=emu.api_key,
            api_url=emu.url,
        )
    with pytest.raises(ConfigError, match="cpu_count|memory_mb"):
        TemplateSpec(cpu_count=cpu, memory_mb=memory)


@needs_bwrap  # the /home/user paths are bwrap's view
def test_prepare_template_hands_the_e2b_backend_the_built_name(emu: E2BEmulator) -> None:
    spec = TINY.replace(work_dir="/home/user/app", build_commands=("pwd > where.txt",))
    options, kwargs = prepare_template(
        SandboxOptions(apiKey=emu.api_key, template=spec), "e2b", {"api_url": emu.url}
    )
    assert options.template == template_name(spec) and options.work_dir == "/home/user/app"
    with E2BSandbox(options, sandbox_url=emu.url, **kwargs) as sb:
        assert sb.fs.read("where.txt") == "/home/user/app\n"
        assert sb.exec("pwd").stdout == "/home/user/app\n"


def test_e2b_sandbox_builds_a_spec_itself_when_used_as_a_library(emu: E2BEmulator) -> None:
    spec = TINY.replace(build_commands=("echo library > made.txt",))
    options = SandboxOptions(apiKey=emu.api_key, template=spec)
    with E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url) as sb:
        assert sb.exec("cat made.txt && kodetiny").stdout == "library\ntiny says 42\n"


def test_a_dockerfile_copies_from_its_own_directory_through_the_emulator(
    emu: E2BEmulator, tmp_path: Path
) -> None:
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "Dockerfile").write_text(
        "FROM python:3.12\nWORKDIR /home/user\nCOPY app.sh app.sh\nRUN ./app.sh > ran.txt\n"
    )
    (docker / "app.sh").write_text("#!/bin/sh\necho v1\n")
    (docker / "app.sh").chmod(0o755)
    spec = TemplateSpec(base="custom", dockerfile="docker/Dockerfile")
    first = ensure_e2b_template(spec, lock_dir=tmp_path, root=tmp_path, **_conn(emu))
    options = SandboxOptions(apiKey=emu.api_key, template=first)
    with E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url) as sb:
        assert sb.exec("cat ran.txt && ./app.sh").stdout == "v1\nv1\n"
    # Editing a file the Dockerfile copies is a new template, built from the new content.
    (docker / "app.sh").write_text("#!/bin/sh\necho v2\n")
    templates._sources_memo.clear()  # a new run: sources are read once per process
    second = ensure_e2b_template(spec, lock_dir=tmp_path, root=tmp_path, **_conn(emu))
    assert second != first
    with E2BSandbox(options.replace(template=second), api_url=emu.url, sandbox_url=emu.url) as sb:
        assert sb.exec("cat ran.txt").stdout == "v2\n"


def test_local_files_and_wheels_reach_an_emulated_sandbox_with_their_modes(
    emu: E2BEmulator, tmp_path: Path
) -> None:
    make_wheel(tmp_path / "dist", name="kodelocal", value="local")
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tmp_path / "data" / "sub" / "run.sh").chmod(0o750)
    spec = TemplateSpec(
        pip_packages=("./dist/kodelocal-1.0-py3-none-any.whl",), files={"data": "stuff/"}
    )
    name = ensure_e2b_template(spec, lock_dir=tmp_path, root=tmp_path, **_conn(emu))
    options = SandboxOptions(apiKey=emu.api_key, template=name)
    with E2BSandbox(options, api_url=emu.url, sandbox_url=emu.url) as sb:
        result = sb.exec("kodelocal && stuff/sub/run.sh && stat -c %a stuff/sub/run.sh")
        assert result.stdout == "tiny says local\nran\n750\n", result.stderr
        assert sb.exec("test -e /tmp/kode-sources || echo removed").stdout == "removed\n"
