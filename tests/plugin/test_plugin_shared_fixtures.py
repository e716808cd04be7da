"""Session- and module-scoped user fixtures built on sandboxes, and the created hook's scope.

Real runs in subprocesses (xdist, reuse across runs); what the hooks saw is appended by each
process to one events file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_kode import LocalSandbox

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("kode_root")]

CONFTEST = """
import json, os, pytest

def _event(**data):
    with open(os.environ["EVENTS_FILE"], "a") as out:
        out.write(json.dumps({"pid": os.getpid(), **data}) + "\\n")

def pytest_kode_sandbox_created(sandbox, item, scope):
    _event(hook="new", id=sandbox.sandbox_id, scope=scope, resumed=sandbox.resumed)
    if scope == "session" and not sandbox.resumed:
        sandbox.exec("echo x >> setups")  # once-per-run set-up

@pytest.fixture(scope="session")
def db(session_sandbox):
    # Every worker runs this on the one session sandbox: replace the file atomically, so that
    # another worker's test never reads it truncated.
    session_sandbox.exec("echo table > db.$$ && mv -f db.$$ db.txt")
    return session_sandbox

@pytest.fixture(scope="module")
def cache_dir(worker_sandbox):
    worker_sandbox.fs.mkdir("cache")
    return worker_sandbox
"""

OLD_STYLE_PLUGIN = """
import json, os

def pytest_kode_sandbox_created(sandbox, item):
    with open(os.environ["EVENTS_FILE"], "a") as out:
        out.write(json.dumps({"hook": "old", "id": sandbox.sandbox_id}) + "\\n")
"""

TESTS = """
import pytest

@pytest.mark.parametrize("n", range(6))
def test_db(db, cache_dir, n):
    assert db.fs.read("db.txt") == "table\\n"
    assert db.fs.read("setups") == "x\\n"  # ran once, in one worker
    assert cache_dir.fs.exists("cache")
    if cache_dir is not db:  # without xdist the worker sandbox is the session sandbox
        assert not cache_dir.fs.exists("setups")  # never on worker sandboxes
"""


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["no-xdist", "xdist"])
def test_session_scoped_fixtures_build_on_sandboxes_and_setup_runs_once(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("EVENTS_FILE", str(events))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(old_style=OLD_STYLE_PLUGIN, test_db=TESTS)
    result = pytester.runpytest_subprocess("-p", "old_style", *workers)
    result.assert_outcomes(passed=6)
    seen = _events(events)
    new = [e for e in seen if e["hook"] == "new"]
    # An implementation naming only (sandbox, item) is still called, for every sandbox.
    assert sorted(e["id"] for e in seen if e["hook"] == "old") == sorted(e["id"] for e in new)
    scopes = sorted(str(e["scope"]) for e in new)
    # Without xdist the worker sandbox is the session sandbox.
    assert scopes == (["session", "worker", "worker"] if workers else ["session"]), seen


def test_reuse_runs_once_per_run_setup_once_and_not_in_connecting_workers(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("EVENTS_FILE", str(events))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_db=TESTS)
    try:
        for run in ("first", "second"):
            events.write_text("")
            pytester.runpytest_subprocess("-n", "2", "--sandbox-reuse").assert_outcomes(passed=6)
            session = [e for e in _events(events) if e["scope"] == "session"]
            assert len(session) == 1, (run, session)
            assert session[0]["resumed"] is (run == "second")
    finally:
        cache = pytester.path / ".pytest_cache" / "d" / "kode" / "reuse.json"
        for entry in json.loads(cache.read_text()).values():
            LocalSandbox(sandbox_id=str(entry["sandbox_id"])).init().dispose()


def test_sandbox_maker_sandboxes_end_with_the_fixture_that_made_them(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("EVENTS_FILE", str(events))
    pytester.makeconftest(
        CONFTEST
        + """
MADE = []

@pytest.fixture(scope="module")
def service(sandbox_maker):
    with sandbox_maker(envs={"ROLE": "service"}) as sb:
        MADE.append(sb)
        yield sb
"""
    )
    pytester.makepyfile(
        test_a="""
        def test_one(service):
            assert service.exec("echo $ROLE").stdout == "service\\n"

        def test_two(service):
            assert service.fs.exists(".")
        """,
        test_b="""
        import time
        import conftest

        def test_after_module_a():
            [made] = conftest.MADE
            # Ended with module a's fixture, not at session end (the kill itself runs in the
            # background, so give it the time it takes).
            deadline = time.monotonic() + 60
            while not made.disposed and time.monotonic() < deadline:
                time.sleep(0.05)
            assert made.disposed
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=3)
    assert [e["scope"] for e in _events(events)] == ["function"]


def test_a_failed_test_reports_and_keeps_the_session_sandbox_it_used(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="session")
        def tool(session_sandbox):
            return session_sandbox

        def test_fails(tool):
            tool.exec("echo from-the-failing-test")
            assert False
        """
    )
    result = pytester.runpytest_subprocess("--sandbox-keep-failed")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*sandbox local-* (local) transcript*",
            "*$ echo from-the-failing-test*",
            "*kept sandbox local-* (local) of test_a_failed_test_reports*::test_fails*",
        ]
    )
    for entry in kode_root.iterdir():
        if entry.is_dir() and entry.name.startswith("local-"):  # the kept one
            LocalSandbox(sandbox_id=entry.name).init().dispose()
