"""envd's plain HTTP endpoints: ``GET/POST /files`` (download, upload) and ``GET /health``.

Paths are in-sandbox paths: a relative one resolves against the user's home ``/home/user``
and a leading ``~`` expands to it, as envd does.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import os
import posixpath
import re
import time
import zlib
from pathlib import Path

from pytest_kode.emulator._http import Request, Response, error_response, json_response
from pytest_kode.emulator._state import WORK_DIR, EmulatedSandbox
from pytest_kode.errors import KodeError, SandboxPathError

_METADATA_HEADER = "x-metadata-"
_XATTR_PREFIX = "user.e2b."
_FILENAME = re.compile(r'filename="((?:[^"\\]|\\.)*)"')
_NAME = re.compile(r'(?<![a-z])name="((?:[^"\\]|\\.)*)"')


def sandbox_path(path: str) -> str:
    """The normalised absolute in-sandbox path for what a client sent."""
    if path == "~" or path.startswith("~/"):
        path = WORK_DIR + path[1:]
    return posixpath.normpath(posixpath.join(WORK_DIR, path or "."))


class PathRejected(Exception):
    """The path cannot be mapped into the sandbox (it would escape it)."""


def host_path(sandbox: EmulatedSandbox, path: str) -> Path:
    """Where the in-sandbox ``path`` lives on this machine (symlinks resolved).

    Raises FileNotFoundError when a parent is missing, PathRejected when it escapes.
    """
    try:
        return sandbox.local.host_path(path)
    except FileNotFoundError:
        raise
    except NotADirectoryError as exc:
        raise FileNotFoundError(f"a parent of '{path}' is not a directory") from exc
    except (KodeError, ValueError) as exc:
        raise PathRejected(
            f"path '{path}' is outside what the emulated sandbox exposes: {exc}"
        ) from exc


def resolved_path(sandbox: EmulatedSandbox, path: str) -> str:
    """The in-sandbox absolute path ``path`` leads to, symlinks resolved (FileNotFoundError
    when it dangles, PathRejected when it leaves the sandbox)."""
    target = host_path(sandbox, path)
    relative = target.relative_to(host_path(sandbox, WORK_DIR))
    return posixpath.normpath(posixpath.join(WORK_DIR, str(relative)))


async def handle(sandbox: EmulatedSandbox, request: Request) -> Response:
    """Answer ``/health`` or ``/files`` for a sandbox the router already checked."""
    if request.path == "/health":
        return Response(204)
    if request.method == "GET":
        return await asyncio.to_thread(_download, sandbox, request)
    if request.method == "POST":
        body = await request.body()
        return await asyncio.to_thread(_upload, sandbox, request, body)
    return error_response(405, f"method {request.method} is not allowed on /files")


def signature_check(sandbox: EmulatedSandbox, request: Request) -> str | None:
    """Check a ``download_url``/``upload_url`` signature (``e2b/sandbox/signature.py``).

    None when it is valid for ``sandbox``, else why not (``"expired"`` or ``"invalid"``).
    """
    signature = request.arg("signature")
    path = request.arg("path")
    if not signature or path is None:
        return "invalid"
    operation = "read" if request.method == "GET" else "write"
    raw = f"{path}:{operation}:{request.arg('username') or ''}:{sandbox.access_token}"
    expiration = request.arg("signature_expiration")
    if expiration:
        if not expiration.lstrip("-").isdigit():
            return "invalid"
        raw += f":{expiration}"
    digest = base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
    if not hmac.compare_digest(signature, f"v1_{digest}"):
        return "invalid"
    if expiration and int(expiration) < time.time():
        return "expired"
    return None


def signature_ok(sandbox: EmulatedSandbox, request: Request) -> bool:
    return signature_check(sandbox, request) is None


def _download(sandbox: EmulatedSandbox, request: Request) -> Response:
    raw = request.arg("path")
    if raw is None:
        return error_response(400, "the path query parameter is required")
    path = sandbox_path(raw)
    try:
        data = sandbox.local.fs.read_bytes(path)
    except FileNotFoundError:
        return error_response(404, f"path '{path}' does not exist")
    except SandboxPathError as exc:
        return error_response(400, str(exc))
    except (KodeError, OSError) as exc:
        # A directory, or unreadable: envd answers 400 for "not a file".
        return error_response(400, f"cannot read '{path}' as a file: {exc}")
    name = posixpath.basename(path).replace('"', "")
    return Response(
        200,
        data,
        content_type="application/octet-stream",
        headers={"content-disposition": f'inline; filename="{name}"'},
    )


def _upload(sandbox: EmulatedSandbox, request: Request, body: bytes) -> Response:
    if request.headers.get("content-encoding", "").lower() == "gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as exc:
            return error_response(400, f"the gzip upload body is corrupt: {exc}")
    content_type = request.headers.get("content-type", "")
    query_path = request.arg("path")
    if content_type.startswith("multipart/form-data"):
        try:
            files = _parse_multipart(body, content_type)
        except ValueError as exc:
            return error_response(400, f"malformed multipart upload: {exc}")
        if query_path is not None and len(files) == 1:
            files = [(query_path, files[0][1])]
    elif content_type.startswith("application/octet-stream"):
        if query_path is None:
            return error_response(400, "an octet-stream upload needs the path query parameter")
        files = [(query_path, body)]
    else:
        return error_response(
            400,
            f"unsupported upload Content-Type {content_type!r}: use multipart/form-data "
            "or application/octet-stream",
        )
    if not files:
        return error_response(400, "the upload holds no file part named 'file'")
    metadata = {
        key[len(_METADATA_HEADER) :].lower(): value
        for key, value in request.headers.items()
        if key.startswith(_METADATA_HEADER)
    }
    written = []
    for raw_path, data in files:
        path = sandbox_path(raw_path)
        try:
            sandbox.local.fs.write(path, data)  # creates parents, never leaves the sandbox
        except (KodeError, OSError) as exc:
            return error_response(400, f"cannot write '{path}': {exc}")
        try:
            target = host_path(sandbox, path)
            # Metadata lives in xattrs of files below work_dir; the sandbox's /tmp and other
            # parts of its own view have no host path here, so theirs is echoed, not kept.
            _set_metadata(target, metadata)
            # envd hands the file to the requesting user (the CHMOD event watchers see); here
            # the sandbox's user is the uid that owns the sandbox directory.
            os.chown(target, os.getuid(), os.getgid(), follow_symlinks=False)
        except (OSError, PathRejected):
            pass
        entry: dict[str, object] = {"name": posixpath.basename(path), "type": "file", "path": path}
        if metadata:
            entry["metadata"] = metadata
        written.append(entry)
    return json_response(200, written)


def _set_metadata(target: Path, metadata: dict[str, str]) -> None:
    # An upload replaces the file, metadata included: stale keys go even when none are sent.
    for key in read_metadata(target):
        try:
            os.removexattr(target, _XATTR_PREFIX + key, follow_symlinks=False)
        except OSError:
            pass
    for key, value in metadata.items():
        try:
            os.setxattr(target, _XATTR_PREFIX + key, value.encode())
        except OSError:
            pass  # file system without user xattrs: metadata is echoed, not persisted


def read_metadata(target: Path) -> dict[str, str]:
    """The ``user.e2b.*`` metadata stored on ``target`` (empty when xattrs are unsupported)."""
    try:
        names = os.listxattr(target, follow_symlinks=False)
    except OSError:
        return {}
    found = {}
    for name in names:
        if name.startswith(_XATTR_PREFIX):
            try:
                value = os.getxattr(target, name, follow_symlinks=False)
            except OSError:
                continue
            found[name[len(_XATTR_PREFIX) :]] = value.decode("utf-8", "replace")
    return found


def _parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise ValueError("the Content-Type has no boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    files = []
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n")
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part has no header/body separator")
        data = data.removesuffix(b"\r\n")
        disposition = next(
            (
                line.split(":", 1)[1]
                for line in head.decode("utf-8", "replace").split("\r\n")
                if line.lower().startswith("content-disposition:")
            ),
            "",
        )
        name = _NAME.search(disposition)
        filename = _FILENAME.search(disposition)
        if name is None or _unescape(name.group(1)) != "file" or filename is None:
            continue
        files.append((_unescape(filename.group(1)), data))
    return files


def _unescape(value: str) -> str:
    # httpx percent-escapes '"' in multipart parameters and backslash-escapes '\'.
    return re.sub(r"\\(.)", r"\1", value).replace("%22", '"')
