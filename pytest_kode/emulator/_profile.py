"""The emulator's cloud profile: the limits a plan enforces, and idempotent creates.

- a create-rate token bucket and a concurrency limit, both answered with 429 and a
  ``Retry-After`` of whole seconds, at least 1 (e2b-dev/infra ``middleware/ratelimit``:
  ``max(ceil(wait), 1)``);
- the plan's maximum lifetime, counted from the sandbox's start;
- ``Idempotency-Key`` on create: a retry while the first request runs gets 409
  (``idempotency_in_progress``), a retry after it finished gets the same sandbox, a key reused
  with another body gets 422 (``idempotency_request_mismatch``) -- the codes the SDK's error model
  lists (``e2b/api/client/models/error.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
import time
from typing import Any

from pytest_kode.plans import CloudPlan, plan_named

__all__ = ["CreateLimits", "IdempotencyTable", "resolve_profile"]


def resolve_profile(profile: str | CloudPlan | None) -> CloudPlan:
    """``hobby``/``pro``/``unlimited`` or a :class:`CloudPlan` of explicit numbers."""
    if profile is None:
        return plan_named("hobby")
    if isinstance(profile, CloudPlan):
        return profile
    return plan_named(profile, allow_unlimited=True)


class CreateLimits:
    """The create-rate bucket of one plan (thread-safe)."""

    def __init__(self, plan: CloudPlan) -> None:
        self._lock = threading.Lock()
        self.plan = plan
        self._tokens = float(plan.create_burst)
        self._stamp = time.monotonic()
        self.limited = 0  # creates answered 429 by the rate or concurrency limit

    def set_plan(self, plan: CloudPlan) -> None:
        with self._lock:
            self.plan = plan
            self._tokens = float(plan.create_burst)
            self._stamp = time.monotonic()

    def take(self) -> int | None:
        """Spend one create token: None when allowed, else the Retry-After seconds (>= 1)."""
        with self._lock:
            rate = self.plan.create_rate
            if rate is None:
                return None
            now = time.monotonic()
            burst = float(self.plan.create_burst)
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - self._tokens) / rate))


@dataclasses.dataclass
class _Entry:
    body_hash: str
    answer: dict[str, Any] | None = None  # None while the first request is in flight


class IdempotencyTable:
    """Create requests by ``Idempotency-Key`` (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    @staticmethod
    def body_hash(body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()

    def begin(self, key: str, body_hash: str) -> tuple[str, dict[str, Any] | None]:
        """``("new", None)``: go ahead; ``("in_progress", None)``; ``("mismatch", None)``;
        ``("done", answer)``: answer what the first request answered."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(body_hash)
                return "new", None
            if entry.body_hash != body_hash:
                return "mismatch", None
            if entry.answer is None:
                return "in_progress", None
            return "done", entry.answer

    def finish(self, key: str, answer: dict[str, Any]) -> None:
        with self._lock:
            self._entries[key].answer = answer

    def abandon(self, key: str) -> None:
        """The first request failed: nothing was made, so a retry may try again."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.answer is None:
                del self._entries[key]
