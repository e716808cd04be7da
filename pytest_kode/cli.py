"""The ``pytest-kode`` command: ``ls`` and ``gc`` the plugin's sandboxes, run the ``emulator``.

Only sandboxes the plugin tagged (metadata ``kode_run``) are ever listed or touched. Whether a
sandbox's run is alive is decided from

- the run registry (``<runs root>/<run id>/proc-*.json``: the run's processes, by pid and start
  time) for every backend on this machine;
- for local sandboxes without a registry entry, the process that created the sandbox;
- for E2B sandboxes, their lease: a sandbox whose lifetime left is within one lease is renewed
  by a live run or ends by itself soon; one given a longer lifetime (kept, reused) is renewed by
  nobody. Times are compared on the server's clock (its ``Date`` header against the sandbox's
  ``startedAt``/``endAt``), never this machine's, which may be minutes off.

Never from age alone: ``--older-than`` only narrows what ``gc`` disposes among dead runs'. And
never touched: a sandbox younger than one lease (its run may be starting), a sandbox kept after a
failure until its keep deadline (``--sandbox-keep-failed``, recorded on this machine; on E2B also
any sandbox given a lifetime beyond its lease that is not kept for reuse), a paused sandbox
whose run is not known dead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main", "parse_duration"]

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE)
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``15m``, ``2h``, ``1d``."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: use a number with an optional unit s, m, h or d "
            "(e.g. 30s, 15m, 2h)"
        )
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass
class _Found:
    backend: str
    sandbox_id: str
    metadata: dict[str, str]
    created: float | None  # Unix seconds
    alive: bool | None  # the run's liveness; None: cannot tell (never disposed)
    why: str
    extra: dict[str, Any] = field(default_factory=dict)
    kept_until: float | None = None  # kept after a failure until then (Unix seconds)
    protected: str | None = None  # why gc must leave it alone whatever its run

    @property
    def run(self) -> str:
        return self.metadata.get("kode_run", "")

    @property
    def reused(self) -> bool:
        return self.metadata.get("kode_reuse") == "1"

    def age_s(self, now: float) -> float | None:
        return None if self.created is None else max(0.0, now - self.created)


def _iso_to_unix(value: str | None) -> float | None:
    if not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


# -- local ------------------------------------------------------------------------------------
def _local(root: Path, runs_root: Path) -> list[_Found]:
    from pytest_kode.backends.local import list_local_sandboxes
    from pytest_kode.lifecycle.keeplist import kept_sandboxes
    from pytest_kode.lifecycle.watchdog import process_alive, run_alive

    kept = kept_sandboxes(runs_root, "local")
    found: list[_Found] = []
    for data in list_local_sandboxes(root):
        metadata = data.get("metadata")
        if not isinstance(metadata, dict) or not metadata.get("kode_run"):
            continue  # not the plugin's: never listed, never touched
        metadata = {str(k): str(v) for k, v in metadata.items()}
        alive = run_alive(runs_root / metadata["kode_run"])
        why = "run registry"
        if alive is None:
            # No registry (the run ended, or used another KODE_RUNS_ROOT): its creator decides.
            pid = data.get("pid")
            alive = isinstance(pid, int) and process_alive(pid)
            why = "creating process"
        created = data.get("created")
        found.append(
            _Found(
                "local",
                str(data["sandbox_id"]),
                metadata,
                float(created) if isinstance(created, (int, float)) else None,
                alive,
                why,
                {"root": root},
                kept_until=kept.get(str(data["sandbox_id"])),
            )
        )
    return found


# -- e2b --------------------------------------------------------------------------------------
def _api(args: argparse.Namespace) -> dict[str, Any] | None:
    key = os.environ.get("E2B_API_KEY")
    if not key:
        return None
    params: dict[str, Any] = {"api_key": key}
    api_url = args.api_url or os.environ.get("E2B_API_URL")
    sandbox_url = args.sandbox_url or os.environ.get("E2B_SANDBOX_URL")
    if api_url:
        params["api_url"] = api_url
    if sandbox_url:
        params["sandbox_url"] = sandbox_url
    return params


def _e2b(api: dict[str, Any], runs_root: Path, out: TextIO) -> list[_Found]:
    from e2b import Sandbox

    from pytest_kode.lifecycle.keeplist import kept_sandboxes
    from pytest_kode.lifecycle.lease import DEFAULT_LEASE_S, LEASE_TAG, lease_state
    from pytest_kode.lifecycle.watchdog import run_alive

    paginator = Sandbox.list(**api)
    infos: list[Any] = []
    while paginator.has_next:
        infos.extend(paginator.next_items())
    now = _server_now(api)
    if now is None:
        # No Date header: fall back on this clock, but with a whole extra lease of margin below.
        print("e2b: the API sent no Date header; judging leases by this machine's clock", file=out)
    kept = kept_sandboxes(runs_root, "e2b")
    found: list[_Found] = []
    for info in infos:
        metadata = {str(k): str(v) for k, v in (info.metadata or {}).items()}
        if not metadata.get("kode_run"):
            continue
        state = str(getattr(info.state, "value", info.state))
        registry = run_alive(runs_root / metadata["kode_run"])
        server_now = now or datetime.datetime.now(datetime.UTC)
        margin_s = 0.0 if now is not None else _lease_of(metadata, DEFAULT_LEASE_S)
        lease = lease_state(metadata, info.end_at, server_now + _seconds(margin_s))
        lease_s = _lease_of(metadata, DEFAULT_LEASE_S) if LEASE_TAG in metadata else 0.0
        kept_until = kept.get(info.sandbox_id)
        protected: str | None = None
        alive: bool | None
        if state == "paused":
            # Nobody renews a paused sandbox and its endAt is the pause time: only its run says.
            alive = registry
            why = "paused; " + (
                "its run is dead"
                if registry is False
                else "its run may live elsewhere"
                if registry is None
                else "its run lives"
            )
        elif registry:
            alive, why = True, "run registry"
        elif lease == "leased":
            alive = False if registry is False else True
            why = "run registry" if registry is False else "on its lease"
        elif lease == "released" and metadata.get("kode_reuse") != "1":
            # Given a lifetime beyond its lease and not for reuse: kept after a failure (a
            # keep-failed sandbox's run is over by design). E2B ends it at its endAt.
            alive, why = False, "kept after a failure"
            if kept_until is None and info.end_at is not None:
                kept_until = time.time() + (info.end_at - server_now).total_seconds()
        elif lease == "released":
            alive, why = False, "lifetime beyond its lease: nobody renews it"
        elif registry is False:
            alive, why = False, "run registry"
        else:
            alive, why = None, "no lease and no registry here"
        started = info.started_at
        if started is not None and (server_now - started).total_seconds() < max(
            lease_s, DEFAULT_LEASE_S
        ):
            protected = "younger than one lease (its run may be starting)"
        created = _iso_to_unix(metadata.get("kode_created"))
        if started is not None:
            # Its age on the server's clock, carried over to ours.
            created = time.time() - (server_now - started).total_seconds()
        found.append(
            _Found(
                "e2b",
                info.sandbox_id,
                metadata,
                created,
                alive,
                why,
                {"state": state},
                kept_until=kept_until,
                protected=protected,
            )
        )
    return found


def _lease_of(metadata: dict[str, str], default: float) -> float:
    try:
        return float(metadata.get("kode_lease", default))
    except ValueError:
        return default


def _seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)


def _server_now(api: dict[str, Any]) -> datetime.datetime | None:
    """The E2B API's clock, from the ``Date`` header of one cheap authenticated request."""
    import email.utils

    import httpx
    from e2b import ConnectionConfig

    config = ConnectionConfig(**{k: v for k, v in api.items() if k in ("api_key", "api_url")})
    try:
        response = httpx.get(
            config.api_url.rstrip("/") + "/v2/sandboxes",
            params={"limit": 1},
            headers={"X-API-KEY": api["api_key"]},
            timeout=15,
        )
        stamp = response.headers.get("date")
        moment = email.utils.parsedate_to_datetime(stamp) if stamp else None
    except (httpx.HTTPError, TypeError, ValueError):
        return None
    if moment is None or moment.tzinfo is None:
        return None
    # The header counts whole seconds: half a second is the best guess of the true time.
    return moment + datetime.timedelta(seconds=0.5)


