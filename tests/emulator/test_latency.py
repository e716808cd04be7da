"""The emulator's latency model: a round trip on every request, a boot time on create.

Only lower bounds are asserted (a delay is a sleep, so it can only be longer than asked).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_kode.emulator import E2BEmulator

ROOT = Path(__file__).resolve().parents[2]


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def test_rpc_latency_delays_every_request_and_create_latency_the_create(tmp_path: Path) -> None:
    from e2b import Sandbox

    with E2BEmulator(root_dir=tmp_path, rpc_latency_ms=120, create_latency_ms=400) as emu:
        api: dict[str, Any] = {"api_key": emu.api_key, "api_url": emu.url, "sandbox_url": emu.url}
        box: list[Any] = []
        assert _timed(lambda: box.append(Sandbox.create(**api))) >= 0.52
        sbx = box[0]
        assert _timed(lambda: sbx.files.exists("/home/user")) >= 0.12
        assert _timed(lambda: sbx.commands.run("true")) >= 0.12
        assert _timed(sbx.kill) >= 0.12
        emu.clear_faults()
        assert (emu.rpc_latency_ms, emu.create_latency_ms, emu.latency_ms) == (0, 0, 0)


def test_latency_ms_is_the_rpc_latency_and_bad_values_are_refused() -> None:
    emu = E2BEmulator()
    emu.latency_ms = 150
    assert emu.rpc_latency_ms == 150
    emu.rpc_latency_ms = 30
    assert emu.latency_ms == 30
    for name in ("latency_ms", "rpc_latency_ms", "create_latency_ms"):
        with pytest.raises(ValueError, match=name):
            setattr(emu, name, -1)
    with pytest.raises(ValueError, match="create_latency_ms"):
        E2BEmulator(create_latency_ms=-5)


def test_latencies_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KODE_EMULATOR_RPC_LATENCY_MS", "30")
    monkeypatch.setenv("KODE_EMULATOR_CREATE_LATENCY_MS", "300")
    emu = E2BEmulator()
    assert (emu.rpc_latency_ms, emu.create_latency_ms) == (30, 300)
    assert E2BEmulator(rpc_latency_ms=0).rpc_latency_ms == 0  # an argument wins
    monkeypatch.setenv("KODE_EMULATOR_RPC_LATENCY_MS", "fast")
    with pytest.raises(ValueError, match="KODE_EMULATOR_RPC_LATENCY_MS.*'fast'"):
        E2BEmulator()


def test_standalone_command_takes_latency_flags() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KODE_EMULATOR_")}
    bad = subprocess.run(
        [sys.executable, "-m", "pytest_kode.emulator", "--create-latency-ms", "-1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "--create-latency-ms must be a whole number of milliseconds >= 0" in bad.stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest_kode.emulator",
            "--rpc-latency-ms",
            "30",
            "--create-latency-ms",
            "300",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "round trip 30 ms, create at least 300 ms" in line, line
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
