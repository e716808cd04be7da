"""The fixtures and the marker's scopes, as a user runs them (pytester end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest


def leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


pytestmark = pytest.mark.usefixtures("kode_root")

IDS_PLUGIN = """
import pytest

SEEN = []

def pytest_kode_sandbox_created(sandbox, item):
    SEEN.append(("created", sandbox.sandbox_id, item.nodeid if item else None))

def pytest_kode_sandbox_disposing(sandbox):
    SEEN.append(("disposing", sandbox.sandbox_id, None))

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    SEEN.append(("call", None, item.nodeid))

def pytest_unconfigure(config):
    import json, os
    with open(os.environ["EVENTS_FILE"], "w") as handle:
        json.dump(SEEN, handle)
"""


def _events(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, list[list[str]]]:
    import json

    events = pytester.path / "events.json"
    pytester.makeconftest(IDS_PLUGIN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EVENTS_FILE", str(events))
        result = pytester.runpytest_subprocess(*args)
    return result, json.loads(events.read_text())


def test_function_scope_gives_each_test_a_fresh_sandbox(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        def test_one(sandbox):
            sandbox.fs.write("mark.txt", "one")
            assert sandbox.exec("cat mark.txt").stdout == "one"

        def test_two(sandbox):
            assert not sandbox.fs.exists("mark.txt")
        """
    )
    result, events = _events(pytester)
    result.assert_outcomes(passed=2)
    created = [e for e in events if e[0] == "created"]
    assert len(created) == 2 and created[0][1] != created[1][1]
    assert leftovers(kode_root) == []


