"""Bubblewrap command lines for the local backend: an unprivileged, least-privilege view.

Inside, commands run as ``user`` (uid/gid 1000, named by a synthetic ``/etc/passwd`` and
``/etc/group``) in new user, pid, ipc and uts namespaces, with every capability dropped and no
further user namespaces allowed: ``mount``, ``mknod`` and ``unshare`` fail even when pytest runs
as root. The root of the sandbox is bwrap's own tmpfs (remounted read-only at the end) holding,
read-only, only what running the host's tools needs:

* ``/usr`` and the ``/bin``, ``/sbin``, ``/lib*`` links (or directories) beside it;
* ``/etc`` without what is not world-readable (``shadow``, ``gshadow``, ``ssl/private``, ssh host
  keys...: a root-owned file stays readable inside when pytest runs as root, because the
  sandbox's uid maps to the host's root, so such files are covered, not merely unreadable);
* the Python installation that runs pytest (the agent's interpreter), when it lives outside
  ``/usr`` (pyenv, a tool cache), and the template layer's shared directories (``binds``);
* private ``/proc``, ``/dev`` and ``/tmp``; ``work_dir`` is the sandbox's directory.

Nothing else of the host: no ``/home``, ``/root``, ``/run`` (and its sockets), ``/var``, no
project checkout, no other sandbox. When ``work_dir`` lies below a visible directory (such as
``/usr/src/app``), that directory's other entries are bound along the way so they stay visible.

The network is the caller's choice (:func:`bwrap_argv`'s ``network``): a namespace of the
sandbox's own, made by bwrap (loopback only, until :mod:`._network` attaches a route out to the
process bwrap reports on ``--info-fd``), or the host's (template builds, which download packages).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pytest_kode.backends.local._network import agent_python

__all__ = [
    "BWRAP_INSTALL_HINT",
    "ISOLATION_ENV",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "SANDBOX_USER",
    "Diagnosis",
    "bwrap_argv",
    "diagnose",
    "isolation_report",
    "probe",
    "requested_isolation",
]

ISOLATION_ENV = "KODE_SANDBOX_ISOLATION"
ISOLATIONS = ("auto", "bwrap", "none")
SANDBOX_USER = "user"
SANDBOX_UID = 1000
SANDBOX_GID = 1000

BWRAP_INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap slirp4netns`; Fedora: "
    "`dnf install bubblewrap slirp4netns`) and make sure unprivileged user namespaces are "
    "allowed, or use isolation='none'"
)
USERNS_BLOCKED_HINT = (
    "allow unprivileged user namespaces: `sudo sysctl -w "
    "kernel.apparmor_restrict_unprivileged_userns=0` (Ubuntu 23.10+, e.g. GitHub Actions' "
    "ubuntu-24.04), or an AppArmor profile for /usr/bin/bwrap with `userns,`"
)
_USERNS_BLOCKED = "setting up uid map: Permission denied"

# Top-level host entries shown read-only (when they exist); /etc is filtered separately.
_SYSTEM_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Covered whatever their mode says.
_ETC_SECRETS = frozenset({"shadow", "shadow-", "gshadow", "gshadow-"})
_PROBE_TIMEOUT_S = 15.0
_lock = threading.Lock()


def requested_isolation() -> str:
    """The isolation the environment asks for: ``$KODE_SANDBOX_ISOLATION`` or ``auto``.

    The plugin's ``--sandbox-isolation`` / ini ``sandbox_isolation`` set this variable for the
    run, so the backend, the template layer and xdist workers all see the same switch.
    """
    value = os.environ.get(ISOLATION_ENV, "").strip().lower() or "auto"
    if value not in ISOLATIONS:
        from pytest_kode.errors import ConfigError

        raise ConfigError(
            f"{ISOLATION_ENV}={os.environ.get(ISOLATION_ENV)!r} is not an isolation; allowed: "
            + ", ".join(ISOLATIONS)
        )
    return value


# -- the synthetic files --------------------------------------------------------------------
def _synthetic_files() -> dict[str, str]:
    user = f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}::/home/{SANDBOX_USER}:/bin/bash\n"
    return {
        "passwd": "root:x:0:0:root:/root:/bin/bash\n"
        + user
        + "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "resolv.conf": "",  # filled per name server by _resolv_conf
    }


@functools.lru_cache(maxsize=1)
def _etc_dir() -> str:
    """A directory of our own holding the synthetic /etc files (same content every run).

    Content-addressed and shared by every process of this user, so nothing needs removing
    after a run (even a killed one); a directory that is not ours or that others may write is
    never used.
    """
    files = _synthetic_files()
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:12]
    final = Path(tempfile.gettempdir(), f"pytest-kode-etc-{os.getuid()}-{digest}")
    if _trusted(final):
        return str(final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}."))
    for name, text in files.items():
        (staging / name).write_text(text, "utf-8")
        os.chmod(staging / name, 0o644)
    (staging / "empty").mkdir(mode=0o755)
    os.chmod(staging, 0o755)
    try:
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    if not _trusted(final):
        # Somebody else holds the name: use a private copy for this process.
        private = Path(tempfile.mkdtemp(prefix="pytest-kode-etc-"))
        for name, text in files.items():
            (private / name).write_text(text, "utf-8")
        (private / "empty").mkdir()
        os.chmod(private, 0o755)
        return str(private)
    return str(final)


def _trusted(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and (path / "empty").is_dir()
    )


@functools.lru_cache(maxsize=8)
def _resolv_conf(nameserver: str) -> str:
    path = Path(_etc_dir(), f"resolv.conf.{nameserver}")
    if not path.is_file():
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(f"nameserver {nameserver}\n", "utf-8")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    return str(path)


# -- the view -------------------------------------------------------------------------------
def _world_readable(info: os.stat_result) -> bool:
    if stat.S_ISDIR(info.st_mode):
        return info.st_mode & 0o005 == 0o005
    return bool(info.st_mode & stat.S_IROTH)


def _show(path: str, args: list[str]) -> None:
    """Bind ``path`` read-only (a symlink stays a symlink)."""
    if os.path.islink(path):
        try:
            args += ["--symlink", os.readlink(path), path]
        except OSError:
            pass
    elif os.path.exists(path):
        args += ["--ro-bind", path, path]


@functools.lru_cache(maxsize=1)
def _etc_args() -> tuple[str, ...]:
    """``/etc`` with what only its owner (root, here) may read covered; passwd and group ours.

    One bind of the whole directory plus a few covers: a bind per entry would cost a mount
    each, 40+ ms per launch for a typical /etc.
    """
    etc = _etc_dir()
    args = ["--ro-bind", "/etc", "/etc"]
    for current, dirs, files in os.walk("/etc"):
        for name in [*dirs, *files]:
            path = os.path.join(current, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode):
                if current == "/etc":
                    args += _follow_link(path)
                continue
            if _world_readable(info) and not (current == "/etc" and name in _ETC_SECRETS):
                continue
            if stat.S_ISDIR(info.st_mode):
                args += ["--ro-bind", os.path.join(etc, "empty"), path]
                dirs.remove(name)
            else:
                args += ["--ro-bind", "/dev/null", path]
    for name in ("passwd", "group"):
        if os.path.isfile(os.path.join("/etc", name)):
            args += ["--ro-bind", os.path.join(etc, name), os.path.join("/etc", name)]
    return tuple(args)


def _visible(path: str) -> bool:
    return any(_below(path, "/" + top) for top in (*_SYSTEM_TOP, "etc", "proc", "dev"))


def _follow_link(link: str) -> list[str]:
    """Show the file an /etc symlink names when it lies somewhere hidden (Ubuntu's resolv.conf
    points into /run): that one file, at its own path, so the link resolves inside."""
    target = os.path.realpath(link)
    if _visible(target) or not os.path.isfile(target):
        return []
    try:
        if not _world_readable(os.stat(target)):
            return []
    except OSError:
        return []
    return ["--ro-bind", target, target]


def _resolv_conf_args(nameserver: str) -> list[str]:
    # Mounted where /etc/resolv.conf leads: a symlink (Ubuntu's points into /run) is followed.
    target = os.path.realpath("/etc/resolv.conf")
    if not os.path.isfile(target):
        return []
    return ["--ro-bind", _resolv_conf(nameserver), target]


@functools.lru_cache(maxsize=4)
def python_roots() -> tuple[str, ...]:
    """The installation of the agent's interpreter, when ``/usr`` does not already show it."""
    roots = {os.path.realpath(sys.base_prefix)}
    roots.add(os.path.dirname(os.path.dirname(agent_python())))
    return tuple(sorted(root for root in roots if not _below(root, "/usr") and root != "/"))


