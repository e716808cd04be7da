"""Template builds' control plane through the real SDK: tags, exists, background builds."""

from __future__ import annotations

import uuid
from typing import Any

import pytest


def _name() -> str:
    return f"kode-{uuid.uuid4().hex[:8]}"


def test_tags_assign_list_remove_and_create_by_tag(api: dict[str, Any], create: Any) -> None:
    from e2b import Template, TemplateException

    name = _name()
    built = Template.build(Template().from_base_image(), f"{name}:v1", **api)
    assert built.build_id and built.template_id
    assigned = Template.assign_tags(f"{name}:v1", ["prod", f"{name}:latest"], **api)
    assert assigned.build_id == built.build_id and assigned.tags == ["prod", "latest"]
    assert {tag.tag for tag in Template.get_tags(name, **api)} == {"v1", "prod", "latest"}
    assert create(template=f"{name}:prod").files.exists(".") is True
    Template.remove_tags(name, "prod", **api)
    assert {tag.tag for tag in Template.get_tags(name, **api)} == {"v1", "latest"}
    for bad in (":x", f"{name}:", "other:x"):
        with pytest.raises(TemplateException):
            Template.assign_tags(f"{name}:v1", bad, **api)
    with pytest.raises(TemplateException):
        Template.assign_tags(f"{_name()}:v1", "x", **api)


def test_exists_knows_built_and_builtin_templates(api: dict[str, Any]) -> None:
    from e2b import Template

    name = _name()
    assert Template.exists("base", **api) is True
    assert Template.exists(name, **api) is False
    Template.build(Template().from_base_image(), name, **api)
    assert Template.exists(name, **api) is True


def test_run_step_as_an_unknown_user_fails_the_build(api: dict[str, Any]) -> None:
    from e2b import BuildException, Template

    template = Template().from_base_image().run_cmd("whoami", user="no-such-user-42")
    with pytest.raises(BuildException, match="invalid username: 'no-such-user-42'"):
        Template.build(template, _name(), **api)
    ok = Template().from_base_image().run_cmd("true", user="root")
    Template.build(ok, _name(), **api)


def test_background_build_reports_building_then_ready(api: dict[str, Any]) -> None:
    import time

    from e2b import Template

    template = Template().from_base_image().skip_cache().run_cmd("sleep 2")
    info = Template.build_in_background(template, _name(), **api)
    assert Template.get_build_status(info, **api).status.value == "building"
    deadline = time.monotonic() + 60
    status = "building"
    while status == "building" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = Template.get_build_status(info, **api).status.value
    assert status == "ready"


def _frames_here(exc: BaseException) -> list[str]:
    import traceback

    return [
        frame.line or ""
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename == __file__
    ]


def test_a_failing_step_is_reported_at_the_users_line(api: dict[str, Any]) -> None:
    from e2b import BuildException, Template

    template = (
        Template()
        .from_base_image()
        .run_cmd("true")
        .run_cmd("echo broken >&2; exit 7")  # the failing step
        .run_cmd("true")
    )
    with pytest.raises(BuildException, match="exit code 7") as caught:
        Template.build(template, _name(), **api)
    assert any("exit 7" in line for line in _frames_here(caught.value))


def test_a_refused_step_and_base_are_reported_at_their_lines(api: dict[str, Any]) -> None:
    from e2b import BuildException, Template

    bad_user = Template().from_base_image().run_cmd("true").run_cmd("id", user="nobody-x")
    with pytest.raises(BuildException) as caught:
        Template.build(bad_user, _name(), **api)
    assert any("nobody-x" in line for line in _frames_here(caught.value))
    bad_base = Template().from_template("never-built-here").run_cmd("true")
    with pytest.raises(BuildException) as caught:
        Template.build(bad_base, _name(), **api)
    assert any("never-built-here" in line for line in _frames_here(caught.value))


def test_copy_with_a_wildcard_keeps_symlinks_as_links(
    api: dict[str, Any], create: Any, tmp_path: Any
) -> None:
    from e2b import Template

    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "test.txt").write_text("hello")
    (folder / "nested" / "deep.txt").write_text("deep")
    (folder / "relative.txt").symlink_to("test.txt")
    (folder / "absolute.txt").symlink_to(folder / "test.txt")  # this host's path
    (folder / "dangling.txt").symlink_to("12345.txt")
    template = (
        Template(file_context_path=str(tmp_path))
        .from_base_image()
        .copy("folder/*", "copied", force_upload=True)
        .run_cmd("cat copied/test.txt copied/relative.txt")
    )
    name = _name()
    Template.build(template, name, **api)
    sandbox = create(template=name)
    listing = sandbox.commands.run(
        "cd copied && cat test.txt relative.txt nested/deep.txt"
        " && readlink absolute.txt dangling.txt"
    )
    assert listing.stdout == f"hellohellodeep{folder / 'test.txt'}\n12345.txt\n"
