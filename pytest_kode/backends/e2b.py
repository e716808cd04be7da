"""The ``e2b`` backend: E2B cloud micro-VMs through the official ``e2b`` SDK (SPEC 2.2).

Only the SDK talks to E2B, and it is imported inside the functions that need it: importing this
module stays cheap, so the pytest plugin can load it at collection time. Every SDK failure goes
through :func:`pytest_kode.backends._e2b_errors.to_kode_error`; create, connect and the start of a
command retry with jittered backoff on 429 / 503 / transport errors.
"""

from __future__ import annotations

import builtins
import logging
import math
import posixpath
import shlex
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from pytest_kode._threads import call_interruptibly, start_thread
from pytest_kode.backends._e2b_errors import Kind, classify, is_retryable, to_kode_error
from pytest_kode.backends._e2b_resilience import (
    CREATE_KEY_TAG,
    cloud_delay,
    kill_orphans,
    may_have_created,
)
from pytest_kode.backends._retry import (
    RetryExhausted,
    RetryPolicy,
    call_with_retries,
    call_within,
)
from pytest_kode.errors import (
    BackendUnavailableError,
    ConfigError,
    KodeError,
    SandboxConnectionError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)
from pytest_kode.options import SandboxOptions, TemplateSpec
from pytest_kode.sandbox import (
    TIMEOUT_EXIT_CODE,
    BoundedOutput,
    ExecResult,
    FileEntry,
    ProcessHandle,
    Sandbox,
    SandboxFS,
    check_call_args,
)

if TYPE_CHECKING:
    from e2b import Sandbox as SdkSandbox
    from e2b.connection_config import ApiParams
    from e2b.sandbox.filesystem.filesystem import EntryInfo
    from e2b.sandbox_sync.commands.command_handle import CommandHandle

