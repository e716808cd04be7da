"""Text the plugin shows people: transcript sections, kept-sandbox hints, the summary line."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from pytest_kode.plans import PLANS

if TYPE_CHECKING:
    from pytest_kode.lifecycle.provisioner import SandboxStats
    from pytest_kode.plans import CloudPlan
    from pytest_kode.sandbox import ExecResult, Sandbox

__all__ = [
    "access_hint",
    "cost_line",
    "describe_result",
    "prewarm_lines",
    "stats_line",
    "tail",
    "transcript_section",
]

TAIL_LINES = 20
TAIL_BYTES = 2000


def clip_tail(text: str, lines: int, max_bytes: int) -> tuple[str, bool]:
    """The end of ``text``: at most ``lines`` lines and ``max_bytes`` bytes; True when cut.

    One rule for every place that shows output to a person (reports and assertion messages).
    """
    split = text.splitlines()
    body = "\n".join(split[-lines:])
    raw = body.encode("utf-8", errors="replace")
    if len(raw) > max_bytes:
        body = raw[-max_bytes:].decode("utf-8", errors="replace")
    return body, len(split) > lines or len(raw) > max_bytes


def tail(text: str, lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> str:
    """The end of ``text`` (see :func:`clip_tail`), marked when anything was cut."""
    body, cut = clip_tail(text, lines, max_bytes)
    return f"[... earlier output cut ...]\n{body}" if cut else body


def describe_result(result: ExecResult, *, lines: int = TAIL_LINES) -> str:
    """A command's outcome as a person reads it: command, exit, duration, output tails."""
    status = f"exit code {result.exit_code}"
    if result.timed_out:
        status += " (timed out)"
    parts = [f"$ {result.command}", f"  {status} after {result.duration_ms:.0f} ms"]
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if text:
            body = tail(text, lines).replace("\n", "\n    ")
            parts.append(f"  {name} (tail):\n    {body}")
        else:
            parts.append(f"  {name}: (empty)")
    if result.truncated:
        parts.append("  (output was truncated: head and tail kept)")
    return "\n".join(parts)


def transcript_section(sandbox: Sandbox, since: int = 0) -> tuple[str, str]:
    """The (title, body) of a failed test's report section: the commands this test ran."""
    entries = sandbox.transcript.since(since)
    title = f"sandbox {sandbox.sandbox_id} ({sandbox.backend}) transcript"
    if not entries:
        return title, "(no commands were run in this test)"
    return title, "\n".join(describe_result(result, lines=10) for result in entries)


def access_hint(sandbox: Sandbox) -> str:
    """How a person gets into a kept sandbox, per backend."""
    directory = getattr(sandbox, "directory", None)
    if sandbox.backend == "local" and directory is not None:
        return f"directory {directory}; enter it with: cd {shlex.quote(str(directory))} && bash"
    if sandbox.backend == "e2b":
        return (
            f"connect with: e2b sandbox connect {sandbox.sandbox_id}  (or, in Python: "
            f"e2b.Sandbox.connect({sandbox.sandbox_id!r}))"
        )
    return f"sandbox id {sandbox.sandbox_id}"


def stats_line(stats: SandboxStats) -> str:
    # Recycled: done sandboxes made as new for the next test (each old id counts as disposed).
    recycled = f"{stats.recycled} recycled, " if stats.recycled else ""
    line = (
        f"{stats.created} created, {recycled}{stats.resumed} resumed, {stats.reused} reused, "
        f"{stats.disposed} disposed, {stats.kept} kept, {stats.leaked} leaked; "
        f"provisioning {stats.provision_s:.2f}s, exec {stats.exec_s:.2f}s"
    )
    if stats.waited_s >= 0.01:
        # The cap is --sandbox-max-concurrent's, or else (E2B) the plan's concurrency limit.
        line += (
            f", waiting for a free slot {stats.waited_s:.2f}s "
            "(--sandbox-max-concurrent / --sandbox-plan)"
        )
    if stats.paced_s >= 0.01:
        line += f", paced to the E2B plan's create rate {stats.paced_s:.2f}s (--sandbox-plan)"
    return line


