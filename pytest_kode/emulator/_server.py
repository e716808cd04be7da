""":class:`E2BEmulator`: the loopback server object tests and the plugin hold on to."""

from __future__ import annotations

import functools
import os
import secrets
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pytest_kode._threads import start_thread
from pytest_kode.emulator._profile import resolve_profile
from pytest_kode.emulator._state import WORK_DIR, Registry

if TYPE_CHECKING:
    from pytest_kode.emulator._hosts import HostProxy
    from pytest_kode.emulator._state import LocalSandboxLike
    from pytest_kode.plans import CloudPlan

__all__ = ["CREATE_LATENCY_ENV", "RPC_LATENCY_ENV", "E2BEmulator", "env_latency_ms"]

_START_TIMEOUT_S = 10.0
RPC_LATENCY_ENV = "KODE_EMULATOR_RPC_LATENCY_MS"
CREATE_LATENCY_ENV = "KODE_EMULATOR_CREATE_LATENCY_MS"
IMAGE_BIN = str(Path(__file__).with_name("image_bin"))


class E2BEmulator:
    """A loopback stand-in for the E2B cloud that the real ``e2b`` SDK talks to.

    One HTTP server on ``127.0.0.1`` answers both the control-plane API and every sandbox's
    daemon (told apart by the ``E2b-Sandbox-Id`` header); each sandbox is a ``LocalSandbox``.
    Use it as a context manager, or call :meth:`start` / :meth:`stop`::

        with E2BEmulator() as emu:
            sbx = e2b.Sandbox.create(api_key=emu.api_key, api_url=emu.url, sandbox_url=emu.url)

    ``profile`` is the E2B plan whose limits it enforces like the cloud: ``"hobby"`` (the
    default: 1 create/s, 20 running, 1 h lifetime), ``"pro"``, ``"unlimited"`` or a
    :class:`pytest_kode.plans.CloudPlan` of explicit numbers. Creates beyond the rate or the
    concurrency limit get 429 with ``Retry-After``; a lifetime beyond the plan's gets 400.

    Test knobs: :attr:`rpc_latency_ms` (alias :attr:`latency_ms`), :attr:`create_latency_ms`,
    :meth:`fail_next_creates`, :meth:`fail_next_kills`, :meth:`lose_create_answers`,
    :meth:`vanish`, :attr:`clock_offset_s`, :attr:`profile`; counters: :attr:`calls`,
    :attr:`created_count`, :attr:`limited_count`, :meth:`sandboxes`. The latencies default to
    ``KODE_EMULATOR_RPC_LATENCY_MS`` and ``KODE_EMULATOR_CREATE_LATENCY_MS`` (so a pytest run's
    own emulator can rehearse a slow cloud).
    """

    def __init__(
        self,
        port: int = 0,
        api_key: str | None = None,
        *,
        root_dir: str | os.PathLike[str] | None = None,
        profile: str | CloudPlan | None = None,
        clock_offset_s: float = 0.0,
        rpc_latency_ms: int | None = None,
        create_latency_ms: int | None = None,
        https_hosts: bool = False,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (any free port) or 1-65535, got {port}")
        self._requested_port = port
        self.api_key: str = api_key or "e2b_" + secrets.token_hex(20)
        self.root_dir = root_dir
        """Where the emulated sandboxes' LocalSandbox directories go (None: LocalSandbox's default)."""
        self._registry = Registry(
            functools.partial(_local_sandbox_factory, root_dir), resolve_profile(profile)
        )
        self.clock_offset_s = clock_offset_s
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.https_hosts = https_hosts
        """Serve the sandboxes' ``https://<port>-<id>.<domain>`` hosts (see :attr:`env`)."""
        self._hosts: HostProxy | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        self.rpc_latency_ms = (
            env_latency_ms(RPC_LATENCY_ENV) if rpc_latency_ms is None else rpc_latency_ms
        )
        self.create_latency_ms = (
            env_latency_ms(CREATE_LATENCY_ENV) if create_latency_ms is None else create_latency_ms
        )

    # -- life-cycle -------------------------------------------------------------------------
    def start(self) -> Self:
        """Bind, serve in a background thread and return once requests are answered."""
        import uvicorn

        from pytest_kode.emulator._app import EmulatorApp

        with self._lock:
            if self._thread is not None:
                return self
            app = EmulatorApp(self._registry, self.api_key)  # before the socket: may raise
            hosts = None
            if self.https_hosts:
                from pytest_kode.emulator._hosts import HostProxy

                hosts = HostProxy(self._registry)  # may raise too (no `cryptography`)
            # proto=IPPROTO_TCP, not the default 0: asyncio turns on TCP_NODELAY only for
            # sockets whose proto says TCP, and accepted sockets inherit it. Without it every
            # response (headers, then body) stalls ~40 ms in Nagle against the client's
            # delayed ACK on a kept-alive connection.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self._requested_port))
            except OSError as exc:
                sock.close()
                from pytest_kode.errors import BackendUnavailableError

                raise BackendUnavailableError(
                    f"the E2B emulator cannot listen on 127.0.0.1:{self._requested_port}: {exc}",
                    backend="emulator",
                    hint="pick another --port, or 0 for any free port",
                ) from exc
            sock.listen(128)
            sock.set_inheritable(False)
            config = uvicorn.Config(
                app,
                # The app sends its own Date, on the emulator's (offset) clock.
                date_header=False,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
                # Longer than the SDK's pools keep an idle connection (E2B_KEEPALIVE_EXPIRY,
                # 300 s), as E2B's edge does: the client retires it first. With uvicorn's
                # default of 5 s, a request sent after 5 s of quiet raced the server's close
                # and failed with a write error.
                timeout_keep_alive=620,
                ws="none",
            )
            server = uvicorn.Server(config)
            app.connections = lambda: server.server_state.connections
            self._registry.start_reaper()
            thread = start_thread(server.run, kwargs={"sockets": [sock]}, name="kode-e2b-emulator")
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    server.should_exit = True
                    thread.join(timeout=_START_TIMEOUT_S)
                    sock.close()
                    self._registry.close()
                    from pytest_kode.errors import BackendUnavailableError

                    raise BackendUnavailableError(
                        "the E2B emulator's HTTP server did not start",
                        backend="emulator",
                        hint="run `python -m pytest_kode.emulator` to see uvicorn's error",
                    )
                time.sleep(0.005)
            self._server, self._thread, self._socket = server, thread, sock
            self._port = sock.getsockname()[1]
            if hosts is not None:
                self._hosts = hosts.start()
        return self

    def stop(self) -> None:
        """Kill every emulated sandbox, stop serving and join the server thread. Idempotent."""
        with self._lock:
            server, thread, sock = self._server, self._thread, self._socket
            self._server = self._thread = self._socket = None
            hosts, self._hosts = self._hosts, None
        if hosts is not None:
            hosts.stop()
        if thread is None:
            return
        # Sandboxes first: their processes end, so open streams finish and shutdown is quick.
        self._registry.close()
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5)
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    # -- where it is ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator is not started; call start() or use `with`")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of both the API and the sandbox daemons, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point the ``e2b`` SDK (and CLI) at this emulator.

        With ``https_hosts``, also ``HTTPS_PROXY``, ``NO_PROXY`` and ``SSL_CERT_FILE``: a
        client process started with them reaches ``https://{sandbox.get_host(port)}`` as on
        E2B (a CONNECT proxy ending TLS with certificates of the emulator's own authority,
        added to a copy of the usual trust bundle; other HTTPS traffic passes through)."""
        env = {"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": self.api_key}
        if self._hosts is not None:
            env.update(self._hosts.env)
        return env

    # -- templates, faults ------------------------------------------------------------------
    def add_template(self, name: str) -> None:
        """Accept ``name`` as a template id in create (besides ``base``)."""
        self._registry.templates.add(name)

    @property
    def rpc_latency_ms(self) -> int:
        """Delay added before answering every request, a network round trip (0 = none)."""
        return self._registry.latency_ms

    @rpc_latency_ms.setter
    def rpc_latency_ms(self, value: int) -> None:
        self._registry.latency_ms = _check_latency("rpc_latency_ms", value)

    @property
    def latency_ms(self) -> int:
        """The same as :attr:`rpc_latency_ms` (the name it had first)."""
        return self.rpc_latency_ms

    @latency_ms.setter
    def latency_ms(self, value: int) -> None:
        self._registry.latency_ms = _check_latency("latency_ms", value)

    @property
    def create_latency_ms(self) -> int:
        """How long a create takes on the server, as a VM boot would, before its round trip
        (:attr:`rpc_latency_ms`) is added; a local sandbox start slower than this counts
        instead (0 = only the local start)."""
        return self._registry.create_latency_ms

    @create_latency_ms.setter
    def create_latency_ms(self, value: int) -> None:
        self._registry.create_latency_ms = _check_latency("create_latency_ms", value)

    @property
    def profile(self) -> CloudPlan:
        """The plan whose limits the emulator enforces (settable: a name or a CloudPlan)."""
        return self._registry.plan

    @profile.setter
    def profile(self, value: str | CloudPlan) -> None:
        self._registry.limits.set_plan(resolve_profile(value))

    @property
    def clock_offset_s(self) -> float:
        """Seconds added to this machine's clock for every time the emulator reports (its
        ``startedAt``/``endAt``, the ``Date`` header) and judges lifetimes by: a skewed cloud."""
        return self._registry.clock_offset_s

    @clock_offset_s.setter
    def clock_offset_s(self, value: float) -> None:
        self._registry.clock_offset_s = float(value)

    @property
    def limited_count(self) -> int:
        """Creates answered 429 by the profile's rate or concurrency limit (not injected ones)."""
        return self._registry.limits.limited

    def fail_next_creates(self, n: int, status: int = 429, *, retry_after_s: int = 1) -> None:
        """Answer the next ``n`` create calls with ``status`` (429 or 503) and ``Retry-After``
        of ``retry_after_s`` (the cloud never says less than 1)."""
        if status not in (429, 503):
            raise ValueError(f"status must be 429 or 503, got {status}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s}")
        self._registry.fault_retry_after_s = retry_after_s
        self._registry.fail_next_creates(n, status)

    def flaky_creates(
        self, fraction: float, statuses: tuple[int, ...] = (429, 503), *, seed: int | None = None
    ) -> None:
        """Answer a random ``fraction`` of all later creates with one of ``statuses`` (429/503,
        ``Retry-After`` as :meth:`fail_next_creates` sets it), on top of the profile's limits,
        until :meth:`clear_faults`."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], got {fraction}")
        if not statuses or any(status not in (429, 503) for status in statuses):
            raise ValueError(f"statuses must be 429 and/or 503, got {statuses}")
        self._registry.flaky_creates(fraction, tuple(statuses), seed)

    def lose_create_answers(self, n: int, status: int = 502, *, hold_s: float = 0.0) -> None:
        """Answer the next ``n`` creates ``status`` (502 or 504) at once, as a gateway that gave
        up, while each create goes on behind it (starting after ``hold_s``): the sandbox comes to
        exist and the client does not know it. A retry with the same ``Idempotency-Key`` gets
        409 until it is made, then that sandbox."""
        if status not in (502, 504):
            raise ValueError(f"status must be 502 or 504, got {status}")
        if n < 0 or hold_s < 0:
            raise ValueError(f"n and hold_s must be >= 0, got {n}, {hold_s}")
        self._registry.lose_create_answers(n, status, hold_s)

    def fail_next_kills(self, n: int) -> None:
        """Answer the next ``n`` kills of existing sandboxes with 500, leaving them running."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._registry.fail_next_kills(n)

    def clear_faults(self) -> None:
        """Drop pending injected create failures and the added latencies."""
        self._registry.clear_create_faults()
        self._registry.latency_ms = 0
        self._registry.create_latency_ms = 0

    def vanish(self, sandbox_id: str) -> None:
        """Make a sandbox disappear as if its VM died: REST 404, daemon 502 "not found"."""
        if not self._registry.kill(sandbox_id):
            raise KeyError(f"no emulated sandbox {sandbox_id!r}; live: {self.sandbox_ids()}")

    def expire(self) -> list[str]:
        """Run the lifetime reaper now; return the ids it killed."""
        return self._registry.reap()

    # -- counters ---------------------------------------------------------------------------
    @property
    def calls(self) -> Counter[str]:
        """Requests per endpoint: ``create``, ``connect``, ``kill``, ``process.Start``..."""
        return self._registry.calls

    @property
    def created_count(self) -> int:
        return self._registry.created_count

    def sandbox_ids(self) -> list[str]:
        """Ids of the sandboxes that exist (running or paused)."""
        return [sandbox.sandbox_id for sandbox in self._registry.all()]

    def sandboxes(self) -> list[dict[str, Any]]:
        """The sandboxes that exist, with state, template, metadata and lifetime."""
        return [
            dict(
                sandbox_id=sandbox.sandbox_id,
                state=sandbox.state,
                template_id=sandbox.template_id,
                metadata=dict(sandbox.metadata),
                started_at=sandbox.started_at,
                end_at=sandbox.end_at,
                allow_internet_access=sandbox.allow_internet_access,
                network_isolated=sandbox.network_isolated,
                processes=len(sandbox.live_processes()),
            )
            for sandbox in self._registry.all()
        ]

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"<E2BEmulator {where} sandboxes={len(self._registry.all())}>"