def _dispose(found: _Found, api: dict[str, Any] | None) -> None:
    if found.backend == "local":
        from pytest_kode.backends.local import remove_local_sandbox

        remove_local_sandbox(found.sandbox_id, found.extra["root"])
    else:
        from e2b import Sandbox

        assert api is not None
        Sandbox.kill(found.sandbox_id, **api)


# -- commands ---------------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _alive_text(found: _Found) -> str:
    text = {True: "yes", False: "no", None: "?"}[found.alive]
    if found.kept_until is not None:
        until = time.strftime("%H:%M:%S", time.localtime(found.kept_until))
        return text + f" (kept until {until})"
    return text + (" (reused)" if found.reused else "")


def _collect(args: argparse.Namespace, out: TextIO) -> tuple[list[_Found], dict[str, Any] | None]:
    from pytest_kode.lifecycle.rundir import runs_root

    runs = runs_root()
    found: list[_Found] = []
    if args.backend in ("all", "local"):
        found += _local(args.local_root, runs)
    api = _api(args)
    if args.backend in ("all", "e2b"):
        if api is None:
            print("e2b: skipped (E2B_API_KEY is not set)", file=out)
        else:
            try:
                found += _e2b(api, runs, out)
            except Exception as exc:
                where = api.get("api_url", "the E2B API")
                print(f"e2b: cannot list sandboxes at {where}: {exc}", file=out)
    return found, api


