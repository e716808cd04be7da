"""The local backend's wire format (:mod:`pytest_kode.backends.local._protocol`) and its agent
(:mod:`pytest_kode.backends.local._agent`), spoken to over a real Unix socket by hand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kode.backends.local import _agent
from pytest_kode.backends.local import _protocol as protocol


def test_frames_round_trip_through_any_split() -> None:
    frames = [
        protocol.message(1, protocol.K_REQUEST, {"op": "run", "argv": ["true"]}),
        protocol.frame(1, protocol.K_STDIN, b"\0binary\xff"),
        protocol.message(7, protocol.K_REPLY, {"size": 3}, b"a\0c"),
        protocol.frame(9, protocol.K_STDIN_EOF),
    ]
    wire = b"".join(frames)
    for step in (1, 2, 5, 9, len(wire)):
        decoder = protocol.Decoder()
        got = []
        for start in range(0, len(wire), step):
            got += decoder.feed(wire[start : start + step])
        assert decoder.pending == 0
        assert [(stream, kind) for stream, kind, _ in got] == [
            (1, protocol.K_REQUEST),
            (1, protocol.K_STDIN),
            (7, protocol.K_REPLY),
            (9, protocol.K_STDIN_EOF),
        ]
        assert got[1][2] == b"\0binary\xff"
        assert protocol.unpack(got[2][2]) == ({"size": 3}, b"a\0c")
        assert protocol.unpack(got[0][2]) == ({"op": "run", "argv": ["true"]}, b"")


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(protocol.ProtocolError, match="announces"):
        protocol.Decoder().feed(protocol.HEADER.pack(protocol.MAX_PAYLOAD + 1, 1, 1))
    with pytest.raises(protocol.ProtocolError, match="does not parse"):
        protocol.unpack(b"{not json")
    with pytest.raises(protocol.ProtocolError, match="not an object"):
        protocol.unpack(b"[1]")


class _Peer:
    """A hand-driven client of a real agent process."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(address)
        self.decoder = protocol.Decoder()
        self.backlog: list[tuple[int, int, bytes]] = []
        self.next_stream = 1

    def send(self, body: dict[str, object], blob: bytes = b"") -> int:
        stream = self.next_stream
        self.next_stream += 1
        self.sock.sendall(protocol.message(stream, protocol.K_REQUEST, body, blob))
        return stream

    def collect(self, stream: int) -> list[tuple[int, bytes]]:
        got: list[tuple[int, bytes]] = []
        while True:
            mine = [entry for entry in self.backlog if entry[0] == stream]
            self.backlog = [entry for entry in self.backlog if entry[0] != stream]
            for _, kind, payload in mine:
                got.append((kind, payload))
                if kind in protocol.FINAL_KINDS:
                    return got
            data = self.sock.recv(1 << 20)
            assert data, "the agent closed the connection"
            self.backlog += self.decoder.feed(data)

    def first(self, stream: int, kind: int) -> bytes:
        """Wait for the first frame of ``kind`` on ``stream``, keeping the rest for later."""
        while True:
            for index, entry in enumerate(self.backlog):
                if entry[:2] == (stream, kind):
                    del self.backlog[index]
                    return entry[2]
            data = self.sock.recv(1 << 20)
            assert data, "the agent closed the connection"
            self.backlog += self.decoder.feed(data)

    def call(self, body: dict[str, object], blob: bytes = b"") -> list[tuple[int, bytes]]:
        return self.collect(self.send(body, blob))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[_Peer, Path]]:
    address = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(16)
    argv = [sys.executable, *_agent.AGENT_ARGV]
    argv += [str(listener.fileno()), str(time.time() + 60), "1000", str(tmp_path)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=[listener.fileno()],
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(_agent.agent_source())
    proc.stdin.close()
    assert proc.stdout.readline().startswith(b"ready ")
    listener.close()
    peer = _Peer(address)
    try:
        yield peer, tmp_path
    finally:
        peer.call({"op": "shutdown"})
        assert proc.wait(10) == 0
        proc.stdout.close()
        peer.sock.close()


ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _exit(frames: list[tuple[int, bytes]]) -> dict[str, object]:
    kind, payload = frames[-1]
    assert kind == protocol.K_EXIT, frames
    return protocol.unpack(payload)[0]


def _stream(frames: list[tuple[int, bytes]], kind: int) -> bytes:
    return b"".join(payload for frame_kind, payload in frames if frame_kind == kind)


def test_the_agent_runs_commands_with_output_exit_code_and_stdin(agent: tuple[_Peer, Path]) -> None:
    peer, directory = agent
    frames = peer.call(
        {
            "op": "run",
            "argv": ["bash", "-c", "cat; pwd; echo err >&2; exit 3"],
            "env": ENV,
            "cwd": str(directory),
            "stdin": "data",
        },
        b"input\n",
    )
    assert frames[0][0] == protocol.K_STARTED
    assert _stream(frames, protocol.K_STDOUT) == f"input\n{directory}\n".encode()
    assert _stream(frames, protocol.K_STDERR) == b"err\n"
    assert _exit(frames)["exit_code"] == 3


def test_the_agent_times_out_the_whole_group_and_streams_requests_in_parallel(
    agent: tuple[_Peer, Path],
) -> None:
    peer, _ = agent
    slow = peer.send(
        {
            "op": "run",
            "argv": ["bash", "-c", "echo early; sleep 30 & sleep 30"],
            "env": ENV,
            "timeout_ms": 300,
            "started": False,
        }
    )
    fast = peer.send({"op": "run", "argv": ["echo", "fast"], "env": ENV, "started": False})
    fast_frames = peer.collect(fast)
    assert _stream(fast_frames, protocol.K_STDOUT) == b"fast\n"
    slow_frames = peer.collect(slow)
    end = _exit(slow_frames)
    assert end["exit_code"] == 124 and end["timed_out"] is True
    assert _stream(slow_frames, protocol.K_STDOUT) == b"early\n"
    assert peer.call({"op": "ps"})[-1][0] == protocol.K_REPLY


def test_the_agent_feeds_stdin_signals_and_lists_processes(agent: tuple[_Peer, Path]) -> None:
    peer, _ = agent
    stream = peer.send(
        {
            "op": "run",
            "argv": ["bash", "-c", "read line; echo got $line; sleep 30"],
            "env": ENV,
            "stdin": "pipe",
            "tag": "reader",
        }
    )
    peer.sock.sendall(protocol.frame(stream, protocol.K_STDIN, b"hello\n"))
    assert peer.first(stream, protocol.K_STDOUT) == b"got hello\n"
    listed = protocol.unpack(peer.call({"op": "ps"})[-1][1])[0]["processes"]
    assert isinstance(listed, list) and [entry["tag"] for entry in listed] == ["reader"]
    pid = listed[0]["pid"]
    assert peer.call({"op": "signal", "pid": pid, "signum": 15})[-1][0] == protocol.K_REPLY
    frames = peer.collect(stream)
    assert _exit(frames)["exit_code"] == 128 + 15
    missing = peer.call({"op": "signal", "pid": pid, "signum": 15})[-1]
    assert missing[0] == protocol.K_ERROR
    assert protocol.unpack(missing[1])[0]["type"] == "not_found"


def test_the_agent_refuses_special_files_and_large_reads(agent: tuple[_Peer, Path]) -> None:
    peer, directory = agent
    os.mkfifo(directory / "fifo")
    for path in (directory / "fifo", Path("/dev/zero")):
        kind, payload = peer.call({"op": "read", "path": str(path)})[-1]
        assert kind == protocol.K_ERROR
        error = protocol.unpack(payload)[0]
        assert error["type"] == "special" and str(path) in str(error["message"])
    (directory / "big").write_bytes(b"x" * 1001)  # the fixture's limit is 1000
    kind, payload = peer.call({"op": "read", "path": str(directory / "big")})[-1]
    assert protocol.unpack(payload)[0]["type"] == "too_large"
    assert peer.call({"op": "write", "path": str(directory / "a/b.txt")}, b"data")[-1][0] == (
        protocol.K_REPLY
    )
    kind, payload = peer.call({"op": "read", "path": str(directory / "a/b.txt")})[-1]
    assert protocol.unpack(payload) == ({"size": 4}, b"data")


def test_a_batch_run_holds_small_output_until_the_exit_and_streams_big_output(
    agent: tuple[_Peer, Path],
) -> None:
    peer, directory = agent
    stream = peer.send(
        {
            "op": "run",
            "argv": ["bash", "-c", "echo first; sleep 0.2; touch done; echo second >&2"],
            "env": ENV,
            "cwd": str(directory),
            "started": False,
            "batch": True,
        }
    )
    # Held: by the time the first output arrives, the command has ended.
    assert peer.first(stream, protocol.K_STDOUT) == b"first\n"
    assert (directory / "done").exists()
    frames = peer.collect(stream)
    assert _stream(frames, protocol.K_STDERR) == b"second\n"
    assert _exit(frames)["exit_code"] == 0
    # Beyond what is held (64 KiB), the output streams: all of it arrives, in order.
    big = peer.call(
        {
            "op": "run",
            "argv": ["bash", "-c", "seq 1 100000"],
            "env": ENV,
            "started": False,
            "batch": True,
        }
    )
    expected = "".join(f"{number}\n" for number in range(1, 100001)).encode()
    assert _stream(big, protocol.K_STDOUT) == expected
    assert _exit(big)["exit_code"] == 0


def test_the_agent_hands_over_sockets_made_in_its_network(agent: tuple[_Peer, Path]) -> None:
    from pytest_kode.backends.local._client import AgentClient

    peer, _ = agent
    # Without isolation the agent's network is the host's: a host listener is reached.
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = AgentClient(peer.sock.getpeername())
        try:
            made = client.inner_socket(socket.AF_INET)
            with made:
                assert made.family == socket.AF_INET and made.type == socket.SOCK_STREAM
                assert not made.get_inheritable()
                made.connect(server.getsockname())
                accepted, _ = server.accept()
                accepted.close()
            six = client.inner_socket(socket.AF_INET6)
            assert six.family == socket.AF_INET6
            six.close()
        finally:
            client.close()