def _check_latency(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number of milliseconds >= 0, got {value!r}")
    return value


def env_latency_ms(name: str) -> int:
    """A latency in ms from environment variable ``name`` (unset or empty: 0)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}: expected a whole number of milliseconds >= 0, got {raw!r}")
    return value


def _local_sandbox_factory(
    root_dir: str | os.PathLike[str] | None,
    envs: dict[str, str],
    allow_internet_access: bool,
    timeout_ms: int,
    local_template: Any = None,
) -> LocalSandboxLike:
    from pytest_kode.backends.local import LocalSandbox

    if "PATH" not in envs:
        # Commands E2B's base image has and a host may lack (`python`, `sudo`) come first,
        # also in the login shells the SDK runs commands in (BASH_ENV: image_bin/bash_env).
        host = os.environ.get("PATH") or os.defpath
        envs = {
            "BASH_ENV": os.path.join(IMAGE_BIN, "bash_env"),
            **envs,
            "PATH": f"{IMAGE_BIN}{os.pathsep}{host}",
        }
    sandbox = LocalSandbox(
        root_dir=root_dir,
        local_template=local_template,
        shared_dirs=(IMAGE_BIN,),
        work_dir=WORK_DIR,
        envs=envs,
        allow_internet_access=allow_internet_access,
        timeout_ms=timeout_ms,
    )
    try:
        sandbox.init()
    except BaseException:
        sandbox.dispose()
        raise
    return sandbox
