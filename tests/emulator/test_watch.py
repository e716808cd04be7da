"""Directory watching through the real SDK: polled (sync) and streamed (async) watchers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest


def _names(events: list[Any]) -> list[tuple[str, str]]:
    return [(event.name, event.type.value) for event in events]


def test_poll_watcher_sees_create_chmod_write_of_an_upload(sbx: Any) -> None:
    sbx.files.make_dir("w")
    handle = sbx.files.watch_dir("w")
    sbx.files.write("w/a.txt", "one")
    events = _names(handle.get_new_events())
    assert events[0] == ("a.txt", "create")
    assert ("a.txt", "write") in events and ("a.txt", "chmod") in events
    sbx.files.remove("w/a.txt")
    assert _names(handle.get_new_events()) == [("a.txt", "remove")]
    handle.stop()


def test_poll_watcher_sees_changes_made_by_commands(sbx: Any) -> None:
    sbx.files.make_dir("w")
    handle = sbx.files.watch_dir("w")
    sbx.commands.run("cd w && echo x > b && mv b c")
    events = _names(handle.get_new_events())
    assert ("b", "create") in events
    assert ("b", "rename") in events and ("c", "create") in events
    handle.stop()


def test_recursive_watch_follows_new_directories(sbx: Any) -> None:
    sbx.files.make_dir("r")
    handle = sbx.files.watch_dir("r", recursive=True)
    sbx.files.make_dir("r/sub")
    sbx.files.write("r/sub/deep.txt", "x")
    events = _names(handle.get_new_events())
    assert ("sub", "create") in events
    assert ("sub/deep.txt", "write") in events
    handle.stop()


def test_recursive_watch_reports_what_a_new_directory_holds_before_its_watch(sbx: Any) -> None:
    sbx.files.make_dir("q")
    handle = sbx.files.watch_dir("q", recursive=True)
    # One command makes the directories and the file microseconds apart: sooner than any
    # watcher can add a watch on the new directories.
    sbx.commands.run("mkdir -p q/a/b && echo x > q/a/b/f.txt && touch q/a/empty")
    events = _names(handle.get_new_events())
    assert ("a", "create") in events
    assert ("a/b", "create") in events
    assert ("a/b/f.txt", "create") in events and ("a/b/f.txt", "write") in events
    assert ("a/empty", "create") in events
    # Later changes come from the watches themselves.
    sbx.files.write("q/a/b/g.txt", "y")
    assert ("a/b/g.txt", "write") in _names(handle.get_new_events())
    handle.stop()


def test_non_recursive_watch_ignores_nested_changes(sbx: Any) -> None:
    sbx.files.make_dir("n/sub")
    handle = sbx.files.watch_dir("n")
    sbx.files.write("n/sub/x.txt", "x")
    assert all(name == "sub" for name, _ in _names(handle.get_new_events()))
    handle.stop()


def test_entry_info_in_events(sbx: Any) -> None:
    sbx.files.make_dir("e")
    handle = sbx.files.watch_dir("e", include_entry=True)
    sbx.files.write("e/f.txt", "x")
    write = next(event for event in handle.get_new_events() if event.type.value == "write")
    assert write.entry is not None
    assert (write.entry.path, write.entry.type.value) == ("/home/user/e/f.txt", "file")
    handle.stop()


def test_watch_errors(sbx: Any) -> None:
    from e2b import FileNotFoundException, InvalidArgumentException, SandboxException

    with pytest.raises(FileNotFoundException):
        sbx.files.watch_dir("missing")
    sbx.files.write("plain.txt", "x")
    with pytest.raises(InvalidArgumentException):
        sbx.files.watch_dir("plain.txt")
    handle = sbx.files.watch_dir(".")
    handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()


def test_stream_watch_delivers_events_and_ends_when_the_directory_goes(
    api: dict[str, Any],
) -> None:
    from e2b import AsyncSandbox

    async def scenario() -> tuple[list[tuple[str, str]], object]:
        sandbox = await AsyncSandbox.create(**api)
        try:
            await sandbox.files.make_dir("s")
            seen: list[tuple[str, str]] = []
            ended: list[object] = []
            handle: Any = await sandbox.files.watch_dir(
                "s",
                on_event=lambda event: seen.append((event.name, event.type.value)),
                on_exit=ended.append,
            )
            await sandbox.files.write("s/one.txt", "1")
            deadline = time.monotonic() + 10
            while ("one.txt", "write") not in seen and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await sandbox.commands.run("rm -r s")
            while not ended and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await handle.stop()
            return seen, ended[0] if ended else "still running"
        finally:
            await sandbox.kill()

    seen, exit_reason = asyncio.run(scenario())
    assert ("one.txt", "create") in seen and ("one.txt", "write") in seen
    assert exit_reason is None  # the stream ended cleanly, not with an error
