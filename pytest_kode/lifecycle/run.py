"""Per-run state kept in ``config.stash``: settings, registry, provisioner, per-test records."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kode.lifecycle.provisioner import Provisioner, RunSettings, SandboxPool

if TYPE_CHECKING:
    from pytest_kode.backends.registry import BackendRegistry
    from pytest_kode.options import MarkerSettings, SandboxOptions
    from pytest_kode.sandbox import Sandbox

__all__ = ["ITEM_FAILED", "ITEM_SANDBOXES", "RUN_KEY", "KodeRun"]

# The sandboxes a test used, each with its transcript position when the test got it.
ITEM_SANDBOXES = pytest.StashKey[list[tuple["Sandbox", int]]]()
ITEM_FAILED = pytest.StashKey[bool]()
_ITEM_MARKER = pytest.StashKey[tuple["MarkerSettings", dict[str, Any]]]()


class KodeRun:
    """Everything pytest-kode knows about the current pytest process."""

    def __init__(
        self,
        config: pytest.Config,
        settings: RunSettings,
        registry: BackendRegistry,
        run_id: str,
        worker_id: str,
        *,
        controller: bool,
        **provisioner_options: Any,
    ) -> None:
        self.config = config
        self.settings = settings
        self.registry = registry
        self.run_id = run_id
        self.worker_id = worker_id
        self.controller = controller  # the xdist controller: runs no tests, settles at the end
        self.provisioner = Provisioner(
            config, settings, registry, run_id, worker_id, **provisioner_options
        )
        # One list for everything the summary should mention (the provisioner's too).
        self.notes: list[str] = self.provisioner.notes
        # The pool of each session-scoped fixture's sandbox (by id), for keep-on-failure.
        self.shared_pools: dict[int, SandboxPool] = {}
        self._wanting_after: dict[str, int] = {}
        self.provisioner.tests_left = self._tests_left

    # -- the collected run ------------------------------------------------------------------
    def plan(self, items: list[pytest.Item]) -> None:
        """Note, for each test, how many later tests may want a function-scope sandbox (what
        prewarm needs to know not to make spares nobody takes)."""
        later = 0
        wanting_after: dict[str, int] = {}
        for item in reversed(items):
            wanting_after[item.nodeid] = later
            later += self._wants_function_sandbox(item)
        self._wanting_after = wanting_after

    def _tests_left(self, item: pytest.Item | None) -> int | None:
        left = self._wanting_after.get(item.nodeid) if item is not None else None
        if left is None:
            return None
        # Under xdist each worker runs its share of the rest (about an equal one).
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
        return -(-left // workers)

    def _wants_function_sandbox(self, item: pytest.Item) -> bool:
        names = getattr(item, "fixturenames", ())
        if "sandbox_factory" in names:
            return True
        if "sandbox" not in names:
            return False
        from pytest_kode.errors import ConfigError

        try:
            settings, _ = self.marker(item)
        except ConfigError:
            return False
        return settings.scope == "function"

    # -- per test ---------------------------------------------------------------------------
    def marker(self, item: pytest.Item) -> tuple[MarkerSettings, dict[str, Any]]:
        """The item's merged, validated ``sandbox`` marker (cached on the item)."""
        cached = item.stash.get(_ITEM_MARKER, None)
        if cached is None:
            from pytest_kode.options import merge_marker_kwargs

            marks = [(mark.args, dict(mark.kwargs)) for mark in item.iter_markers("sandbox")]
            cached = merge_marker_kwargs(marks, item.nodeid)
            item.stash[_ITEM_MARKER] = cached
        return cached

    def options_for(self, item: pytest.Item | None) -> SandboxOptions:
        """Defaults < ini/command line < marker, then the pytest_kode_sandbox_options hook.

        ``item=None`` for the sandboxes of no test (session-scoped fixtures): no marker applies.
        """
        from pytest_kode.options import SandboxOptions

        fields: dict[str, Any] = {}
        if self.settings.template is not None:
            fields["template"] = self.settings.template
        if item is not None:
            fields.update(self.marker(item)[1])
        options = SandboxOptions(**fields)
        changed = self.config.hook.pytest_kode_sandbox_options(options=options, item=item)
        return changed if changed is not None else options

    def track(self, item: pytest.Item, sandbox: Sandbox) -> None:
        used = item.stash.setdefault(ITEM_SANDBOXES, [])
        if all(known is not sandbox for known, _ in used):
            used.append((sandbox, sandbox.transcript.total))
            item.user_properties.append(("sandbox_id", sandbox.sandbox_id))

    def finish(
        self,
        item: pytest.Item,
        sandbox: Sandbox,
        settings: MarkerSettings,
        pool: SandboxPool | None,
    ) -> None:
        """After a test: collect artifacts and keep the sandbox when it failed; else release."""
        failed = item.stash.get(ITEM_FAILED, False)
        keep = failed and (self.settings.keep_failed or settings.keep_on_failure)
        if failed and settings.artifacts:
            self._collect_artifacts(item, sandbox, settings.artifacts)
        if pool is not None:
            if keep:
                pool.keep_after_failure(sandbox, item.nodeid)
            return
        self.provisioner.release(sandbox, keep_for=item.nodeid if keep else None)

    def _collect_artifacts(
        self, item: pytest.Item, sandbox: Sandbox, patterns: tuple[str, ...]
    ) -> None:
        target = self.settings.artifacts_dir / _safe_name(item.nodeid)
        copied = 0
        for pattern in patterns:
            try:
                paths = sandbox.fs.glob(pattern)
                for path in paths:
                    if sandbox.fs.stat(path).type != "file":
                        continue
                    destination = target / path.lstrip("/")
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(sandbox.fs.read_bytes(path))
                    copied += 1
            except Exception as exc:  # artifacts must never turn a failure into an error
                self.notes.append(f"{item.nodeid}: could not collect artifacts {pattern!r}: {exc}")
        if copied:
            self.notes.append(f"{item.nodeid}: {copied} artifact file(s) copied to {target}")


def _safe_name(nodeid: str) -> str:
    """A file-system-safe, still recognisable folder name for a test id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:200] or "test"


def artifacts_dir(value: str | None, rootpath: Path) -> Path:
    path = Path(value) if value else Path("sandbox-artifacts")
    return path if path.is_absolute() else rootpath / path


RUN_KEY = pytest.StashKey[KodeRun]()
