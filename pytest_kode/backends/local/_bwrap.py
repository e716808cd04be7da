"""Bubblewrap command lines for the local backend, and the once-per-process probe.

The sandbox directory must appear at ``work_dir`` (``/home/user`` on E2B), a path that usually
does not exist on the host. ``--ro-bind / /`` would make it impossible to create that mount point,
so the root of the sandbox is bwrap's own tmpfs: every top-level host entry is bound read-only
except ``/proc``, ``/dev`` and ``/tmp`` (which get fresh, private instances) and the first
component of ``work_dir``. Along the ``work_dir`` chain each host directory's other entries are
bound too, so ``/home/<someone else>`` or ``/usr/share`` stay visible when ``work_dir`` is
``/home/user`` or ``/usr/src/app``. The tmpfs root is remounted read-only at the end.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence

__all__ = ["BWRAP_INSTALL_HINT", "bwrap_argv", "probe", "probe_network_isolation"]

BWRAP_INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
    "bubblewrap`) and make sure unprivileged user namespaces are allowed, or use "
    "isolation='none'"
)

# /proc, /dev and /tmp get private instances; the rest of the host is visible read-only.
_PRIVATE_TOP = frozenset({"proc", "dev", "tmp"})
_PROBE_TIMEOUT_S = 15.0
_lock = threading.Lock()


def _entry_args(host_dir: str, skip: str | None) -> list[str]:
    args: list[str] = []
    try:
        names = sorted(os.listdir(host_dir))
    except OSError:
        return args
    for name in names:
        if name == skip or (host_dir == "/" and name in _PRIVATE_TOP):
            continue
        path = os.path.join(host_dir, name)
        if os.path.islink(path):
            try:
                args += ["--symlink", os.readlink(path), path]
            except OSError:
                continue
        elif os.path.exists(path):
            args += ["--ro-bind-try", path, path]
    return args


@functools.lru_cache(maxsize=64)
def _layout(work_dir: str) -> tuple[str, ...]:
    """The mount arguments that do not depend on the sandbox directory (cached per work_dir)."""
    parts = [part for part in work_dir.split("/") if part]
    args = _entry_args("/", parts[0] if parts else None)
    if parts and parts[0] not in _PRIVATE_TOP:
        current = "/"
        for index, part in enumerate(parts[:-1]):
            current = os.path.join(current, part)
            # A symlink or a missing directory on the host becomes a plain tmpfs directory.
            if os.path.islink(current) or not os.path.isdir(current):
                break
            args += _entry_args(current, parts[index + 1])
    args += ["--proc", "/proc", "--dev", "/dev"]
    return tuple(args)


@functools.lru_cache(maxsize=1)
def _executable() -> str | None:
    return shutil.which("bwrap")


def bwrap_argv(
    directory: str,
    work_dir: str,
    *,
    network: bool = True,
    cwd: str | None = None,
    binds: Sequence[tuple[str, bool]] = (),
    tmp_dir: str | None = None,
    persistent: bool = False,
) -> list[str]:
    """The bwrap prefix that runs a command with ``directory`` mounted at ``work_dir``.

    ``persistent``: the command is a sandbox's long-lived agent. It becomes the pid namespace's
    init (``--as-pid-1``: it reaps orphans itself, and its exit ends every process inside) and
    is not tied to the thread that spawned it (no ``--die-with-parent``): the sandbox lives
    until disposed or until its deadline, whoever created it.

    Append the command's argv. ``cwd`` is an in-sandbox path (default ``work_dir``). ``binds``
    are extra host paths shown at the same path, writable or not (a template's shared venv,
    which may live under the otherwise private ``/tmp``). ``tmp_dir`` is a host directory shown
    as ``/tmp`` (the sandbox's own, kept across commands as on E2B); without it each command
    gets an empty tmpfs.
    """
    exe = _executable()
    if exe is None:
        raise FileNotFoundError("bwrap")
    argv = [exe, "--unshare-pid"]
    argv += ["--as-pid-1"] if persistent else ["--die-with-parent"]
    if not network:
        argv.append("--unshare-net")
    argv += _layout(work_dir)
    argv += ["--bind", tmp_dir, "/tmp"] if tmp_dir else ["--tmpfs", "/tmp"]
    for path, writable in binds:
        argv += ["--bind" if writable else "--ro-bind", path, path]
    argv += ["--bind", directory, work_dir, "--remount-ro", "/", "--chdir", cwd or work_dir, "--"]
    return argv


def _try(unshare_net: bool) -> tuple[bool, str]:
    if _executable() is None:
        return False, "the `bwrap` executable is not on PATH"
    directory = tempfile.mkdtemp(prefix="pytest-kode-probe-")
    try:
        argv = bwrap_argv(directory, "/home/user", network=not unshare_net)
        argv += ["bash", "-c", "test -w /home/user && test -d /tmp"]
        completed = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_PROBE_TIMEOUT_S,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"running bwrap failed: {exc}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if completed.returncode != 0:
        detail = completed.stderr.decode("utf-8", "replace").strip() or "no error output"
        return False, f"bwrap exited with {completed.returncode}: {detail}"
    return True, "ok"


_probed: dict[bool, tuple[bool, str]] = {}


def probe() -> tuple[bool, str]:
    """Whether bubblewrap works here, and why not. Runs once per process."""
    return _cached(False)


def probe_network_isolation() -> tuple[bool, str]:
    """Whether bwrap can also give a network-less namespace (``--unshare-net``)."""
    return _cached(True)


def _cached(unshare_net: bool) -> tuple[bool, str]:
    result = _probed.get(unshare_net)
    if result is None:
        with _lock:
            result = _probed.get(unshare_net)
            if result is None:
                result = _probed[unshare_net] = _try(unshare_net)
    return result
