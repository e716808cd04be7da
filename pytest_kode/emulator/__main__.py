"""``python -m pytest_kode.emulator [--port N] [--https-hosts] [--rpc-latency-ms MS]
[--create-latency-ms MS]``: serve the emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from types import FrameType

from pytest_kode.emulator._profile import resolve_profile
from pytest_kode.emulator._server import CREATE_LATENCY_ENV, RPC_LATENCY_ENV, E2BEmulator
from pytest_kode.plans import CloudPlan


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
        "--https-hosts",
        action="store_true",
        help="also serve https://<port>-<sandbox id>.localhost (get_host): exports HTTPS_PROXY, "
        "NO_PROXY and SSL_CERT_FILE for a client process",
    )
    add_profile_arguments(parser)
    add_latency_arguments(parser)
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
        profile = profile_from_args(args)
        emulator = E2BEmulator(
            port=args.port,
            api_key=args.api_key,
            profile=profile,
            clock_offset_s=args.clock_offset,
            rpc_latency_ms=args.rpc_latency_ms,
            create_latency_ms=args.create_latency_ms,
            https_hosts=args.https_hosts,
        )
    except ValueError as exc:  # a bad profile, or a bad latency in the environment
        parser.error(str(exc))

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        emulator.start()
        for name, value in emulator.env.items():
            print(f"export {name}={shlex.quote(value)}")
        plan = emulator.profile
        latency = (
            f"; round trip {emulator.rpc_latency_ms} ms, create at least "
            f"{emulator.create_latency_ms} ms"
            if emulator.rpc_latency_ms or emulator.create_latency_ms
            else ""
        )
        print(
            f"# E2B emulator serving on {emulator.url} ({plan.name} profile: "
            f"{_limit(plan.create_rate, '/s')} creates, {_limit(plan.max_concurrent, '')} "
            f"running, {_limit(plan.max_lifetime_s, 's')} lifetime{latency}); Ctrl-C to stop",
            file=sys.stderr,
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The cloud-profile flags (shared with ``pytest-kode emulator``)."""
    parser.add_argument(
        "--profile",
        default="hobby",
        help="E2B plan whose limits to enforce: hobby (default), pro or unlimited",
    )
    parser.add_argument("--create-rate", type=float, help="creates per second (overrides)")
    parser.add_argument("--create-burst", type=int, help="creates allowed back to back")
    parser.add_argument("--max-concurrent", type=int, help="running sandboxes at once")
    parser.add_argument("--max-lifetime", type=int, help="longest sandbox lifetime, seconds")
    parser.add_argument(
        "--clock-offset",
        type=float,
        default=0.0,
        help="seconds added to this machine's clock in every time the emulator reports",
    )


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    """The latency flags (shared with ``pytest-kode emulator``)."""
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


def profile_from_args(args: argparse.Namespace) -> CloudPlan:
    """The profile the flags ask for; ValueError names a bad one."""
    plan = resolve_profile(args.profile)
    changes = {
        name: value
        for name, value in (
            ("create_rate", args.create_rate),
            ("create_burst", args.create_burst),
            ("max_concurrent", args.max_concurrent),
            ("max_lifetime_s", args.max_lifetime),
        )
        if value is not None
    }
    return plan.replace(name=f"{plan.name}+custom", **changes) if changes else plan


def _limit(value: float | None, unit: str) -> str:
    return "unlimited" if value is None else f"{value:g}{unit}"


if __name__ == "__main__":
    sys.exit(main())
