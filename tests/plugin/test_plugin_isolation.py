"""The isolation switch and what the header says about isolation; parallel tests that each serve
the same port in their own sandbox."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from _local import needs_bwrap

from pytest_kode.backends.local import _bwrap

pytestmark = pytest.mark.usefixtures("kode_root")


@pytest.fixture(autouse=True)
def _no_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test sets the switch it is about; CI's second run sets it for the whole suite.
    monkeypatch.delenv(_bwrap.ISOLATION_ENV, raising=False)


@needs_bwrap
def test_two_parallel_tests_each_serve_port_8000_in_their_own_sandbox(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import time, urllib.request
        import pytest

        def _serve_and_fetch(sandbox, text):
            sandbox.fs.write("www/index.html", text)
            server = sandbox.start("python3 -m http.server 8000 --directory www")
            url = sandbox.get_host_url(8000)
            deadline = time.monotonic() + 15
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        return url, response.read().decode()
                except OSError:
                    assert server.is_running(), server.stderr
                    assert time.monotonic() < deadline
                    time.sleep(0.05)

        def test_first(sandbox):
            url, body = _serve_and_fetch(sandbox, "first")
            # Both tests hold their server while the other fetches its own.
            time.sleep(1)
            assert body == "first" and url.startswith("http://127.0.0.1:")

        def test_second(sandbox):
            url, body = _serve_and_fetch(sandbox, "second")
            time.sleep(1)
            assert body == "second" and url.startswith("http://127.0.0.1:")
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=2)


REUSED_SERVER = """
import time, urllib.request

def _fetch(url):
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)

def test_serves(session_sandbox):
    if not session_sandbox.resumed:
        session_sandbox.fs.write("www/index.html", "kept")
        session_sandbox.exec(
            "nohup python3 -m http.server 8000 --directory www >/dev/null 2>&1 &"
        )
    routes = session_sandbox.exec("cat /proc/net/route").stdout
    print("RESUMED", session_sandbox.resumed, "ROUTE OUT", "tap0" in routes)
    print("BODY", _fetch(session_sandbox.get_host_url(8000)))
"""


@needs_bwrap
def test_a_reused_sandbox_keeps_its_route_out_and_serves_its_ports_in_the_next_run(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    """The next run resumes the kept sandbox in another process: its server is reached through
    that process's own get_host_url, and its route out outlived the run that made it."""
    pytester.makepyfile(REUSED_SERVER)
    try:
        first = pytester.runpytest_subprocess("--sandbox-reuse", "-s")
        first.assert_outcomes(passed=1)
        first.stdout.fnmatch_lines(["*RESUMED False ROUTE OUT True", "BODY kept"])
        second = pytester.runpytest_subprocess("--sandbox-reuse", "-s")
        second.assert_outcomes(passed=1)
        second.stdout.fnmatch_lines(["*RESUMED True ROUTE OUT True", "BODY kept"])
    finally:
        from pytest_kode.backends.local import remove_local_sandbox

        for name in os.listdir(kode_root):
            if name.endswith(".json"):
                remove_local_sandbox(name[: -len(".json")], kode_root)
    assert os.listdir(kode_root) == []


def test_the_switch_turns_isolation_off_and_the_header_names_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
        def test_plain(sandbox):
            assert sandbox.isolation == "none"
            assert sandbox.exec("echo $HOME").stdout.strip() == str(sandbox.directory)
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-isolation=none")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["kode: backend=auto (local), isolation=none (--sandbox-isolation=none), run=*"]
    )
    monkeypatch.setenv(_bwrap.ISOLATION_ENV, "none")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["kode: *isolation=none (KODE_SANDBOX_ISOLATION=none), run=*"])
    monkeypatch.delenv(_bwrap.ISOLATION_ENV)
    pytester.makeini("[pytest]\nsandbox_isolation = none\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["kode: *isolation=none (ini sandbox_isolation=none), run=*"])


def test_an_unknown_isolation_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--sandbox-isolation=chroot")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--sandbox-isolation=chroot: unknown isolation; choose one of: auto, bwrap, none*"]
    )


def test_no_internet_without_isolation_is_an_error_saying_what_is_missing(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(allow_internet_access=False)
        def test_offline(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-isolation=none")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*BackendUnavailableError*allow_internet_access=False needs the sandbox's own "
            "network namespace*only has with bubblewrap*",
        ]
    )


def _path_without_bwrap(tmp_path: Path) -> str:
    """A PATH with the shell tools a plain sandbox needs, but no bwrap."""
    bin_dir = tmp_path / "bin-without-bwrap"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "env", "cat", "echo", "true"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_without_bubblewrap_the_header_says_why_and_the_fix(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytester.makepyfile(
        """
        def test_plain(sandbox):
            assert sandbox.isolation == "none"
            assert sandbox.exec("echo hi").stdout == "hi\\n"
        """
    )
    monkeypatch.setenv("PATH", _path_without_bwrap(tmp_path))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "kode: backend=auto (local), isolation=none (bubblewrap unavailable), run=*",
            "kode: no isolation: bubblewrap is not installed (no `bwrap` on PATH)",
            "kode: fix: install it: `sudo apt-get install bubblewrap slirp4netns`*",
            "kode: choose with --sandbox-isolation=auto|bwrap|none or KODE_SANDBOX_ISOLATION",
        ]
    )


def test_requiring_bwrap_where_it_is_missing_fails_the_sandbox_with_the_fix(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytester.makepyfile("def test_boxed(sandbox): pass")
    monkeypatch.setenv("PATH", _path_without_bwrap(tmp_path))
    result = pytester.runpytest_subprocess("--sandbox-isolation=bwrap")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "kode: *isolation=bwrap required (--sandbox-isolation=bwrap) but unavailable*",
            "*isolation='bwrap' was requested but bubblewrap does not work here*apt-get install "
            "bubblewrap*",
        ]
    )


def test_blocked_user_namespaces_are_explained_with_the_exact_fixes() -> None:
    found = _bwrap._explain("bwrap exited with 1: bwrap: setting up uid map: Permission denied")
    assert not found.works
    assert "user namespaces are blocked here" in found.why
    assert "bwrap: setting up uid map: Permission denied" in found.why
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in found.fix
    assert "AppArmor profile for /usr/bin/bwrap with `userns,`" in found.fix


def test_ls_names_the_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = dict(os.environ, KODE_SANDBOX_ISOLATION="none", KODE_LOCAL_ROOT=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "pytest_kode.cli", "ls", "--backend", "local"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[0] == "local isolation: none (KODE_SANDBOX_ISOLATION=none)"