__all__ = ["E2BSandbox"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Every command carries this variable; whatever it starts inherits it, so a timed-out or killed
# command's whole tree can be found and killed even after envd already killed its root process
# and the children were re-parented.
_MARKER_ENV = "KODE_EXEC_ID"
# How long to wait for a process's stream to end after it was killed.
_KILL_SETTLE_S = 5.0
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# The home of E2B's default user, which every E2B template has (and the emulator's): a work_dir
# there needs no MakeDir round trip after create. Should a template lack it, the first command
# that runs there creates it (see _start_command).
# How long a failed create looks for a sandbox that an attempt with a lost answer made.
_ORPHAN_SEARCH_S = 5.0
_TEMPLATE_HOME = "/home/user"


def _sweep_script(marker: str) -> str:
    # Two passes: a process may fork between the scan and the kill of the first pass.
    needle = shlex.quote(f"{_MARKER_ENV}={marker}")
    scan = (
        "for f in /proc/[0-9]*/environ; do "
        f'if grep -qzx -- {needle} "$f" 2>/dev/null; then '
        'p=${f#/proc/}; kill -9 "${p%/environ}" 2>/dev/null; fi; done'
    )
    return f"{scan}; {scan}; true"


class E2BSandbox(Sandbox):
    """A sandbox in E2B's cloud, driven through the official ``e2b`` SDK.

    ``api_url`` / ``sandbox_url`` point the SDK at another control plane / sandbox daemon (the
    loopback emulator); they are passed to the SDK per call, never through ``os.environ``.
    The API key comes from ``options.api_key`` (``E2B_API_KEY`` by default) and is never shown.
    ``lease_ms``, when given, is the lifetime a new sandbox starts with instead of ``timeout_ms``
    (the pytest layer's heartbeat renews it while the run lives).
    """

    backend: ClassVar[str] = "e2b"
    #: Tries in all (first attempt included) for create, connect and starting a command.
    retry_attempts: ClassVar[int] = 4
    #: Backoff before the n-th retry is drawn from [base * 2**(n-1) / 2, base * 2**(n-1)].
    retry_base_delay_s: ClassVar[float] = 0.2
    retry_max_delay_s: ClassVar[float] = 5.0
    #: How long a create keeps retrying 429/503/409/transport failures (honouring Retry-After).
    create_window_s: ClassVar[float] = 60.0
    #: How long a kill or a set_timeout keeps retrying them.
    control_window_s: ClassVar[float] = 15.0

    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        api_url: str | None = None,
        sandbox_url: str | None = None,
        lease_ms: int | None = None,
        pace: Callable[[], object] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(options, **fields)
        self._lease_ms = lease_ms
        # Called before every create attempt: the run's create pacer (lifecycle.pacing).
        self._pace = pace
        self.kill_error: KodeError | None = None
        """Why disposing could not kill the sandbox (it runs on until its lifetime ends), or None.
        dispose() itself stays quiet; the pytest layer reports this in the run's summary."""
        self._deadline: float | None = None
        self._api_url = api_url
        self._sandbox_url = sandbox_url
        self._sdk: SdkSandbox | None = None
        self._fs: _E2BFS | None = None
        self._processes: list[_E2BProcess] = []
        self._host_urls: dict[int, str] = {}  # per port, under a loopback emulator
        self._work_dir_made = False

    # -- plumbing ---------------------------------------------------------------------------
    def _secret(self) -> str | None:
        key = self.options.api_key
        return key.get_secret_value() if key is not None else None

    def _api_params(self) -> ApiParams:
        secret = self._secret()
        if not secret:
            raise BackendUnavailableError(
                "no E2B API key is configured",
                backend=self.backend,
                sandbox_id=self._sandbox_id,
                hint="set the E2B_API_KEY environment variable (or pass api_key=...) to a key "
                "from https://e2b.dev/dashboard?tab=keys, or use the local backend",
            )
        # retries=0: the SDK would otherwise retry 429/503 on its own (up to 3 times, backing
        # off up to 10 s each), hiding the real attempt count behind ours.
        params: ApiParams = {"api_key": secret, "retries": 0}
        if self.options.domain:
            params["domain"] = self.options.domain
        if self._api_url:
            params["api_url"] = self._api_url
        if self._sandbox_url:
            params["sandbox_url"] = self._sandbox_url
        return params

    def _delay_for(self, *, creating: bool = False) -> Callable[[BaseException, int], float | None]:
        def delay(exc: BaseException, retry_number: int) -> float | None:
            return cloud_delay(
                exc, retry_number, creating=creating, transport_attempts=self.retry_attempts
            )

        return delay

    def _policy(self) -> RetryPolicy:
        return RetryPolicy(self.retry_attempts, self.retry_base_delay_s, self.retry_max_delay_s)

    def _error(self, exc: BaseException, action: str, **extra: Any) -> KodeError:
        return to_kode_error(
            exc, action=action, sandbox_id=self._sandbox_id, secret=self._secret(), **extra
        )

    def _call(
        self,
        fn: Callable[[], _T],
        action: str,
        *,
        retry: bool = False,
        path: str | None = None,
        creating: bool = False,
    ) -> _T:
        """Run one SDK call; every failure leaves as a KodeError chained to the SDK's."""
        try:
            if retry:
                return call_within(fn, window_s=self.control_window_s, delay_for=self._delay_for())
            return fn()
        except RetryExhausted as exc:
            raise self._error(
                exc.last, action, attempts=exc.attempts, path=path, creating=creating
            ) from exc.last
        except KodeError:
            raise
        except Exception as exc:
            raise self._error(exc, action, path=path, creating=creating) from exc

    @property
    def _live(self) -> SdkSandbox:
        self._require_live()
        assert self._sdk is not None
        return self._sdk

    def _lifetime_s(self, timeout_ms: int) -> int:
        return max(1, math.ceil(timeout_ms / 1000))

    def _template_name(self) -> str:
        """The E2B template to create from; a TemplateSpec was built (and replaced by its
        name) by the template layer before ``_create`` (SPEC 5)."""
        template = self.options.template
        if isinstance(template, TemplateSpec):
            raise ConfigError(
                "a TemplateSpec reached the e2b backend unbuilt; create sandboxes through "
                "Sandbox.init() or the pytest fixtures, which build it first",
                backend=self.backend,
            )
        return template

    # -- life-cycle -------------------------------------------------------------------------
    def _create(self) -> None:
        from e2b import Sandbox as SdkSandboxCls

        params = self._api_params()
        template = self._template_name()
        options = self.options
        # One key for all attempts: if a create went through but its answer was lost, the API
        # hands back the same sandbox instead of starting a second one. The key is also a tag,
        # so a sandbox made by an attempt whose answer never came can be found and killed.
        key = str(uuid.uuid4())
        action = f"creating a sandbox from template {template!r}"
        failures: list[BaseException] = []
        retry_delay = self._delay_for(creating=True)

        def delay_for(exc: BaseException, retry_number: int) -> float | None:
            failures.append(exc)
            return retry_delay(exc, retry_number)

        try:
            sdk = call_within(
                lambda: SdkSandboxCls.create(
                    template=template,
                    timeout=self._lifetime_s(self._lease_ms or options.timeout_ms),
                    metadata={**options.metadata, CREATE_KEY_TAG: key},
                    envs=dict(options.envs),
                    allow_internet_access=options.allow_internet_access,
                    idempotency_key=key,
                    **params,
                ),
                window_s=self.create_window_s,
                delay_for=delay_for,
                before_attempt=self._pace,
            )
        except RetryExhausted as exc:
            orphans = self._kill_orphans(key, params, failures)
            raise self._error(
                exc.last, action + orphans, attempts=exc.attempts, creating=True
            ) from exc.last
        except KodeError:
            raise
        except Exception as exc:
            orphans = self._kill_orphans(key, params, failures)
            raise self._error(exc, action + orphans, creating=True) from exc
        self._sdk = sdk
        self._sandbox_id = sdk.sandbox_id
        self._deadline = time.time() + options.timeout_ms / 1000
        if posixpath.normpath(options.work_dir) == _TEMPLATE_HOME:
            return  # one round trip in the common case: the template has it
        try:
            self._make_work_dir()
        except BaseException:
            # init() failed half-way: the caller never gets a handle, so nobody else could
            # dispose of the sandbox we just started.
            self._kill_quietly()
            self._sdk = None
            raise

    def _make_work_dir(self) -> None:
        sdk = self._sdk
        assert sdk is not None
        work_dir = self.options.work_dir
        self._call(
            lambda: sdk.files.make_dir(work_dir), f"creating work_dir {work_dir!r}", path=work_dir
        )
        self._work_dir_made = True

    def _connect(self) -> None:
        from e2b import Sandbox as SdkSandboxCls

        params = self._api_params()
        sandbox_id = self.options.sandbox_id
        assert sandbox_id is not None
        lifetime = self._lifetime_s(self.options.timeout_ms)
        sdk = self._call(
            lambda: SdkSandboxCls.connect(sandbox_id, timeout=lifetime, **params),
            "connecting to the sandbox",
            retry=True,
        )
        self._sdk = sdk
        self._sandbox_id = sdk.sandbox_id
        # connect only ever extends a running sandbox's lifetime; we want exactly ours.
        self._call(lambda: sdk.set_timeout(lifetime), "re-applying timeout_ms after connect")
        self._deadline = time.time() + self.options.timeout_ms / 1000

    def _kill_orphans(self, key: str, params: ApiParams, failures: list[BaseException]) -> str:
        """Kill what the failed create with ``key`` may have made; a note for the error."""
        if not any(may_have_created(exc) for exc in failures):
            return ""  # every attempt was turned away or never sent: nothing can exist
        try:
            # A create whose answer was lost may still be under way and not listed yet: look
            # again for a while (the cloud boots a sandbox within seconds) before giving up.
            deadline = time.monotonic() + _ORPHAN_SEARCH_S
            while not (killed := kill_orphans(key, dict(params))):
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        except Exception as exc:
            return (
                f" (and the search for a sandbox a lost answer may have left failed: "
                f"{self._error(exc, 'listing sandboxes').message}; `pytest-kode gc` finds it)"
            )
        if not killed:
            return ""
        return f" (killed {', '.join(killed)}, made by an attempt whose answer was lost)"

    def _kill_quietly(self) -> None:
        sdk = self._sdk
        if sdk is None:
            return
        try:
            sdk.kill()  # False, not an error, when it is gone already
        except Exception as exc:
            # dispose() must not raise (it runs in teardown paths), but the sandbox may still be
            # running until its lease or timeout ends it: kept for the run's summary to say so.
            self.kill_error = self._error(exc, "disposing (killing the sandbox)")
            _log.debug("e2b: kill of sandbox %s failed: %s", self._sandbox_id, self.kill_error)

    def _dispose(self) -> None:
        sdk = self._sdk
        if sdk is not None:
            try:
                # Retried through 429/503: one refused DELETE must not leave it running for its
                # lease. A sandbox already gone answers False, which is fine.
                self._call(
                    lambda: call_within(
                        sdk.kill, window_s=self.control_window_s, delay_for=self._delay_for()
                    ),
                    "disposing (killing the sandbox)",
                )
            except KodeError as exc:
                # dispose() stays quiet (it runs in teardown paths); the caller counts the leak.
                self.kill_error = exc
                _log.debug("e2b: kill of sandbox %s failed: %s", self._sandbox_id, exc)
        for process in self._processes:
            process._join(1.0)
        self._processes.clear()

    @property
    def deadline(self) -> float | None:
        """When the sandbox's lifetime (``timeout_ms``, or the last ``set_timeout``) ends, in
        Unix seconds; a lease (see :meth:`lease`) never moves it."""
        return self._deadline

    def set_timeout(self, timeout_ms: int) -> None:
        """Give the sandbox ``timeout_ms`` more to live (retried through 429/503)."""
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or timeout_ms <= 0:
            raise ConfigError(f"set_timeout(timeout_ms=...) needs an int > 0, got {timeout_ms!r}")
        sdk = self._live
        lifetime = self._lifetime_s(timeout_ms)
        self._call(
            lambda: call_within(
                lambda: sdk.set_timeout(lifetime),
                window_s=self.control_window_s,
                delay_for=self._delay_for(),
            ),
            "setting the sandbox timeout",
        )
        self._deadline = time.time() + timeout_ms / 1000

    def lease(self, lease_ms: int) -> None:
        """Let the VM run ``lease_ms`` more without moving :attr:`deadline`.

        The plugin's heartbeat renews held sandboxes this way, never past their deadline, so a
        killed run's sandboxes end within one lease while a live run's end at ``timeout_ms``.
        One try with a short request timeout: a stalled call must not outlast the lease, and
        the next beat tries again.
        """
        sdk = self._live
        lifetime = self._lifetime_s(lease_ms)
        request_timeout = max(2.0, lease_ms / 6000)
        self._call(
            lambda: sdk.set_timeout(lifetime, request_timeout=request_timeout),
            "renewing the sandbox lease",
        )

    def is_alive(self) -> bool:
        if self._disposed or not self._initialized or self._sdk is None:
            return False
        sdk = self._sdk
        try:
            return bool(sdk.is_running())
        except Exception as exc:
            if classify(exc) is Kind.SANDBOX_GONE:
                return False
            raise self._error(exc, "checking whether the sandbox is alive") from exc

    def get_host_url(self, port: int) -> str:
        """A URL reaching ``port`` inside the sandbox: ``https://`` + the SDK's ``get_host``.

        When the SDK talks to a plain-http loopback ``sandbox_url`` (the loopback emulator),
        E2B's per-sandbox host names do not resolve: the emulator is asked, with that host name
        in the ``Host`` header, where ``<port>-<sandbox id>`` leads (a forwarded port of the
        host's 127.0.0.1 into that sandbox's own network). A loopback daemon that does not
        answer so (the SDK's debug mode) shares the host's network: ``http://127.0.0.1:port``.
        """
        port = self._port_arg(port)
        sdk = self._live
        host = sdk.get_host(port)
        if self._sandbox_url_is_loopback():
            known = self._host_urls.get(port)
            if known is None:
                known = self._host_urls[port] = self._routed_url(host) or f"http://127.0.0.1:{port}"
            return known
        scheme = "http" if sdk.connection_config.debug else "https"
        return f"{scheme}://{host}"

    def _routed_url(self, host: str) -> str | None:
        import http.client
        import os

        url = urlsplit(self._sandbox_url or os.environ.get("E2B_SANDBOX_URL", ""))
        connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
        try:
            connection.request("GET", "/", headers={"Host": host})
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()
        if response.status == 502:
            raise SandboxNotFoundError(
                f"cannot get a host URL: sandbox {self._sandbox_id} is gone",
                backend=self.backend,
                sandbox_id=self._sandbox_id,
                hint="it ended (timeout_ms) or was killed; create a new sandbox",
            )
        location = response.getheader("location") if response.status == 307 else None
        if not location:
            return None
        routed = urlsplit(location)
        return f"{routed.scheme}://{routed.netloc}"

    def _sandbox_url_is_loopback(self) -> bool:
        import os

        url = self._sandbox_url or os.environ.get("E2B_SANDBOX_URL")
        if not url:
            return False
        parts = urlsplit(url)
        return parts.scheme == "http" and (parts.hostname or "") in _LOOPBACK_HOSTS

    # -- commands ---------------------------------------------------------------------------
    def _resolve_cwd(self, cwd: str | None) -> str:
        if cwd is None:
            return posixpath.normpath(self.options.work_dir)
        return posixpath.normpath(posixpath.join(self.options.work_dir, str(cwd)))

    def _exec(
        self,
        command: str,
        *,
        cwd: str | None,
        envs: dict[str, str],
        timeout_ms: int,
        stdin: str | bytes | None,
    ) -> ExecResult:
        from e2b import CommandExitException

        marker = uuid.uuid4().hex
        out = _Stream(self.options.max_output_bytes)
        err = _Stream(self.options.max_output_bytes)
        workdir = self._resolve_cwd(cwd)
        started = time.monotonic()
        exit_code = TIMEOUT_EXIT_CODE
        # Started in the background so that we hold the pid (to kill it on timeout) and the
        # output callbacks see partial output.
        handle = self._start_command(
            command,
            envs=envs,
            marker=marker,
            cwd=workdir,
            stdin=stdin is not None,
            timeout_s=timeout_ms / 1000,
        )
        timed_out = handle is None
        raw_out = _tee_stdout(handle, self.options.max_output_bytes)
        if handle is not None:
            if stdin is not None:
                self._feed_stdin(handle, stdin, command)
            try:
                result = call_interruptibly(
                    lambda: handle.wait(on_stdout=out.write, on_stderr=err.write),
                    name="kode-e2b-exec",
                )
                exit_code = result.exit_code
            except CommandExitException as exc:
                exit_code = exc.exit_code
            except Exception as exc:
                if classify(exc) is not Kind.TIMEOUT:
                    raise self._error(exc, f"running command {command!r}") from exc
                timed_out = True
        duration_ms = (time.monotonic() - started) * 1000
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
            self._kill_tree(marker, handle.pid if handle is not None else None)
        return ExecResult(
            command=command,
            exit_code=exit_code,
            stdout=out.text(),
            stderr=err.text(),
            duration_ms=duration_ms,
            timed_out=timed_out,
            truncated=out.truncated or err.truncated,
            stdout_bytes=raw_out.getvalue() if raw_out is not None else out.raw(),
        )

    def _start_command(
        self,
        command: str,
        *,
        envs: dict[str, str],
        marker: str,
        cwd: str,
        stdin: bool,
        timeout_s: float,
    ) -> CommandHandle[Any] | None:
        """Start ``command`` in the background; None when its deadline ran out before the start
        event (a slow link, a short timeout), which makes it a timed-out command.

        Retried only up to the start event: after that the command may be running.
        """
        sdk = self._live
        action = f"starting command {command!r}"
        try:
            return call_with_retries(
                lambda: sdk.commands.run(
                    command,
                    background=True,
                    envs={**envs, _MARKER_ENV: marker},
                    cwd=cwd,
                    stdin=stdin,
                    timeout=timeout_s,
                    retain_output=False,
                ),
                policy=self._policy(),
                retryable=is_retryable,
            )
        except RetryExhausted as exc:
            raise self._error(exc.last, action, attempts=exc.attempts) from exc.last
        except Exception as exc:
            kind = classify(exc)
            if kind is Kind.TIMEOUT and timeout_s > 0:
                return None
            work_dir = posixpath.normpath(self.options.work_dir)
            if kind is Kind.INVALID and cwd == work_dir and not self._work_dir_made:
                # Assumed present after create (_TEMPLATE_HOME): this template may lack it.
                self._work_dir_made = True  # checked once, whatever the answer
                if not self._is_dir(cwd):
                    self._make_work_dir()
                    return self._start_command(
                        command, envs=envs, marker=marker, cwd=cwd, stdin=stdin, timeout_s=timeout_s
                    )
            if kind is Kind.INVALID and not self._is_dir(cwd):
                raise self._missing_cwd(cwd) from exc
            raise self._error(exc, action) from exc

    def _missing_cwd(self, cwd: str) -> SandboxFileNotFoundError:
        return SandboxFileNotFoundError(
            f"cwd {cwd!r} is not an existing directory in the sandbox",
            backend=self.backend,
            sandbox_id=self._sandbox_id,
            hint="create it first (fs.mkdir) or pass another cwd",
        )

    def _is_dir(self, path: str) -> bool:
        try:
            kind = self._live.files.get_info(path).type
            return kind is not None and kind.value == "dir"
        except Exception:
            return False

    def _feed_stdin(self, handle: CommandHandle[Any], data: str | bytes, command: str) -> None:
        payload = data.encode("utf-8") if isinstance(data, str) else data
        try:
            # envd takes one RPC message of at most 4 MiB: larger input goes in pieces (a 5 MB
            # stdin used to be refused, and the command waited for input until its timeout).
            for start in range(0, len(payload), _STDIN_CHUNK):
                handle.send_stdin(payload[start : start + _STDIN_CHUNK])
            handle.close_stdin()
        except Exception as exc:
            error = self._stdin_error(exc, command)
            if error is not None:
                raise error from exc

    def _stdin_error(self, exc: Exception, command: str) -> KodeError | None:
        """The error for stdin that could not be delivered, or None when that is no error."""
        # A command that exits without reading its input makes these fail with "process
        # not found"; that is the command's business and wait() reports how it ended.
        if classify(exc) in (Kind.SANDBOX_GONE, Kind.TRANSPORT, Kind.AUTH):
            return self._error(exc, f"sending stdin to command {command!r}")
        _log.debug("e2b: stdin for %r not delivered: %s", command, exc)
        return None

    def _kill_tree(self, marker: str, pid: int | None) -> None:
        """Kill a command and everything it started (best effort; the sandbox may be dying)."""
        sdk = self._sdk
        if sdk is None:
            return
        try:
            if pid is not None:
                sdk.commands.kill(pid)
            sdk.commands.run(_sweep_script(marker), timeout=30)
        except Exception as exc:
            _log.debug(
                "e2b: killing process tree %s in %s failed: %s", marker, self._sandbox_id, exc
            )

    def start(
        self,
        command: str,
        *,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> ProcessHandle:
        self._require_live()
        check_call_args("start", cwd=cwd, envs=envs)
        marker = uuid.uuid4().hex
        workdir = self._resolve_cwd(cwd)
        started = time.monotonic()
        # timeout=0: the SDK's default 60 s is also the process's deadline inside envd, which
        # would kill a server a minute into the test. stdin stays open for send_stdin.
        handle = self._start_command(
            command, envs=envs or {}, marker=marker, cwd=workdir, stdin=True, timeout_s=0
        )
        if handle is None:  # pragma: no cover - no deadline was set, so none can run out
            raise SandboxConnectionError(
                f"starting background command {command!r} timed out",
                backend=self.backend,
                sandbox_id=self._sandbox_id,
                hint="the sandbox did not answer; check it with is_alive()",
            )
        process = _E2BProcess(self, handle, command, marker, started)
        self._processes = [p for p in self._processes if p.is_running()]
        self._processes.append(process)
        return process

    # -- files ------------------------------------------------------------------------------
    @property
    def fs(self) -> SandboxFS:
        self._require_live()
        if self._fs is None:
            self._fs = _E2BFS(self)
        return self._fs


_STDIN_CHUNK = 1 << 20


def _tee_stdout(handle: CommandHandle[Any] | None, limit: int) -> BoundedOutput | None:
    """Keep the raw bytes of a command's stdout beside the SDK's decoded text.

    The SDK decodes output as UTF-8 with replacement, so non-UTF-8 output (an image, a
    compressed file) could not be given back exactly in ``stdout_bytes``; recording what its
    decoder is fed can. None when this SDK version decodes some other way.
    """
    decoder: Any = getattr(handle, "_stdout_decoder", None)
    if not callable(getattr(decoder, "decode", None)):
        return None
    raw = BoundedOutput(limit)

    class _Tee:
        def decode(self, data: bytes, final: bool = False) -> str:
            raw.write(bytes(data))
            return str(decoder.decode(data, final))

        def __getattr__(self, name: str) -> Any:
            return getattr(decoder, name)

    handle._stdout_decoder = _Tee()  # type: ignore[union-attr]
    return raw


class _Stream:
    """Bounded output fed with the SDK's text (decoded as UTF-8 with replacement).

    Re-encoding that text gives back the exact bytes unless a replacement character showed up,
    so :meth:`raw` offers the bytes only when they are known to be exact.
    """

    def __init__(self, limit: int) -> None:
        self._buffer = BoundedOutput(limit)
        self._lossy = False

    def write(self, text: str) -> None:
        if "\ufffd" in text:
            self._lossy = True
        self._buffer.write(text.encode("utf-8", "replace"))

    @property
    def truncated(self) -> bool:
        return self._buffer.truncated

    def text(self) -> str:
        return self._buffer.text()

    def raw(self) -> bytes | None:
        return None if self._lossy else self._buffer.getvalue()


class _E2BProcess(ProcessHandle):
    """A background command whose output a daemon thread drains into bounded buffers.

    The sync SDK only reads a command's stream while someone iterates or waits on it, so without
    the thread a chatty server would stall once the transport's buffers filled.
    """

    def __init__(
        self,
        owner: E2BSandbox,
        handle: CommandHandle[Any],
        command: str,
        marker: str,
        started: float,
    ) -> None:
        self.command = command
        self._owner = owner
        self._handle = handle
        self._marker = marker
        self._started = started
        self._ended: float | None = None
        self._lock = threading.Lock()
        self._out = _Stream(owner.options.max_output_bytes)
        self._err = _Stream(owner.options.max_output_bytes)
        self._exit_code: int | None = None
        self._failure: Exception | None = None
        self._done = threading.Event()
        self._thread = start_thread(self._drain, name=f"kode-e2b-process-{handle.pid}")

    def _write(self, stream: _Stream, text: str) -> None:
        with self._lock:
            stream.write(text)

    def _drain(self) -> None:
        from e2b import CommandExitException

        try:
            result = self._handle.wait(
                on_stdout=lambda text: self._write(self._out, text),
                on_stderr=lambda text: self._write(self._err, text),
            )
            self._exit_code = result.exit_code
        except CommandExitException as exc:
            self._exit_code = exc.exit_code
        except Exception as exc:
            self._failure = exc
        finally:
            self._ended = time.monotonic()
            self._done.set()

    def _join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    @property
    def pid(self) -> int:
        return int(self._handle.pid)

    def is_running(self) -> bool:
        return not self._done.is_set()

    def wait(self, timeout_ms: int | None = None) -> ExecResult:
        """Wait for exit; past ``timeout_ms`` the process tree is killed and the result is
        timed out (exit code 124)."""
        finished = self._done.wait(None if timeout_ms is None else timeout_ms / 1000)
        if not finished:
            self.kill()
        elif self._failure is not None and self._exit_code is None:
            raise self._owner._error(
                self._failure, f"waiting for background command {self.command!r}"
            ) from self._failure
        ended = self._ended if self._ended is not None else time.monotonic()
        with self._lock:
            stdout, stderr = self._out.text(), self._err.text()
            truncated = self._out.truncated or self._err.truncated
            raw = self._out.raw()
        return ExecResult(
            command=self.command,
            exit_code=TIMEOUT_EXIT_CODE if not finished else (self._exit_code or 0),
            stdout=stdout,
            stderr=stderr,
            duration_ms=(ended - self._started) * 1000,
            timed_out=not finished,
            truncated=truncated,
            stdout_bytes=raw,
        )

    def kill(self) -> None:
        if self._done.is_set():
            return
        self._owner._kill_tree(self._marker, self.pid)
        self._done.wait(_KILL_SETTLE_S)

    @property
    def stdout(self) -> str:
        with self._lock:
            return self._out.text()

    @property
    def stderr(self) -> str:
        with self._lock:
            return self._err.text()

    def send_stdin(self, data: str | bytes) -> None:
        self._owner._call(
            lambda: self._handle.send_stdin(data), f"sending stdin to {self.command!r}"
        )

    def close_stdin(self) -> None:
        self._owner._call(self._handle.close_stdin, f"closing stdin of {self.command!r}")

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self._exit_code}"
        return f"<E2B process {self.pid} {state}: {self.command!r}>"


_ENTRY_TYPES = {"file": "file", "dir": "dir", "symlink": "symlink"}


class _E2BFS(SandboxFS):
    """``sandbox.files`` with absolute paths only (envd would resolve relative ones against the
    user's home, not against ``work_dir``)."""

    def __init__(self, owner: E2BSandbox) -> None:
        super().__init__(owner.options.work_dir)
        self._owner = owner

    def _files(self) -> Any:
        return self._owner._live.files

    def _do(self, fn: Callable[[], _T], action: str, path: str) -> _T:
        return self._owner._call(fn, f"{action} {path!r}", path=path)

    def read_bytes(self, path: str) -> bytes:
        full = self.abspath(path)
        files = self._files()
        data = self._do(lambda: files.read(full, format="bytes"), "reading", full)
        return bytes(data)

    def _write(self, path: str, data: str | bytes) -> None:
        full = self.abspath(path)
        files = self._files()
        self._do(lambda: files.write(full, data), "writing", full)

    def exists(self, path: str) -> bool:
        full = self.abspath(path)
        files = self._files()
        return bool(self._do(lambda: files.exists(full), "checking", full))

    def stat(self, path: str) -> FileEntry:
        full = self.abspath(path)
        files = self._files()
        return _entry(self._do(lambda: files.get_info(full), "inspecting", full))

    def list(self, path: str = ".", depth: int = 1) -> builtins.list[FileEntry]:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth!r}")
        full = self.abspath(path)
        files = self._files()
        entries = self._do(lambda: files.list(full, depth=depth), "listing", full)
        return [_entry(entry) for entry in entries]

    def mkdir(self, path: str) -> None:
        full = self.abspath(path)
        files = self._files()
        # make_dir answers False when the directory exists, which is fine here.
        self._do(lambda: files.make_dir(full), "creating directory", full)

    def remove(self, path: str) -> None:
        full = self.abspath(path)
        files = self._files()
        # Real envd treats a missing path as a no-op; the contract says missing is an error.
        if not self._do(lambda: files.exists(full), "checking", full):
            raise SandboxFileNotFoundError(
                f"cannot remove {full!r}: it does not exist in the sandbox",
                backend=self._owner.backend,
                sandbox_id=self._owner._sandbox_id,
                hint="check the path (relative paths resolve against work_dir)",
            )
        self._do(lambda: files.remove(full), "removing", full)

    def rename(self, src: str, dst: str) -> None:
        full_src, full_dst = self.abspath(src), self.abspath(dst)
        files = self._files()
        self._do(lambda: files.rename(full_src, full_dst), f"renaming to {full_dst!r}", full_src)


def _entry(info: EntryInfo) -> FileEntry:
    kind = info.type.value if info.type is not None else "file"
    return FileEntry(
        name=info.name,
        path=info.path,
        type=_ENTRY_TYPES.get(kind, "file"),  # type: ignore[arg-type]
        size=int(info.size),
        mode=int(info.mode) & 0o7777,
        modified_time=info.modified_time,
        symlink_target=info.symlink_target or None,
    )
