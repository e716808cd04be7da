"""Minimal HTTP plumbing over ASGI: a request reader and whole-body responses."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Request:
    """The parts of an ASGI HTTP request the handlers read."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        raw_query: bytes = scope.get("query_string", b"")
        self.query: dict[str, list[str]] = parse_qs(
            raw_query.decode("latin-1"), keep_blank_values=True
        )
        self.headers: dict[str, str] = {}
        for key, value in scope.get("headers", ()):
            self.headers[key.decode("latin-1").lower()] = value.decode("latin-1")

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    async def body(self) -> bytes:
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def json(self) -> Any:
        raw = await self.body()
        return json.loads(raw) if raw.strip() else {}


class Response:
    """A complete (non-streamed) response."""

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers or {})
        if content_type is not None:
            self.headers["content-type"] = content_type

    async def send(self, send: Send) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def json_response(status: int, payload: Any, *, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, content_type="application/json", headers=headers)


def error_response(
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    error_code: str | None = None,
) -> Response:
    """The ``{"code", "message"}`` body both the API and envd answer errors with (plus the
    API's optional ``error_code``)."""
    body: dict[str, object] = {"code": status, "message": message}
    if error_code is not None:
        body["error_code"] = error_code
    return json_response(status, body, headers=headers)


def sandbox_not_found(sandbox_id: str) -> Response:
    # The SDK recognises a dead sandbox by the phrase "was not found" in the proxy's 502.
    return json_response(
        502,
        {
            "code": 502,
            "message": f"The sandbox {sandbox_id} was not found",
            "sandboxId": sandbox_id,
        },
    )
