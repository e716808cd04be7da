"""``python -m pytest_kode.emulator [--port N]``: serve the emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from types import FrameType

from pytest_kode.emulator._server import E2BEmulator


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground, print ``export`` lines for the SDK, serve until stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_kode.emulator",
        description="Serve a loopback E2B emulator (control plane + sandbox daemons) for the "
        "e2b SDK. Prints `export` lines; `eval` them in a shell to point the SDK at it.",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--api-key", default=None, help="API key to require (default: generated)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    emulator = E2BEmulator(port=args.port, api_key=args.api_key)
    try:
        emulator.start()
        for name, value in emulator.env.items():
            print(f"export {name}={shlex.quote(value)}")
        print(f"# E2B emulator serving on {emulator.url}; Ctrl-C to stop", file=sys.stderr)
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
