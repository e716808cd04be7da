"""Repository-wide test set-up: what every test of this project shares."""

from __future__ import annotations

# pytester's in-process runs remove the modules they imported when they end. The e2b SDK's
# protobuf runtime cannot be imported a second time in one process ("invalid field
# descriptor"), so load it before any inner run, where their clean-up leaves it alone.
import e2b  # noqa: F401
import pytest

_XDIST_WORKER_ENV = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """The inner pytest runs are plain runs, even when this suite runs under ``-n``.

    Without this they inherit the xdist worker's environment, and plugins that look at it
    (pytest-benchmark warns, which our warnings-as-errors turns into a crash) misbehave.
    """
    for name in _XDIST_WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    return pytester
