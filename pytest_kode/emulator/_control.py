"""The control-plane REST API (``api.e2b.app``): create, connect, info, list, kill, timeout, pause.

JSON bodies are camelCase like the real API; errors are ``{"code", "message"}`` so the SDK's
``handle_api_exception`` maps them to the same exceptions as in the cloud.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import re
from typing import Any
from urllib.parse import parse_qsl, unquote

from pytest_kode.emulator._http import Request, Response, error_response, json_response
from pytest_kode.emulator._state import (
    DEFAULT_TIMEOUT_S,
    ENVD_VERSION,
    EmulatedSandbox,
    Registry,
)

DOMAIN = "localhost"
_CPU_COUNT = 2
_MEMORY_MB = 512
_DISK_MB = 1024
_ABSOLUTE_MAX_TIMEOUT_S = 24 * 3600
_ID = r"(?P<id>[^/]+)"
_FAULT_MESSAGES = {
    429: "Rate limit exceeded, too many concurrent sandboxes (injected by the emulator)",
    503: "No capacity available to create the sandbox (injected by the emulator)",
}

# (method, path, handler); the handler name doubles as the counter name in `calls`.
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/v2/sandboxes|/sandboxes"), "create"),
    ("GET", re.compile(r"/v2/sandboxes|/sandboxes"), "list"),
    ("GET", re.compile(rf"/sandboxes/{_ID}"), "get_info"),
    ("DELETE", re.compile(rf"/sandboxes/{_ID}"), "kill"),
    ("POST", re.compile(rf"/sandboxes/{_ID}/timeout"), "set_timeout"),
    ("POST", re.compile(rf"/sandboxes/{_ID}/pause"), "pause"),
    ("POST", re.compile(rf"/v2/sandboxes/{_ID}/connect"), "connect"),
    ("POST", re.compile(rf"/sandboxes/{_ID}/connect"), "connect"),
    ("POST", re.compile(rf"/sandboxes/{_ID}/resume"), "resume"),
    ("GET", re.compile(rf"/sandboxes/{_ID}/metrics"), "metrics"),
]


async def handle(registry: Registry, api_key: str, request: Request) -> Response:
    """Answer one control-plane request."""
    for method, pattern, name in _ROUTES:
        match = pattern.fullmatch(request.path)
        if match is None or method != request.method:
            continue
        registry.calls[name] += 1
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return error_response(
                401,
                "Invalid API key: the emulator expects the key it printed (E2B_API_KEY) "
                "in the X-API-KEY header",
            )
        sandbox_id = match.groupdict().get("id")
        try:
            return await _HANDLERS[name](registry, request, sandbox_id)
        except _BadRequest as exc:
            return error_response(400, str(exc))
    return error_response(404, f"no such API endpoint: {request.method} {request.path}")


class _BadRequest(Exception):
    pass


def _not_found(sandbox_id: str | None) -> Response:
    return error_response(
        404, f"sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it"
    )


def _timeout(registry: Registry, body: dict[str, Any]) -> int:
    value = body.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadRequest(f"timeout must be a non-negative integer of seconds, got {value!r}")
    limit = registry.plan.max_lifetime_s or _ABSOLUTE_MAX_TIMEOUT_S
    if value > limit:
        # infra handlers/timeout_helper.go, for create and connect alike.
        raise _BadRequest(
            f"Timeout cannot be greater than {limit // 3600} hours "
            f"({registry.plan.name} plan: {limit}s; got {value}s)"
        )
    return value


def _too_many(registry: Registry, message: str, retry_after_s: int) -> Response:
    registry.limits.limited += 1
    return error_response(429, message, headers={"retry-after": str(retry_after_s)})


def _str_map(body: dict[str, Any], key: str) -> dict[str, str]:
    value = body.get(key) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _BadRequest(f"{key} must be an object of string values")
    return dict(value)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise _BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _sandbox_json(sandbox: EmulatedSandbox) -> dict[str, Any]:
    return {
        "templateID": sandbox.template_id,
        "sandboxID": sandbox.sandbox_id,
        "clientID": sandbox.client_id,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sandbox.access_token,
        "domain": DOMAIN,
    }


def _listed_json(sandbox: EmulatedSandbox) -> dict[str, Any]:
    return {
        "templateID": sandbox.template_id,
        "sandboxID": sandbox.sandbox_id,
        "clientID": sandbox.client_id,
        "startedAt": _iso(sandbox.started_at),
        "endAt": _iso(sandbox.end_at),
        "cpuCount": _CPU_COUNT,
        "memoryMB": _MEMORY_MB,
        "diskSizeMB": _DISK_MB,
        "state": sandbox.state,
        "envdVersion": ENVD_VERSION,
        "metadata": dict(sandbox.metadata),
    }


def _detail_json(sandbox: EmulatedSandbox) -> dict[str, Any]:
    return {
        **_listed_json(sandbox),
        "envdAccessToken": sandbox.access_token,
        "domain": DOMAIN,
        "allowInternetAccess": sandbox.allow_internet_access,
        "lifecycle": {
            "onTimeout": "pause" if sandbox.auto_pause else "kill",
            "autoResume": False,
        },
    }


async def _create(registry: Registry, request: Request, _: str | None) -> Response:
    # The rate limit and the injected failures sit in front of everything, as the cloud's
    # middleware and gateways do: a request they turn away never reaches the handler.
    wait_s = registry.limits.take()
    if wait_s is not None:
        rate = registry.plan.create_rate
        return _too_many(
            registry,
            f"Rate limit exceeded: the {registry.plan.name} plan creates {rate:g} sandbox(es) "
            "per second",
            wait_s,
        )
    fault = registry.take_create_fault()
    if fault is not None:
        message = _FAULT_MESSAGES.get(fault, f"injected failure {fault}")
        return error_response(
            fault, message, headers={"retry-after": str(registry.fault_retry_after_s)}
        )
    body = await _body(request)
    template = body.get("templateID")
    if not isinstance(template, str) or not template:
        raise _BadRequest("templateID is required")
    timeout_s = _timeout(registry, body)
    key = request.headers.get("idempotency-key")
    if key is not None:
        state, answer = registry.idempotency.begin(key, registry.idempotency.body_hash(body))
        if state == "in_progress":
            return error_response(
                409,
                "a create request with this Idempotency-Key is still in progress; retry later",
                error_code="idempotency_in_progress",
            )
        if state == "mismatch":
            return error_response(
                422,
                "this Idempotency-Key was used with a different request body",
                error_code="idempotency_request_mismatch",
            )
        if state == "done":
            assert answer is not None
            return json_response(201, answer)
    lost = registry.take_lost_answer()
    if lost is None:
        return await _create_now(registry, body, template, timeout_s, key)
    status, hold_s = lost

    async def go_on() -> None:
        await asyncio.sleep(hold_s)
        await _create_now(registry, body, template, timeout_s, key)

    # A gateway gave up on the request while the create goes on behind it.
    registry.background(go_on())
    return error_response(status, f"injected gateway failure {status}; the create goes on")


async def _create_now(
    registry: Registry,
    body: dict[str, Any],
    template: str,
    timeout_s: int,
    key: str | None,
) -> Response:
    if not registry.reserve_slot():
        if key is not None:
            registry.idempotency.abandon(key)
        limit = registry.plan.max_concurrent
        return _too_many(
            registry,
            f"you have reached the maximum number of concurrent E2B sandboxes ({limit})",
            1,
        )
    allow = body.get("allow_internet_access", True)
    boot = asyncio.get_running_loop().time() + registry.create_latency_ms / 1000
    try:
        sandbox = await asyncio.to_thread(
            registry.create,
            template_id=template,
            timeout_s=timeout_s,
            metadata=_str_map(body, "metadata"),
            env_vars=_str_map(body, "envVars"),
            allow_internet_access=allow is not False,
            auto_pause=body.get("autoPause") is True,
        )
    except KeyError:
        if key is not None:
            registry.idempotency.abandon(key)
        known = ", ".join(sorted(registry.templates))
        return error_response(
            404,
            f"template '{template}' not found (or it has no finished build; the emulator "
            f"knows: {known}; register more with E2BEmulator.add_template)",
        )
    except BaseException:
        if key is not None:
            registry.idempotency.abandon(key)
        raise
    finally:
        registry.release_slot()
    # A cloud create takes a VM boot; the local start that stands for it overlaps with it.
    await asyncio.sleep(max(0.0, boot - asyncio.get_running_loop().time()))
    answer = _sandbox_json(sandbox)
    if key is not None:
        registry.idempotency.finish(key, answer)
    return json_response(201, answer)


async def _connect(registry: Registry, request: Request, sandbox_id: str | None) -> Response:
    body = await _body(request)
    sandbox = registry.get(sandbox_id or "")
    if sandbox is None:
        return _not_found(sandbox_id)
    timeout_s = _timeout(registry, body)
    if sandbox.running:
        # A running sandbox's lifetime only ever grows on connect.
        wanted = registry.now() + datetime.timedelta(seconds=timeout_s)
        if wanted > sandbox.end_at:
            registry.set_timeout(sandbox, timeout_s)
        return json_response(200, _sandbox_json(sandbox))
    return _resumed(registry, sandbox, timeout_s)


def _resumed(registry: Registry, sandbox: EmulatedSandbox, timeout_s: int) -> Response:
    # A resumed sandbox runs again, so it counts against the concurrency limit like a new one.
    if not registry.reserve_slot():
        limit = registry.plan.max_concurrent
        return _too_many(
            registry,
            f"you have reached the maximum number of concurrent E2B sandboxes ({limit})",
            1,
        )
    try:
        registry.resume(sandbox, timeout_s)
    finally:
        registry.release_slot()
    return json_response(201, _sandbox_json(sandbox))


async def _resume(registry: Registry, request: Request, sandbox_id: str | None) -> Response:
    body = await _body(request)
    sandbox = registry.get(sandbox_id or "")
    if sandbox is None:
        return _not_found(sandbox_id)
    if sandbox.running:
        return error_response(409, f"sandbox {sandbox_id} is already running")
    return _resumed(registry, sandbox, _timeout(registry, body))


async def _get_info(registry: Registry, _: Request, sandbox_id: str | None) -> Response:
    sandbox = registry.get(sandbox_id or "")
    if sandbox is None:
        return _not_found(sandbox_id)
    return json_response(200, _detail_json(sandbox))


async def _kill(registry: Registry, _: Request, sandbox_id: str | None) -> Response:
    if registry.get(sandbox_id or "") is not None and registry.take_kill_fault():
        return error_response(500, "Failed to kill the sandbox (injected by the emulator)")
    killed = await asyncio.to_thread(registry.kill, sandbox_id or "")
    return Response(204) if killed else _not_found(sandbox_id)


async def _set_timeout(registry: Registry, request: Request, sandbox_id: str | None) -> Response:
    body = await _body(request)
    sandbox = registry.get(sandbox_id or "")
    if sandbox is None or not sandbox.running:
        return _not_found(sandbox_id)
    timeout_s = body.get("timeout")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 0:
        raise _BadRequest(f"timeout must be a non-negative integer of seconds, got {timeout_s!r}")
    if registry.lifetime_over(sandbox):
        # infra orchestrator keep_alive.go: set_timeout is not validated, it clamps, and past
        # the maximum it refuses.
        raise _BadRequest("Max instance length exceeded")
    registry.set_timeout(sandbox, timeout_s)
    return Response(204)


async def _pause(registry: Registry, request: Request, sandbox_id: str | None) -> Response:
    await _body(request)
    sandbox = registry.get(sandbox_id or "")
    if sandbox is None:
        return _not_found(sandbox_id)
    if not sandbox.running:
        return error_response(409, f"sandbox {sandbox_id} is already paused")
    await asyncio.to_thread(registry.pause, sandbox)
    return Response(204)


async def _metrics(registry: Registry, _: Request, sandbox_id: str | None) -> Response:
    if registry.get(sandbox_id or "") is None:
        return _not_found(sandbox_id)
    return json_response(200, [])


async def _list(registry: Registry, request: Request, _: str | None) -> Response:
    legacy = not request.path.startswith("/v2/")
    states = {"running"} if legacy else {"running", "paused"}
    if raw_state := request.arg("state"):
        states = {item.strip() for item in raw_state.split(",") if item.strip()}
        unknown = states - {"running", "paused"}
        if unknown:
            raise _BadRequest(f"state must be running and/or paused, got {sorted(unknown)}")
    wanted_meta = {
        unquote(key): unquote(value)
        for key, value in parse_qsl(request.arg("metadata") or "", keep_blank_values=True)
    }
    started_after = _parse_time(request.arg("startedAfter"))
    template = request.arg("template")
    found = [
        sb
        for sb in registry.all()
        if sb.state in states
        and not sb.gone
        and all(sb.metadata.get(k) == v for k, v in wanted_meta.items())
        and (started_after is None or sb.started_at > started_after)
        and (template is None or sb.template_id == template)
    ]
    found.sort(
        key=lambda sb: (sb.started_at, sb.sandbox_id), reverse=request.arg("order") == "desc"
    )
    if legacy:
        return json_response(200, [_listed_json(sb) for sb in found])
    offset = _offset(request.arg("nextToken"))
    limit = _limit(request.arg("limit"))
    page = found[offset : offset + limit]
    headers = {}
    if offset + limit < len(found):
        headers["x-next-token"] = f"o{offset + limit}"
    return json_response(200, [_listed_json(sb) for sb in page], headers=headers)


def _parse_time(raw: str | None) -> datetime.datetime | None:
    if not raw:
        return None
    try:
        moment = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise _BadRequest(f"startedAfter must be an RFC 3339 time, got {raw!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _offset(token: str | None) -> int:
    if not token:
        return 0
    if not re.fullmatch(r"o\d+", token):
        raise _BadRequest(f"invalid nextToken {token!r}: pass back the x-next-token header value")
    return int(token[1:])


def _limit(raw: str | None) -> int:
    if raw is None:
        return 100
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise _BadRequest(f"limit must be an integer from 1 to 100, got {raw!r}")
    return int(raw)


_HANDLERS = {
    "create": _create,
    "list": _list,
    "get_info": _get_info,
    "kill": _kill,
    "set_timeout": _set_timeout,
    "pause": _pause,
    "connect": _connect,
    "resume": _resume,
    "metrics": _metrics,
}
