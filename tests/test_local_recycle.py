"""A done local sandbox made as new (``LocalSandbox.recycle``): everything its last user left is
gone (processes, files in ``work_dir``, ``/tmp`` and ``/dev``, connections), it has a new id, and
the old id is gone as a disposed sandbox's is. What only a new namespace set would clear
(connections closing in its network namespace, System V IPC objects) makes it refuse, and the
sandbox is disposed as usual. Real sandboxes, real processes."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _local import needs_bwrap, procs_with, unique_sleep, wait_for_procs

from pytest_kode.backends.local import LocalSandbox
from pytest_kode.errors import KodeError, SandboxNotFoundError

pytestmark = pytest.mark.usefixtures("no_leaked_children")


@pytest.fixture
def made(root: Path) -> Iterator[list[LocalSandbox]]:
    """The sandboxes a test makes (recycled ones included): all disposed at its end."""
    sandboxes: list[LocalSandbox] = []
    yield sandboxes
    for sandbox in sandboxes:
        sandbox.dispose()


def _new(root: Path, made: list[LocalSandbox], **fields: object) -> LocalSandbox:
    sandbox = LocalSandbox(isolation="bwrap", root_dir=root, **fields)  # type: ignore[arg-type]
    made.append(sandbox)
    return sandbox.init()


def _recycled(sandbox: LocalSandbox, made: list[LocalSandbox]) -> LocalSandbox | None:
    fresh = sandbox.recycle(sandbox.options)
    if fresh is not None:
        made.append(fresh)
    return fresh


def _view(sandbox: LocalSandbox) -> dict[str, str]:
    """What a user of the sandbox sees of its state, command by command."""
    commands = {
        "home": "ls -A",
        "tmp": "ls -A /tmp",
        "dev": "ls -A /dev",
        "shm": "ls -A /dev/shm",
        "whoami": "id; hostname; echo $HOME; pwd",
    }
    view = {name: sandbox.exec(command).stdout for name, command in commands.items()}
    # Processes by name (pids differ between any two sandboxes), but for this command's own.
    names = sandbox.exec("ps -e -o comm=").stdout.split()
    view["ps"] = " ".join(sorted(name for name in names if name not in ("bash", "ps")))
    return view


@needs_bwrap
def test_a_recycled_sandbox_looks_like_a_new_one(root: Path, made: list[LocalSandbox]) -> None:
    new_view = _view(_new(root, made))
    used = _new(root, made)
    marker = unique_sleep()
    left = used.exec(
        f"nohup sleep {marker} >/dev/null 2>&1 & "
        "echo data > kept.txt && mkdir -p locked/deep && touch locked/deep/f && chmod 000 locked "
        "&& touch /tmp/scratch /dev/shm/segment /dev/extra && chmod 000 /tmp"
    )
    assert left.ok, left.stderr
    handle = used.start(f"sleep {marker}", stdin=True)
    assert len(wait_for_procs(marker, 2)) == 2
    old_id = used.sandbox_id

    fresh = _recycled(used, made)

    assert fresh is not None
    assert fresh.sandbox_id != old_id
    assert procs_with(marker) == [], "every process of the last user is killed"
    assert _view(fresh) == new_view
    assert fresh.exec("echo again > kept.txt && cat kept.txt").stdout == "again\n"
    assert fresh.deadline is not None and fresh.deadline > time.time() + 1
    # The old id is gone, as a disposed sandbox's is, and so is everything held on it.
    assert used.disposed and not used.recyclable and fresh.recyclable
    with pytest.raises(KodeError, match="disposed"):
        used.exec("true")
    with pytest.raises(KodeError):
        handle.send_stdin("late\n")
    with pytest.raises(SandboxNotFoundError):
        LocalSandbox(sandbox_id=old_id, root_dir=root).init()
    names = sorted(path.name for path in root.iterdir())
    assert not any(old_id in name for name in names), names
    meta = json.loads((root / f"{fresh.sandbox_id}.json").read_text())
    assert meta["sandbox_id"] == fresh.sandbox_id and meta["directory"] == str(fresh.directory)


@needs_bwrap
def test_another_process_resumes_a_recycled_sandbox_by_its_new_id(
    root: Path, made: list[LocalSandbox]
) -> None:
    fresh = _recycled(_new(root, made), made)
    assert fresh is not None
    fresh.exec("echo mine > note.txt")
    again = LocalSandbox(sandbox_id=fresh.sandbox_id, root_dir=root).init()
    try:
        assert again.fs.read("note.txt") == "mine\n"
    finally:
        again.detach()


@needs_bwrap
def test_the_new_options_metadata_is_what_the_recycled_sandbox_records(
    root: Path, made: list[LocalSandbox]
) -> None:
    used = _new(root, made, metadata={"owner": "first"})
    fresh = used.recycle(used.options.replace(metadata={"owner": "second"}))
    assert fresh is not None
    made.append(fresh)
    assert fresh.options.metadata == {"owner": "second"}
    meta = json.loads((root / f"{fresh.sandbox_id}.json").read_text())
    assert meta["metadata"] == {"owner": "second"}


@needs_bwrap
def test_a_connection_still_closing_inside_stops_recycling(
    root: Path, made: list[LocalSandbox]
) -> None:
    used = _new(root, made)
    # The server closes first: its side of the connection stays in TIME_WAIT for a minute,
    # which a new sandbox would not have (a server without SO_REUSEADDR could not bind).
    script = (
        "import socket\n"
        "server = socket.create_server(('127.0.0.1', 0))\n"
        "client = socket.create_connection(server.getsockname())\n"
        "conn, _ = server.accept()\n"
        "conn.close(); client.recv(1); client.close(); server.close()\n"
    )
    assert used.exec(f'python3 -c "{script}"').ok
    assert _recycled(used, made) is None
    assert not used.disposed, "refused: the sandbox is still the caller's to dispose"
    used.dispose()
    assert sorted(path.name for path in root.iterdir()) == []


@needs_bwrap
@pytest.mark.skipif(shutil.which("ipcmk") is None, reason="needs util-linux's ipcmk")
def test_a_system_v_ipc_object_stops_recycling(root: Path, made: list[LocalSandbox]) -> None:
    used = _new(root, made)
    assert used.exec("ipcmk -M 4096").ok
    assert _recycled(used, made) is None


def test_what_cannot_be_made_as_new_is_refused(root: Path, made: list[LocalSandbox]) -> None:
    # Without a pid namespace of its own, nothing proves every process of it is gone.
    plain = LocalSandbox(isolation="none", root_dir=root)
    made.append(plain)
    plain.init()
    assert not plain.recyclable
    assert plain.recycle(plain.options) is None
    assert not plain.disposed


@needs_bwrap
def test_only_the_creator_recycles_and_only_into_equal_options(
    root: Path, made: list[LocalSandbox]
) -> None:
    used = _new(root, made)
    assert used.recyclable
    resumed = LocalSandbox(sandbox_id=used.sandbox_id, root_dir=root).init()
    try:
        assert not resumed.recyclable
        assert resumed.recycle(resumed.options.replace(sandbox_id=None)) is None
    finally:
        resumed.detach()
    assert used.recycle(used.options.replace(envs={"OTHER": "1"})) is None
    assert used.exec("true").ok, "a refused recycle leaves the sandbox as it was"
