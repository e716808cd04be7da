"""Surviving the cloud's limits: which E2B failures to retry, how long to wait, and the orphans a
failed create may leave.

- 429 (rate or concurrency limit) waits at least the answer's ``Retry-After`` (>= 1 s: the cloud
  never says less), 503 backs off from a fraction of a second; both with jitter, inside a window
  of about a minute for creates. Transport failures get a few quick tries only.
- 409 during a create is the cloud saying a request with the same ``Idempotency-Key`` is still
  running (``idempotency_in_progress``): wait and ask again, the answer will be that sandbox.
- Every create carries its idempotency key in the metadata tag :data:`CREATE_KEY_TAG`; when a
  create finally fails, sandboxes carrying that tag were made by one of its attempts whose
  answer was lost, and are killed (:func:`kill_orphans`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from pytest_kode.backends._e2b_errors import Kind, classify, retry_after_s, status_of
from pytest_kode.backends._retry import wait_after

__all__ = ["CREATE_KEY_TAG", "cloud_delay", "kill_orphans", "may_have_created"]

CREATE_KEY_TAG = "kode_create"
TRANSPORT_ATTEMPTS = 4
_log = logging.getLogger(__name__)


def cloud_delay(
    exc: BaseException,
    retry_number: int,
    *,
    creating: bool = False,
    transport_attempts: int = TRANSPORT_ATTEMPTS,
) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None when it is not worth a retry."""
    kind = classify(exc)
    told = retry_after_s(exc)
    if kind is Kind.RATE_LIMITED:
        return wait_after(retry_number, told, floor_s=1.0)
    if creating and kind is Kind.SDK and status_of(exc) == 409:
        return wait_after(retry_number, told, floor_s=1.0)
    if kind is Kind.BUSY:
        return wait_after(retry_number, told, floor_s=0.2)
    if kind is Kind.TRANSPORT:
        # A refused or reset connection is rarely cured by waiting long: a few quick tries,
        # then "no time left" (so the caller reports the attempts made).
        if retry_number >= transport_attempts:
            return math.inf
        return wait_after(retry_number, None, floor_s=0.1, base_s=0.2)
    return None


def may_have_created(exc: BaseException) -> bool:
    """Whether a create that failed with ``exc`` may still have made a sandbox: its request
    may have reached the API (not a refused connection, not an answer turning it away)."""
    import httpx

    kind = classify(exc)
    if kind in (Kind.RATE_LIMITED, Kind.AUTH, Kind.INVALID, Kind.SANDBOX_GONE):
        return False
    if isinstance(exc, httpx.ConnectError) or isinstance(exc.__cause__, httpx.ConnectError):
        return False
    status = status_of(exc)
    return status is None or status in (409, 500, 502, 503, 504)


def kill_orphans(key: str, params: dict[str, Any], *, keep: str | None = None) -> list[str]:
    """Kill every sandbox tagged with create key ``key`` (except ``keep``); their ids."""
    from e2b import Sandbox, SandboxQuery

    paginator = Sandbox.list(query=SandboxQuery(metadata={CREATE_KEY_TAG: key}), **params)
    killed: list[str] = []
    while paginator.has_next:
        for info in paginator.next_items():
            if info.sandbox_id == keep:
                continue
            kill = _bind_kill(info.sandbox_id, params)
            if kill():
                killed.append(info.sandbox_id)
    return killed


def _bind_kill(sandbox_id: str, params: dict[str, Any]) -> Callable[[], bool]:
    from e2b import Sandbox

    def kill() -> bool:
        # Static by id: a paused orphan is not resumed just to be killed.
        return bool(Sandbox.kill(sandbox_id, **params))

    return kill