def cost_line(stats: SandboxStats) -> str | None:
    """What the run's sandboxes cost: sandbox-seconds (each one's life summed) per backend."""
    if not stats.sandbox_s:
        return None
    parts = ", ".join(
        f"{backend} {seconds:.1f}s" for backend, seconds in sorted(stats.sandbox_s.items())
    )
    return f"sandbox-seconds (creation to disposal, summed): {parts}"


# Below this share of the run spent waiting for function-scope sandboxes, prewarm is not worth it.
_PROVISIONING_DOMINATES = 0.2
_MAX_SUGGESTED_PREWARM = 16


def prewarm_lines(stats: SandboxStats, prewarm: int, plan: CloudPlan | None = None) -> list[str]:
    """What prewarm hid, and a setting to try when waiting for sandboxes dominates the run.

    ``plan``: the E2B plan creates were paced to. When that pacing is most of what the tests
    waited for, no prewarm can help (it hides a create's latency, not a rate), and the line
    says what can.
    """
    import math

    lines = []
    if prewarm:
        lines.append(
            f"prewarm {prewarm}: {stats.prewarm_taken} of {stats.function_acquired} "
            "function-scope sandboxes were made ahead of need"
            + (f" ({stats.prewarm_recycled} of them recycled)" if stats.prewarm_recycled else "")
            + ", hiding "
            f"{stats.prewarm_hidden_s:.2f}s of provisioning; {stats.prewarm_unused} spare(s) "
            "disposed unused"
            + (
                f"; {stats.prewarm_lost} spare(s) lost (failed to create, or gone while "
                "waiting) and replaced"
                if stats.prewarm_lost
                else ""
            )
        )
    if not stats.function_acquired or stats.run_s <= 0 or not stats.created:
        return lines
    if stats.recycled >= stats.created:
        # The tests mostly waited for done sandboxes being made as new, which no number of
        # spares created ahead would shorten.
        return lines
    share = stats.provision_wait_s / stats.run_s
    if share < _PROVISIONING_DOMINATES or stats.function_acquired < 5:
        return lines
    bound = _rate_bound_line(stats, plan)
    if bound is not None:
        return [*lines, bound]
    create_s = stats.provision_s / stats.created
    # Time a test holds its sandbox between two acquisitions; spares in flight must cover a
    # create's duration at that pace.
    per_test = max(0.01, (stats.run_s - stats.provision_wait_s) / stats.function_acquired)
    suggested = min(_MAX_SUGGESTED_PREWARM, math.ceil(create_s / per_test) + 1)
    if suggested > prewarm:
        lines.append(
            f"tests waited {stats.provision_wait_s:.2f}s ({share:.0%} of the run) for new "
            f"sandboxes (about {create_s:.2f}s to create each); try --sandbox-prewarm "
            f"{suggested} to create them ahead of need"
        )
    return lines


def _rate_bound_line(stats: SandboxStats, plan: CloudPlan | None) -> str | None:
    """The advice for a run whose tests mostly waited for the plan's create rate (else None)."""
    from pytest_kode.lifecycle.pacing import SAFETY

    if plan is None or plan.create_rate is None:
        return None
    # Paced creates are summed over the threads that made them: with prewarm, more than the
    # tests' own wait; without, the part of it that was pacing.
    if stats.paced_s < max(0.01, stats.provision_wait_s / 2):
        return None
    floor_s = max(0, stats.created - plan.create_burst) / (plan.create_rate * SAFETY)
    faster = [other for other in PLANS.values() if (other.create_rate or 0) > plan.create_rate]
    on_plan = (
        f", or --sandbox-plan {faster[0].name} if your team is on E2B's {faster[0].name} plan "
        f"({faster[0].create_rate:g}/s)"
        if faster
        else ""
    )
    return (
        f"tests waited {stats.provision_wait_s:.2f}s for new sandboxes, paced to the E2B "
        f"{plan.name} plan's create rate ({plan.create_rate:g}/s): {stats.created} sandboxes "
        f"take at least {floor_s:.1f}s to create however many are prewarmed; share sandboxes "
        f'between tests (@pytest.mark.sandbox(scope="module"), worker_sandbox){on_plan}'
    )
