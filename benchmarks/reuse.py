"""P5, P6 and the wall-time gain of --sandbox-reuse.

- P5: sandboxes created by the second of two ``--sandbox-reuse`` runs (target 0).
- P6: sandboxes created for ``session_sandbox`` under ``-n 4`` (target 1).
- The wall time of the second reuse run over the first, for a suite whose session set-up takes
  2 s (skipped when the sandbox was resumed, as ``sandbox.resumed`` allows).

    python benchmarks/reuse.py [--backend local|emulator]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFTEST = """
import time

def pytest_kode_sandbox_created(sandbox, item):
    # Set-up belongs in this hook: under xdist it runs once, before other workers connect.
    if not sandbox.resumed:
        time.sleep(2)  # stands for installing dependencies, seeding data...
        sandbox.fs.write("ready", "yes")
"""

SUITE = """
import pytest

@pytest.mark.parametrize("n", range(16))
def test_uses_it(session_sandbox, n):
    assert session_sandbox.exec("cat ready").stdout == "yes"
"""


def _run(folder: Path, *args: str) -> tuple[float, dict[str, int]]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("sandboxes: "))
    counts = {name: int(n) for n, name in re.findall(r"(\d+) ([a-z]+)", line.split(";")[0])}
    return elapsed, counts


def _dispose_cached(folder: Path) -> None:
    from pytest_kode import LocalSandbox

    cache = folder / ".pytest_cache" / "d" / "kode" / "reuse.json"
    if cache.exists():
        for entry in json.loads(cache.read_text()).values():
            try:
                LocalSandbox(sandbox_id=entry["sandbox_id"]).init().dispose()
            except Exception:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", choices=["local"])
    args = parser.parse_args()
    backend = f"--sandbox-backend={args.backend}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["KODE_LOCAL_ROOT"] = str(folder / "sandboxes")
        (folder / "test_suite.py").write_text(SUITE)
        (folder / "conftest.py").write_text(CONFTEST)
        (folder / "pytest.ini").write_text("[pytest]\n")
        try:
            first_s, first = _run(folder, backend, "--sandbox-reuse")
            second_s, second = _run(folder, backend, "--sandbox-reuse")
        finally:
            _dispose_cached(folder)
        _, distributed = _run(folder, backend, "-n", "4")
    print(f"first reuse run : {first_s:.2f} s, {first}")
    print(f"second reuse run: {second_s:.2f} s, {second}")
    print(f"P5 = {second['created']} sandboxes created on the second reuse run (target 0)")
    print(
        f"P6 = {distributed['created']} sandboxes created for session_sandbox under -n 4 (target 1)"
    )
    print(f"second / first wall time = {second_s / first_s:.2f}x")


if __name__ == "__main__":
    main()
