"""P1: what loading pytest-kode costs a suite that uses no sandbox.

Runs a generated suite of 1000 plain tests with the plugin loaded and with ``-p no:kode``,
alternating the two so machine noise hits both alike, and prints the ratio of the medians.
Target: <= 1.05.

    python benchmarks/plugin_overhead.py [--rounds 7] [--tests 1000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _suite(folder: Path, tests: int) -> None:
    per_file = 100
    for index in range(tests // per_file):
        body = "\n".join(f"def test_{n}():\n    assert {n} == {n}\n" for n in range(per_file))
        (folder / f"test_plain_{index}.py").write_text(body)
    (folder / "pytest.ini").write_text("[pytest]\n")


def _run(folder: Path, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
        cwd=folder,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tests", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _suite(folder, args.tests)
        _run(folder)  # warm the bytecode caches of both variants
        _run(folder, "-p", "no:kode")
        with_plugin, without = [], []
        for _ in range(args.rounds):
            with_plugin.append(_run(folder))
            without.append(_run(folder, "-p", "no:kode"))
    loaded, bare = statistics.median(with_plugin), statistics.median(without)
    print(f"{args.tests} tests, {args.rounds} interleaved rounds (medians)")
    print(f"  plugin loaded : {loaded:.3f} s")
    print(f"  -p no:kode    : {bare:.3f} s")
    print(f"P1 = {loaded / bare:.3f}x  (target <= 1.05x)")


if __name__ == "__main__":
    main()
