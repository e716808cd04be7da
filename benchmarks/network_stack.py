"""What a local sandbox's own network costs, and which user-mode stack to use.

1. Set-up of a sandbox network, interleaved: a sandbox until its first command returns with the
   internet off (bwrap's own namespace, loopback only) and on (+ slirp4netns attached to it, the
   stack in use), and pasta alone attached to a live sandbox's namespace (the alternative,
   measured to justify the pick; skipped when pasta is missing or fails here).
2. ``LocalSandbox(...).init()`` (and ``dispose()`` separately) with the internet on, off and
   without isolation (no network of its own), interleaved.
3. The first ``get_host_url`` round trip: ``get_host_url(8000)`` plus one HTTP GET through the
   new forward to a server already listening inside, against a later GET on the same forward.

Medians of interleaved rounds. Run: ``python benchmarks/network_stack.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kode.backends.local import LocalSandbox, detect_isolation  # noqa: E402


def _interleaved(cases: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, float]:
    """Each case returns its own measured seconds (or None when it cannot run here)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            took = cases[name]()
            if took is not None:
                times[name].append(took)
    return {name: statistics.median(values) * 1000 for name, values in times.items() if values}


def _ready(root: str, internet: bool) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        sandbox = LocalSandbox(root_dir=root, allow_internet_access=internet).init()
        sandbox.exec("true")
        took = time.perf_counter() - started
        sandbox.dispose()
        return took

    return run


def _pasta(root: str) -> Callable[[], float | None]:
    def run() -> float | None:
        pasta = shutil.which("pasta")
        if pasta is None:
            return None
        with LocalSandbox(root_dir=root, allow_internet_access=False) as sandbox:
            sandbox.exec("true")
            bwrap_pid = sandbox._meta["agent"]["pid"]
            with open(f"/proc/{bwrap_pid}/task/{bwrap_pid}/children") as handle:
                agent = int(handle.read().split()[0])
            net = os.open(f"/proc/{agent}/ns/net", os.O_RDONLY)
            user = fcntl.ioctl(net, 0xB701)  # NS_GET_USERNS: the namespace's owner
            pid_file = Path(tempfile.mkdtemp()) / "pasta.pid"
            # As root pasta drops to nobody, who cannot open our user namespace: stay root.
            runas = ["--runas", "0"] if os.getuid() == 0 else []
            started = time.perf_counter()
            done = subprocess.run(
                [
                    *(pasta, "--config-net", "--no-map-gw", "--quiet", *runas),
                    *("--netns", f"/proc/self/fd/{net}", "--userns", f"/proc/self/fd/{user}"),
                    *("--pid", str(pid_file)),
                ],
                capture_output=True,
                pass_fds=(net, user),
                check=False,
            )
            took = time.perf_counter() - started
            os.close(net)
            os.close(user)
            try:
                if done.returncode != 0:
                    return None
                os.kill(int(pid_file.read_text().strip()), 9)
            finally:
                shutil.rmtree(pid_file.parent, ignore_errors=True)
            return took

    return run


def _init(root: str, **fields: object) -> Callable[[], float]:
    def run() -> float:
        sandbox = LocalSandbox(root_dir=root, **fields)  # type: ignore[arg-type]
        started = time.perf_counter()
        sandbox.init()
        took = time.perf_counter() - started
        sandbox.dispose()
        return took

    return run


def _dispose(root: str, **fields: object) -> Callable[[], float]:
    def run() -> float:
        sandbox = LocalSandbox(root_dir=root, **fields).init()  # type: ignore[arg-type]
        started = time.perf_counter()
        sandbox.dispose()
        return time.perf_counter() - started

    return run


def _fetch(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()


def _first_host_url(root: str, rounds: int) -> tuple[float, float]:
    first: list[float] = []
    later: list[float] = []
    for _ in range(rounds):
        with LocalSandbox(root_dir=root) as sandbox:
            sandbox.fs.write("www/index.html", "hi")
            server = sandbox.start("exec python3 -u -m http.server 8000 --directory www")
            # Wait until it listens, through a probe that does not set up the forward under test.
            deadline = time.monotonic() + 30
            while "Serving HTTP" not in server.stdout:
                assert server.is_running() and time.monotonic() < deadline, server.stderr
                time.sleep(0.01)
            started = time.perf_counter()
            url = sandbox.get_host_url(8000)
            _fetch(url)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            _fetch(url)
            later.append(time.perf_counter() - started)
    return statistics.median(first) * 1000, statistics.median(later) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    if detect_isolation() != "bwrap":
        print("bubblewrap does not work here; sandboxes have no network of their own")
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    root = tempfile.mkdtemp(prefix="kode-net-bench-")
    try:
        stacks = _interleaved(
            {
                "to first exec, internet off": _ready(root, False),
                "to first exec, internet on (slirp4netns)": _ready(root, True),
                "pasta alone (on a live sandbox)": _pasta(root),
            },
            args.rounds,
        )
        print("network set-up, median ms:")
        for name, value in stacks.items():
            print(f"  {name:<42} {value:7.2f}")
        inits = _interleaved(
            {
                "init() bwrap, internet on": _init(root),
                "init() bwrap, internet off": _init(root, allow_internet_access=False),
                "init() no isolation": _init(root, isolation="none"),
                "dispose() bwrap, internet on": _dispose(root),
                "dispose() bwrap, internet off": _dispose(root, allow_internet_access=False),
            },
            args.rounds,
        )
        print("sandbox life, median ms:")
        for name, value in inits.items():
            print(f"  {name:<42} {value:7.2f}")
        on, off = inits["init() bwrap, internet on"], inits["init() bwrap, internet off"]
        print(f"  ratio init() internet on / off: {on / off:.2f}x")
        first, later = _first_host_url(root, max(5, args.rounds // 4))
        print("get_host_url(8000) + first GET, median ms:")
        print(f"  first (sets the forward up)          {first:7.2f}")
        print(f"  a later GET on the same forward      {later:7.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
