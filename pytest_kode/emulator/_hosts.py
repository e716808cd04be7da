"""The sandboxes' public hosts over HTTPS: ``https://<port>-<sandbox id>.<domain>`` offline.

What the SDK's ``get_host(port)`` names is, on E2B, a TLS endpoint of the edge proxy that
forwards to that port in the sandbox. Offline there is neither the name nor a certificate for
it, so the emulator offers what a client process can be pointed at with the environment alone:

- an HTTP ``CONNECT`` proxy on ``127.0.0.1`` (``HTTPS_PROXY``): a tunnel to a sandbox host ends
  here, in TLS with a certificate for that very host name, and goes on, in plain TCP, to the
  sandbox's own port (its forwarded port on the host); a tunnel to any other host is passed
  through untouched, so the process's other HTTPS traffic keeps working;
- a certificate authority made for this emulator, added to a copy of the usual trust bundle
  (``SSL_CERT_FILE``), so clients verify those certificates as they would E2B's.

Answers follow the edge: a sandbox that does not exist or was killed gets 502 "... was not
found", a paused sandbox set up for auto-resume is woken by the request, and a port nothing
listens on gets 502 "... port is not open" (the SDK's wording for both).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import shutil
import ssl
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_kode._threads import start_thread
from pytest_kode.emulator._control import DOMAIN

if TYPE_CHECKING:
    from pytest_kode.emulator._state import Registry

__all__ = ["HostProxy"]

_log = logging.getLogger(__name__)
_HOST = re.compile(r"(\d{1,5})-([A-Za-z0-9_-]+)\." + re.escape(DOMAIN))
_HEAD_LIMIT = 64 * 1024
_CHUNK = 64 * 1024
_START_TIMEOUT_S = 10.0


class HostProxy:
    """The CONNECT proxy and its certificate authority; :attr:`env` points a client at it."""

    def __init__(self, registry: Registry) -> None:
        try:
            self._ca_cert, self._ca_key = _make_ca()
        except ImportError as exc:
            from pytest_kode.errors import BackendUnavailableError

            raise BackendUnavailableError(
                f"the emulator's https_hosts make TLS certificates, which needs the "
                f"`cryptography` package: {exc}",
                backend="emulator",
                hint="pip install 'pytest-kode[emulator]' (or cryptography), or leave "
                "https_hosts off",
            ) from exc
        self._registry = registry
        self._dir: Path | None = None  # made at start()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._contexts_lock = threading.Lock()
        self.bundle = Path()
        """The usual trust bundle plus this emulator's certificate authority (from start())."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def env(self) -> dict[str, str]:
        """What sends a client's HTTPS traffic through the proxy and makes it trust the hosts.

        ``NO_PROXY`` keeps the SDK's own traffic to the emulator (``127.0.0.1``) direct; it
        does not name ``localhost``, which some clients would match against every
        ``*.localhost`` sandbox host too."""
        proxy = f"http://127.0.0.1:{self.port}"
        return {
            "HTTPS_PROXY": proxy,
            "https_proxy": proxy,
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
            "SSL_CERT_FILE": str(self.bundle),
        }

    # -- life-cycle -------------------------------------------------------------------------
    def start(self) -> HostProxy:
        self._dir = directory = Path(tempfile.mkdtemp(prefix="kode-emulator-tls-"))
        self.bundle = directory / "trust-bundle.pem"
        self.bundle.write_bytes(_default_bundle() + b"\n" + _pem(self._ca_cert))
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, "127.0.0.1", 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = start_thread(run, name="kode-emulator-hosts")
        if not ready.wait(_START_TIMEOUT_S) or failure:
            raise RuntimeError(f"the emulator's HTTPS host proxy did not start: {failure}")
        return self

    def stop(self) -> None:
        loop, server, thread = self._loop, self._server, self._thread
        self._loop = self._server = self._thread = None
        if loop is not None and server is not None:

            async def shut() -> None:
                server.close()
                for task in asyncio.all_tasks():
                    if task is not asyncio.current_task():
                        task.cancel()

            try:
                asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - stopping is best effort
                pass
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    # -- one client connection --------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._tunnel(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError):
            pass  # the client went away, or its TLS handshake failed: nothing to answer
        except Exception:  # noqa: BLE001 - one bad connection must not stop the others
            _log.debug("emulator host proxy: a connection failed", exc_info=True)
        finally:
            writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _HEAD_LIMIT:
            return
        method, _, rest = head.decode("latin-1").partition(" ")
        authority = rest.split(" ", 1)[0]
        host, _, port_text = authority.rpartition(":")
        host = host.strip("[]")  # an IPv6 literal
        if method.upper() != "CONNECT" or not host or not port_text.isdigit():
            writer.write(
                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
            return
        sandbox_host = _HOST.fullmatch(host.lower())
        if sandbox_host is None:
            await _pass_through(reader, writer, host, int(port_text))
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await writer.start_tls(self._context_for(host.lower()))
        await self._to_sandbox(
            reader, writer, int(sandbox_host[1]), sandbox_host[2], f"{host}:{port_text}"
        )

    async def _to_sandbox(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        port: int,
        sandbox_id: str,
        authority: str,
    ) -> None:
        sandbox = self._registry.get(sandbox_id)
        if sandbox is not None:
            await asyncio.to_thread(self._registry.wake, sandbox)
        if sandbox is None or not sandbox.running:
            message = f"The sandbox {sandbox_id} was not found"
            await _answer_502(writer, {"sandboxId": sandbox_id, "message": message})
            return
        if not 1 <= port <= 65535:
            await _answer_502(writer, {"message": f"{authority}: {port} is not a TCP port"})
            return
        not_open = {
            "sandboxId": sandbox_id,
            "port": port,
            "message": "The sandbox is running but port is not open",
        }
        try:
            url = await asyncio.to_thread(sandbox.local.get_host_url, port)
            target_host, _, target_port = url.removeprefix("http://").partition(":")
            up_reader, up_writer = await asyncio.open_connection(target_host, int(target_port))
        except (OSError, ValueError):
            await _answer_502(writer, not_open)
            return
        except Exception as exc:  # noqa: BLE001 - the sandbox died in between, for one
            await _answer_502(writer, {"sandboxId": sandbox_id, "message": str(exc)})
            return
        upward = asyncio.create_task(_pipe(reader, up_writer))
        try:
            # The way into the sandbox's network accepts at once, whatever listens inside; a
            # port nothing listens on shows as that connection ending before any answer.
            try:
                first = await up_reader.read(_CHUNK)
            except OSError:  # reset rather than closed
                first = b""
            if not first:
                await _answer_502(writer, not_open)
                return
            writer.write(first)
            await writer.drain()
            await _pipe(up_reader, writer)
        finally:
            upward.cancel()
            up_writer.close()

    def _context_for(self, host: str) -> ssl.SSLContext:
        with self._contexts_lock:
            context = self._contexts.get(host)
            if context is None:
                assert self._dir is not None  # serving means started
                cert_path = self._dir / f"{host}.pem"
                cert_path.write_bytes(_leaf(host, self._ca_cert, self._ca_key))
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(cert_path)
                self._contexts[host] = context
            return context


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        pass  # either side went away: the other is closed by the caller


async def _pass_through(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        writer.write(
            f"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nx-reason: {type(exc).__name__}"
            "\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    upward = asyncio.create_task(_pipe(reader, up_writer))
    try:
        await _pipe(up_reader, writer)
    finally:
        upward.cancel()
        up_writer.close()


async def _answer_502(writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
    body = json.dumps({"code": 502, **payload}, separators=(",", ":")).encode()
    writer.write(
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()


# -- certificates ---------------------------------------------------------------------------
def _make_ca() -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pytest-kode E2B emulator CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _leaf(host: str, ca_cert: Any, ca_key: Any) -> bytes:
    """A server certificate for ``host`` signed by the CA, and its key, as one PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return _pem(certificate) + key_pem


def _pem(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = certificate.public_bytes(serialization.Encoding.PEM)
    return data


def _default_bundle() -> bytes:
    """The trust bundle clients use when nothing overrides it (certifi's, else the system's)."""
    try:
        import certifi

        return Path(certifi.where()).read_bytes()
    except (ImportError, OSError):
        cafile = ssl.get_default_verify_paths().cafile
        try:
            return Path(cafile).read_bytes() if cafile else b""
        except OSError:
            return b""