def _below(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@functools.lru_cache(maxsize=64)
def _layout(work_dir: str) -> tuple[str, ...]:
    """The mount arguments that do not depend on the sandbox (cached per work_dir)."""
    parts = [part for part in work_dir.split("/") if part]
    first = parts[0] if parts else None
    args: list[str] = []
    for name in _SYSTEM_TOP:
        if name != first:
            _show("/" + name, args)
    if first != "etc":
        args += _etc_args()
    if first in _SYSTEM_TOP:
        # work_dir lies below a visible directory: keep that directory's other entries visible.
        current = "/"
        for index, part in enumerate(parts[:-1]):
            current = os.path.join(current, part)
            if os.path.islink(current) or not os.path.isdir(current):
                break  # a symlink or a missing directory becomes a plain tmpfs directory
            for name in sorted(os.listdir(current)):
                if name != parts[index + 1]:
                    _show(os.path.join(current, name), args)
    for root in python_roots():
        args += ["--ro-bind", root, root]
    args += ["--proc", "/proc", "--dev", "/dev"]
    return tuple(args)


@functools.lru_cache(maxsize=1)
def _executable() -> str | None:
    return shutil.which("bwrap")


_IDENTITY = (
    "--unshare-user",
    "--uid",
    str(SANDBOX_UID),
    "--gid",
    str(SANDBOX_GID),
    "--disable-userns",
    "--cap-drop",
    "ALL",
    "--unshare-pid",
    "--unshare-ipc",
    "--unshare-uts",
)


def bwrap_argv(
    directory: str,
    work_dir: str,
    *,
    network: Literal["host", "own"] = "host",
    nameserver: str | None = None,
    info_fd: int | None = None,
    cwd: str | None = None,
    binds: Sequence[tuple[str, bool]] = (),
    tmp_dir: str | None = None,
    persistent: bool = False,
) -> list[str]:
    """The launcher prefix that runs a command in a sandbox: ``directory`` at ``work_dir``.

    ``persistent``: the command is a sandbox's long-lived agent. It becomes the pid namespace's
    init (``--as-pid-1``: it reaps orphans itself, and its exit ends every process inside) and
    is not tied to the thread that spawned it (no ``--die-with-parent``): the sandbox lives
    until disposed or until its deadline, whoever created it.

    Append the command's argv. ``network`` is ``"own"`` (a new network namespace, loopback
    only until a stack is attached to it) or ``"host"`` (the host's network; template builds).
    ``nameserver`` replaces the host's resolv.conf (the stack's DNS). ``info_fd``: an fd the
    launched bwrap holds, on which it reports the sandbox's host pid and namespaces as JSON.
    ``cwd`` is an in-sandbox path (default ``work_dir``). ``binds`` are extra host paths shown
    at the same path, writable or not (a template's shared venv). ``tmp_dir`` is a host
    directory shown as ``/tmp`` (the sandbox's own, kept across commands as on E2B); without it
    each command gets an empty tmpfs.
    """
    exe = _executable()
    if exe is None:
        raise FileNotFoundError("bwrap")
    argv = [exe, *_IDENTITY, "--as-pid-1" if persistent else "--die-with-parent"]
    if network == "own":
        argv.append("--unshare-net")
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += _layout(work_dir)
    if nameserver is not None:
        argv += _resolv_conf_args(nameserver)
    argv += ["--bind", tmp_dir, "/tmp"] if tmp_dir else ["--tmpfs", "/tmp"]
    for path, writable in binds:
        argv += ["--bind" if writable else "--ro-bind", path, path]
    argv += ["--bind", directory, work_dir, "--remount-ro", "/", "--chdir", cwd or work_dir, "--"]
    return argv


# -- can it run here? ------------------------------------------------------------------------
@dataclass(frozen=True)
class Diagnosis:
    """What isolation the local backend gets here and, when it is none, why and the fix."""

    works: bool
    why: str  # "ok", or what is missing
    fix: str  # "" when it works


def _try() -> Diagnosis:
    if _executable() is None:
        return Diagnosis(False, "bubblewrap is not installed (no `bwrap` on PATH)", _install())
    directory = tempfile.mkdtemp(prefix="pytest-kode-probe-")
    try:
        argv = bwrap_argv(directory, "/home/user", network="own")
        argv += ["/bin/sh", "-c", "test -w /home/user && test -d /tmp"]
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return Diagnosis(False, f"running bwrap failed: {exc}", _install())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if completed.returncode != 0:
        detail = completed.stderr.decode("utf-8", "replace").strip() or "no error output"
        return _explain(f"bwrap exited with {completed.returncode}: {detail}")
    return Diagnosis(True, "ok", "")


def _install() -> str:
    return (
        "install it: `sudo apt-get install bubblewrap slirp4netns` "
        "(Fedora: `sudo dnf install bubblewrap slirp4netns`)"
    )


def _explain(detail: str) -> Diagnosis:
    if _USERNS_BLOCKED in detail or "Operation not permitted" in detail:
        return Diagnosis(
            False,
            f"user namespaces are blocked here ({detail.strip().splitlines()[-1]})",
            USERNS_BLOCKED_HINT,
        )
    return Diagnosis(False, detail, "run with --sandbox-isolation=none to go without isolation")


_probed: list[Diagnosis] = []


def diagnose() -> Diagnosis:
    """Whether bubblewrap (with a network namespace of its own) works here. Probed once."""
    if not _probed:
        with _lock:
            if not _probed:
                _probed.append(_try())
    return _probed[0]


def probe() -> tuple[bool, str]:
    """``(works, why)``: :func:`diagnose` as a pair."""
    found = diagnose()
    return found.works, found.why if found.works else f"{found.why}; fix: {found.fix}"


def isolation_report(switch: str | None = None) -> tuple[str, list[str]]:
    """What the header and ``pytest-kode ls`` say: the isolation in one phrase, then details.

    ``switch`` names where a non-default isolation choice came from (``--sandbox-isolation=none``,
    ``KODE_SANDBOX_ISOLATION=none``...); by default the environment variable is consulted.
    """
    wanted = requested_isolation()
    if switch is None and wanted != "auto":
        switch = f"{ISOLATION_ENV}={wanted}"
    choose = f"choose with --sandbox-isolation=auto|bwrap|none or {ISOLATION_ENV}"
    if wanted == "none":
        return f"none ({switch})", []
    found = diagnose()
    if not found.works:
        short = "none" if wanted == "auto" else f"bwrap required ({switch}) but unavailable"
        return f"{short} (bubblewrap unavailable)", [
            f"no isolation: {found.why}",
            f"fix: {found.fix}",
            choose,
        ]
    from pytest_kode.backends.local._network import SLIRP_INSTALL_HINT, stack_problem

    details = []
    problem = stack_problem()
    if problem is not None:
        details = [
            f"sandboxes with allow_internet_access=True cannot start: {problem}",
            f"fix: {SLIRP_INSTALL_HINT}",
        ]
    return "bwrap" + (f" ({switch})" if switch else ""), details
