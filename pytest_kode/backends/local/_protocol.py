"""The wire format between the host and a local sandbox's agent: a sans-I/O frame codec.

This module does no I/O and imports only the standard library, because the same text is also
executed inside the sandbox as the first half of the agent's source (see
:func:`pytest_kode.backends.local._agent.agent_source`): both ends share one definition.

Frames
------
Every frame is a 9-byte header followed by ``length`` payload bytes::

    >I length   payload bytes that follow (at most MAX_PAYLOAD)
    >I stream   the request it belongs to; chosen by the client, unique per connection, > 0
    >B kind     one of the K_* constants below

Payloads are either raw bytes (``K_STDIN``, ``K_STDOUT``, ``K_STDERR``) or a JSON object,
optionally followed by a NUL byte and a binary blob (JSON text never contains a raw NUL, so the
first NUL splits them): :func:`pack` / :func:`unpack`. Small control messages are JSON; output
and file data travel as raw bytes.

Conversation
------------
The client opens a stream with one ``K_REQUEST`` (``{"op": ..., ...}``); the agent answers on
the same stream id and ends the stream with exactly one of ``K_EXIT``, ``K_REPLY`` or
``K_ERROR``. Many streams may be open on one connection at once; frames of different streams
interleave. Operations (JSON fields; ``blob`` is the binary part):

``run`` ``{argv, cwd, env, timeout_ms, stdin: "none"|"data"|"pipe", pty: {rows, cols}|null,
    tag, started: bool, own: bool, batch: bool}`` (blob: the stdin data for ``"data"``) — spawn
    ``argv`` in its own session. Answers ``K_STARTED {"pid"}`` (unless ``started`` is false), then ``K_STDOUT`` /
    ``K_STDERR`` chunks as they arrive, then ``K_EXIT {"exit_code", "timed_out", "signal",
    "duration_ms"}``. With ``stdin: "pipe"`` the client sends ``K_STDIN`` chunks and
    ``K_STDIN_EOF`` on the same stream. ``timeout_ms`` 0 means none; at the timeout the whole
    process group is killed and the exit code is 124. After the main process exits the agent
    drains the pipes for a short moment, then ends the stream even if a daemon keeps them open.
    With ``own`` the process (group and descendants) is killed when this connection closes
    before it ended (a client that gave up on a foreground command). With ``batch`` the output
    frames are held (up to 64 KiB, then streamed) and sent with ``K_EXIT`` in one write: a
    client that only wants the result wakes once.
``input`` ``{pid, eof}`` (blob: data) — write to (or close) the stdin of a process started
    with ``stdin: "pipe"`` from any connection.
``signal`` ``{pid, signum}`` — signal a process started by ``run`` and its process group.
``attach`` ``{pid}`` — stream that process's further output and its ``K_EXIT`` here.
``resize`` ``{pid, rows, cols}`` — resize a PTY process's terminal.
``ps`` — ``K_REPLY {"processes": [{pid, argv, cwd, tag, pty, env}]}``: running processes
    started by ``run``.
``stat`` / ``lstat`` ``{path}``, ``list`` ``{path, depth}``, ``read`` ``{path, limit}``
    (reply blob: the bytes), ``write`` ``{path, mode}`` (blob: the bytes; parents are created),
    ``mkdir`` ``{path}``, ``remove`` ``{path}``, ``rename`` ``{src, dst}``, ``glob``
    ``{pattern}`` — file operations done by the agent, as the sandbox's user in its view.
``socket`` ``{family: 4|6}`` — ``K_REPLY {}`` carrying, as SCM_RIGHTS ancillary data on its
    first byte, a new TCP socket made in the sandbox's network namespace (the host connects it to
    a port inside; see :mod:`._network`). Ask on an otherwise idle connection.
``deadline`` ``{at}`` — the sandbox ends (every process killed, the agent exits) at Unix time
    ``at``.
``reset`` ``{at, wipe: {path: mode}}`` — make the sandbox as new for a next user (the agent
    must be its pid namespace's init): every other connection dropped, every process killed and
    reaped, each ``wipe`` directory emptied (but for what is mounted in it) and given ``mode``,
    ``/dev`` as bwrap made it and ``/dev/shm`` empty, the deadline moved to ``at``.
    ``K_REPLY {"left": [...]}`` names what stands in the way (sockets left in the network
    namespace, System V IPC objects, a process that would not die): the host disposes of the
    sandbox instead when ``left`` is not empty.
``ping`` — ``K_REPLY {"pid", "version"}``. ``shutdown`` — kill everything and exit.

Errors are ``K_ERROR {"type", "message", "errno", "path"}``; ``type`` is ``"os"`` (an
``OSError``; ``errno`` set), ``"special"`` (a FIFO, socket or device refused), ``"too_large"``
(a read above the limit), ``"not_found"`` (no such process) or ``"bad_request"``.
"""

