"""The browser console: a static page served by the gateway beside `/v1/realtime` (no build step, no CDN).

    GET /                    -> 302 to /console/
    GET /console/            the page (index.html)
    GET /console/NAME        its scripts, styles (files of the package's `console/` folder only)

The files ship as package data (`vita/realtime/console/`), so an installed gateway serves them too. They hold no
secret and need no token: the page asks for the API key and sends it on the WebSocket handshake. Browsers allow the
microphone and camera only on a secure origin: `http://localhost` / `127.0.0.1` counts, another host needs HTTPS in
front (or a tunnel to localhost).
"""

from __future__ import annotations

import functools
import re
from http import HTTPStatus
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Response

PREFIX = "/console/"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg)$")  # no path separators, no dot-files
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}


@functools.cache
def _read(name: str) -> bytes | None:
    try:
        return (resources.files("vita.realtime") / "console" / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _response(status: HTTPStatus, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")])
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status.value, status.phrase, headers, body)


def console_response(path: str) -> Response | None:
    """The response for a console path (a file, or 404 for an unknown one); None when `path` is not the console's."""
    if path == "/" or path == PREFIX.rstrip("/"):
        return _response(HTTPStatus.FOUND, b"", "text/plain", Location=PREFIX)
    if not path.startswith(PREFIX):
        return None
    name = path[len(PREFIX):] or "index.html"
    body = _read(name) if _NAME.match(name) else None
    if body is None:
        return _response(HTTPStatus.NOT_FOUND, f"no console file {name!r}\n".encode(), "text/plain; charset=utf-8")
    return _response(HTTPStatus.OK, body, _TYPES[name.rsplit(".", 1)[1]])
