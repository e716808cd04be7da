"""E2B plans and their limits: what the cloud enforces, shared by the emulator and the plugin.

The numbers are E2B's published ones (https://e2b.dev/docs/sandbox/rate-limits and the maximum
lifetime in https://e2b.dev/docs/sandbox): Hobby creates 1 sandbox/s, runs 20 at once and keeps
one alive for at most 1 h; Pro 5/s, 100 and 24 h. The burst a rate allows is not published; the
cloud's limiter is a token bucket configured per route (e2b-dev/infra ``middleware/ratelimit``),
so ``create_burst`` is a guess kept small. The emulator enforces a plan (``E2BEmulator(profile=)``),
the plugin paces itself to one (``--sandbox-plan``). Stdlib only: imported from both layers.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PLANS", "CloudPlan", "plan_named"]


@dataclasses.dataclass(frozen=True)
class CloudPlan:
    """The limits of one E2B plan. ``None`` means no limit (the lenient emulator)."""

    name: str
    create_rate: float | None
    """Sandbox creations per second for the team (429 with ``Retry-After`` beyond it)."""
    create_burst: int
    """Creations allowed back to back before ``create_rate`` applies."""
    max_concurrent: int | None
    """Running sandboxes at once (429 beyond it)."""
    max_lifetime_s: int | None
    """Longest a sandbox may live from its start (create/connect 400 beyond, set_timeout clamps)."""

    def __post_init__(self) -> None:
        if self.create_rate is not None and not self.create_rate > 0:
            raise ValueError(f"create_rate must be > 0 or None, got {self.create_rate!r}")
        if self.create_burst < 1:
            raise ValueError(f"create_burst must be >= 1, got {self.create_burst!r}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1 or None, got {self.max_concurrent!r}")
        if self.max_lifetime_s is not None and self.max_lifetime_s < 1:
            raise ValueError(f"max_lifetime_s must be >= 1 or None, got {self.max_lifetime_s!r}")

    def replace(self, **changes: object) -> CloudPlan:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


PLANS: dict[str, CloudPlan] = {
    "hobby": CloudPlan("hobby", 1.0, 2, 20, 3600),
    "pro": CloudPlan("pro", 5.0, 10, 100, 24 * 3600),
}
"""The plans E2B publishes, by the name ``--sandbox-plan`` and ``E2BEmulator(profile=)`` take."""

UNLIMITED = CloudPlan("unlimited", None, 1, None, 24 * 3600)
"""The emulator's lenient profile: no rate or concurrency limit (still 24 h at most)."""


def plan_named(name: str, *, allow_unlimited: bool = False) -> CloudPlan:
    """The plan called ``name``; ValueError lists the names there are."""
    key = name.strip().lower()
    if key in PLANS:
        return PLANS[key]
    if allow_unlimited and key == UNLIMITED.name:
        return UNLIMITED
    names = [*PLANS, *([UNLIMITED.name] if allow_unlimited else [])]
    raise ValueError(f"unknown E2B plan {name!r}; choose one of: {', '.join(names)}")
