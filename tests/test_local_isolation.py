"""Least privilege under bubblewrap: who commands run as and what of the host they can see.

Every check runs a real command inside a real sandbox. pytest runs as root here and in CI, which
is the case that matters: without the identity change, sandboxed code would keep root's
capabilities and read root-only files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _local import needs_bwrap

from pytest_kode.backends.local import LocalSandbox, _bwrap
from pytest_kode.backends.local._network import agent_python

pytestmark = [needs_bwrap, pytest.mark.usefixtures("no_leaked_children")]


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSandbox]:
    root = tmp_path_factory.mktemp("isolation-root")
    with LocalSandbox(isolation="bwrap", root_dir=root) as sandbox:
        # init() returns while the agent still starts (bwrap forks the agent's interpreter):
        # wait for it here, or the first test's no_leaked_children takes
        # the shared sandbox's own processes for its leaks.
        sandbox.exec("true")
        yield sandbox


def _run(box: LocalSandbox, command: str) -> tuple[int, str]:
    result = box.exec(command)
    return result.exit_code, result.stdout + result.stderr


def test_commands_run_as_user_1000_with_home_user(box: LocalSandbox) -> None:
    result = box.exec('id -u; id -g; id -un; id -gn; echo "$HOME"; whoami')
    assert result.stdout.split() == ["1000", "1000", "user", "user", "/home/user", "user"]


def test_no_capabilities_even_when_pytest_is_root(box: LocalSandbox) -> None:
    status = box.exec("grep -E '^Cap(Eff|Prm|Inh|Bnd|Amb):' /proc/self/status").stdout
    fields = dict(line.split(":\t") for line in status.splitlines())
    assert set(fields) == {"CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"}
    assert {value.strip() for value in fields.values()} == {"0000000000000000"}


@pytest.mark.parametrize(
    "command",
    [
        "mount -o remount,rw /usr",
        "mount -o remount,rw,bind /home/user",
        "mount -t tmpfs none /tmp",
        "mknod /tmp/zero c 1 5",
        "unshare --user --map-root-user true",
        "unshare --mount true",
        "chown 0:0 /home/user",
    ],
)
def test_privileged_operations_fail(box: LocalSandbox, command: str) -> None:
    code, output = _run(box, command)
    assert code != 0, output
    assert not Path("/tmp/zero").exists() or os.stat("/tmp/zero").st_rdev == 0


def test_passwd_and_group_are_synthetic_and_name_user(box: LocalSandbox) -> None:
    passwd = box.exec("cat /etc/passwd").stdout
    assert "user:x:1000:1000::/home/user:/bin/bash" in passwd.splitlines()
    assert box.exec("getent group user").stdout.strip() == "user:x:1000:"
    host = Path("/etc/passwd").read_text()
    host_only = {line.split(":")[0] for line in host.splitlines()} - {"root", "user", "nobody"}
    inside = {line.split(":")[0] for line in passwd.splitlines()}
    assert not host_only & inside


@pytest.mark.parametrize("secret", ["/etc/shadow", "/etc/gshadow", "/etc/ssl/private"])
def test_root_only_files_of_etc_are_hidden(box: LocalSandbox, secret: str) -> None:
    if not os.path.exists(secret):
        pytest.skip(f"{secret} does not exist on this host")
    code, output = _run(box, f"cat {secret} 2>&1 || ls -A {secret} 2>&1")
    host_text = Path(secret).read_bytes() if os.path.isfile(secret) else b""
    listing = sorted(os.listdir(secret)) if os.path.isdir(secret) else []
    assert not host_text or host_text.decode("utf-8", "replace") not in output
    assert all(name not in output for name in listing), output


def test_etc_that_programs_need_is_there(box: LocalSandbox) -> None:
    assert box.exec("test -r /etc/os-release && test -r /etc/nsswitch.conf").ok
    assert box.exec("ls /etc/ssl/certs | head -1").stdout.strip()


@pytest.mark.parametrize(
    "path",
    ["/root", "/home", "/run", "/var/run", "/work", "/srv", "/mnt", "/opt", "/var", "/sys"],
)
def test_private_host_places_are_invisible(box: LocalSandbox, path: str) -> None:
    listing = box.exec(f"ls -A {path} 2>/dev/null").stdout.split()
    if path == "/root":
        # Only the Python installation that runs the agent, when it lives under /root.
        allowed = (
            {".pyenv"} if any(_below(root, "/root") for root in _bwrap.python_roots()) else set()
        )
        assert set(listing) <= allowed
    elif path == "/home":
        assert listing == ["user"]
    else:
        assert listing == []


def test_project_checkout_and_host_tmp_are_invisible(box: LocalSandbox, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    marker.write_text("secret")
    checkout = Path(__file__).resolve().parents[1]
    for path in (str(marker), str(checkout / "pyproject.toml"), str(box.directory)):
        code, output = _run(box, f"cat {path}")
        assert code != 0 and "secret" not in output, path


def test_other_sandboxes_are_invisible(box: LocalSandbox, tmp_path: Path) -> None:
    with LocalSandbox(isolation="bwrap", root_dir=tmp_path / "other") as other:
        other.fs.write("mine.txt", "other sandbox")
        code, output = _run(box, f"cat {other.directory}/mine.txt; ls {other.root_dir}")
        assert code != 0 and "other sandbox" not in output


def test_the_agents_python_runs_inside(box: LocalSandbox) -> None:
    result = box.exec(f"{agent_python()} -I -S -c 'import sys; print(sys.version_info[:2])'")
    assert result.ok, result.stderr
    assert result.stdout.strip() == str(sys.version_info[:2])


def test_files_written_inside_are_the_sandbox_users(box: LocalSandbox) -> None:
    assert box.exec("echo x > owned && stat -c '%u:%g' owned").stdout.strip() == "1000:1000"
    # ...and on the host they belong to whoever runs pytest.
    assert (box.directory / "owned").stat().st_uid == os.getuid()


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")