def _ls(args: argparse.Namespace, out: TextIO) -> int:
    if args.backend in ("all", "local"):
        from pytest_kode.backends.local._bwrap import isolation_report

        # Which isolation new local sandboxes get here, and when none, why and the fix.
        isolation, details = isolation_report()
        print(f"local isolation: {isolation}", file=out)
        for line in details:
            print(f"  {line}", file=out)
    found, _ = _collect(args, out)
    if not found:
        print("no sandboxes of pytest-kode", file=out)
        return 0
    now = time.time()
    rows = [("BACKEND", "SANDBOX", "RUN", "WORKER", "TEST", "AGE", "RUN ALIVE")]
    for item in found:
        rows.append(
            (
                item.backend,
                item.sandbox_id,
                item.run,
                item.metadata.get("kode_worker", ""),
                item.metadata.get("kode_test", ""),
                _age(item.age_s(now)),
                _alive_text(item),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), file=out)
    return 0


def _gc(args: argparse.Namespace, out: TextIO) -> int:
    if args.cached:
        return _gc_cached(args, out)
    found, api = _collect(args, out)
    now = time.time()
    verb = "would dispose" if args.dry_run else "disposed"
    disposed = failed = 0
    for item in found:
        age = item.age_s(now)
        if item.alive is not False:
            continue  # a live run's, or undecidable: never touched
        if item.protected is not None:
            continue
        if item.kept_until is not None and item.kept_until > now:
            continue  # kept after a failure, for someone to look at until then
        if item.reused and not args.include_reused:
            continue  # in some checkout's reuse cache: `gc --cached` there disposes it
        if age is not None and age < args.older_than:
            continue
        label = (
            f"{item.backend} sandbox {item.sandbox_id} (run {item.run}, "
            f"{item.metadata.get('kode_test', '?')}, age {_age(age)}; run dead: {item.why})"
        )
        if not args.dry_run:
            try:
                _dispose(item, api)
            except Exception as exc:
                failed += 1
                print(f"could not dispose {label}: {exc}", file=out)
                continue
        disposed += 1
        print(f"{verb} {label}", file=out)
    spared = sum(
        1
        for item in found
        if item.alive is not False
        or item.protected is not None
        or (item.kept_until is not None and item.kept_until > now)
    )
    print(
        f"{disposed} {verb}, {spared} left alone (live or undecidable runs, kept or young "
        f"sandboxes), {failed} failed",
        file=out,
    )
    if not args.dry_run:
        _prune_run_dirs()
    return 1 if failed else 0


def _prune_run_dirs() -> None:
    """Remove run folders whose processes are all gone (a killed run with no watchdog)."""
    import shutil

    from pytest_kode.lifecycle.rundir import runs_root
    from pytest_kode.lifecycle.watchdog import run_alive

    root = runs_root()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if run_alive(root / name) is False:
            shutil.rmtree(root / name, ignore_errors=True)


