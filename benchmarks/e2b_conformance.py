"""Run E2B's own Python SDK test suite, unchanged, against the loopback emulator.

    python benchmarks/e2b_conformance.py --sdk PATH [--e2b checkout|installed]
        [--profile unlimited|pro|hobby] [--jobs N] [-k EXPR] [--folders a,b]

PATH is a checkout of e2b-dev/E2B's ``packages/python-sdk`` that you fetched yourself (it is
never vendored here). The runner starts :class:`pytest_kode.emulator.E2BEmulator`, points the SDK
at it (``E2B_API_URL``, ``E2B_SANDBOX_URL``, ``E2B_API_KEY``, ``E2B_VALIDATE_API_KEY=false``),
runs the sync and async ``sandbox_*``, ``api_*`` and ``template_*`` test folders with pytest
(``test_network.py`` and ``test_internet_access.py`` need the public internet and are left out),
reads the JUnit XML and prints passed/total per folder and overall, then the failures grouped by
file. The emulator serves the sandboxes' ``https://<port>-<id>.<domain>`` hosts too
(``https_hosts``: the tests get its ``HTTPS_PROXY`` and ``SSL_CERT_FILE``), which
``get_host`` tests request.

``--e2b checkout`` (the default) runs the tests with the checkout's own ``e2b`` package, the SDK
they were written for: some tests mock SDK internals (``test_stacktrace.py``) that another SDK
version lays out differently. Before starting, the runner checks that the checkout's package
imports and, if not, names what to ``pip install`` from the checkout's ``pyproject.toml``
(``[project].dependencies``, and the ``pytest`` plugins of its ``dev`` dependency group).
``--e2b installed`` runs them with the installed ``e2b`` instead.

``--profile`` picks the emulator's plan limits. The default, ``unlimited``, matches how E2B runs
its own suite: on an account without the hobby plan's limits (one create a second, 20 running
sandboxes), so a suite that creates a sandbox per test at two workers is not answered 429. The
plan limits themselves are covered by the project's own emulator tests
(``tests/emulator/test_profile.py``); ``--profile pro`` or ``hobby`` shows what the suite meets
on those plans.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kode.emulator import E2BEmulator  # noqa: E402

FOLDERS = (
    "sync/sandbox_sync",
    "sync/api_sync",
    "sync/template_sync",
    "async/sandbox_async",
    "async/api_async",
    "async/template_async",
)
NEEDS_INTERNET = ("test_network.py", "test_internet_access.py")


@dataclasses.dataclass
class Case:
    file: str
    name: str
    outcome: str  # passed, failed, skipped
    message: str


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdk", required=True, type=Path, help="checkout of packages/python-sdk")
    parser.add_argument(
        "--e2b",
        choices=("checkout", "installed"),
        default="checkout",
        help="which e2b package the tests import: the checkout's own (default) or the installed one",
    )
    parser.add_argument(
        "--profile",
        default="unlimited",
        help="the emulator's plan limits: unlimited (default, as E2B runs its suite), pro, hobby",
    )
    parser.add_argument("--jobs", "-n", type=int, default=2, help="pytest-xdist workers (0: none)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument(
        "--folders", default=",".join(FOLDERS), help="comma-separated folders under tests/"
    )
    parser.add_argument("--junit", type=Path, default=None, help="keep the JUnit XML here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the failure messages")
    args = parser.parse_args()
    tests_dir = args.sdk / "tests"
    if not (tests_dir / "conftest.py").is_file():
        parser.error(f"{args.sdk} is not a checkout of packages/python-sdk (no tests/conftest.py)")
    folders = [folder for folder in args.folders.split(",") if folder]
    if args.e2b == "checkout":
        problem = _checkout_sdk_problem(args.sdk)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="kode-e2b-conformance-") as scratch:
        junit = args.junit or Path(scratch) / "junit.xml"
        try:
            emulator = E2BEmulator(
                root_dir=Path(scratch) / "sandboxes", profile=args.profile, https_hosts=True
            )
        except ValueError as error:
            parser.error(str(error))
        with emulator:
            returncode = _run_suite(args, tests_dir, folders, emulator, junit)
        if not junit.is_file():
            print(f"pytest wrote no JUnit XML (exit status {returncode})", file=sys.stderr)
            return 2
        cases = _parse(junit, args.sdk)
    _report(cases, folders, args.verbose)
    return 0


def _run_suite(
    args: argparse.Namespace,
    tests_dir: Path,
    folders: list[str],
    emulator: E2BEmulator,
    junit: Path,
) -> int:
    env = {key: value for key, value in os.environ.items() if not key.startswith("E2B_")}
    env.update(emulator.env)
    env["E2B_VALIDATE_API_KEY"] = "false"
    if args.e2b == "installed":
        # `python -m pytest` puts the working directory, the checkout, first on sys.path;
        # PYTHONSAFEPATH leaves it out, so `import e2b` finds the installed package.
        env["PYTHONSAFEPATH"] = "1"
    else:
        env.pop("PYTHONSAFEPATH", None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        *(f"tests/{folder}" for folder in folders),
        *(f"--ignore-glob=*/{name}" for name in NEEDS_INTERNET),
        "-p",
        "no:kode",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:benchmark",
        "-q",
        "--no-header",
        "-rN",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={junit}",
    ]
    if args.jobs:
        command += ["-n", str(args.jobs)]
    if args.keyword:
        command += ["-k", args.keyword]
    print(
        f"emulator at {emulator.url} (profile {args.profile}); running {len(folders)} folders"
        f" of {args.sdk} with the {args.e2b} e2b",
        flush=True,
    )
    completed = subprocess.run(
        command, cwd=tests_dir.parent, env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    tail = completed.stdout.strip().splitlines()[-1:] if completed.stdout else []
    print(*tail, sep="\n")
    return completed.returncode


def _checkout_sdk_problem(sdk: Path) -> str | None:
    """Why the checkout's ``e2b`` cannot run its tests here, with what to pip install; or None.

    What is needed comes from the checkout's ``pyproject.toml``: versions outside its bounds are
    only reported (the SDK often works with newer releases), a package that is missing or an
    ``import e2b`` that fails stops the run.
    """
    pyproject = sdk / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        return f"cannot read the checkout's {pyproject}: {error}"
    runtime = _requirements(project.get("project", {}).get("dependencies", []))
    dev_group = project.get("dependency-groups", {}).get("dev", [])
    plugins = [req for req in _requirements(dev_group) if req.name.startswith("pytest-")]
    missing: list[Requirement] = []
    for req in runtime:
        version = _installed_version(req.name)
        if version is None:
            missing.append(req)
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            print(f"note: {req.name} {version} is installed, the checkout asks for {req}")
    absent_plugins = [req for req in plugins if _installed_version(req.name) is None]
    if absent_plugins:
        names = " ".join(f"'{req}'" for req in absent_plugins)
        print(f"note: the SDK's tests also list {names} (pip install them if its tests need them)")
    probe = subprocess.run(
        [sys.executable, "-c", "import e2b; print(e2b.__file__)"],
        cwd=sdk,
        env={key: value for key, value in os.environ.items() if key != "PYTHONSAFEPATH"},
        capture_output=True,
        text=True,
        check=False,
    )
    if not missing and probe.returncode == 0:
        origin = Path(probe.stdout.strip()).resolve()
        if sdk.resolve() in origin.parents:
            return None
        return f"`import e2b` in {sdk} found {origin}, not the checkout's own e2b package"
    lines = [f"the checkout's e2b package ({sdk / 'e2b'}) cannot be imported here:"]
    if probe.returncode != 0:
        last = probe.stderr.strip().splitlines()[-1:] or ["(no message)"]
        lines.append(f"  import e2b: {last[0]}")
    if missing:
        names = " ".join(f"'{req}'" for req in missing)
        lines.append(f"  missing from its pyproject.toml dependencies: pip install {names}")
    lines.append("  (or run with --e2b installed to use the installed e2b package)")
    return "\n".join(lines)


def _requirements(entries: list[object]) -> list[Requirement]:
    found = []
    for entry in entries:
        if not isinstance(entry, str):  # an {include-group = ...} table
            continue
        try:
            found.append(Requirement(entry))
        except InvalidRequirement:
            continue
    return found


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse(junit: Path, sdk: Path) -> list[Case]:
    found: dict[tuple[str, str], Case] = {}
    for testcase in ET.parse(junit).getroot().iter("testcase"):
        file = testcase.get("file") or testcase.get("classname", "").replace(".", "/") + ".py"
        file = file.removeprefix("tests/")
        name = testcase.get("name", "")
        outcome, message = "passed", ""
        for child in testcase:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                lines = (child.get("message") or child.tag).strip().splitlines()
                message = lines[0] if lines else child.tag
                break
            if child.tag == "skipped":
                outcome = "skipped"
        previous = found.get((file, name))
        if previous is None or previous.outcome == "passed":
            found[(file, name)] = Case(file, name, outcome, message)
    return list(found.values())


def _folder_of(file: str, folders: list[str]) -> str:
    for folder in sorted(folders, key=len, reverse=True):
        if file.startswith(folder + "/"):
            rest = file[len(folder) + 1 :]
            sub = rest.split("/")[0] if "/" in rest else ""
            return f"{folder}/{sub}" if sub else folder
    return file.rsplit("/", 1)[0]


def _report(cases: list[Case], folders: list[str], verbose: bool) -> None:
    by_folder: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for case in cases:
        by_folder[_folder_of(case.file, folders)][case.outcome] += 1
    width = max((len(name) for name in by_folder), default=10)
    print(f"\n{'folder':<{width}}  passed/total  skipped")
    total: collections.Counter[str] = collections.Counter()
    for name in sorted(by_folder):
        counts = by_folder[name]
        total.update(counts)
        print(f"{name:<{width}}  {counts['passed']:>6}/{counts.total():<5}  {counts['skipped']:>7}")
    overall = total.total()
    share = 100.0 * total["passed"] / overall if overall else 0.0
    print(
        f"{'overall':<{width}}  {total['passed']:>6}/{overall:<5}  {total['skipped']:>7}  ({share:.1f} %)"
    )
    failures: dict[str, list[Case]] = collections.defaultdict(list)
    for case in cases:
        if case.outcome == "failed":
            failures[case.file].append(case)
    if failures:
        print("\nfailures by file:")
    for file in sorted(failures):
        print(f"  {file} ({len(failures[file])})")
        for case in failures[file]:
            print(f"    {case.name}" + (f": {case.message[:160]}" if verbose else ""))


if __name__ == "__main__":
    sys.exit(main())
