"""Each emulated sandbox's ports: ``<port>-<sandbox id>.<domain>`` (the SDK's ``get_host``) leads
to that sandbox's own port, and ``E2BSandbox.get_host_url`` hands out a URL that reaches it."""

from __future__ import annotations

import http.client
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from _local import needs_bwrap

from pytest_kode.backends.e2b import E2BSandbox
from pytest_kode.emulator import E2BEmulator
from pytest_kode.errors import ConfigError


def _serve(run: Callable[[str], Any], text: str) -> None:
    run(f"mkdir -p www && printf '{text}' > www/index.html")


def _wait_fetch(url: str) -> str:
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except (OSError, http.client.HTTPException):
            assert time.monotonic() < deadline, f"nothing answered at {url}"
            time.sleep(0.05)


def _ask(emulator: E2BEmulator, host: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", int(emulator.url.rsplit(":", 1)[1]))
    connection.request("GET", "/index.html?x=1", headers={"Host": host})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


@needs_bwrap
def test_the_sdks_port_host_leads_to_that_sandboxs_own_port(
    emulator: E2BEmulator, create: Callable[..., Any]
) -> None:
    first, second = create(), create()
    for sbx, text in ((first, "one"), (second, "two")):
        _serve(sbx.commands.run, text)
        sbx.commands.run(
            "python3 -m http.server 8000 --bind 127.0.0.1 --directory www", background=True
        )
    targets = []
    for sbx in (first, second):
        response = _ask(emulator, sbx.get_host(8000))
        assert response.status == 307
        location = response.getheader("location") or ""
        assert location.startswith("http://127.0.0.1:") and location.endswith("/index.html?x=1")
        targets.append(location)
    assert targets[0] != targets[1]
    assert [_wait_fetch(url) for url in targets] == ["one", "two"]


def test_a_port_host_of_an_unknown_sandbox_is_the_proxys_502(emulator: E2BEmulator) -> None:
    response = _ask(emulator, "8000-nosuchsandbox.localhost")
    assert response.status == 502


@needs_bwrap
def test_get_host_url_of_two_emulated_sandboxes_on_one_port(emulator: E2BEmulator) -> None:
    params = {"api_key": emulator.api_key, "api_url": emulator.url, "sandbox_url": emulator.url}
    with E2BSandbox(**params) as first, E2BSandbox(**params) as second:  # type: ignore[arg-type]
        for sandbox, text in ((first, "first"), (second, "second")):
            _serve(sandbox.exec, text)
            sandbox.start("python3 -m http.server 8000 --directory www")
        one, two = first.get_host_url(8000), second.get_host_url(8000)
        assert one != two
        assert (_wait_fetch(one), _wait_fetch(two)) == ("first", "second")
        with pytest.raises(ConfigError, match="1-65535"):
            first.get_host_url(0)
