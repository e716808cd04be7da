"""Behaviours of E2B's sandboxes the emulator reproduces, checked through the real SDK."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest


def test_base_image_commands_python_and_sudo(sbx: Any) -> None:
    assert sbx.commands.run("python -c 'import sys; print(sys.version_info[0])'").stdout == "3\n"
    assert sbx.commands.run("sudo -E env FOO=1 sh -c 'echo $FOO'").stdout == "1\n"
    assert sbx.commands.run("sudo -u root true").exit_code == 0


def test_command_envs_do_not_leak_into_later_commands(sbx: Any) -> None:
    assert sbx.commands.run("echo $FOO", envs={"FOO": "bar"}).stdout.strip() == "bar"
    assert sbx.commands.run('sudo echo "$FOO"').stdout.strip() == ""


def _assert_reported_killed(error: BaseException) -> None:
    from e2b import TimeoutException
    from e2b.envd.rpc import is_transport_failure

    assert isinstance(error, TimeoutException), repr(error)
    assert "killed or reached its end of life" in str(error)
    # The connection was reset under the stream, as the edge resets it when the VM goes away:
    # a transport failure, which every SDK version answers with a health probe (older ones
    # do not probe on an UNAVAILABLE answer).
    assert is_transport_failure(error.__cause__), repr(error.__cause__)


def test_sandbox_killed_while_a_command_runs(sbx: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox

    handle = sbx.commands.run("sleep 60", background=True)
    killer = threading.Timer(0.2, Sandbox.kill, args=(sbx.sandbox_id,), kwargs=api)
    killer.start()
    with pytest.raises(Exception) as caught:
        handle.wait()
    killer.join()
    _assert_reported_killed(caught.value)


def test_waiting_on_a_command_after_killing_its_sandbox(sbx: Any) -> None:
    handle = sbx.commands.run("sleep 60", background=True)
    sbx.kill()
    with pytest.raises(Exception) as caught:
        handle.wait()
    _assert_reported_killed(caught.value)
    # The reset is of that one connection: the emulator answers the next request as usual.
    with pytest.raises(Exception, match="not found|killed"):
        sbx.commands.run("true")


def test_async_wait_on_a_command_after_killing_its_sandbox(api: dict[str, Any]) -> None:
    from e2b import AsyncSandbox

    async def scenario() -> BaseException | None:
        sandbox = await AsyncSandbox.create(**api)
        handle = await sandbox.commands.run("sleep 60", background=True)
        await sandbox.kill()
        try:
            await handle.wait()
        except Exception as exc:  # noqa: BLE001 - checked below
            return exc
        return None

    error = asyncio.run(scenario())
    assert error is not None, "wait() returned although the sandbox was killed"
    _assert_reported_killed(error)


def test_upload_replaces_metadata(sbx: Any) -> None:
    first = sbx.files.write("m.txt", "1", metadata={"author": "a"})
    assert first.metadata == {"author": "a"}
    assert sbx.files.get_info("m.txt").metadata == {"author": "a"}
    assert sbx.files.write("m.txt", "2").metadata is None
    assert sbx.files.get_info("m.txt").metadata is None


def test_entry_owner_and_symlink_target(sbx: Any) -> None:
    sbx.files.write("dir/f.txt", "x")
    sbx.commands.run("ln -s f.txt link", cwd="/home/user/dir")
    info = sbx.files.get_info("dir/f.txt")
    assert (info.owner, info.group, info.permissions) == ("user", "user", "-rw-r--r--")
    link = sbx.files.get_info("dir/link")
    assert link.symlink_target == "/home/user/dir/f.txt"
    dangling = sbx.commands.run("ln -s nowhere dangling && echo ok", cwd="/home/user/dir")
    assert dangling.stdout == "ok\n"
    assert sbx.files.get_info("dir/dangling").symlink_target == "nowhere"


def test_expired_signed_url_is_refused_with_envds_message(create: Any) -> None:
    sbx = create(secure=True)
    sbx.files.write("s.txt", "x")
    url = sbx.download_url("s.txt", "user", use_signature_expiration=-120)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, timeout=10)
    assert caught.value.code == 401
    assert json.loads(caught.value.read()) == {
        "code": 401,
        "message": "signature is already expired",
    }
    fresh = sbx.download_url("s.txt", "user", use_signature_expiration=60)
    with urllib.request.urlopen(fresh, timeout=10) as response:
        assert response.read() == b"x"


def test_watch_does_not_stall_other_sandboxes(create: Any) -> None:
    first, second = create(), create()
    handle = first.files.watch_dir(".")
    assert second.commands.run("echo ok").stdout == "ok\n"
    handle.stop()
