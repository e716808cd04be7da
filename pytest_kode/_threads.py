"""Background threads that leave SIGINT and SIGTERM to the main thread.

The kernel may deliver a process-directed signal to any thread that does not block it. Python
runs the handler only in the main thread, and only when that thread next executes bytecode, so a
signal that lands on a helper thread leaves a test asleep in ``time.sleep`` instead of raising
``KeyboardInterrupt``. Every thread pytest-kode starts therefore blocks both signals, and so do
the threads *those* start (uvicorn's, the SDK's), since a new thread inherits its creator's mask.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")

__all__ = ["call_interruptibly", "start_thread"]

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_thread(
    target: Callable[..., Any],
    *,
    name: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> threading.Thread:
    """Start a daemon thread whose signal mask blocks SIGINT and SIGTERM."""
    thread = threading.Thread(target=target, name=name, args=args, kwargs=kwargs, daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        thread.start()  # pthread_create: the new thread inherits the mask set just now
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


def call_interruptibly(call: Callable[[], _T], *, name: str) -> _T:
    """``call()`` in a helper thread while the calling thread waits, so Ctrl-C interrupts it.

    A blocking read inside native code (the e2b SDK's HTTP client streaming a command's output)
    runs no Python signal handler until it returns: a Ctrl-C during a 60 s command waited for the
    command. Waiting on a thread instead is interruptible at once; the helper thread ends when
    the stream does (the interrupted run disposes the sandbox, which closes it).
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = start_thread(run, name=name)
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]
