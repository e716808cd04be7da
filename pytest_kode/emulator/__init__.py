"""A loopback E2B emulator: the real ``e2b`` SDK against local sandboxes, offline (SPEC 2.3).

Importing this package is cheap; uvicorn and ``e2b`` load when the emulator starts.
"""

from __future__ import annotations

from pytest_kode.emulator._server import E2BEmulator

__all__ = ["E2BEmulator"]
