"""Does a parallel run survive a cloud as strict as E2B's Hobby plan, without wasting its rate?

    python benchmarks/cloud_limits.py [--tests 60] [--workers 4] [--faults 0.3]

Runs a real inner pytest (``-n WORKERS``, TESTS function-scope tests, one sandbox each) on the
``e2b`` backend against a standalone emulator enforcing the ``hobby`` profile (1 create/s, burst
2, 20 running, 429 + ``Retry-After`` beyond), twice: as is, and with a fraction FAULTS of all
creates answered 429/503 on top. Watches the emulator's create counter to time every create.

Prints per scenario: outcomes, leaks (live emulated sandboxes after the run, the summary's
``leaked``), creates the profile turned away, and the achieved create rate: creates after the
first, divided by the time from the first to the last, as a fraction of the plan's rate.
Targets: all pass, 0 leaks; without faults the achieved rate >= 0.9 of the plan's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_kode.emulator import E2BEmulator  # noqa: E402

TESTS = """
import pytest

@pytest.mark.parametrize("n", range({count}))
def test_one(sandbox, n):
    assert sandbox.exec("echo $((6 * 7))").stdout == "42\\n"
"""


def _watch(emulator: E2BEmulator, stop: threading.Event, stamps: list[float]) -> None:
    seen = emulator.created_count
    while not stop.is_set():
        now = emulator.created_count
        stamps.extend([time.monotonic()] * (now - seen))
        seen = now
        time.sleep(0.005)


def scenario(tests: int, workers: int, faults: float, base: Path) -> dict[str, object]:
    workdir = base / f"faults-{faults:g}"
    (workdir / "local").mkdir(parents=True)
    (workdir / "test_many.py").write_text(TESTS.format(count=tests))
    with E2BEmulator(root_dir=workdir / "emulator", profile="hobby") as emulator:
        if faults:
            emulator.flaky_creates(faults, (429, 503), seed=16)
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "E2B_", "KODE_"))
        }
        env.update(emulator.env)
        env.update(
            KODE_LOCAL_ROOT=str(workdir / "local"),
            KODE_RUNS_ROOT=str(workdir / "runs"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        argv += ["--sandbox-backend=e2b", "--sandbox-plan=hobby", "-n", str(workers)]
        stamps: list[float] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(emulator, stop, stamps), daemon=True)
        watcher.start()
        started = time.monotonic()
        done = subprocess.run(
            [*argv, "test_many.py"], cwd=workdir, env=env, capture_output=True, text=True
        )
        wall = time.monotonic() - started
        stop.set()
        watcher.join()
        live = emulator.sandbox_ids()
        limited = emulator.limited_count
        calls = emulator.calls["create"]
    summary = next((ln for ln in done.stdout.splitlines() if ln.startswith("sandboxes:")), "")
    leaked = re.search(r"(\d+) leaked", summary)
    outcome = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "outcome": outcome,
        "ok": done.returncode == 0,
        "created": len(stamps),
        "create_calls": calls,
        "limited": limited,
        "live_after": len(live),
        "leaked": int(leaked.group(1)) if leaked else -1,
        "rate": rate,
        "wall": wall,
        "summary": summary,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=60)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--faults", type=float, default=0.3)
    args = parser.parse_args()
    plan_rate = 1.0
    base = Path(tempfile.mkdtemp(prefix="kode-cloud-limits-"))
    failures = 0
    try:
        for faults in (0.0, args.faults):
            result = scenario(args.tests, args.workers, faults, base)
            ratio = float(result["rate"]) / plan_rate  # type: ignore[arg-type]
            print(f"--- hobby profile, -n {args.workers}, {args.tests} tests, {faults:.0%} faults")
            print(f"  outcome:          {result['outcome']}")
            print(f"  {result['summary']}")
            print(
                f"  creates:          {result['created']} made, {result['create_calls']} "
                f"requests, {result['limited']} turned away by the profile"
            )
            print(f"  leaks:            {result['live_after']} live after the run")
            print(f"  achieved rate:    {result['rate']:.3f}/s = {ratio:.2f} of the plan's")
            print(f"  wall time:        {result['wall']:.1f}s", flush=True)
            ok = result["ok"] and result["live_after"] == 0 and result["leaked"] == 0
            if not faults and ratio < 0.9:
                ok = False
            failures += not ok
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
