"""The browser console's files, served by a real gateway over HTTP beside /v1/realtime (no orchestrator needed)."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.error
import urllib.request
from http.client import HTTPConnection

import pytest

from vita.realtime.server import RealtimeServer


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _raw_get(port: int, path: str) -> int:
    """A path sent as is (urllib would normalise `..`)."""
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fetched():
    """What a browser gets from a gateway whose orchestrator is not even running (static files need none)."""
    paths = ["/", "/console", "/console/", "/console/index.html", "/console/console.js", "/console/console.css",
             "/console/mic-worklet.js", "/console/nope.js", "/healthz"]
    raw = ["/console/../server.py", "/console/%2e%2e/server.py", "/console/.hidden.js", "/console/sub/x.js"]

    def fetch(port: int):
        return {p: _get(port, p) for p in paths}, {p: _raw_get(port, p) for p in raw}

    return asyncio.run(_with_gateway(fetch))


async def _with_gateway(fetch):
    """`fetch(port)` (in a thread) against a gateway served meanwhile, its orchestrator not even running."""
    stop = asyncio.Event()
    server = RealtimeServer("127.0.0.1:9", port=0)
    task = asyncio.create_task(server.serve(stop))
    while not server.port:
        await asyncio.sleep(0.01)
    try:
        return await asyncio.to_thread(fetch, server.port)
    finally:
        stop.set()
        await task


def test_root_redirects_to_the_console_and_the_page_is_served(fetched):
    got, _ = fetched
    for path in ("/", "/console"):
        status, headers, _ = got[path]
        assert status == 302 and headers["Location"] == "/console/"
    status, headers, body = got["/console/"]
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body == got["/console/index.html"][2] and b"<title>VITA console</title>" in body
    assert got["/console/console.js"][1]["Content-Type"].startswith("text/javascript")
    assert got["/console/console.css"][1]["Content-Type"].startswith("text/css")
    assert got["/healthz"][0] == 200


def test_everything_the_page_loads_is_served_and_nothing_comes_from_elsewhere(fetched):
    got, _ = fetched
    html = got["/console/"][2].decode()
    script = got["/console/console.js"][2].decode()
    wanted = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r'addModule\("([^"]+)"\)', script)
    assert sorted(wanted) == ["console.css", "console.js", "mic-worklet.js"]
    for name in wanted:
        status, _, body = got[f"/console/{name}"]
        assert status == 200 and body
    for path in ("/console/", "/console/console.js", "/console/console.css", "/console/mic-worklet.js"):
        assert not re.search(rb"https?://", got[path][2]), f"{path} loads something from another origin"


def test_unknown_and_escaping_paths_are_404(fetched):
    got, raw = fetched
    assert got["/console/nope.js"][0] == 404
    assert raw == {path: 404 for path in raw}


def test_probes_of_healthz_are_not_logged(caplog):
    """An operator's try (2026-12-04): every /healthz or /readyz request logged two info lines (websockets' "HTTP
    response sent", "connection closed" with a connection object's repr): steady noise under Kubernetes probes."""

    with caplog.at_level(logging.DEBUG):
        statuses = asyncio.run(_with_gateway(lambda port: [_get(port, "/healthz")[0] for _ in range(3)]))
    assert statuses == [200, 200, 200]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "websockets" in r.name] == []
    assert any(r.getMessage() == "serving" for r in caplog.records)  # the gateway's own lines still come
