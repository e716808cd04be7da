"""@pytest.mark.sandbox(template=TemplateSpec(...)) end to end: local and the emulator, built once
per run (one build across xdist workers) and cached across runs. Packages come from a wheel
built here, installed offline through PIP_NO_INDEX / PIP_FIND_LINKS."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from _wheels import make_wheel

pytest_plugins = "pytester"

TESTS = """
import pytest
from pytest_kode import TemplateSpec

SPEC = TemplateSpec(pip_packages=["kodetiny"], build_commands=["echo built > made.txt"])

@pytest.mark.sandbox(template=SPEC)
@pytest.mark.parametrize("n", range({count}))
def test_from_template(sandbox, n):
    result = sandbox.exec("kodetiny && cat made.txt")
    assert result.stdout == "tiny says 42\\nbuilt\\n", result.stderr
    sandbox.fs.write("made.txt", "changed by test %d" % n)  # must not reach the template
"""

# Records, per process, whether the template layer built or found the template (a spy that
# calls through: the real build runs).
SPY = """
import os
import pytest_kode.templates as templates

_real = templates.local_template

def _spy(*args, **kwargs):
    template = _real(*args, **kwargs)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["SPY_DIR"], worker), "a") as out:
        out.write("built\\n" if template.built else "cached\\n")
    return template

templates.local_template = _spy
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    cache = tmp_path / "cache"
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("KODE_TEMPLATE_CACHE", str(cache))
    monkeypatch.setenv("KODE_LOCAL_ROOT", str(root))
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    monkeypatch.delenv("KODE_SANDBOX_BACKEND", raising=False)
    yield cache
    assert os.listdir(root) == [], "sandboxes left behind"


def _ready(cache: Path) -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in sorted(cache.glob("*/ready.json"))]


@pytest.mark.parametrize("backend", ["local", pytest.param("emulator", marks=pytest.mark.slow)])
def test_marker_template_builds_once_and_the_next_run_hits_the_cache(
    pytester: pytest.Pytester, env: Path, backend: str
) -> None:
    pytester.makepyfile(TESTS.replace("{count}", "3"))
    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandbox-backend={backend}")
    first.assert_outcomes(passed=3)
    # The build's log is shown as it runs, once.
    assert first.stdout.str().count("$ pip install kodetiny") == 1, first.stdout.str()
    first.stdout.fnmatch_lines(["*sandbox template*Successfully installed kodetiny-1.0*"])
    built = _ready(env)
    assert len(built) == 1
    second = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--sandbox-backend={backend}")
    second.assert_outcomes(passed=3)
    assert "$ pip install" not in second.stdout.str()
    assert _ready(env) == built  # same build, not redone


@pytest.mark.slow
def test_xdist_workers_share_one_build(
    pytester: pytest.Pytester, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = tmp_path / "spy"
    spy.mkdir()
    monkeypatch.setenv("SPY_DIR", str(spy))
    pytester.makeconftest(SPY)
    pytester.makepyfile(TESTS.replace("{count}", "6"))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--sandbox-backend=local"
    )
    result.assert_outcomes(passed=6)
    seen = {path.name: path.read_text().split() for path in spy.iterdir()}
    assert sorted(seen) == ["gw0", "gw1"], seen  # both workers needed the template...
    outcomes = [outcome for lines in seen.values() for outcome in lines]
    assert outcomes.count("built") == 1, seen  # ...and exactly one of them built it
    assert len(_ready(env)) == 1


def test_a_template_local_cannot_build_fails_the_test_with_the_reason(
    pytester: pytest.Pytester, env: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_kode import TemplateSpec

        @pytest.mark.sandbox(template=TemplateSpec(apt_packages=["kode-no-such-package"]))
        def test_needs_apt(sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-backend=local")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*BackendUnavailableError*kode-no-such-package*apt-get install -y kode-no-such-package*"]
    )
