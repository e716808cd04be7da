"""What the local-backend test modules share: the isolation modes they run in.

``needs_bwrap`` tests skip cleanly where bubblewrap does not work *or* the run's switch
(``--sandbox-isolation=none``, ``KODE_SANDBOX_ISOLATION=none``) turns it off. The decision is
made when the test runs (``tests/conftest.py``), not at import: the plugin applies
``--sandbox-isolation`` after the root conftest has already been imported.
"""

from __future__ import annotations

import pytest

from pytest_kode.backends.local import detect_isolation

needs_bwrap = pytest.mark.needs_bwrap
MODES = [pytest.param("bwrap", marks=needs_bwrap), "none"]


def have_bwrap() -> bool:
    """Whether local sandboxes get bubblewrap in this run (probed once per process)."""
    return detect_isolation() == "bwrap"


def skip_without_bwrap(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_bwrap") is not None and not have_bwrap():
        pytest.skip("needs bubblewrap, which does not work here or is switched off")
