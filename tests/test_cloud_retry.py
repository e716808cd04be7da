"""How long the E2B path waits before a retry: the server's ``Retry-After`` (read from the real
SDK's exceptions, answered by the emulator), clipped when absurd or in the past, plus jitter;
and the run-wide create pacer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pytest_kode.backends._e2b_errors import retry_after_s
from pytest_kode.backends._e2b_resilience import cloud_delay
from pytest_kode.backends._retry import MAX_RETRY_AFTER_S, RetryExhausted, call_within, wait_after
from pytest_kode.emulator import E2BEmulator
from pytest_kode.lifecycle.pacing import SAFETY, CreatePacer


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2BEmulator]:
    with E2BEmulator(root_dir=tmp_path_factory.mktemp("retry-emu"), profile="unlimited") as emu:
        yield emu


def _refused(emulator: E2BEmulator, status: int, retry_after: int) -> BaseException:
    from e2b import Sandbox

    emulator.fail_next_creates(1, status, retry_after_s=retry_after)
    with pytest.raises(Exception) as info:
        Sandbox.create(
            api_key=emulator.api_key, api_url=emulator.url, sandbox_url=emulator.url, retries=0
        )
    return info.value


@pytest.mark.parametrize("status", [429, 503])
def test_the_answers_retry_after_is_honoured(emulator: E2BEmulator, status: int) -> None:
    exc = _refused(emulator, status, 3)
    assert retry_after_s(exc) == 3.0
    delay = cloud_delay(exc, 1, creating=True)
    assert delay is not None and 3.0 <= delay <= 3.0 + 0.5


def test_an_absurd_retry_after_is_capped(emulator: E2BEmulator) -> None:
    exc = _refused(emulator, 429, 3600)
    delay = cloud_delay(exc, 1, creating=True)
    assert delay is not None and MAX_RETRY_AFTER_S <= delay <= MAX_RETRY_AFTER_S + 0.5


def test_a_retry_after_in_the_past_means_now_but_never_below_the_floor() -> None:
    def refuse() -> None:
        response = httpx.Response(429, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
        assert response.status_code == 429
        raise RuntimeError("429")

    with pytest.raises(RuntimeError) as info:
        refuse()
    told = retry_after_s(info.value)
    assert told is not None and told < 0
    assert 1.0 <= wait_after(1, told, floor_s=1.0) <= 1.5
    assert 0.0 <= wait_after(1, -5.0) <= 0.5


def test_the_window_bounds_the_retries() -> None:
    calls: list[float] = []
    now = [0.0]

    def fail() -> Any:
        calls.append(now[0])
        raise RuntimeError("busy")

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(RetryExhausted) as info:
        call_within(
            fail, window_s=5.0, delay_for=lambda e, n: 2.0, sleep=sleep, clock=lambda: now[0]
        )
    assert calls == [0.0, 2.0, 4.0] and info.value.attempts == 3
    with pytest.raises(ValueError):
        call_within(lambda: int("x"), window_s=5.0, delay_for=lambda e, n: None, sleep=sleep)


def test_the_pacer_allows_the_burst_then_one_create_per_interval(tmp_path: Path) -> None:
    now = [1000.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))

    # Two "processes" (two objects on one folder) share one bucket.
    first = CreatePacer(tmp_path, rate=1.0, burst=2, sleep=sleep, clock=lambda: now[0])
    second = CreatePacer(tmp_path, rate=1.0, burst=2, sleep=sleep, clock=lambda: now[0])
    interval = 1 / SAFETY
    assert [first.wait(), second.wait()] == [0.0, 0.0]  # the burst
    assert second.wait() == pytest.approx(interval)
    assert first.wait() == pytest.approx(2 * interval)
    now[0] += 10 * interval  # idle: the bucket refills, but never beyond its burst
    assert [first.wait(), second.wait()] == [0.0, 0.0]
    assert first.wait() == pytest.approx(interval)
    assert slept == [pytest.approx(interval), pytest.approx(2 * interval), pytest.approx(interval)]