def test_module_scope_shares_within_a_module_and_disposes_when_it_ends(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    shared = """
        import pytest
        pytestmark = pytest.mark.sandbox(scope="module")

        def test_a(sandbox):
            sandbox.fs.write("count", sandbox.fs.read("count") + "x" if sandbox.fs.exists("count") else "x")

        def test_b(sandbox):
            sandbox.fs.write("count", sandbox.fs.read("count") + "x")
            assert sandbox.fs.read("count") == "xx"
        """
    pytester.makepyfile(test_m1=shared, test_m2=shared)
    result, events = _events(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    kinds = [(kind, nodeid) for kind, _, nodeid in events]
    created = [e for e in events if e[0] == "created"]
    assert len(created) == 2, events
    # The first module's sandbox is disposed before the second module's first test runs.
    first_disposal = kinds.index(("disposing", None))
    assert kinds.index(("call", "test_m2.py::test_a")) > first_disposal
    assert kinds.index(("call", "test_m1.py::test_b")) < first_disposal
    assert leftovers(kode_root) == []


def test_class_scope_and_differing_options_do_not_share(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.sandbox(scope="class", envs={"WHO": "class"})
        class TestShared:
            ids = set()

            def test_a(self, sandbox):
                self.ids.add(sandbox.sandbox_id)
                assert sandbox.exec("echo $WHO").stdout == "class\\n"

            def test_b(self, sandbox):
                self.ids.add(sandbox.sandbox_id)
                assert len(self.ids) == 1

            @pytest.mark.sandbox(envs={"WHO": "other"})
            def test_other_options(self, sandbox):
                assert sandbox.sandbox_id not in self.ids
                assert sandbox.exec("echo $WHO").stdout == "other\\n"
        """
    )
    result, events = _events(pytester)
    result.assert_outcomes(passed=3)
    assert len([e for e in events if e[0] == "created"]) == 2
    assert leftovers(kode_root) == []


def test_worker_and_session_scopes_share_across_modules(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    body = """
        import pytest

        def test_worker(worker_sandbox, sandbox_options):
            worker_sandbox.fs.write(f"seen-{__name__}", "")

        def test_session(session_sandbox):
            session_sandbox.fs.write(f"s-{__name__}", "")

        @pytest.mark.sandbox(scope="session")
        def test_marker_scope(sandbox):
            sandbox.fs.write(f"m-{__name__}", "")
        """
    pytester.makepyfile(test_w1=body, test_w2=body)
    pytester.makepyfile(
        test_w3="""
        def test_check(worker_sandbox, session_sandbox):
            assert worker_sandbox is session_sandbox  # without xdist they are the same
            names = sorted(e.name for e in worker_sandbox.fs.list("."))
            assert names == ["m-test_w1", "m-test_w2", "s-test_w1", "s-test_w2",
                             "seen-test_w1", "seen-test_w2"], names
        """
    )
    result, events = _events(pytester, "-p", "no:randomly")
    result.assert_outcomes(passed=7)
    assert len([e for e in events if e[0] == "created"]) == 1
    assert leftovers(kode_root) == []


def test_sandbox_factory_applies_overrides_and_disposes_all(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        def test_many(sandbox_factory):
            a = sandbox_factory(envs={"N": "1"})
            b = sandbox_factory(envs={"N": "2"}, execTimeoutMs=5000)
            assert a.sandbox_id != b.sandbox_id
            assert a.exec("echo $N").stdout == "1\\n"
            assert b.exec("echo $N").stdout == "2\\n"
            assert b.options.exec_timeout_ms == 5000
        """
    )
    result, events = _events(pytester, "--sandbox-prewarm=0")  # no spares: the two made here
    result.assert_outcomes(passed=1)
    assert len([e for e in events if e[0] == "disposing"]) == 2
    assert leftovers(kode_root) == []


def test_sandbox_options_reflect_marker_ini_and_can_be_overridden(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nsandbox_template = from-ini\n")
    pytester.makepyfile(
        test_opts="""
        import pytest

        pytestmark = pytest.mark.sandbox(envs={"A": "module"}, timeout_ms=1000)

        @pytest.mark.sandbox(timeoutMs=2000)
        def test_closest_wins_key_by_key(sandbox_options):
            assert sandbox_options.timeout_ms == 2000
            assert sandbox_options.envs == {"A": "module"}
            assert sandbox_options.template == "from-ini"
        """,
    )
    pytester.mkpydir("sub")
    pytester.path.joinpath("sub", "conftest.py").write_text(
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def sandbox_options(sandbox_options):\n"
        "    return sandbox_options.replace(envs={'FROM': 'conftest'})\n"
    )
    pytester.path.joinpath("sub", "test_sub.py").write_text(
        "def test_overridden(sandbox):\n"
        "    assert sandbox.exec('echo $FROM').stdout == 'conftest\\n'\n"
    )
    result = pytester.runpytest_subprocess("--sandbox-template=base")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*assert 'base' == 'from-ini'*"])


def test_options_hook_changes_what_is_created(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_kode_sandbox_options(options, item):
            return options.replace(envs={**options.envs, "HOOKED": item.name})
        """
    )
    pytester.makepyfile(
        """
        def test_hooked(sandbox):
            assert sandbox.exec("echo $HOOKED").stdout == "test_hooked\\n"
        """
    )
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_prewarm_hands_out_sandboxes_made_ahead_and_disposes_the_spares(
    pytester: pytest.Pytester, kode_root: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_uses(sandbox, n):
            made_ahead = sandbox.options.metadata["kode_test"] == "prewarm"
            assert made_ahead == (n > 0), sandbox.options.metadata  # the first one is made on demand
            assert not sandbox.fs.exists("previous")  # a spare is as fresh as any sandbox
            sandbox.fs.write("previous", str(n))  # no sleep: a spare still being made is awaited
        """
    )
    # Prewarm alone: every test gets a new sandbox (recycling has its own tests).
    result = pytester.runpytest_subprocess(
        "--sandbox-prewarm=2", "--no-sandbox-recycle", "-p", "no:randomly"
    )
    result.assert_outcomes(passed=4)
    # The pool is never topped up beyond the tests still to come: no spare is left unused.
    result.stdout.fnmatch_lines(
        [
            "sandboxes: 4 created, 0 resumed, 0 reused, 4 disposed, 0 kept, 0 leaked*",
            "prewarm 2: 3 of 4 function-scope sandboxes were made ahead of need, hiding *s "
            "of provisioning; 0 spare(s) disposed unused",
        ]
    )
    assert leftovers(kode_root) == []
