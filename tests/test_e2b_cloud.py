"""A handful of checks against the real E2B cloud. They run only with a real ``E2B_API_KEY``.

Skipped cleanly without a key, and when the environment points the SDK at a loopback emulator
(its key is a test key, and ``tests/test_e2b_backend.py`` covers that path already).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from pytest_kode.backends.e2b import E2BSandbox
from pytest_kode.errors import SandboxFileNotFoundError, SandboxNotFoundError


def _skip_reason() -> str | None:
    key = os.environ.get("E2B_API_KEY", "")
    if not key:
        return "E2B_API_KEY is not set (real-cloud E2B tests need a key)"
    if re.fullmatch(r"e2b_0+", key):
        return "E2B_API_KEY is a placeholder test key, not a real one"
    for name in ("E2B_API_URL", "E2B_SANDBOX_URL"):
        host = urlsplit(os.environ.get(name, "")).hostname
        if host in ("127.0.0.1", "localhost", "::1"):
            return f"{name} points at a loopback emulator, not the E2B cloud"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture(scope="module")
def cloud() -> Iterator[E2BSandbox]:
    with E2BSandbox(timeout_ms=120_000, metadata={"kode_test": "tests/test_e2b_cloud.py"}) as sb:
        yield sb


def test_exec_in_the_cloud(cloud: E2BSandbox) -> None:
    result = cloud.exec("echo hello; echo oops >&2; exit 2")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "hello\n", "oops\n")
    assert cloud.exec("pwd").stdout == f"{cloud.options.work_dir}\n"


def test_exec_timeout_in_the_cloud(cloud: E2BSandbox) -> None:
    result = cloud.exec("echo early; sleep 30", timeout_ms=1500)
    assert result.timed_out and result.exit_code == 124 and result.stdout == "early\n"


def test_exec_timeout_kills_the_whole_tree_in_the_cloud(cloud: E2BSandbox) -> None:
    # setsid takes the child out of the command's session and process group; the backend's
    # marker sweep must still find it.
    result = cloud.exec("setsid bash -c 'sleep 3; touch escaped.txt' & sleep 30", timeout_ms=1000)
    assert result.timed_out
    time.sleep(3.5)
    assert not cloud.fs.exists("escaped.txt")
    assert "sleep 30" not in cloud.exec("ps -eo args").stdout


def test_fs_in_the_cloud(cloud: E2BSandbox) -> None:
    blob = bytes(range(256))
    cloud.fs.write("cloud/blob.bin", blob)
    assert cloud.fs.read_bytes("cloud/blob.bin") == blob
    assert cloud.fs.glob("cloud/*.bin") == ["cloud/blob.bin"]
    with pytest.raises(SandboxFileNotFoundError):
        cloud.fs.read("cloud/missing")
    with pytest.raises(SandboxFileNotFoundError):
        cloud.fs.remove("cloud/missing")


def test_host_url_is_https(cloud: E2BSandbox) -> None:
    assert cloud.get_host_url(8080).startswith(f"https://8080-{cloud.sandbox_id}.")


def test_dispose_then_resume_is_not_found() -> None:
    sandbox = E2BSandbox(timeout_ms=60_000).init()
    sandbox_id = sandbox.sandbox_id
    assert sandbox.is_alive()
    sandbox.dispose()
    with pytest.raises(SandboxNotFoundError):
        E2BSandbox(sandbox_id=sandbox_id).init()
