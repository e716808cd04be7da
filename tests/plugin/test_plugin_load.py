"""Loading the plugin stays cheap: heavy libraries load only when a sandbox is needed."""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_the_plugin_imports_no_heavy_library() -> None:
    code = (
        "import sys, json, pytest_kode.plugin;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('e2b', 'hypothesis', 'uvicorn', 'pydantic', 'httpx', 'pytest_kode'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    heavy = [name for name in loaded if not name.startswith("pytest_kode")]
    assert heavy == [], heavy
    assert "pytest_kode.backends.e2b" not in loaded
    assert "pytest_kode.emulator" not in loaded


def test_a_run_without_sandboxes_imports_no_heavy_library(pytester) -> None:  # type: ignore[no-untyped-def]
    pytester.makepyfile(
        """
        import sys

        def test_nothing_heavy():
            heavy = [m for m in ("e2b", "hypothesis", "uvicorn", "pydantic") if m in sys.modules]
            assert heavy == []
        """
    )
    pytester.runpytest_subprocess("-p", "no:hypothesispytest").assert_outcomes(passed=1)
