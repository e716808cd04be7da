"""The ASGI router: one server answers the control plane and every sandbox's daemon.

Requests carrying ``E2b-Sandbox-Id`` go to the daemon side (the Connect services the ``e2b``
package ships, ``/files``, ``/health``), after the proxy checks the real edge does: the sandbox
must exist and run (502 "... was not found" otherwise) and ``X-Access-Token`` must match (401).
Everything else is the control plane, which wants ``X-API-KEY``.
"""

from __future__ import annotations

import asyncio
import contextvars
import email.utils
import logging
import re
import socket
import struct
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

from pytest_kode.emulator import _control, _files, _templates
from pytest_kode.emulator._http import (
    ASGIApp,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    error_response,
    sandbox_not_found,
)
from pytest_kode.emulator._state import EmulatedSandbox, Registry, current_sandbox

_log = logging.getLogger(__name__)
_RPC_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")
# What the SDK's get_host(port) names: "<port>-<sandbox id>.<domain>".
_PORT_HOST = re.compile(r"(\d{1,5})-([A-Za-z0-9_-]+)\." + re.escape(_control.DOMAIN))
_ENVD_HTTP_PATHS = ("/files", "/health")
# Set in a request's task when its response is cut off on purpose; the server then closes the
# connection and would log "ASGI callable returned without completing response" for it.
_cut_off: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kode_emulator_cut_off", default=False
)


class _SandboxDied(Exception):
    """The sandbox under a response in flight is gone: the connection is to drop."""


