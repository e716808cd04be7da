"""Checking the files a script produces.

All tests of this module share one sandbox (``scope="module"``), so the (imagine: slow) build runs
once, for whichever test comes first; the others only look at what it wrote.
"""

import json

import pytest

from pytest_kode import assert_exec, assert_file, assert_tree

BUILD = """\
set -e
mkdir -p out/pages
for name in home about; do
  printf '<h1>%s</h1>\\n' "$name" > "out/pages/$name.html"
done
printf '{"pages": ["about", "home"], "ok": true}\\n' > out/manifest.json
chmod 600 out/manifest.json
echo built
"""

pytestmark = pytest.mark.sandbox(scope="module")


@pytest.fixture
def built(sandbox):
    if not sandbox.fs.exists("out/manifest.json"):
        sandbox.fs.write("build.sh", BUILD)
        assert_exec(sandbox.exec("bash build.sh")).succeeded().stdout_contains("built")
    return sandbox


def test_manifest(built):
    sandbox = built
    assert_file(sandbox, "out/manifest.json").exists().json_equals(
        {"pages": ["about", "home"], "ok": True}
    )
    assert_file(sandbox, "out/manifest.json").has_mode(0o600)
    manifest = json.loads(sandbox.fs.read("out/manifest.json"))
    assert sorted(manifest["pages"]) == manifest["pages"]


def test_pages(built):
    sandbox = built
    assert_tree(sandbox, "out/pages").equals(
        {"home.html": "<h1>home</h1>\n", "about.html": "<h1>about</h1>\n"}
    )
    assert sandbox.fs.glob("out/**/*.html") == ["out/pages/about.html", "out/pages/home.html"]
