"""Backends by name. Plugins add theirs through ``pytest_kode_register_backends``."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

from pytest_kode.errors import ConfigError

if TYPE_CHECKING:
    from pytest_kode.sandbox import Sandbox

__all__ = ["BUILTIN_BACKENDS", "BackendRegistry", "SELECTABLE_ALIASES"]

# Built-ins are named by import path so that the registry costs nothing until a backend is used.
BUILTIN_BACKENDS: dict[str, str] = {
    "local": "pytest_kode.backends.local:LocalSandbox",
    "e2b": "pytest_kode.backends.e2b:E2BSandbox",
}

# Names a user may select that are not classes of their own: ``auto`` picks ``e2b`` or ``local``;
# ``emulator`` is the ``e2b`` backend against a loopback emulator the plugin starts.
SELECTABLE_ALIASES = ("auto", "emulator")


class BackendRegistry(MutableMapping[str, "type[Sandbox] | str"]):
    """Maps a backend name to a ``Sandbox`` subclass (or a lazy ``"module:Class"`` path)."""

    def __init__(self) -> None:
        self._entries: dict[str, type[Sandbox] | str] = dict(BUILTIN_BACKENDS)

    def __getitem__(self, name: str) -> type[Sandbox] | str:
        return self._entries[name]

    def __setitem__(self, name: str, backend: type[Sandbox] | str) -> None:
        if not isinstance(name, str) or not name or name in SELECTABLE_ALIASES:
            raise ConfigError(
                f"cannot register a backend named {name!r}: names must be non-empty strings "
                f"other than {', '.join(SELECTABLE_ALIASES)}"
            )
        self._entries[name] = backend

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Everything a user may select: aliases first, then registered backends."""
        return [*SELECTABLE_ALIASES, *sorted(self._entries)]

    def load(self, name: str) -> type[Sandbox]:
        """The backend class for ``name``, importing a lazy entry on first use."""
        from pytest_kode.sandbox import Sandbox

        try:
            entry = self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown sandbox backend {name!r}; known backends: {', '.join(self.names())}",
                hint="register it with the pytest_kode_register_backends hook",
            ) from None
        if isinstance(entry, str):
            module_name, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = entry
        if not (isinstance(entry, type) and issubclass(entry, Sandbox)):
            raise ConfigError(
                f"backend {name!r} is registered as {entry!r}, which is not a "
                "pytest_kode.Sandbox subclass"
            )
        return entry