class _QuietCutOff(logging.Filter):
    """Leaves out the server's error record for a response the emulator cut off on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _cut_off.get()


_QUIET_CUT_OFF = _QuietCutOff()


class EmulatorApp:
    """The ASGI application: routes to the control plane, the RPC services or ``/files``."""

    def __init__(self, registry: Registry, api_key: str) -> None:
        from e2b.envd.filesystem.filesystem_connect import FilesystemASGIApplication
        from e2b.envd.process.process_connect import ProcessASGIApplication

        from pytest_kode.emulator import _envd

        self._registry = registry
        self._api_key = api_key
        self.connections: Callable[[], Iterable[Any]] = tuple
        """The server's open connections (uvicorn's protocol objects, with ``client`` and
        ``transport``), to reset the one under a response cut off."""
        rpc_options: dict[str, Any] = {"compressions": ()}
        self._process_app: ASGIApp = ProcessASGIApplication(
            _envd.ProcessService(registry), **rpc_options
        )
        self._filesystem_app: ASGIApp = FilesystemASGIApplication(
            _envd.FilesystemService(), **rpc_options
        )
        server_log = logging.getLogger("uvicorn.error")
        if _QUIET_CUT_OFF not in server_log.filters:
            server_log.addFilter(_QUIET_CUT_OFF)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self._route(scope, receive, tracked)
        except Exception as exc:
            # An unexpected failure reaches the client as an error it can report, never as an
            # "Exception in ASGI application" traceback in the middle of the test run's output.
            _log.debug(
                "emulator: %s %s failed", scope.get("method"), scope.get("path"), exc_info=True
            )
            if not started:
                await error_response(
                    500, f"the E2B emulator failed: {type(exc).__name__}: {exc}"
                ).send(send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        send = self._dated(send)
        if self._registry.latency_ms:
            await asyncio.sleep(self._registry.latency_ms / 1000.0)
        request = Request(scope, receive)
        port_host = _PORT_HOST.fullmatch(request.headers.get("host", "").split(":")[0])
        if port_host is not None:
            await self._port(request, int(port_host[1]), port_host[2], send)
            return
        sandbox_id = request.headers.get("e2b-sandbox-id")
        path = request.path
        if sandbox_id is None and path == "/files" and request.arg("signature"):
            # A signed URL from download_url()/upload_url() carries no sandbox header (the
            # cloud routes it by host name): the signature itself says whose it is.
            sandbox_id, why = self._signed_by(request)
            if sandbox_id is None:
                self._registry.calls[
                    "files.read" if request.method == "GET" else "files.write"
                ] += 1
                # envd's own words for an expired signature, which the SDK's tests match.
                message = (
                    "signature is already expired"
                    if why == "expired"
                    else "the URL's signature matches no running sandbox: it was forged or its "
                    "sandbox is gone; get a fresh download_url()/upload_url()"
                )
                await error_response(401, message).send(send)
                return
        if sandbox_id is not None and (path.startswith(_RPC_PREFIXES) or path in _ENVD_HTTP_PATHS):
            await self._envd(request, sandbox_id, scope, receive, send)
            return
        if _templates.is_template_path(path):
            built = await _templates.handle(self._registry, self._api_key, request)
            if built is not None:
                await built.send(send)
                return
        response = await _control.handle(self._registry, self._api_key, request)
        await response.send(send)

    async def _envd(
        self, request: Request, sandbox_id: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        path = request.path
        if path.startswith(_RPC_PREFIXES):
            service, _, method = path.strip("/").partition("/")
            self._registry.calls[f"{service.split('.')[0]}.{method}"] += 1
        else:
            name = (
                "health"
                if path == "/health"
                else "files.read"
                if request.method == "GET"
                else "files.write"
            )
            self._registry.calls[name] += 1
        sandbox = self._registry.get(sandbox_id)
        if (
            sandbox is not None
            and sandbox.state == "paused"
            and sandbox.auto_resume
            and self._authorised(request, sandbox)
        ):
            await asyncio.to_thread(self._registry.wake, sandbox)
        if sandbox is None or not sandbox.running:
            await sandbox_not_found(sandbox_id).send(send)
            return
        if not self._authorised(request, sandbox):
            await error_response(
                401,
                f"invalid access token for sandbox {sandbox_id}: send the envdAccessToken "
                "that create/connect returned in the X-Access-Token header",
            ).send(send)
            return
        token = current_sandbox.set(sandbox)
        try:
            if path.startswith("/process.Process/"):
                await self._rpc(self._process_app, sandbox, scope, receive, send)
            elif path.startswith("/filesystem.Filesystem/"):
                await self._rpc(self._filesystem_app, sandbox, scope, receive, send)
            else:
                response = await _files.handle(sandbox, request)
                await response.send(send)
        finally:
            current_sandbox.reset(token)

    async def _rpc(
        self, app: ASGIApp, sandbox: EmulatedSandbox, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run a Connect service; if the sandbox dies while the answer is on its way, the
        connection is reset before the answer ends, as the edge resets the stream when the VM
        under it goes away. The SDK takes a reset for a transport failure, probes ``/health``,
        which then answers 502 "not found", and reports the sandbox as killed."""
        started = False

        async def guarded(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            elif started and not message.get("more_body", False) and not sandbox.running:
                raise _SandboxDied
            await send(message)

        try:
            await app(scope, receive, guarded)
        except _SandboxDied:
            _cut_off.set(True)
            self._reset_on_close(scope)

    def _reset_on_close(self, scope: Scope) -> None:
        """Make the server's close of this request's connection a reset (RST), not an orderly
        end (FIN): HTTP/1.1 has no stream reset, and an orderly close in the middle of a
        chunked body reads as a protocol error to the SDK's client, not as a dropped
        connection."""
        client = scope.get("client")
        for connection in self.connections():
            if client is None or tuple(getattr(connection, "client", ()) or ()) != tuple(client):
                continue
            transport = getattr(connection, "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return

    def _dated(self, send: Send) -> Send:
        """``send`` that adds a ``Date`` header on the emulator's clock (a skewed cloud shows
        its skew there, as a real server would)."""
        registry = self._registry

        async def dated(message: MutableMapping[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                stamp = email.utils.format_datetime(registry.now(), usegmt=True)
                headers = [*message.get("headers", []), (b"date", stamp.encode())]
                message = {**message, "headers": headers}
            await send(message)

        return dated

    async def _port(self, request: Request, port: int, sandbox_id: str, send: Send) -> None:
        """A request for ``<port>-<sandbox id>.<domain>``: sent on to that sandbox's own port.

        Each emulated sandbox has a network of its own, its ports reached through a forwarded
        port on the host's 127.0.0.1; the answer is a redirect there (307 keeps the method and
        body), which also tells ``E2BSandbox.get_host_url`` the URL to hand out.
        """
        self._registry.calls["port"] += 1
        sandbox = self._registry.get(sandbox_id)
        if sandbox is None or not sandbox.running:
            await sandbox_not_found(sandbox_id).send(send)
            return
        if not 1 <= port <= 65535:
            await error_response(400, f"port {port} is not a TCP port (1-65535)").send(send)
            return
        base = await asyncio.to_thread(sandbox.local.get_host_url, port)
        target = base + request.path
        query = request.scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        await Response(307, headers={"location": target}).send(send)

    def _signed_by(self, request: Request) -> tuple[str | None, str]:
        """The running sandbox whose access token signed the URL, or None and why not."""
        why = "invalid"
        for sandbox in self._registry.all():
            if not sandbox.running:
                continue
            problem = _files.signature_check(sandbox, request)
            if problem is None:
                return sandbox.sandbox_id, ""
            if problem == "expired":
                why = problem
        return None, why

    @staticmethod
    def _authorised(request: Request, sandbox: EmulatedSandbox) -> bool:
        if request.headers.get("x-access-token") == sandbox.access_token:
            return True
        # /files also accepts the signed URLs of download_url()/upload_url().
        return request.path == "/files" and _files.signature_ok(sandbox, request)
