"""How long Ctrl-C takes to give the prompt back, per backend (issue 15: 47 s on the emulator).

    python benchmarks/interrupt.py [--trials 5]

Each trial runs a real inner pytest whose test waits in ``sandbox.exec("sleep 300")`` (the case
that used to wait for the command on the E2B path), sends SIGINT to its whole process group as a
terminal does, and times signal -> exit. Backends interleave trial by trial; prints the medians
and the emulator/local ratio. Target: under ~2 s on the emulator, near local.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = textwrap.dedent(
    """
    import os, pathlib

    def test_wait(sandbox):
        sandbox.exec("true")
        pathlib.Path(os.environ["KODE_READY"]).touch()
        sandbox.exec("sleep 300")
    """
)


def trial(backend: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "test_wait.py").write_text(TEST)
        ready = work / "ready"
        env = dict(
            os.environ,
            KODE_READY=str(ready),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        proc = subprocess.Popen(
            [*argv, f"--sandbox-backend={backend}", "test_wait.py"],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{backend}: the inner run ended before its test was ready")
            time.sleep(0.02)
        time.sleep(0.5)  # the test is inside exec() now
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"local": [], "emulator": []}
    for _ in range(args.trials):
        for backend in times:
            times[backend].append(trial(backend))
    medians = {backend: statistics.median(values) for backend, values in times.items()}
    for backend, values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{backend:9} Ctrl-C -> exit: median {medians[backend]:.2f}s  ({shown})")
    print(f"emulator / local: {medians['emulator'] / medians['local']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
