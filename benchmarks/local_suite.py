"""P2: a whole suite on local sandboxes against the same suite written by hand.

200 function-scope tests, each: write a file, run 3 commands, read a file back. Once with the
plugin's ``sandbox`` fixture (default settings, so the local backend with bubblewrap when it
works), once with ``tmp_path`` + ``subprocess.run`` and ``-p no:kode``. Each suite is a real
``python -m pytest`` subprocess on generated files; the two alternate round by round and the
medians of their wall times are compared.                                  target <= 1.5x

Run: ``python benchmarks/local_suite.py [--rounds N] [--tests N]``. Exits 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5

KODE = """
import pytest

@pytest.mark.parametrize("index", range({tests}))
def test_suite(sandbox, index):
    sandbox.fs.write("in.txt", f"data {{index}}")
    assert sandbox.exec("cat in.txt").stdout == f"data {{index}}"
    assert sandbox.exec("cp in.txt out.txt").ok
    assert sandbox.exec("test -s out.txt").ok
    assert sandbox.fs.read("out.txt") == f"data {{index}}"
"""

HAND = """
import subprocess

import pytest

def _run(command, cwd):
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True)

@pytest.mark.parametrize("index", range({tests}))
def test_suite(tmp_path, index):
    (tmp_path / "in.txt").write_text(f"data {{index}}")
    assert _run("cat in.txt", tmp_path).stdout == f"data {{index}}"
    assert _run("cp in.txt out.txt", tmp_path).returncode == 0
    assert _run("test -s out.txt", tmp_path).returncode == 0
    assert (tmp_path / "out.txt").read_text() == f"data {{index}}"
"""


def _suite(directory: Path, name: str, body: str, tests: int) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body.format(tests=tests)))
    return path


def _timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tests", type=int, default=200)
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key != "E2B_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="kode-suite-") as tmp:
        directory = Path(tmp)
        (directory / "pytest.ini").write_text("[pytest]\n")
        env["KODE_LOCAL_ROOT"] = str(directory / "sandboxes")
        kode = _suite(directory, "test_kode.py", KODE, args.tests)
        hand = _suite(directory, "test_hand.py", HAND, args.tests)
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        runs = {
            "kode": [*base, str(kode)],
            "hand": [*base, "-p", "no:kode", str(hand)],
        }
        times: dict[str, list[float]] = {"kode": [], "hand": []}
        for argv in runs.values():  # warm the page cache and the template cache
            _timed(argv, directory, env)
        for index in range(args.rounds):
            order = ("kode", "hand") if index % 2 == 0 else ("hand", "kode")
            for name in order:
                times[name].append(_timed(runs[name], directory, env))
    ours, theirs = statistics.median(times["kode"]), statistics.median(times["hand"])
    ratio = ours / theirs
    ok = ratio <= TARGET
    print(
        f"rounds: {args.rounds} (interleaved), tests per suite: {args.tests}, cpus: {os.cpu_count()}"
    )
    print(
        f"P2: sandbox fixture suite {ours:.2f} s vs tmp_path + subprocess.run suite "
        f"{theirs:.2f} s -> {ratio:.3f}x (target <= {TARGET}x) {'OK' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
