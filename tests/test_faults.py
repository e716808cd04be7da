"""Nothing outlives the run (SPEC 3.6), tested by doing it: a real inner pytest holding sandboxes
with a running background process gets SIGINT, SIGTERM or SIGKILL mid-test, or loses an xdist
worker to ``os._exit``; afterwards no sandbox directory, sandbox process, live emulated sandbox
or run folder is left. SIGKILL's clean-up is the watchdog's (local) or the lease's (E2B, here a
standalone emulator with a 1 s lease), within 5 s. ``benchmarks/faults.py`` repeats these."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _faults import FAULTS, run  # noqa: E402

from pytest_kode.emulator import E2BEmulator  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BEmulator]:
    with E2BEmulator(root_dir=tmp_path_factory.mktemp("faults-emulator")) as emu:
        yield emu


@pytest.mark.parametrize("fault", FAULTS)
def test_local(fault: str, tmp_path: Path) -> None:
    outcome = run("local", fault, tmp_path)
    assert not outcome.leaked, outcome.describe()
    if fault != "worker-crash":
        assert outcome.held == 1, outcome.describe()
    if fault in ("sigint", "sigterm"):
        assert outcome.returncode == 2, outcome.describe()  # interrupted, not killed
        # Every sandbox made (the test's and the prewarmed spares) was disposed.
        assert re.search(
            r"(\d+) created, 0 resumed, 0 reused, \1 disposed, 0 kept, 0 leaked", outcome.output
        ), outcome.describe()
    if fault == "worker-crash":
        assert "1 passed" in outcome.output and "crashed" in outcome.output, outcome.describe()


@pytest.mark.parametrize("fault", FAULTS)
def test_e2b_on_the_emulator(fault: str, tmp_path: Path, emulator: E2BEmulator) -> None:
    outcome = run("e2b", fault, tmp_path, emulator)
    assert not outcome.leaked, outcome.describe()
    if fault == "sigkill":
        # Nobody disposed them: they ended because their lease ran out.
        assert outcome.clean_after_s > 0.3, outcome.describe()
    if fault in ("sigint", "sigterm"):
        assert outcome.returncode == 2, outcome.describe()
        # Every sandbox made (the test's and the prewarmed spares) was disposed.
        assert re.search(
            r"(\d+) created, 0 resumed, 0 reused, \1 disposed, 0 kept, 0 leaked", outcome.output
        ), outcome.describe()


def test_sigterm_under_xdist_reaches_the_workers(tmp_path: Path) -> None:
    """The controller passes SIGTERM on: both workers dispose their sandboxes and stop."""
    outcome = run("local", "sigterm", tmp_path, xdist=True)
    assert not outcome.leaked, outcome.describe()
    assert outcome.held == 2, outcome.describe()


def test_sigkill_of_a_run_with_its_own_emulator(tmp_path: Path) -> None:
    """--sandbox-backend=emulator keeps the emulated sandboxes under the run folder, so the
    watchdog removes them when the run (and the emulator in it) is killed."""
    outcome = run("emulator", "sigkill", tmp_path)
    assert not outcome.leaked, outcome.describe()
    assert outcome.held == 1


@pytest.mark.parametrize("backend", ["emulator", "local"])
def test_sigint_during_a_long_exec_stops_the_run_at_once(backend: str, tmp_path: Path) -> None:
    """Ctrl-C while the test waits in ``exec("sleep 300")``: the run stops and disposes without
    waiting for the command (on the E2B path the SDK's streaming read used to hold the interrupt
    until the command ended). A run still going 40 s after the signal counts as hung."""
    outcome = run(backend, "sigint", tmp_path, in_exec=True)
    assert not outcome.leaked, outcome.describe()
    assert outcome.returncode == 2, outcome.describe()
    assert "1 created, 0 resumed, 0 reused, 1 disposed, 0 kept, 0 leaked" in outcome.output


def test_sigint_under_xdist_still_counts_the_workers_sandboxes(tmp_path: Path) -> None:
    """An interrupted controller stops listening to its workers' summaries; the summary still
    counts what they created and disposed (from their journals) instead of "0 created"."""
    outcome = run("local", "sigint", tmp_path, xdist=True)
    assert not outcome.leaked, outcome.describe()
    assert outcome.held == 2, outcome.describe()
    assert "2 created, 0 resumed, 0 reused, 2 disposed, 0 kept, 0 leaked" in outcome.output, (
        outcome.describe()
    )
