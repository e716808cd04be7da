"""What the local-backend test modules share: the isolation modes they run in."""

from __future__ import annotations

import pytest

from pytest_kode.backends.local import detect_isolation

HAVE_BWRAP = detect_isolation() == "bwrap"
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap does not work here")
MODES = [pytest.param("bwrap", marks=needs_bwrap), "none"]
