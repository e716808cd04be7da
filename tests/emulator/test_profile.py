"""The emulator's cloud profile: rate, concurrency and lifetime limits, idempotent creates,
the clock offset -- each against raw HTTP or the real SDK, as the cloud would answer."""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pytest_kode.emulator import E2BEmulator
from pytest_kode.emulator.__main__ import main as emulator_main
from pytest_kode.plans import PLANS, CloudPlan, plan_named

TIGHT = CloudPlan("tight", create_rate=0.5, create_burst=1, max_concurrent=2, max_lifetime_s=60)


@pytest.fixture
def tight(tmp_path: Any) -> Iterator[E2BEmulator]:
    with E2BEmulator(root_dir=tmp_path, profile=TIGHT) as emu:
        yield emu


def _post(emu: E2BEmulator, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"X-API-KEY": emu.api_key}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(emu.url + "/v2/sandboxes", json=body, headers=headers, timeout=30)


def _kill(emu: E2BEmulator, sandbox_id: str) -> None:
    httpx.delete(emu.url + f"/sandboxes/{sandbox_id}", headers={"X-API-KEY": emu.api_key})


def test_the_default_profile_is_hobby() -> None:
    emu = E2BEmulator()
    assert emu.profile == PLANS["hobby"]
    assert (emu.profile.create_rate, emu.profile.max_concurrent) == (1.0, 20)
    assert emu.profile.max_lifetime_s == 3600


def test_creates_beyond_the_rate_get_429_with_a_real_retry_after(tight: E2BEmulator) -> None:
    first = _post(tight, {"templateID": "base", "timeout": 30})
    assert first.status_code == 201
    second = _post(tight, {"templateID": "base", "timeout": 30})
    assert second.status_code == 429
    assert "0.5 sandbox(es) per second" in second.json()["message"]
    retry_after = second.headers["retry-after"]
    assert retry_after.isdecimal() and int(retry_after) >= 1
    assert tight.limited_count == 1
    _kill(tight, first.json()["sandboxID"])


def test_creates_beyond_the_concurrency_limit_get_429(tight: E2BEmulator) -> None:
    tight.profile = TIGHT.replace(create_rate=None)
    made = [_post(tight, {"templateID": "base", "timeout": 30}) for _ in range(2)]
    assert [r.status_code for r in made] == [201, 201]
    refused = _post(tight, {"templateID": "base", "timeout": 30})
    assert refused.status_code == 429
    assert "maximum number of concurrent E2B sandboxes (2)" in refused.json()["message"]
    assert int(refused.headers["retry-after"]) >= 1
    _kill(tight, made[0].json()["sandboxID"])
    again = _post(tight, {"templateID": "base", "timeout": 30})
    assert again.status_code == 201
    for response in (made[1], again):
        _kill(tight, response.json()["sandboxID"])


def test_the_plans_maximum_lifetime(tight: E2BEmulator) -> None:
    from e2b import Sandbox

    tight.profile = TIGHT.replace(create_rate=None)
    api = {"api_key": tight.api_key, "api_url": tight.url, "sandbox_url": tight.url}
    too_long = _post(tight, {"templateID": "base", "timeout": 61})
    assert too_long.status_code == 400
    assert "Timeout cannot be greater than" in too_long.json()["message"]
    sbx = Sandbox.create(timeout=30, **api)
    try:
        sbx.set_timeout(3600)  # accepted, but clamped to start + the plan's maximum
        info = sbx.get_info()
        assert (info.end_at - info.started_at).total_seconds() <= 60
        refused = httpx.post(
            tight.url + f"/v2/sandboxes/{sbx.sandbox_id}/connect",
            json={"timeout": 61},
            headers={"X-API-KEY": tight.api_key},
        )
        assert refused.status_code == 400
    finally:
        sbx.kill()


def test_idempotency_key_in_flight_then_done_then_mismatched(tight: E2BEmulator) -> None:
    tight.profile = TIGHT.replace(create_rate=None)
    body = {"templateID": "base", "timeout": 30, "metadata": {"k": "v"}}
    tight.lose_create_answers(1, 504, hold_s=1.0)
    lost = _post(tight, body, key="abc-1")
    assert lost.status_code == 504
    busy = _post(tight, body, key="abc-1")
    assert busy.status_code == 409
    assert busy.json()["error_code"] == "idempotency_in_progress"
    deadline = time.monotonic() + 30
    while (answer := _post(tight, body, key="abc-1")).status_code == 409:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert answer.status_code == 201
    again = _post(tight, body, key="abc-1")
    assert again.json()["sandboxID"] == answer.json()["sandboxID"]
    assert tight.created_count == 1
    other = _post(tight, {**body, "timeout": 31}, key="abc-1")
    assert other.status_code == 422
    assert other.json()["error_code"] == "idempotency_request_mismatch"
    _kill(tight, answer.json()["sandboxID"])


def test_injected_faults_say_retry_after(tight: E2BEmulator) -> None:
    tight.profile = TIGHT.replace(create_rate=None)
    tight.fail_next_creates(1, 503, retry_after_s=4)
    refused = _post(tight, {"templateID": "base"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "4"
    assert tight.limited_count == 0  # injected, not the profile's


def test_the_clock_offset_shows_in_times_and_the_date_header(tmp_path: Any) -> None:
    with E2BEmulator(root_dir=tmp_path, clock_offset_s=-600) as emu:
        made = _post(emu, {"templateID": "base", "timeout": 30})
        server_date = email.utils.parsedate_to_datetime(made.headers["date"])
        now = datetime.datetime.now(datetime.UTC)
        assert 590 <= (now - server_date).total_seconds() <= 610
        sandbox_id = made.json()["sandboxID"]
        info = httpx.get(
            emu.url + f"/sandboxes/{sandbox_id}", headers={"X-API-KEY": emu.api_key}
        ).json()
        started = datetime.datetime.fromisoformat(info["startedAt"].replace("Z", "+00:00"))
        assert 590 <= (now - started).total_seconds() <= 610
        # Lifetimes run on the emulator's clock: still alive.
        assert emu.sandbox_ids() == [sandbox_id]
        _kill(emu, sandbox_id)


def test_plan_names_and_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert plan_named("Pro") == PLANS["pro"]
    with pytest.raises(ValueError, match="choose one of: hobby, pro"):
        plan_named("enterprise")
    with pytest.raises(SystemExit):
        emulator_main(["--profile", "enterprise"])
    assert "choose one of: hobby, pro, unlimited" in capsys.readouterr().err
    with pytest.raises(ValueError, match="create_rate must be > 0"):
        CloudPlan("x", create_rate=0, create_burst=1, max_concurrent=None, max_lifetime_s=None)
