"""``python -m pytest_kode.emulator [--port N] [--rpc-latency-ms MS] [--create-latency-ms MS]``:
serve the emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from types import FrameType

from pytest_kode.emulator._server import CREATE_LATENCY_ENV, RPC_LATENCY_ENV, E2BEmulator


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground, print ``export`` lines for the SDK, serve until stopped."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_kode.emulator",
        description="Serve a loopback E2B emulator (control plane + sandbox daemons) for the "
        "e2b SDK. Prints `export` lines; `eval` them in a shell to point the SDK at it.",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--api-key", default=None, help="API key to require (default: generated)")
    parser.add_argument(
        "--rpc-latency-ms",
        type=int,
        default=None,
        metavar="MS",
        help=f"delay before answering every request, a network round trip [env: "
        f"{RPC_LATENCY_ENV}, default: 0]",
    )
    parser.add_argument(
        "--latency-ms", dest="rpc_latency_ms", type=int, help="the same as --rpc-latency-ms"
    )
    parser.add_argument(
        "--create-latency-ms",
        type=int,
        default=None,
        metavar="MS",
        help=f"the least a sandbox create takes, as a VM boot would, before its round trip "
        f"[env: {CREATE_LATENCY_ENV}, default: 0]",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    for flag, value in (
        ("--rpc-latency-ms", args.rpc_latency_ms),
        ("--create-latency-ms", args.create_latency_ms),
    ):
        if value is not None and value < 0:
            parser.error(f"{flag} must be a whole number of milliseconds >= 0, got {value}")
    try:
        emulator = E2BEmulator(
            port=args.port,
            api_key=args.api_key,
            rpc_latency_ms=args.rpc_latency_ms,
            create_latency_ms=args.create_latency_ms,
        )
    except ValueError as exc:  # a bad latency in the environment
        parser.error(str(exc))

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        emulator.start()
        for name, value in emulator.env.items():
            print(f"export {name}={shlex.quote(value)}")
        latency = (
            f" (round trip {emulator.rpc_latency_ms} ms, create at least "
            f"{emulator.create_latency_ms} ms)"
            if emulator.rpc_latency_ms or emulator.create_latency_ms
            else ""
        )
        print(f"# E2B emulator serving on {emulator.url}{latency}; Ctrl-C to stop", file=sys.stderr)
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
