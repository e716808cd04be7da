"""One emulator for the whole emulator test session, and SDK handles bound to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pytest_kode.emulator import E2BEmulator


@pytest.fixture(scope="session")
def emulator() -> Iterator[E2BEmulator]:
    with E2BEmulator() as emu:
        yield emu


@pytest.fixture
def lenient(emulator: E2BEmulator) -> Iterator[E2BEmulator]:
    """The session emulator without its plan's rate and concurrency limits, for tests that count
    requests exactly or send raw requests without retries; restored afterwards."""
    strict = emulator.profile
    emulator.profile = "unlimited"
    yield emulator
    emulator.profile = strict


@pytest.fixture
def api(emulator: E2BEmulator) -> dict[str, Any]:
    """ApiParams pointing the real SDK at the emulator (no os.environ involved)."""
    return {"api_key": emulator.api_key, "api_url": emulator.url, "sandbox_url": emulator.url}


@pytest.fixture
def create(api: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """``create(**kwargs)`` -> an ``e2b.Sandbox`` on the emulator, killed after the test."""
    from e2b import Sandbox

    made: list[Any] = []

    def _create(**kwargs: Any) -> Any:
        sandbox = Sandbox.create(**{**api, **kwargs})
        made.append(sandbox)
        return sandbox

    yield _create
    for sandbox in made:
        Sandbox.kill(sandbox.sandbox_id, **api)


@pytest.fixture
def sbx(create: Callable[..., Any]) -> Any:
    return create()
