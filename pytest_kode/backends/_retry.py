"""Bounded retries with jittered exponential backoff, for calls to a remote service.

Kept free of any SDK import: the caller decides which failures are worth another attempt and
what to raise once the attempts are used up.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "RetryExhausted",
    "RetryPolicy",
    "acall_with_retries",
    "call_with_retries",
    "call_within",
    "wait_after",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; before try ``n`` (n >= 1) sleep up to ``base * 2**(n-1)``."""

    attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, retry_number: int) -> float:
        """Full jitter: a uniform pick below the exponential cap, so that many workers hit by
        the same 429 do not come back in lock-step."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (retry_number - 1)))
        return random.uniform(cap / 2, cap) if cap > 0 else 0.0


class RetryExhausted(Exception):
    """Every attempt failed with a retryable error; ``last`` is the final one."""

    def __init__(self, attempts: int, last: BaseException) -> None:
        super().__init__(f"gave up after {attempts} attempts: {last!r}")
        self.attempts = attempts
        self.last = last


def call_with_retries(
    fn: Callable[[], _T],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    sleep: Callable[[float], None] = time.sleep,
) -> _T:
    """Call ``fn`` until it succeeds, a non-retryable error escapes, or attempts run out.

    A non-retryable exception propagates unchanged; running out raises :class:`RetryExhausted`
    chained to the last failure, so the caller maps it to its own error type.
    """
    attempts = max(1, policy.attempts)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not retryable(exc):
                raise
            if attempt == attempts:
                raise RetryExhausted(attempts, exc) from exc
            sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


MAX_RETRY_AFTER_S = 10.0
"""The longest a server's ``Retry-After`` is honoured; beyond it (a typo, an hour) we come back
sooner and let the overall window decide when to give up."""


def wait_after(
    retry_number: int,
    retry_after_s: float | None,
    *,
    floor_s: float = 0.0,
    base_s: float = 0.5,
    cap_s: float = 8.0,
) -> float:
    """How long to wait before retry ``retry_number`` (>= 1): the server's ``Retry-After``
    (clipped to [0, MAX_RETRY_AFTER_S]: a date in the past means now) or ``floor_s``, whichever
    is longer, plus full jitter below an exponential cap, so workers told the same
    ``Retry-After`` do not all come back in the same instant."""
    told = 0.0 if retry_after_s is None else min(max(retry_after_s, 0.0), MAX_RETRY_AFTER_S)
    spread = min(cap_s, base_s * (2 ** (retry_number - 1)))
    return max(told, floor_s) + random.uniform(0.0, spread)


def call_within(
    fn: Callable[[], _T],
    *,
    window_s: float,
    delay_for: Callable[[BaseException, int], float | None],
    before_attempt: Callable[[], object] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> _T:
    """Call ``fn`` until it succeeds or ``window_s`` is spent.

    ``delay_for(exc, retry_number)`` says how long to wait before the next try, or None when
    ``exc`` is not worth another (it propagates unchanged). A wait that would end past the
    window raises :class:`RetryExhausted` instead. ``before_attempt`` runs before every try
    (pacing).
    """
    deadline = clock() + window_s
    attempt = 0
    while True:
        attempt += 1
        if before_attempt is not None:
            before_attempt()
        try:
            return fn()
        except Exception as exc:
            delay = delay_for(exc, attempt)
            if delay is None:
                raise
            if clock() + delay > deadline:
                raise RetryExhausted(attempt, exc) from exc
            sleep(delay)


async def acall_with_retries(
    fn: Callable[[], Awaitable[_T]],
    *,
    policy: RetryPolicy,
    retryable: Callable[[BaseException], bool],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> _T:
    """The async twin of :func:`call_with_retries`: same policy, backoff on the event loop."""
    attempts = max(1, policy.attempts)
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except Exception as exc:
            if not retryable(exc):
                raise
            if attempt == attempts:
                raise RetryExhausted(attempts, exc) from exc
            await sleep(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
