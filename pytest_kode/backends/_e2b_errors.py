"""One place that turns what the ``e2b`` SDK raises into the pytest-kode error family.

The SDK has four exception roots (``SandboxException``, ``AuthenticationException``,
``ServiceBusyException``, ``BuildException``) and, on some paths, lets raw ``httpx`` /
``connectrpc`` / ``pyqwest`` transport errors through (e2b-sdk-facts §4). Everything is
classified here, once, so no call site can forget a case. The SDK is only imported when an
exception is being classified, by which time it is loaded anyway.
"""

from __future__ import annotations

from enum import Enum

from pytest_kode.errors import (
    BackendUnavailableError,
    KodeError,
    RateLimitError,
    SandboxConnectionError,
    SandboxCreateError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)

__all__ = [
    "Kind",
    "TemplateNotReadyError",
    "classify",
    "is_retryable",
    "retry_after_s",
    "status_of",
    "to_kode_error",
]

BACKEND = "e2b"


class TemplateNotReadyError(SandboxCreateError):
    """Create answered 404: the template does not exist, or has no finished build."""


class Kind(Enum):
    SANDBOX_GONE = "sandbox_gone"
    FILE_NOT_FOUND = "file_not_found"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    TRANSPORT = "transport"
    AUTH = "auth"
    TIMEOUT = "timeout"
    INVALID = "invalid"
    SDK = "sdk"
    OTHER = "other"


def classify(exc: BaseException) -> Kind:
    """Which kind of failure ``exc`` is; order matters (the SDK's classes overlap)."""
    import httpx
    from e2b import exceptions as ex

    if isinstance(exc, (ex.SandboxNotFoundException, ex.SandboxNotRunningException)):
        return Kind.SANDBOX_GONE
    if isinstance(exc, ex.FileNotFoundException):
        return Kind.FILE_NOT_FOUND
    if isinstance(exc, ex.RateLimitException):
        return Kind.RATE_LIMITED
    if isinstance(exc, ex.ServiceBusyException):
        return Kind.BUSY
    if isinstance(exc, ex.SandboxUnreachableException):
        return Kind.TRANSPORT
    if isinstance(exc, ex.AuthenticationException):
        return Kind.AUTH
    if isinstance(exc, ex.TimeoutException):
        return Kind.TIMEOUT
    if isinstance(exc, ex.InvalidArgumentException):
        return Kind.INVALID
    if isinstance(exc, ex.SandboxException):
        status = getattr(exc, "status_code", None)
        # REST answers the SDK did not special-case still carry their status.
        if status == 429:
            return Kind.RATE_LIMITED
        if status in (502, 503, 504):
            return Kind.BUSY
        return Kind.SDK
    if isinstance(exc, (httpx.TransportError, OSError)) or _is_raw_transport(exc):
        return Kind.TRANSPORT
    return Kind.OTHER


def _is_raw_transport(exc: BaseException) -> bool:
    # connectrpc wraps pyqwest transport failures in a ConnectError whose cause is the transport
    # error; the SDK hands that back unchanged when its health probe says the sandbox is alive.
    module = type(exc).__module__
    if module.startswith("pyqwest"):
        return True
    if module.startswith("connectrpc"):
        cause = exc.__cause__
        return cause is not None and (
            isinstance(cause, OSError) or type(cause).__module__.startswith("pyqwest")
        )
    return False


