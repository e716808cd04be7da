"""Recycling, as a user sees it: each function-scope test gets a local sandbox as new, with an
id of its own, whatever the test before it left; done sandboxes are made as new for the next
test instead of being disposed and created again (the summary says how many), and nothing is
left after the run. ``--no-sandbox-recycle`` / ``sandbox_recycle = false`` turn it off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _local import needs_bwrap, procs_with, unique_sleep

pytestmark = pytest.mark.usefixtures("kode_root")

MESSY_SUITE = """
import pathlib

import pytest

@pytest.mark.parametrize("n", range(8))
def test_finds_a_new_sandbox_and_leaves_a_mess(sandbox, n):
    assert sandbox.exec("ls -A . /tmp /dev/shm").stdout == ".:\\n\\n/dev/shm:\\n\\n/tmp:\\n"
    assert "sleep" not in sandbox.exec("ps -e -o comm=").stdout
    sandbox.exec("echo x > mess.txt; touch /tmp/mess /dev/shm/mess; "
                 "nohup sleep {marker} >/dev/null 2>&1 &")
    with open(pathlib.Path(__file__).with_name("ids.txt"), "a") as ids:
        ids.write(sandbox.sandbox_id + "\\n")
"""


def _counts(output: str) -> tuple[int, int, int]:
    found = re.search(r"sandboxes: (\d+) created, (?:(\d+) recycled, )?.* (\d+) disposed", output)
    assert found, output
    created, recycled, disposed = found.groups()
    return int(created), int(recycled or 0), int(disposed)


@needs_bwrap
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_every_test_gets_a_sandbox_as_new_and_done_ones_are_recycled(
    pytester: pytest.Pytester, kode_root: Path, workers: list[str]
) -> None:
    marker = unique_sleep()
    pytester.makepyfile(MESSY_SUITE.replace("{marker}", marker))
    result = pytester.runpytest_subprocess(*workers)
    result.assert_outcomes(passed=8)
    ids = (pytester.path / "ids.txt").read_text().split()
    assert len(ids) == len(set(ids)) == 8, "every test has a sandbox id of its own"
    created, recycled, disposed = _counts(result.stdout.str())
    assert recycled >= 1, result.stdout.str()
    assert created + recycled == disposed >= 8
    assert procs_with(marker) == []
    assert sorted(path.name for path in kode_root.iterdir()) == []
    result.stdout.fnmatch_lines(["prewarm 2: * made ahead of need (* of them recycled)*"])
    # Waiting for a done sandbox to be made as new is no reason to prewarm more.
    result.stdout.no_fnmatch_line("*try --sandbox-prewarm*")


@needs_bwrap
@pytest.mark.parametrize("switch", ["option", "ini"])
def test_recycling_can_be_turned_off(
    pytester: pytest.Pytester, kode_root: Path, switch: str
) -> None:
    marker = unique_sleep()
    pytester.makepyfile(MESSY_SUITE.replace("{marker}", marker))
    if switch == "ini":
        pytester.makeini("[pytest]\nsandbox_recycle = false\n")
        result = pytester.runpytest_subprocess()
    else:
        result = pytester.runpytest_subprocess("--no-sandbox-recycle")
    result.assert_outcomes(passed=8)
    created, recycled, disposed = _counts(result.stdout.str())
    assert recycled == 0
    result.stdout.no_fnmatch_line("*recycled*disposed*")
    assert created == disposed >= 8
    assert procs_with(marker) == []
    assert sorted(path.name for path in kode_root.iterdir()) == []


def test_without_bubblewrap_nothing_is_recycled_and_the_spares_still_serve(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    # isolation=none has no pid namespace to prove every process gone: nothing is recycled,
    # and the tests take the spares created ahead as before.
    marker = unique_sleep()
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("n", range(8))
        def test_leaves_a_daemon(sandbox, n):
            assert not sandbox.fs.exists("mess.txt")
            sandbox.exec("echo x > mess.txt; nohup sleep {marker} >/dev/null 2>&1 &")
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-isolation=none", "-p", "no:randomly")
    result.assert_outcomes(passed=8)
    result.stdout.no_fnmatch_line("*recycled*disposed*")  # the summary counts none
    result.stdout.fnmatch_lines(
        ["prewarm 2: 7 of 8 function-scope sandboxes were made ahead of need, hiding *"]
    )
    assert procs_with(marker) == []
    assert sorted(path.name for path in kode_root.iterdir()) == []


def test_the_option_is_documented_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--sandbox-recycle, --no-sandbox-recycle*"])


@needs_bwrap
def test_sigkill_while_sandboxes_are_recycled_leaves_nothing(
    pytester: pytest.Pytester, kode_root: Path, tmp_path: Path
) -> None:
    """A run killed at any point of a recycle (renamed or not, its metadata old or new) leaves
    no process and no file: the watchdog finds the sandbox by whichever metadata file names it.
    """
    marker = unique_sleep()
    done = pytester.path / "done.txt"
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("n", range(2000))
        def test_quick(sandbox, n):
            sandbox.exec("nohup sleep {marker} >/dev/null 2>&1 & echo x > f")
            with open({str(done)!r}, "a") as out:
                out.write("x")
        """
    )
    env = {**os.environ, "KODE_RUNS_ROOT": str(tmp_path / "runs")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=pytester.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while (not done.exists() or done.stat().st_size < 30) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done.exists() and done.stat().st_size >= 30, "the run never got going"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while (procs_with(marker) or any(kode_root.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs_with(marker) == []
    assert sorted(path.name for path in kode_root.iterdir()) == []


@needs_bwrap
def test_a_worker_dying_between_a_recycle_and_its_journal_leaves_nothing(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    """The recycled sandbox exists under its new id, but no journal names it yet: the
    controller finds it by its metadata file, tagged with the run, and removes it."""
    marker = unique_sleep()
    pytester.makeconftest(
        """
        import os
        from pytest_kode.backends.local import LocalSandbox

        _recycle = LocalSandbox.recycle

        def recycle_then_die(self, options):
            fresh = _recycle(self, options)
            if fresh is not None:
                os._exit(1)  # the worker dies before the new id is journaled
            return fresh

        LocalSandbox.recycle = recycle_then_die
        """
    )
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_work(sandbox, n):
            sandbox.exec("nohup sleep {marker} >/dev/null 2>&1 &")
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:randomly", "--max-worker-restart=0")
    result.stdout.fnmatch_lines(["*crashed*"])
    assert procs_with(marker) == []
    assert sorted(path.name for path in kode_root.iterdir()) == []
