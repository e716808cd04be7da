"""What the async API buys: concurrency that shows, at no cost per command.

A1: 20 concurrent ``await exec("sleep 0.2")`` in one local sandbox, against one such exec.
                                                                            target <= 1.5x
A2: 10 sandboxes created concurrently (``asyncio.gather`` of ``AsyncE2BSandbox(...).init()``) on
    the emulator with 150 ms latency per request, against one creation.    target <= 2.0x
A3: ``await exec("true")`` on a live local sandbox, against the blocking ``exec("true")``.
                                                                            target <= 1.2x

A and B alternate round by round (so drift and noise hit both alike); medians are reported.
Run: ``python benchmarks/async_concurrency.py [--rounds N]``. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kode.backends.e2b_async import AsyncE2BSandbox  # noqa: E402
from pytest_kode.backends.local._aio import AsyncLocalSandbox  # noqa: E402
from pytest_kode.emulator import E2BEmulator  # noqa: E402

TARGETS = {"A1": 1.5, "A2": 2.0, "A3": 1.2}


async def _interleaved(
    a: Callable[[], Awaitable[None]], b: Callable[[], Awaitable[None]], rounds: int
) -> tuple[float, float]:
    times_a: list[float] = []
    times_b: list[float] = []
    for index in range(rounds):
        # Alternate which goes first, so neither always pays for the other's leftovers.
        order = ((a, times_a), (b, times_b)) if index % 2 == 0 else ((b, times_b), (a, times_a))
        for func, sink in order:
            started = time.perf_counter()
            await func()
            sink.append(time.perf_counter() - started)
    return statistics.median(times_a), statistics.median(times_b)


async def _local(rounds: int) -> dict[str, tuple[float, float]]:
    async with AsyncLocalSandbox() as sandbox:

        async def twenty() -> None:
            await asyncio.gather(*(sandbox.exec("sleep 0.2") for _ in range(20)))

        async def one() -> None:
            await sandbox.exec("sleep 0.2")

        async def async_true() -> None:
            await sandbox.exec("true")

        async def sync_true() -> None:
            sandbox.sync.exec("true")

        floor = _LoopFloor(sandbox)

        # Both sides warm (the async connection, the blocking client's pooled one), then
        # measured on the same sandbox, round by round.
        await async_true()
        await sync_true()
        results = {
            "A1": await _interleaved(twenty, one, max(5, rounds // 20)),
            "A3": await _interleaved(async_true, sync_true, rounds),
            "A3-floor": await _interleaved(async_true, floor.round_trip, rounds),
        }
        floor.close()
        return results


class _LoopFloor:
    """The least an event loop can do for ``exec("true")``: one request to the agent on a
    non-blocking socket, awaited through ``add_reader``. Shows what is the loop's (its wake-up
    path, which a loaded machine schedules worse than a blocking ``recv``) and what is ours."""

    def __init__(self, sandbox: AsyncLocalSandbox) -> None:
        import socket

        from pytest_kode.backends.local._protocol import Decoder

        self._sync = sandbox._sync
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(sandbox._sync.agent_socket)
        self._sock.setblocking(False)
        self._decoder = Decoder()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._next = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        from pytest_kode.backends.local._protocol import FINAL_KINDS

        for stream, kind, _ in self._decoder.feed(self._sock.recv(1 << 20)):
            if kind in FINAL_KINDS:
                self._waiting.pop(stream).set_result(None)

    async def round_trip(self) -> None:
        from pytest_kode.backends.local._protocol import K_REQUEST, message

        body, _ = self._sync._run_body(["bash", "-c", "true"], cwd=None, envs={}, stdin="none")
        body.update(timeout_ms=120_000, started=False, own=True)
        self._next += 1
        done = self._waiting[self._next] = self._loop.create_future()
        self._sock.send(message(self._next, K_REQUEST, body))
        await done

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


async def _emulator(rounds: int) -> tuple[float, float]:
    # No plan limits: A2 measures how the client overlaps creations, and the default (hobby)
    # plan's 1 create/s would pace ten of them to ~9 s whatever the client did.
    with E2BEmulator(port=0, profile="unlimited") as emulator:
        emulator.latency_ms = 150
        fields = {
            "api_key": emulator.api_key,
            "api_url": emulator.env["E2B_API_URL"],
            "sandbox_url": emulator.env["E2B_SANDBOX_URL"],
        }

        async def create(count: int) -> float:
            boxes = [AsyncE2BSandbox(**fields) for _ in range(count)]
            started = time.perf_counter()
            await asyncio.gather(*(box.init() for box in boxes))
            elapsed = time.perf_counter() - started
            await asyncio.gather(*(box.dispose() for box in boxes))  # not measured
            return elapsed

        await create(1)  # warm: the SDK's imports and first connections
        times_ten: list[float] = []
        times_one: list[float] = []
        for index in range(max(3, rounds // 50)):
            order = [(10, times_ten), (1, times_one)]
            for count, sink in order if index % 2 == 0 else reversed(order):
                sink.append(await create(count))
        return statistics.median(times_ten), statistics.median(times_one)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    results = asyncio.run(_local(args.rounds))
    results["A2"] = asyncio.run(_emulator(args.rounds))
    labels = {
        "A1": "20 concurrent sleep 0.2 vs one",
        "A2": "10 concurrent creations vs one (150 ms latency)",
        "A3": "await exec('true') vs sync exec('true')",
    }
    missed = False
    for name in ("A1", "A2", "A3"):
        a, b = results[name]
        ratio = a / b
        ok = ratio <= TARGETS[name]
        missed |= not ok
        print(
            f"{name} {labels[name]}: {a * 1000:.1f} ms vs {b * 1000:.1f} ms = {ratio:.2f}x "
            f"(target <= {TARGETS[name]}x) {'ok' if ok else 'MISSED'}"
        )
    a, b = results["A3-floor"]
    print(
        f"   (A3 against the event loop's floor, a bare request on a non-blocking socket: "
        f"{a * 1000:.1f} ms vs {b * 1000:.1f} ms = {a / b:.2f}x)"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