def is_retryable(exc: BaseException) -> bool:
    """429, 503 and transport failures are worth another attempt; nothing else is."""
    return classify(exc) in (Kind.RATE_LIMITED, Kind.BUSY, Kind.TRANSPORT)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an SDK exception carries, if any."""
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def retry_after_s(exc: BaseException) -> float | None:
    """The ``Retry-After`` (seconds) of the HTTP answer behind ``exc``, or None.

    The SDK drops the response's headers when it maps an error answer to an exception
    (``e2b/api/__init__.py: handle_api_exception`` keeps the status and message only), but the
    response is still a local of the SDK frame that raised. Read it from there; when the SDK
    changes shape this finds nothing and the caller falls back to its own backoff.
    """
    import email.utils
    import time

    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            headers = getattr(value, "headers", None)
            if headers is None or not isinstance(getattr(value, "status_code", None), int):
                continue
            try:
                raw = headers.get("retry-after")
            except Exception:  # noqa: BLE001 - not a header mapping after all
                continue
            if not raw:
                continue
            raw = str(raw).strip()
            if raw.isdecimal():
                return float(raw)
            try:
                moment = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                return None
            return moment.timestamp() - time.time()  # a date in the past: negative, "now"
        tb = tb.tb_next
    return None


def _describe(exc: BaseException, secret: str | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    # The SDK's texts can be long (several sentences of advice); the first line carries the fact.
    text = text.splitlines()[0][:500]
    if secret:
        text = text.replace(secret, "<hidden>")
    return f"{type(exc).__name__}: {text}"


def to_kode_error(
    exc: BaseException,
    *,
    action: str,
    sandbox_id: str | None,
    secret: str | None = None,
    attempts: int | None = None,
    path: str | None = None,
    creating: bool = False,
) -> KodeError:
    """The pytest-kode error for ``exc`` raised while doing ``action`` (caller chains it).

    ``secret`` (the API key) is scrubbed from every text; ``attempts`` says how many tries were
    made when retries ran out; ``path`` names the in-sandbox path of a file operation;
    ``creating`` turns otherwise unexplained SDK refusals into :class:`SandboxCreateError`.
    """
    if isinstance(exc, KodeError):
        return exc
    kind = classify(exc)
    detail = _describe(exc, secret)
    tried = f" after {attempts} attempts" if attempts else ""
    where = {"backend": BACKEND, "sandbox_id": sandbox_id}
    if kind is Kind.SANDBOX_GONE:
        return SandboxNotFoundError(
            f"the sandbox is gone (killed, expired or never existed) while {action} ({detail})",
            **where,
            hint="create a new sandbox; a sandbox lives for timeout_ms (extend it with "
            "set_timeout) and can be resumed only while it is running or paused",
        )
    if kind is Kind.FILE_NOT_FOUND:
        shown = repr(path) if path else "the path"
        return SandboxFileNotFoundError(
            f"{shown} does not exist in the sandbox while {action} ({detail})",
            **where,
            hint="check the path (relative paths resolve against work_dir)",
        )
    if kind is Kind.RATE_LIMITED:
        return RateLimitError(
            f"E2B kept answering 429 Too Many Requests while {action}{tried} ({detail})",
            **where,
            hint="run fewer sandboxes at once (--sandbox-max-concurrent, fewer xdist workers) "
            "or raise the concurrency limit of your E2B plan",
        )
    if kind is Kind.BUSY:
        return SandboxConnectionError(
            f"E2B stayed busy (503 service unavailable) while {action}{tried} ({detail})",
            **where,
            hint="E2B has no capacity right now; try again in a minute",
        )
    if kind is Kind.TRANSPORT:
        return SandboxConnectionError(
            f"could not reach E2B while {action}{tried} ({detail})",
            **where,
            hint="check the network and proxy settings, E2B_DOMAIN, and that the E2B API "
            "(or the emulator the api_url/sandbox_url point at) is up",
        )
    if kind is Kind.AUTH:
        return BackendUnavailableError(
            f"E2B rejected the credentials while {action} ({detail})",
            **where,
            hint="set E2B_API_KEY (or api_key=) to a valid key from "
            "https://e2b.dev/dashboard?tab=keys",
        )
    if kind is Kind.TIMEOUT:
        return SandboxConnectionError(
            f"a request to the sandbox timed out while {action} ({detail})",
            **where,
            hint="the sandbox may be overloaded or the network slow; retry, or check it with "
            "`pytest-kode ls`",
        )
    if kind is Kind.INVALID:
        return KodeError(
            f"E2B rejected the request as invalid while {action} ({detail})",
            **where,
            hint="check the arguments: paths must be valid and a cwd must be an existing "
            "directory in the sandbox",
        )
    status = getattr(exc, "status_code", None)
    status_text = f" (HTTP {status})" if status else ""
    if creating and status == 404:
        return TemplateNotReadyError(
            f"E2B has no ready template for this create{status_text} ({detail})",
            **where,
            hint="check the template name; a template whose build failed, was interrupted or "
            "still runs exists by name but cannot start sandboxes until a build finishes",
        )
    if creating:
        return SandboxCreateError(
            f"E2B refused to create the sandbox{status_text} ({detail})",
            **where,
            hint="check that the template name or ID exists for your team and that the "
            "options (timeout_ms within your plan's limit, metadata, envs) are accepted",
        )
    return KodeError(
        f"the E2B SDK failed{status_text} while {action} ({detail})",
        **where,
        hint="this is unexpected; re-run with -v and report it with the message above",
    )
