"""Sandbox metrics from what the emulated sandbox really uses, sampled as E2B does (buckets).

CPU and memory come from ``/proc`` for the sandbox's process tree (its agent, the sandbox's
init, and everything running inside); disk is the size of the files in the sandbox's home.
Totals are the sizes the control plane reports for the sandbox.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
from pathlib import Path

__all__ = ["SAMPLE_INTERVAL_S", "Metric", "MetricsRecorder"]

SAMPLE_INTERVAL_S = 5.0
_MAX_SAMPLES = 720  # an hour of 5 s buckets
_MAX_DISK_ENTRIES = 50_000  # walking the home stops here: a sample must stay cheap
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class Metric:
    timestamp: datetime.datetime
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int

    def to_json(self) -> dict[str, object]:
        return {
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            "timestampUnix": int(self.timestamp.timestamp()),
            "cpuCount": self.cpu_count,
            "cpuUsedPct": round(self.cpu_used_pct, 2),
            "memUsed": self.mem_used,
            "memTotal": self.mem_total,
            "memCache": 0,
            "diskUsed": self.disk_used,
            "diskTotal": self.disk_total,
        }


class MetricsRecorder:
    """One sandbox's samples; :meth:`sample` is called at creation and then every bucket."""

    def __init__(self, *, cpu_count: int, mem_total: int, disk_total: int) -> None:
        self._cpu_count = cpu_count
        self._mem_total = mem_total
        self._disk_total = disk_total
        self._lock = threading.Lock()
        self._samples: list[Metric] = []
        self._last: tuple[float, int] | None = None  # (monotonic time, cpu ticks)
        self.next_due = 0.0

    def sample(self, root_pid: int | None, home: Path, now: float) -> None:
        """Measure the process tree under ``root_pid`` (None: nothing runs) and ``home``."""
        ticks, rss_pages = _usage(root_pid) if root_pid is not None else (0, 0)
        cpu_pct = 0.0
        if self._last is not None:
            elapsed = now - self._last[0]
            if elapsed > 0:
                used_s = max(0, ticks - self._last[1]) / _CLOCK_TICKS
                cpu_pct = min(100.0, 100.0 * used_s / (elapsed * self._cpu_count))
        self._last = (now, ticks)
        metric = Metric(
            timestamp=datetime.datetime.now(datetime.UTC),
            cpu_count=self._cpu_count,
            cpu_used_pct=cpu_pct,
            mem_used=rss_pages * _PAGE_SIZE,
            mem_total=self._mem_total,
            disk_used=_disk_used(home),
            disk_total=self._disk_total,
        )
        with self._lock:
            self._samples.append(metric)
            del self._samples[:-_MAX_SAMPLES]
        self.next_due = now + SAMPLE_INTERVAL_S

    def between(self, start: int | None, end: int | None) -> list[Metric]:
        """Samples whose second lies in ``[start, end]`` (unix seconds, both optional)."""
        with self._lock:
            samples = list(self._samples)
        return [
            metric
            for metric in samples
            if (start is None or int(metric.timestamp.timestamp()) >= start)
            and (end is None or int(metric.timestamp.timestamp()) <= end)
        ]


def _usage(root_pid: int) -> tuple[int, int]:
    """CPU ticks (user + system) and resident pages of ``root_pid`` and its descendants."""
    stats: dict[int, tuple[int, int, int]] = {}  # pid -> (ppid, ticks, pages)
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return 0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:
            stats[pid] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21]))
        except (IndexError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks = pages = 0
    pending = [root_pid] if root_pid in stats else []
    while pending:
        pid = pending.pop()
        ticks += stats[pid][1]
        pages += stats[pid][2]
        pending.extend(children.get(pid, ()))
    return ticks, pages


def _disk_used(home: Path) -> int:
    total = seen = 0
    for directory, dirs, files in os.walk(home):
        for name in dirs + files:
            seen += 1
            if seen > _MAX_DISK_ENTRIES:
                return total
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                continue
    return total
