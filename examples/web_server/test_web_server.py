"""A web server started inside the sandbox and reached from the test through get_host_url."""

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from pytest_kode import ProcessHandle

# A fixed port: every sandbox has a network of its own, so parallel tests never clash on it.
PORT = 8000


@dataclass
class Site:
    url: str
    server: ProcessHandle


@pytest.fixture
def site(sandbox):
    """Serves the sandbox's ``site/`` folder at a URL the test process can reach."""
    sandbox.fs.write("site/index.html", "<p>hello from the sandbox</p>\n")
    server = sandbox.start(f"python3 -m http.server {PORT} --bind 127.0.0.1 --directory site")
    url = sandbox.get_host_url(PORT)
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or not server.is_running():
                pytest.fail(f"the server did not come up:\n{server.stderr}")
            time.sleep(0.05)
    yield Site(url, server)
    server.kill()


def test_serves_the_page(site):
    with urllib.request.urlopen(site.url + "/index.html", timeout=5) as response:
        assert response.status == 200
        assert response.read() == b"<p>hello from the sandbox</p>\n"


def test_missing_page_is_404(site):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(site.url + "/nope.html", timeout=5)
    info.value.close()  # an HTTPError holds the response open
    assert info.value.code == 404


def test_server_logs_the_request(site):
    urllib.request.urlopen(site.url + "/index.html", timeout=5).close()
    deadline = time.monotonic() + 5
    while "GET /index.html" not in site.server.stderr:
        assert time.monotonic() < deadline, site.server.stderr
        time.sleep(0.05)
