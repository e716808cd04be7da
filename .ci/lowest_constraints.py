"""Print pip constraints that pin every dependency to the lowest version pyproject.toml admits.

CI installs the project with them into a separate venv and runs the suite there, so each
``>=`` floor is a tested claim, not a guess. Tools that only check the code (mypy, ruff) keep
their latest versions: their floors say nothing about what users run.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TOOLS = {"mypy", "ruff"}


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins: dict[str, str] = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([A-Za-z0-9_.]+)\s*", requirement)
        if match is None:
            sys.exit(f"{requirement!r}: give every dependency a plain '>=' floor")
        name = match.group(1).lower()
        if name not in TOOLS:
            pins[name] = match.group(2)
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, version in sorted(floors(root / "pyproject.toml").items()):
        print(f"{name}=={version}")
