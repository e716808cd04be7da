"""Fault scenarios shared by tests/test_faults.py and benchmarks/faults.py.

Each scenario runs a real inner pytest in a subprocess, with its own local root, runs root and
(for the E2B path) a standalone emulator in *this* process so it outlives a killed run. It waits
until the inner tests hold sandboxes with a running background process, does the fault (a real
signal with ``os.kill``, or a test that calls ``os._exit`` under ``-n 2``), then counts what is
left: sandbox directories, sandbox processes, live emulated sandboxes and run folders.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_kode.emulator import E2BEmulator

REPO = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent(
    """
    import os, pathlib, time

    def _hold(sandbox, name):
        sandbox.start("sleep 300")
        sandbox.exec("echo data > kept-file")
        ready = pathlib.Path(os.environ["KODE_FAULT_READY"])
        ready.joinpath(name).touch()
        if os.environ.get("KODE_FAULT_IN_EXEC"):
            sandbox.exec("sleep 300")  # the signal lands while the SDK streams a command
        else:
            time.sleep(60)

    def test_hold_a(sandbox):
        _hold(sandbox, "a")

    def test_hold_b(sandbox):
        _hold(sandbox, "b")
    """
)

CRASH = textwrap.dedent(
    """
    import os, time

    def test_crash(sandbox):
        sandbox.start("sleep 300")
        sandbox.exec("true")
        time.sleep(0.3)  # let the other worker take its test too
        os._exit(3)

    def test_ok(sandbox):
        sandbox.start("sleep 300")
        assert sandbox.exec("true").ok
        time.sleep(0.6)
    """
)

SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}
FAULTS = ("sigint", "sigterm", "sigkill", "worker-crash")


@dataclass
class Outcome:
    scenario: str
    returncode: int
    held: int  # sandboxes in use when the fault happened
    dirs: list[str]
    processes: list[int]
    emulated: list[str]
    run_dirs: list[str]
    clean_after_s: float
    output: str

    @property
    def leaked(self) -> bool:
        hung = self.output.startswith("HUNG")
        return hung or bool(self.dirs or self.processes or self.emulated or self.run_dirs)

    def describe(self) -> str:
        return (
            f"{self.scenario}: rc={self.returncode} held={self.held} dirs={self.dirs} "
            f"processes={self.processes} emulated={self.emulated} run_dirs={self.run_dirs} "
            f"after {self.clean_after_s:.2f}s\n{self.output[-3000:]}"
        )


def sandbox_processes(fragment: str) -> list[int]:
    """Processes whose command line or environment mentions ``fragment`` (a private root)."""
    needle = fragment.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                data = handle.read()
            with open(f"/proc/{name}/environ", "rb") as handle:
                data += handle.read()
        except OSError:
            continue
        # The inner pytest itself has the roots in its environment; only sandbox dwellers count.
        if needle in data and b"sleep" in data and b"pytest" not in data:
            found.append(int(name))
    return found


def _listing(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def run(
    backend: str,
    fault: str,
    workdir: Path,
    emulator: E2BEmulator | None = None,
    *,
    lease_s: float = 1.0,
    clean_within_s: float = 5.0,
    xdist: bool = False,
    in_exec: bool = False,
) -> Outcome:
    """One trial of ``fault`` on ``backend``: ``local``, ``e2b`` (against ``emulator``) or
    ``emulator`` (the run's own). ``xdist`` runs a signal scenario under ``-n 2``; ``in_exec``
    signals while the test waits in ``exec("sleep 300")`` rather than in ``time.sleep``."""
    workdir.mkdir(parents=True, exist_ok=True)
    local_root, runs_root, ready = workdir / "local", workdir / "runs", workdir / "ready"
    for folder in (local_root, ready):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "E2B_", "KODE_"))}
    env.update(
        KODE_LOCAL_ROOT=str(local_root),
        KODE_RUNS_ROOT=str(runs_root),
        KODE_FAULT_READY=str(ready),
        KODE_FAULT_IN_EXEC="1" if in_exec else "",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    argv = [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:benchmark",
        "-q",
        # One sandbox per scenario, counted in its summary: no spares made ahead of need.
        "--sandbox-prewarm=0",
    ]
    if backend == "e2b":
        assert emulator is not None
        env.update(emulator.env)
        argv += ["--sandbox-backend=e2b", f"--sandbox-lease={lease_s:g}"]
    else:
        argv += [f"--sandbox-backend={backend}"]
    before = set(emulator.sandbox_ids()) if emulator is not None else set()
    crash = fault == "worker-crash"
    (workdir / "test_fault.py").write_text(CRASH if crash else HOLD)
    if crash or xdist:
        argv += ["-n", "2"]
    if crash:
        argv += ["--max-worker-restart=0"]  # a replacement worker would only add start-up time
    started = time.monotonic()
    proc = subprocess.Popen(
        [*argv, "test_fault.py"],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=in_exec,
    )
    held = 0
    try:
        if crash:
            output, _ = proc.communicate(timeout=120)
        else:
            while len(_listing(ready)) < (2 if xdist else 1):
                if proc.poll() is not None or time.monotonic() - started > 60:
                    break
                time.sleep(0.02)
            held = len(_listing(ready))
            if in_exec:
                time.sleep(1.0)  # the test has moved on from the ready file into exec()
                # As a terminal's Ctrl-C: to the whole process group, the run's threads and
                # children included.
                os.killpg(proc.pid, SIGNALS[fault])
            else:
                proc.send_signal(SIGNALS[fault])
            output, _ = proc.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        # Hung: dump its threads (faulthandler is on via -X below), then kill it.
        proc.send_signal(signal.SIGABRT)
        output, _ = proc.communicate()
        output = b"HUNG after the fault\n" + output
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    text = output.decode("utf-8", "replace")
    faulted = time.monotonic()

    def leftovers() -> tuple[list[str], list[int], list[str], list[str]]:
        emulated = sorted(set(emulator.sandbox_ids()) - before) if emulator is not None else []
        return (
            _listing(local_root),
            sandbox_processes(str(local_root))
            + sandbox_processes(str(runs_root))
            + (sandbox_processes(str(emulator.root_dir)) if emulator is not None else []),
            emulated,
            _listing(runs_root),
        )

    # Clean-up after SIGKILL is the watchdog's or the lease's; otherwise it is done on exit
    # (the watchdog still takes a poll to see the run folder go).
    deadline = faulted + (clean_within_s if fault == "sigkill" else 1.0)
    left = leftovers()
    while any(left) and time.monotonic() < deadline:
        time.sleep(0.05)
        left = leftovers()
    return Outcome(
        f"{backend}-{fault}{'-xdist' if xdist else ''}",
        proc.returncode,
        held,
        *left,
        clean_after_s=time.monotonic() - faulted,
        output=text,
    )
