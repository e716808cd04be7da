"""One mistake, one behaviour, on every backend: the same bad input raises the same exception
class with the same message substance on local (bwrap), local (none) and E2B (the real SDK
against the emulator). Each case is a mistake a new user makes; the assertions are what the
user reads."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from pytest_kode.errors import (
    ConfigError,
    SandboxCreateError,
    SandboxFileNotFoundError,
    SandboxPathError,
)
from pytest_kode.sandbox import Sandbox


@pytest.mark.parametrize(
    ("mistake", "error", "says"),
    [
        (
            lambda sb: sb.exec("echo $N", envs={"N": 1}),
            ConfigError,
            r"exec\(envs=\.\.\.\) must map non-empty names .* to str values.*'N'=1",
        ),
        (
            lambda sb: sb.start("sleep 1", envs={"N": 1}),
            ConfigError,
            r"start\(envs=\.\.\.\) must map non-empty names .* to str values.*'N'=1",
        ),
        (
            lambda sb: sb.exec("pwd", cwd="no/such/dir"),
            SandboxFileNotFoundError,
            r"cwd '/home/user/no/such/dir' is not an existing directory in the sandbox",
        ),
        (
            lambda sb: sb.exec("pwd", cwd=3),
            ConfigError,
            r"exec\(cwd=\.\.\.\) needs a str path, got int",
        ),
        (
            lambda sb: sb.fs.write("x.json", {"a": 1}),
            ConfigError,
            r"fs.write\('x.json', \.\.\.\) needs str or bytes, got dict \(serialise it first",
        ),
        (
            lambda sb: sb.fs.write("x.bin", 7),
            ConfigError,
            r"fs.write\('x.bin', \.\.\.\) needs str or bytes, got int",
        ),
        (
            lambda sb: sb.fs.read("nope.txt"),
            SandboxFileNotFoundError,
            r"'/home/user/nope.txt'",
        ),
        (
            lambda sb: sb.fs.read_bytes("nope.bin"),
            SandboxFileNotFoundError,
            r"'/home/user/nope.bin'",
        ),
        (
            lambda sb: sb.exec("true", timeout_ms=-5),
            ConfigError,
            r"exec\(timeout_ms=-5\) needs an int > 0",
        ),
        (
            lambda sb: sb.exec("cat", stdin=5),
            ConfigError,
            r"exec\(stdin=\.\.\.\) needs str or bytes, got int",
        ),
    ],
    ids=[
        "env-not-str",
        "start-env-not-str",
        "missing-cwd",
        "cwd-not-str",
        "write-dict",
        "write-int",
        "read-missing",
        "read-bytes-missing",
        "negative-timeout",
        "stdin-not-bytes",
    ],
)
def test_the_same_mistake_raises_the_same_error(
    contract_sandbox: Sandbox, mistake: Callable[[Sandbox], Any], error: type, says: str
) -> None:
    with pytest.raises(error) as caught:
        mistake(contract_sandbox)
    assert type(caught.value) is error
    assert re.search(says, str(caught.value), re.DOTALL), str(caught.value)
    # The sandbox is still fine after the mistake.
    assert contract_sandbox.exec("echo ok").stdout == "ok\n"


def test_reading_a_binary_file_as_text_says_use_read_bytes(contract_sandbox: Sandbox) -> None:
    contract_sandbox.fs.write("image.bin", b"\x89PNG\xff\xfe\x00")
    with pytest.raises(UnicodeDecodeError) as caught:
        contract_sandbox.fs.read("image.bin")
    assert "'/home/user/image.bin' is not UTF-8 text; read binary files with fs.read_bytes()" in (
        str(caught.value)
    )
    assert contract_sandbox.fs.read_bytes("image.bin") == b"\x89PNG\xff\xfe\x00"


def test_non_utf8_output_keeps_its_bytes(contract_sandbox: Sandbox) -> None:
    result = contract_sandbox.exec(r"printf 'a\377\376b'")
    assert result.stdout_bytes == b"a\xff\xfeb"
    assert result.stdout == "a\ufffd\ufffdb"


@pytest.mark.parametrize("size_mb", [5, 10])
def test_huge_stdin_reaches_the_command(contract_sandbox: Sandbox, size_mb: int) -> None:
    data = bytes(range(256)) * (size_mb * 4096)
    result = contract_sandbox.exec("sha256sum | cut -c1-16; ", stdin=data, timeout_ms=60_000)
    import hashlib

    assert result.ok and not result.timed_out, result
    assert result.stdout.strip() == hashlib.sha256(data).hexdigest()[:16]


def test_an_unknown_template_is_an_error(contract_factory: Callable[..., Sandbox]) -> None:
    with pytest.raises(SandboxCreateError) as caught:
        contract_factory(template="no-such-template")
    assert "'no-such-template' not found" in str(caught.value)


def test_a_path_escaping_the_sandbox_is_refused(
    contract_sandbox: Sandbox, contract_backend: str
) -> None:
    if contract_backend.startswith("e2b") or contract_backend == "local-bwrap":
        pytest.skip("the sandbox's own view (E2B's VM, bwrap's namespace) has an /etc/passwd")
    with pytest.raises(SandboxPathError) as caught:
        contract_sandbox.fs.read("../../etc/passwd")
    assert "outside the sandbox" in str(caught.value)


def test_json_written_as_text_round_trips(contract_sandbox: Sandbox) -> None:
    # The fix the write-dict message suggests works everywhere.
    contract_sandbox.fs.write("x.json", json.dumps({"a": 1}))
    assert json.loads(contract_sandbox.fs.read("x.json")) == {"a": 1}
