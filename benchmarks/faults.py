"""Stress the "nothing outlives the run" guarantee (SPEC 3.6): every fault scenario N times.

    python benchmarks/faults.py [--trials 20] [--only local-sigkill,e2b-sigterm]

Each trial is a real inner pytest run (see tests/_faults.py) that gets SIGINT, SIGTERM or
SIGKILL mid-test, or loses an xdist worker to os._exit, on the local backend and on the E2B
backend against a standalone emulator (1 s lease). Prints, per scenario, how many trials leaked
anything (sandbox directories, sandbox processes, live emulated sandboxes, run folders) and how
long the clean-up took after the fault. Target: 0 leaks of N for every scenario.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _faults import FAULTS, run  # type: ignore[import-not-found]  # noqa: E402

from pytest_kode.emulator import E2BEmulator  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    args = parser.parse_args()
    wanted = {name for name in args.only.split(",") if name}
    scenarios = [
        (backend, fault)
        for backend in ("local", "e2b")
        for fault in FAULTS
        if not wanted or f"{backend}-{fault}" in wanted
    ]
    base = Path(tempfile.mkdtemp(prefix="kode-faults-"))
    failures = 0
    print(f"{'scenario':<20} {'leaked':>9} {'clean-up s (median / max)':>27} {'trial s':>8}")
    try:
        with E2BEmulator(root_dir=base / "emulator") as emulator:
            for backend, fault in scenarios:
                leaks, cleanups, started = 0, [], time.monotonic()
                for trial in range(args.trials):
                    workdir = base / f"{backend}-{fault}-{trial}"
                    outcome = run(backend, fault, workdir, emulator if backend == "e2b" else None)
                    cleanups.append(outcome.clean_after_s)
                    if outcome.leaked:
                        leaks += 1
                        print(outcome.describe(), file=sys.stderr)
                    shutil.rmtree(workdir, ignore_errors=True)
                failures += leaks
                per_trial = (time.monotonic() - started) / args.trials
                print(
                    f"{backend + '-' + fault:<20} {leaks:>4} of {args.trials:<3}"
                    f" {statistics.median(cleanups):>13.2f} / {max(cleanups):<11.2f}"
                    f" {per_trial:>8.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
