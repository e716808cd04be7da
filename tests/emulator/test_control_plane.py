"""The control-plane API through the real e2b SDK: lifecycle, listing, errors, faults."""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any

import httpx
import pytest

from pytest_kode.emulator import E2BEmulator


def _wait_gone(emulator: E2BEmulator, sandbox_id: str, timeout_s: float = 4.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sandbox_id not in emulator.sandbox_ids():
            return True
        time.sleep(0.05)
    return False


def test_create_reports_what_was_asked(create: Any, emulator: E2BEmulator) -> None:
    before = emulator.created_count
    sbx = create(metadata={"who": "test"}, timeout=120, allow_internet_access=True)
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and info.template_id == "base"
    assert info.metadata == {"who": "test"}
    assert info.state.value == "running"
    assert 115 <= (info.end_at - info.started_at).total_seconds() <= 121
    assert info.envd_version == "0.6.4"
    assert emulator.created_count == before + 1
    assert sbx.sandbox_id in emulator.sandbox_ids()


def test_no_internet_request_is_recorded(create: Any, emulator: E2BEmulator) -> None:
    sbx = create(allow_internet_access=False)
    assert sbx.get_info().allow_internet_access is False
    mine = next(item for item in emulator.sandboxes() if item["sandbox_id"] == sbx.sandbox_id)
    assert mine["allow_internet_access"] is False
    assert isinstance(mine["network_isolated"], bool)
    assert sbx.commands.run("echo up").stdout == "up\n"


def test_default_lifetime_is_300_seconds(sbx: Any) -> None:
    info = sbx.get_info()
    assert abs((info.end_at - info.started_at).total_seconds() - 300) < 2


def test_kill_then_everything_says_gone(create: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox, SandboxNotFoundException, SandboxNotRunningException

    sbx = create()
    assert sbx.is_running() is True
    assert sbx.kill() is True
    assert sbx.is_running() is False
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    assert Sandbox.kill(sbx.sandbox_id, **api) is False


def test_set_timeout_moves_the_end_and_the_reaper_enforces_it(
    create: Any, emulator: E2BEmulator
) -> None:
    from e2b import SandboxNotFoundException, SandboxNotRunningException

    sbx = create(timeout=60)
    sbx.set_timeout(900)
    info = sbx.get_info()
    remaining = (info.end_at - datetime.datetime.now(datetime.UTC)).total_seconds()
    assert 895 <= remaining <= 901
    sbx.set_timeout(1)
    assert _wait_gone(emulator, sbx.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotRunningException):
        sbx.files.list(".")


def test_short_create_timeout_expires(create: Any, emulator: E2BEmulator) -> None:
    sbx = create(timeout=1)
    assert sbx.is_running()
    assert _wait_gone(emulator, sbx.sandbox_id)
    assert sbx.is_running() is False


def test_pause_keeps_files_and_connect_resumes(create: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox, SandboxNotRunningException

    sbx = create()
    sbx.files.write("kept.txt", "still here")
    assert sbx.pause() is True
    assert sbx.get_info().state.value == "paused"
    assert sbx.pause() is False  # 409: already paused
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=200, **api)
    assert resumed.sandbox_id == sbx.sandbox_id
    assert resumed.get_info().state.value == "running"
    assert resumed.files.read("kept.txt") == "still here"
    assert resumed.commands.run("cat kept.txt").stdout == "still here"


def test_connect_to_running_only_extends_the_lifetime(create: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox

    sbx = create(timeout=600)
    end = sbx.get_info().end_at
    Sandbox.connect(sbx.sandbox_id, timeout=10, **api)
    assert sbx.get_info().end_at == end
    Sandbox.connect(sbx.sandbox_id, timeout=1200, **api)
    assert sbx.get_info().end_at > end


def test_connect_to_an_unknown_sandbox(api: dict[str, Any]) -> None:
    from e2b import Sandbox, SandboxNotFoundException

    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("doesnotexist0000000", **api)


def test_list_filters_by_metadata_and_state_and_pages(create: Any, api: dict[str, Any]) -> None:
    from e2b import Sandbox, SandboxQuery, SandboxState

    run = uuid.uuid4().hex
    made = [create(metadata={"run": run, "n": str(n)}) for n in range(5)]
    create(metadata={"run": "someone else"})
    made[4].pause()

    def ids(query: Any, limit: int | None = None) -> tuple[list[str], int]:
        paginator = Sandbox.list(query=query, limit=limit, **api)
        found: list[str] = []
        pages = 0
        while paginator.has_next:
            found += [info.sandbox_id for info in paginator.next_items()]
            pages += 1
        return found, pages

    everyone = {sbx.sandbox_id for sbx in made}
    found, _ = ids(SandboxQuery(metadata={"run": run}))
    assert set(found) == everyone
    running, _ = ids(SandboxQuery(metadata={"run": run}, state=[SandboxState.RUNNING]))
    assert set(running) == everyone - {made[4].sandbox_id}
    paused, _ = ids(SandboxQuery(metadata={"run": run}, state=[SandboxState.PAUSED]))
    assert paused == [made[4].sandbox_id]
    one, _ = ids(SandboxQuery(metadata={"run": run, "n": "2"}))
    assert one == [made[2].sandbox_id]
    paged, pages = ids(SandboxQuery(metadata={"run": run}), limit=2)
    assert pages == 3 and len(paged) == 5 and set(paged) == everyone


def test_metadata_with_reserved_characters_filters_exactly(
    create: Any, api: dict[str, Any]
) -> None:
    from e2b import Sandbox, SandboxQuery

    value = f"a b&c=d%{uuid.uuid4().hex}"
    sbx = create(metadata={"odd key": value})
    found = Sandbox.list(query=SandboxQuery(metadata={"odd key": value}), **api).next_items()
    assert [info.sandbox_id for info in found] == [sbx.sandbox_id]
    assert found[0].metadata == {"odd key": value}


def test_wrong_api_key_is_an_authentication_error(api: dict[str, Any]) -> None:
    from e2b import AuthenticationException, Sandbox

    with pytest.raises(AuthenticationException):
        Sandbox.create(**{**api, "api_key": "e2b_" + "0" * 40})
    response = httpx.get(api["api_url"] + "/v2/sandboxes", headers={"X-API-KEY": "e2b_bad"})
    assert response.status_code == 401
    assert response.json()["code"] == 401 and "X-API-KEY" in response.json()["message"]
    assert "e2b_bad" not in response.text


def test_unknown_template_is_a_404_and_templates_can_be_added(
    create: Any, emulator: E2BEmulator, api: dict[str, Any]
) -> None:
    from e2b import Sandbox, SandboxException

    name = f"tpl-{uuid.uuid4().hex[:8]}"
    with pytest.raises(SandboxException) as info:
        Sandbox.create(template=name, **api)
    assert info.value.status_code == 404
    assert name in str(info.value)
    emulator.add_template(name)
    assert create(template=name).get_info().template_id == name


def test_older_sdk_paths_are_served(lenient: E2BEmulator, api: dict[str, Any]) -> None:
    emulator = lenient
    headers = {"X-API-KEY": emulator.api_key}
    created = httpx.post(
        emulator.url + "/sandboxes", json={"templateID": "base", "timeout": 30}, headers=headers
    )
    assert created.status_code == 201
    sandbox_id = created.json()["sandboxID"]
    listed = httpx.get(emulator.url + "/sandboxes", headers=headers).json()
    assert sandbox_id in [item["sandboxID"] for item in listed]
    assert (
        httpx.delete(emulator.url + f"/sandboxes/{sandbox_id}", headers=headers).status_code == 204
    )
    assert (
        httpx.delete(emulator.url + f"/sandboxes/{sandbox_id}", headers=headers).status_code == 404
    )


def test_envd_rejects_a_wrong_access_token(sbx: Any, emulator: E2BEmulator) -> None:
    response = httpx.get(
        emulator.url + "/health",
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": "wrong"},
    )
    assert response.status_code == 401
    ok = httpx.get(
        emulator.url + "/health",
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token},
    )
    assert ok.status_code == 204


# -- faults -----------------------------------------------------------------------------------


@pytest.fixture
def faults(lenient: E2BEmulator) -> Any:
    yield lenient
    lenient.clear_faults()


def test_persistent_429_ends_in_rate_limit_after_the_sdk_retries(
    faults: E2BEmulator, api: dict[str, Any]
) -> None:
    from e2b import RateLimitException, Sandbox

    calls, created = faults.calls["create"], faults.created_count
    faults.fail_next_creates(5, status=429, retry_after_s=0)
    with pytest.raises(RateLimitException):
        Sandbox.create(**api)
    assert faults.calls["create"] - calls == 4  # the first try and the SDK's 3 retries
    assert faults.created_count == created


def test_persistent_503_is_service_busy(faults: E2BEmulator, api: dict[str, Any]) -> None:
    from e2b import Sandbox, ServiceBusyException

    faults.fail_next_creates(4, status=503)
    with pytest.raises(ServiceBusyException):
        Sandbox.create(**api)


def test_one_429_is_absorbed_by_the_sdk_retry(faults: E2BEmulator, create: Any) -> None:
    calls, created = faults.calls["create"], faults.created_count
    faults.fail_next_creates(1, status=429)
    assert create().is_running()
    assert faults.calls["create"] - calls == 2
    assert faults.created_count == created + 1


def test_latency_is_added_to_every_request(faults: E2BEmulator, sbx: Any) -> None:
    faults.latency_ms = 300
    started = time.monotonic()
    sbx.get_info()
    sbx.files.exists("x")
    assert time.monotonic() - started >= 0.6  # both the API and the daemon side are delayed


def test_vanish_looks_like_a_dead_vm(create: Any, emulator: E2BEmulator) -> None:
    from e2b import SandboxNotFoundException, SandboxNotRunningException

    sbx = create()
    emulator.vanish(sbx.sandbox_id)
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("x")
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    assert sbx.is_running() is False
    with pytest.raises(KeyError, match="no emulated sandbox"):
        emulator.vanish(sbx.sandbox_id)


def test_calls_are_counted_per_endpoint(create: Any, lenient: E2BEmulator) -> None:
    emulator = lenient
    before = dict(emulator.calls)
    sbx = create()
    sbx.commands.run("true")
    sbx.files.write("c.txt", "x")
    sbx.files.list(".")
    sbx.get_info()
    sbx.kill()
    delta = {key: emulator.calls[key] - before.get(key, 0) for key in emulator.calls}
    for name in (
        "create",
        "process.Start",
        "files.write",
        "filesystem.ListDir",
        "get_info",
        "kill",
    ):
        assert delta[name] == 1, name


def test_sandboxes_reports_live_ones(create: Any, emulator: E2BEmulator) -> None:
    sbx = create(metadata={"probe": "yes"})
    handle = sbx.commands.run("sleep 5", background=True)
    mine = next(item for item in emulator.sandboxes() if item["sandbox_id"] == sbx.sandbox_id)
    assert mine["state"] == "running" and mine["metadata"] == {"probe": "yes"}
    assert mine["processes"] == 1
    handle.kill()


def test_lifecycle_pause_on_timeout_pauses_instead_of_killing(
    create: Any, api: dict[str, Any]
) -> None:
    from e2b import Sandbox

    sbx = create(timeout=1, lifecycle={"on_timeout": "pause"})
    sbx.files.write("survivor.txt", "yes")
    assert sbx.get_info().lifecycle["on_timeout"] == "pause"
    deadline = time.monotonic() + 4
    while sbx.get_info().state.value != "paused" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sbx.get_info().state.value == "paused"
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=60, **api)
    assert resumed.files.read("survivor.txt") == "yes"
