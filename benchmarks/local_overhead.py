"""What the local backend costs on top of bubblewrap itself.

P2: a fresh LocalSandbox + one ``exec("true")`` + ``dispose()``, against a raw ``mkdtemp`` + the
    same bwrap command line running ``bash -c true`` + ``rmtree``.       target <= 1.25x
P3: ``exec("true")`` in a live sandbox, against a raw bwrap spawn of ``bash -c true``.
                                                                           target <= 1.15x

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
    _bwrap,  # noqa: E402
    detect_isolation,
)

TARGETS = {"P2": 1.25, "P3": 1.15}


def _raw_run(argv: list[str], env: dict[str, str]) -> None:
    # What a hand-written caller would do: run it, capture both streams, check nothing else.
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    if detect_isolation() != "bwrap":
        print("bubblewrap does not work here; this benchmark measures against it", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="kode-bench-"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/user"}
    failed = False
    try:
        # P2: the whole life of a sandbox around one command.
        def sandbox_life() -> None:
            sandbox = LocalSandbox(isolation="bwrap", root_dir=root).init()
            sandbox.exec("true")
            sandbox.dispose()

        def raw_life() -> None:
            directory = tempfile.mkdtemp(dir=root)
            _raw_run(_bwrap.bwrap_argv(directory, "/home/user") + ["bash", "-c", "true"], env)
            shutil.rmtree(directory)

        # P3: one command in a live sandbox.
        live = LocalSandbox(isolation="bwrap", root_dir=root).init()
        # Exactly the command line the sandbox itself runs (its /tmp bind included).
        raw_argv = [*live._prefix, "bash", "-c", "true"]

        def sandbox_exec() -> None:
            live.exec("true")

        def raw_exec() -> None:
            _raw_run(raw_argv, env)

        for warm in (sandbox_life, raw_life, sandbox_exec, raw_exec):
            for _ in range(10):
                warm()
        results = {
            "P2": _interleaved(sandbox_life, raw_life, args.rounds),
            "P3": _interleaved(sandbox_exec, raw_exec, args.rounds),
        }
        live.dispose()
        labels = {
            "P2": ("LocalSandbox init+exec+dispose", "mkdtemp+bwrap+rmtree"),
            "P3": ("LocalSandbox.exec('true')", "raw bwrap bash -c true"),
        }
        print(f"rounds: {args.rounds} (interleaved), cpus: {os.cpu_count()}")
        for name, (ours, raw) in results.items():
            ratio = ours / raw
            ok = ratio <= TARGETS[name]
            failed |= not ok
            print(
                f"{name}: {labels[name][0]} {ours * 1000:.2f} ms vs {labels[name][1]} "
                f"{raw * 1000:.2f} ms -> {ratio:.3f}x (target <= {TARGETS[name]}x) "
                f"{'OK' if ok else 'MISSED'}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