def _gc_cached(args: argparse.Namespace, out: TextIO) -> int:
    from pytest_kode.lifecycle.idcache import CACHE_SUBDIR, IdCache

    cache = IdCache(
        args.rootdir / ".pytest_cache" / "d" / CACHE_SUBDIR, lambda note: print(note, file=out)
    )
    entries = cache.items()
    if not entries:
        print(f"the reuse cache {cache.path} is empty", file=out)
        return 0
    api = _api(args)
    verb = "would dispose" if args.dry_run else "disposed"
    failed = 0
    for key, entry in entries.items():
        backend = str(entry.get("backend", ""))
        sandbox_id = str(entry.get("sandbox_id", ""))
        label = f"{backend} sandbox {sandbox_id} (cached as {key})"
        try:
            if backend == "emulator":
                print(f"dropped {label}: emulated sandboxes end with their run", file=out)
            elif backend == "local":
                if not args.dry_run:
                    from pytest_kode.backends.local import remove_local_sandbox

                    remove_local_sandbox(sandbox_id, args.local_root)
                print(f"{verb} {label}", file=out)
            elif backend == "e2b":
                if api is None:
                    raise RuntimeError("E2B_API_KEY is not set; set it to dispose E2B sandboxes")
                if not args.dry_run:
                    from e2b import Sandbox

                    Sandbox.kill(sandbox_id, **api)
                print(f"{verb} {label}", file=out)
            else:
                raise RuntimeError(f"unknown backend {backend!r}")
        except Exception as exc:
            failed += 1
            print(f"could not dispose {label}: {exc}; left in the cache", file=out)
            continue
        if not args.dry_run:
            cache.delete(key, sandbox_id)
    return 1 if failed else 0


def _emulator(args: argparse.Namespace, out: TextIO) -> int:
    from pytest_kode.emulator.__main__ import main as emulator_main

    argv = ["--port", str(args.port), "--profile", args.profile]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    for flag in (
        "create_rate",
        "create_burst",
        "max_concurrent",
        "max_lifetime",
        "clock_offset",
        "rpc_latency_ms",
        "create_latency_ms",
    ):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    return emulator_main(argv)


def _parser() -> argparse.ArgumentParser:
    from pytest_kode.backends.local import default_root

    parser = argparse.ArgumentParser(
        prog="pytest-kode", description="Manage the sandboxes pytest-kode made."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--backend", choices=("all", "local", "e2b"), default="all", help="default: all"
        )
        sub.add_argument(
            "--local-root",
            type=Path,
            default=default_root(),
            help="where local sandboxes live (default: $KODE_LOCAL_ROOT or <tmp>/pytest-kode)",
        )
        sub.add_argument("--api-url", help="E2B API URL (default: $E2B_API_URL or E2B's)")
        sub.add_argument("--sandbox-url", help="E2B sandbox URL (default: $E2B_SANDBOX_URL)")

    ls = commands.add_parser(
        "ls", help="list the plugin's sandboxes: run, worker, test, age, whether the run lives"
    )
    common(ls)
    gc = commands.add_parser(
        "gc",
        help="dispose sandboxes whose run is dead (never a live run's, never untagged ones)",
    )
    common(gc)
    gc.add_argument("--dry-run", action="store_true", help="print what would be disposed")
    gc.add_argument(
        "--older-than",
        type=_duration_arg,
        default=0.0,
        metavar="DURATION",
        help="only sandboxes older than this (30s, 15m, 2h, 1d)",
    )
    gc.add_argument(
        "--cached",
        action="store_true",
        help="dispose the sandboxes in the reuse cache (--sandbox-reuse) and empty it",
    )
    gc.add_argument(
        "--rootdir", type=Path, default=Path.cwd(), help="project whose cache --cached reads"
    )
    gc.add_argument(
        "--include-reused",
        action="store_true",
        help="also dispose dead runs' sandboxes kept for --sandbox-reuse",
    )
    emulator = commands.add_parser("emulator", help="serve a loopback E2B emulator")
    emulator.add_argument("--port", type=int, default=0)
    emulator.add_argument("--api-key", default=None)
    from pytest_kode.emulator.__main__ import add_latency_arguments, add_profile_arguments

    add_profile_arguments(emulator)
    add_latency_arguments(emulator)
    return parser


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytest-kode`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    if args.command == "ls":
        return _ls(args, out)
    if args.command == "gc":
        return _gc(args, out)
    return _emulator(args, out)


if __name__ == "__main__":
    sys.exit(main())
