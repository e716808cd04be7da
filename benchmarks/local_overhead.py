"""What a command in a local sandbox costs, and what a sandbox's life costs.

P3: ``exec("true")`` in a live bubblewrap sandbox, against the host's own
    ``subprocess.run(["bash", "-c", "true"])`` (output captured).            target <= 1.2x
Also reported (no target): the same for ``isolation="none"``; ``init()`` alone (the agent starts
in the background), ``init()`` + the first ``exec("true")`` (waits for the agent),
``recycle()`` (a done sandbox made as new for the next test) and ``dispose()``, beside a bare
``bwrap ... true`` spawn (the same namespace set and mounts).

A and B alternate round by round (so drift and noise hit both alike); medians are reported.
Run: ``python benchmarks/local_overhead.py [--rounds N]``. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kode.backends.local import (  # noqa: E402
    LocalSandbox,
    _bwrap,
    detect_isolation,
)

TARGETS = {"P3": 1.2}


def _host_run() -> None:
    # What a hand-written caller would do: run it, capture both streams, check nothing else.
    subprocess.run(["bash", "-c", "true"], stdin=subprocess.DEVNULL, capture_output=True)


def _interleaved(a: Callable[[], None], b: Callable[[], None], rounds: int) -> tuple[float, float]:
    times_a: list[float] = []
    times_b: list[float] = []
    for index in range(rounds):
        # Alternate which goes first, so neither always pays for the other's leftovers.
        order = ((a, times_a), (b, times_b)) if index % 2 == 0 else ((b, times_b), (a, times_a))
        for func, sink in order:
            started = time.perf_counter()
            func()
            sink.append(time.perf_counter() - started)
    return statistics.median(times_a), statistics.median(times_b)


def _lifetimes(root: Path, rounds: int) -> dict[str, float]:
    """Medians of init(), init()+first exec, dispose() and a bare bwrap spawn, interleaved."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    bare = _bwrap.bwrap_argv(str(root), "/home/user") + ["true"]
    samples: dict[str, list[float]] = {
        "init": [],
        "init+exec": [],
        "recycle": [],
        "dispose": [],
        "bwrap": [],
    }
    for _ in range(rounds):
        started = time.perf_counter()
        sandbox = LocalSandbox(isolation="bwrap", root_dir=root).init()
        samples["init"].append(time.perf_counter() - started)
        sandbox.exec("true")
        samples["init+exec"].append(time.perf_counter() - started)
        started = time.perf_counter()
        fresh = sandbox.recycle(sandbox.options)  # what the plugin does between tests
        samples["recycle"].append(time.perf_counter() - started)
        sandbox = fresh or sandbox
        started = time.perf_counter()
        sandbox.dispose()
        samples["dispose"].append(time.perf_counter() - started)
        started = time.perf_counter()
        subprocess.run(bare, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False)
        samples["bwrap"].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    if detect_isolation() != "bwrap":
        print("bubblewrap does not work here; this benchmark measures against it", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="kode-bench-"))
    failed = False
    try:
        live = LocalSandbox(isolation="bwrap", root_dir=root).init()
        plain = LocalSandbox(isolation="none", root_dir=root).init()
        for warm in (lambda: live.exec("true"), lambda: plain.exec("true"), _host_run):
            for _ in range(20):
                warm()
        p3 = _interleaved(lambda: live.exec("true"), _host_run, args.rounds)
        none = _interleaved(lambda: plain.exec("true"), _host_run, args.rounds)
        live.dispose()
        plain.dispose()
        life = _lifetimes(root, max(20, args.rounds // 10))
        print(f"rounds: {args.rounds} (interleaved), cpus: {os.cpu_count()}")
        ratio = p3[0] / p3[1]
        ok = ratio <= TARGETS["P3"]
        failed |= not ok
        print(
            f"P3: exec('true') in a bwrap sandbox {p3[0] * 1000:.2f} ms vs host bash -c true "
            f"{p3[1] * 1000:.2f} ms -> {ratio:.3f}x (target <= {TARGETS['P3']}x) "
            f"{'OK' if ok else 'MISSED'}"
        )
        print(
            f"    isolation='none': {none[0] * 1000:.2f} ms vs {none[1] * 1000:.2f} ms -> "
            f"{none[0] / none[1]:.3f}x"
        )
        print(
            f"life (medians of {max(20, args.rounds // 10)}): init() {life['init'] * 1000:.2f} ms, "
            f"init()+first exec {life['init+exec'] * 1000:.2f} ms, recycle() "
            f"{life['recycle'] * 1000:.2f} ms, dispose() "
            f"{life['dispose'] * 1000:.2f} ms; bare `bwrap ... true` {life['bwrap'] * 1000:.2f} ms"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
