"""Shared set-up of the pytester end-to-end tests of the pytest layer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def kode_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private folder for the local backend's sandboxes of the inner runs.

    The inner pytest runs inherit the environment, so every sandbox they make lands here; a test
    that checks for leaks asserts this folder ends up empty.
    """
    root = tmp_path / "kode-root"
    root.mkdir()
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(root))
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.delenv("KODE_SANDBOX_BACKEND", raising=False)
    return root
