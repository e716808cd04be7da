"""How the e2b backend classifies SDK failures and retries them (no emulator needed).

The exceptions are the SDK's own classes, and the transport failures are provoked for real
against a closed port on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest

from pytest_kode.backends._e2b_errors import Kind, classify, is_retryable, to_kode_error
from pytest_kode.backends._retry import RetryExhausted, RetryPolicy, call_with_retries
from pytest_kode.backends.e2b import _MARKER_ENV, E2BSandbox, _sweep_script
from pytest_kode.errors import (
    BackendUnavailableError,
    KodeError,
    RateLimitError,
    SandboxConnectionError,
    SandboxCreateError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)

KEY = "e2b_" + "5" * 40
_ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sdk_exceptions() -> list[tuple[BaseException, Kind, type[KodeError]]]:
    import e2b

    return [
        (e2b.SandboxNotFoundException("gone"), Kind.SANDBOX_GONE, SandboxNotFoundError),
        (e2b.SandboxNotRunningException("gone"), Kind.SANDBOX_GONE, SandboxNotFoundError),
        (e2b.FileNotFoundException("nope"), Kind.FILE_NOT_FOUND, SandboxFileNotFoundError),
        (e2b.RateLimitException("slow down"), Kind.RATE_LIMITED, RateLimitError),
        (e2b.exceptions.ServiceBusyException("busy"), Kind.BUSY, SandboxConnectionError),
        (e2b.SandboxUnreachableException("no route"), Kind.TRANSPORT, SandboxConnectionError),
        (e2b.AuthenticationException("bad key"), Kind.AUTH, BackendUnavailableError),
        (e2b.TimeoutException("deadline"), Kind.TIMEOUT, SandboxConnectionError),
        (e2b.InvalidArgumentException("bad cwd"), Kind.INVALID, KodeError),
        (e2b.SandboxException("teapot", status_code=418), Kind.SDK, KodeError),
        (e2b.SandboxException("too many", status_code=429), Kind.RATE_LIMITED, RateLimitError),
        (httpx.ConnectError("refused"), Kind.TRANSPORT, SandboxConnectionError),
        (httpx.ReadTimeout("slow"), Kind.TRANSPORT, SandboxConnectionError),
        (Exception("Command ended without an end event"), Kind.OTHER, KodeError),
    ]


@pytest.mark.parametrize("index", range(14))
def test_every_sdk_failure_maps_to_one_kode_error(index: int) -> None:
    exc, kind, error_type = _sdk_exceptions()[index]
    assert classify(exc) is kind
    error = to_kode_error(exc, action="doing things", sandbox_id="sbx-1")
    assert type(error) is error_type
    text = str(error)
    assert "backend=e2b" in text and "sandbox=sbx-1" in text and "doing things" in text
    assert error.hint


def test_retryable_kinds_are_exactly_429_503_and_transport() -> None:
    retryable = {kind for exc, kind, _ in _sdk_exceptions() if is_retryable(exc)}
    assert retryable == {Kind.RATE_LIMITED, Kind.BUSY, Kind.TRANSPORT}


def test_unexplained_refusal_during_create_is_a_create_error_with_status() -> None:
    import e2b

    error = to_kode_error(
        e2b.SandboxException("404: template nope not found", status_code=404),
        action="creating",
        sandbox_id=None,
        creating=True,
    )
    assert isinstance(error, SandboxCreateError)
    assert "HTTP 404" in str(error) and "template" in str(error)


def test_the_api_key_is_scrubbed_from_messages() -> None:
    import e2b

    error = to_kode_error(
        e2b.AuthenticationException(f"key {KEY} is invalid"),
        action="creating",
        sandbox_id=None,
        secret=KEY,
    )
    assert KEY not in str(error) and "<hidden>" in str(error)


def test_attempts_are_named_when_retries_run_out() -> None:
    import e2b

    error = to_kode_error(
        e2b.RateLimitException("429"), action="creating", sandbox_id=None, attempts=3
    )
    assert "after 3 attempts" in str(error)


def test_retry_stops_at_the_bound_and_sleeps_with_growing_jittered_delays() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def always_busy() -> int:
        calls.append(1)
        raise httpx.ConnectError("refused")

    policy = RetryPolicy(attempts=4, base_delay_s=0.1, max_delay_s=0.3)
    with pytest.raises(RetryExhausted) as info:
        call_with_retries(always_busy, policy=policy, retryable=is_retryable, sleep=sleeps.append)
    assert info.value.attempts == 4 and len(calls) == 4
    assert isinstance(info.value.last, httpx.ConnectError)
    assert len(sleeps) == 3
    for n, slept in enumerate(sleeps, start=1):
        cap = min(0.3, 0.1 * 2 ** (n - 1))
        assert cap / 2 <= slept <= cap


def test_retry_returns_once_a_later_attempt_succeeds_and_never_retries_other_errors() -> None:
    import e2b

    outcomes: list[BaseException | str] = [e2b.RateLimitException("429"), "ok"]
    result = call_with_retries(
        lambda: _pop(outcomes), policy=RetryPolicy(3, 0.0), retryable=is_retryable
    )
    assert result == "ok"
    calls: list[int] = []

    def not_found() -> None:
        calls.append(1)
        raise e2b.SandboxNotFoundException("gone")

    with pytest.raises(e2b.SandboxNotFoundException):
        call_with_retries(not_found, policy=RetryPolicy(5, 0.0), retryable=is_retryable)
    assert len(calls) == 1


def _pop(outcomes: list[BaseException | str]) -> str:
    item = outcomes.pop(0)
    if isinstance(item, BaseException):
        raise item
    return item


def test_no_api_key_is_unavailable_at_init_and_says_how_to_fix() -> None:
    sandbox = E2BSandbox(api_key=None)
    with pytest.raises(BackendUnavailableError, match="E2B_API_KEY"):
        sandbox.init()
    sandbox.dispose()


def test_unreachable_api_gives_connection_error_after_the_bounded_attempts() -> None:
    # In a subprocess: the SDK's own connection retries (read from the environment at import
    # time) would otherwise multiply the attempts and make this take seconds.
    code = textwrap.dedent(
        f"""
        import httpx, pytest
        from pytest_kode.backends.e2b import _MARKER_ENV, E2BSandbox, _sweep_script
        from pytest_kode.errors import SandboxConnectionError

        class Quick(E2BSandbox):
            retry_attempts = 3
            retry_base_delay_s = 0.01

        sandbox = Quick(api_key={KEY!r}, api_url="http://127.0.0.1:{_closed_port()}")
        with pytest.raises(SandboxConnectionError, match="after 3 attempts") as info:
            sandbox.init()
        # The raw httpx error the SDK leaks is chained, never raised.
        assert isinstance(info.value.__cause__, httpx.TransportError), info.value.__cause__
        assert {KEY!r} not in str(info.value)
        sandbox.dispose()
        """
    )
    env = {**os.environ, "E2B_CONNECTION_RETRIES": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env, cwd=_ROOT)


def test_importing_the_backend_does_not_import_the_sdk() -> None:
    code = textwrap.dedent(
        """
        import sys
        import pytest_kode.backends.e2b
        import pytest_kode.backends._e2b_errors
        assert "e2b" not in sys.modules, sorted(m for m in sys.modules if m.startswith("e2b"))
        assert "httpx" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=_ROOT)


def test_the_marker_sweep_kills_every_process_carrying_the_marker() -> None:
    # Runs the in-sandbox sweep script on this machine against real processes: one carries the
    # marker and escaped its parent's session (as a daemonising child would), one does not.
    marker = uuid.uuid4().hex
    env = {**os.environ, _MARKER_ENV: marker}
    marked = subprocess.Popen(["sleep", "30"], env=env, start_new_session=True)
    unmarked = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        subprocess.run(["bash", "-c", _sweep_script(marker)], check=True, timeout=30)
        assert marked.wait(timeout=5) == -9
        assert unmarked.poll() is None
    finally:
        for proc in (marked, unmarked):
            proc.kill()
            proc.wait()