from __future__ import annotations

import struct

VERSION = 1
HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 64 * 1024 * 1024
CHUNK = 64 * 1024

# client -> agent
K_REQUEST = 1
K_STDIN = 2
K_STDIN_EOF = 3
# agent -> client
K_STARTED = 16
K_STDOUT = 17
K_STDERR = 18
K_EXIT = 19
K_REPLY = 20
K_ERROR = 21

FINAL_KINDS = frozenset({K_EXIT, K_REPLY, K_ERROR})
JSON_KINDS = frozenset({K_REQUEST, K_STARTED, K_EXIT, K_REPLY, K_ERROR})

_pack_header = HEADER.pack


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


try:
    # JSON through its C accelerator directly: the json package imports re and enum, which
    # would double the agent's start-up (measured: 7 -> 15 ms of CPU per sandbox).
    import _json

    class _Context:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = float  # "NaN", "Infinity"
        memo: dict[str, str] = {}

    _scan = _json.make_scanner(_Context())  # type: ignore[arg-type]

    def _unencodable(value: object) -> object:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")

    _encode = _json.make_encoder(
        None, _unencodable, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )

    def _dumps(value: dict[str, object]) -> bytes:
        return "".join(_encode(value, 0)).encode("ascii")

    def _loads(text: bytes) -> object:
        source = text.decode("utf-8")
        try:
            value, end = _scan(source, 0)
        except StopIteration:
            raise ValueError("not a JSON value") from None
        if end != len(source):
            raise ValueError(f"extra data at {end}")
        return value

except ImportError:  # an interpreter without the accelerator
    import json

    def _dumps(value: dict[str, object]) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("ascii")

    def _loads(text: bytes) -> object:
        return json.loads(text)


def frame(stream: int, kind: int, payload: bytes = b"") -> bytes:
    """One encoded frame."""
    return _pack_header(len(payload), stream, kind) + payload


def pack(message: dict[str, object], blob: bytes = b"") -> bytes:
    """A JSON payload, with ``blob`` appended after a NUL when non-empty."""
    text = _dumps(message)
    return text + b"\0" + blob if blob else text


def unpack(payload: bytes) -> tuple[dict[str, object], bytes]:
    """The JSON object and the blob of a :func:`pack` payload."""
    split = payload.find(b"\0")
    text, blob = (payload, b"") if split < 0 else (payload[:split], payload[split + 1 :])
    try:
        message = _loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a frame's JSON payload does not parse: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a frame's JSON payload is not an object")
    return message, blob


def message(stream: int, kind: int, body: dict[str, object], blob: bytes = b"") -> bytes:
    """One encoded frame with a :func:`pack` payload."""
    return frame(stream, kind, pack(body, blob))


class Decoder:
    """Turns received bytes into ``(stream, kind, payload)`` frames.

    Feed whatever the transport delivered with :meth:`feed`; it returns the frames completed so
    far (possibly none) and keeps a partial frame for the next call.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        if not buffer and len(data) >= HEADER_SIZE:
            # The common case, one or more whole frames in one read: slice without copying in.
            frames, used = self._scan(data)
            if used < len(data):
                buffer += data[used:]
            return frames
        buffer += data
        frames, used = self._scan(buffer)
        if used:
            del buffer[:used]
        return frames

    @staticmethod
    def _scan(data: bytes | bytearray) -> tuple[list[tuple[int, int, bytes]], int]:
        frames: list[tuple[int, int, bytes]] = []
        offset = 0
        end = len(data)
        unpack_from = HEADER.unpack_from
        while end - offset >= HEADER_SIZE:
            length, stream, kind = unpack_from(data, offset)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"a frame announces {length} bytes, above {MAX_PAYLOAD}")
            start = offset + HEADER_SIZE
            if end - start < length:
                break
            frames.append((stream, kind, bytes(data[start : start + length])))
            offset = start + length
        return frames, offset

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)
