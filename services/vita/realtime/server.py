"""`vita serve realtime`: the OpenAI-Realtime-compatible WebSocket endpoint, a gateway in front of the orchestrator.

    ws://HOST:PORT/v1/realtime?model=...   one Realtime session per connection (one Converse call)
    GET /healthz                           200 while serving (liveness: the gateway itself)
    GET /readyz                            200 while the orchestrator answers grpc.health.v1 SERVING, else 503
                                           (readiness; the answer is cached for READY_CACHE_S)
    GET / (-> /console/)                   the browser console (realtime/console/, a static page)

It holds no model and no session state (sessions live in Redis behind the orchestrator), so it scales as its own
Deployment. Authentication: with `--api-tokens FILE` a connection must bring one of the file's tokens, as
`Authorization: Bearer TOKEN` or, for browsers (which cannot set headers on a WebSocket), as the subprotocol
`openai-insecure-api-key.TOKEN` beside `realtime` (offered without it: HTTP 400, see `key_without_realtime`); a
refused handshake is HTTP 401. The token is passed on to the orchestrator as
`authorization` metadata, so a gRPC-side check sees the same caller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from vita.errors import PortInUse, VitaError, one_line
from vita.realtime.console import console_response
from vita.realtime.protocol import BETA_HEADER, SESSION_ID_PREFIX, SessionSettings, wants_beta
from vita.realtime.session import RealtimeSession
from vita.realtime.tts import make_tts
from vita.runtime.access import TokenSet, bearer_token, load_tokens
from vita.runtime.args import PORT
from vita.runtime.dumps import install_stack_dumps
from vita.runtime.readiness import READINESS
from vita.runtime.tls import channel_credentials
from vita.usage import ArgumentParser
from vita.v1.assistant_pb2_grpc import AssistantStub

log = logging.getLogger("vita.realtime")

PATH = "/v1/realtime"
MAX_MESSAGE_BYTES = 16 << 20  # the API allows 15 MiB of base64 audio per append
_KEY_PROTOCOL = "openai-insecure-api-key."
READY_CACHE_S = 2.0  # /readyz asks the orchestrator at most this often; probes in between get the last answer
READY_TIMEOUT_S = 1.0


def request_token(headers: Headers) -> str | None:
    """The bearer token of a handshake: Authorization header first, then the browser subprotocol."""
    token = bearer_token(headers.get("Authorization"))
    if token is not None:
        return token
    for protocol in offered_subprotocols(headers):
        if protocol.startswith(_KEY_PROTOCOL):
            return protocol[len(_KEY_PROTOCOL):] or None
    return None


def offered_subprotocols(headers: Headers) -> list[str]:
    return [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",") if p.strip()]


def key_without_realtime(headers: Headers) -> bool:
    """Whether a handshake offers the browser key subprotocol `openai-insecure-api-key.TOKEN` but not `realtime`.

    The key subprotocol carries a credential, not a protocol: the connection's protocol is `realtime`, the one this
    server selects (and OpenAI's; its clients, the openai SDKs and its browser examples, always offer the pair). A
    server must not select the key one (that would echo the secret back), so without `realtime` it could select
    none, and a browser fails such a handshake on its side (it offered subprotocols and got none back) with no
    reason it can show, after the session had started here. Refused instead, before anything starts: HTTP 400
    whose body says what to offer."""
    offered = offered_subprotocols(headers)
    return "realtime" not in offered and any(p.startswith(_KEY_PROTOCOL) for p in offered)


def resume_id(value: str) -> str:
    """The Converse session a `?session_id=` resumes: the id as session.created reported it (`sess_<id>`), or the
    bare Converse session id."""
    return value.removeprefix(SESSION_ID_PREFIX)


def _json_response(status: HTTPStatus, message: str, code: str) -> Response:
    body = json.dumps({"error": {"type": "invalid_request_error", "code": code, "message": message,
                                 "param": None}}).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                       ("Connection", "close")])
    if status == HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = 'Bearer realm="vita"'
    return Response(status.value, status.phrase, headers, body)


class RealtimeServer:
    def __init__(self, orchestrator: str, *, host: str = "127.0.0.1", port: int = 0,
                 tokens: frozenset[str] | None = None, tts: str = "espeak", echo_guard: bool = True,
                 audio_lead_ms: int = 500, orchestrator_tls: grpc.ChannelCredentials | None = None) -> None:
        self.orchestrator, self.host, self.port = orchestrator, host, port
        self.tokens = TokenSet(tokens) if tokens is not None else None
        self.tts, self.echo_guard, self.audio_lead_ms = tts, echo_guard, audio_lead_ms
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (grpc.aio.insecure_channel(orchestrator, options=options) if orchestrator_tls is None
                        else grpc.aio.secure_channel(orchestrator, orchestrator_tls, options=options))
        self.stub = AssistantStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.sessions = 0
        self._ready: tuple[float, str | None] | None = None  # (loop time, None if ready else why not)
        self._ready_check: asyncio.Task | None = None

    async def not_ready(self) -> str | None:
        """Why the gateway cannot serve sessions now (None: it can): the orchestrator's grpc.health.v1 status,
        asked at most every READY_CACHE_S (concurrent probes share one check)."""
        now = asyncio.get_running_loop().time()
        if self._ready is not None and now - self._ready[0] < READY_CACHE_S:
            return self._ready[1]
        if self._ready_check is None or self._ready_check.done():
            self._ready_check = asyncio.create_task(self._check_orchestrator())
        reason = await asyncio.shield(self._ready_check)
        self._ready = (asyncio.get_running_loop().time(), reason)
        return reason

    async def _check_orchestrator(self) -> str | None:
        """The orchestrator's `readiness` (it follows the bus: vita/runtime/readiness.py), or `""` from one that
        does not report it (NOT_FOUND: an older release)."""
        for service in (READINESS, ""):
            try:
                reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                                timeout=READY_TIMEOUT_S)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and service:
                    continue
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # no health service at all: it answered
                    return None
                return f"the orchestrator at {self.orchestrator} is unreachable: {e.code().name}: {e.details()}"
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return (f"the orchestrator at {self.orchestrator} is "
                    f"{health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
        return None

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            reason = await self.not_ready()
            if reason is not None:
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}\n")
            return connection.respond(HTTPStatus.OK, "ok\n")
        if (page := console_response(path)) is not None:
            return page
        if path != PATH:
            return _json_response(HTTPStatus.NOT_FOUND, f"no such endpoint {path!r}: connect to {PATH}",
                                  "not_found")
        if key_without_realtime(request.headers):
            return _json_response(HTTPStatus.BAD_REQUEST, "the subprotocol 'openai-insecure-api-key.<token>' was "
                                  "offered without 'realtime': offer both (new WebSocket(url, ['realtime', "
                                  "'openai-insecure-api-key.<token>']))", "missing_required_parameter")
        if self.tokens is not None and request_token(request.headers) not in self.tokens:
            return _json_response(HTTPStatus.UNAUTHORIZED, "missing or unknown API key: send "
                                  "'Authorization: Bearer <token>'", "invalid_api_key")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        token = request_token(ws.request.headers)
        settings = SessionSettings(model=query.get("model", ["vita"])[0])
        resume = resume_id(query.get("session_id", [""])[0])
        if resume:
            settings.session_id = resume
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        beta = wants_beta(ws.request.headers.get(BETA_HEADER))  # the beta Realtime API's events and shapes
        self.sessions += 1
        log.info("session opened", extra={"model": settings.model, "resume": bool(resume), "beta": beta})
        try:
            await RealtimeSession(ws, self.stub, settings, tts=self.tts, metadata=metadata, resume=bool(resume),
                                  echo_guard=self.echo_guard, audio_lead_ms=self.audio_lead_ms, beta=beta).run()
        except Exception:
            log.exception("session failed")
        finally:
            self.sessions -= 1
            log.info("session closed", extra={"session_id": settings.session_id})

    def _select_subprotocol(self, connection: ServerConnection, offered: Sequence[str]) -> str | None:
        return "realtime" if "realtime" in offered else None

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set. Raises PortInUse when another process listens on the port."""
        try:
            listening = await serve(self._handle, self.host, self.port, process_request=self._process_request,
                                    select_subprotocol=self._select_subprotocol, max_size=MAX_MESSAGE_BYTES,
                                    compression=None, logger=_WEBSOCKETS_LOG)
        except OSError as e:
            raise PortInUse.from_bind(e, f"listen on {self.host}:{self.port}") from None
        async with listening as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            log.info("serving", extra={"url": f"ws://{self.host}:{self.port}{PATH}",
                                       "console": f"http://{self.host}:{self.port}/console/",
                                       "orchestrator": self.orchestrator, "auth": self.tokens is not None})
            await stop.wait()
            server.close(close_connections=True)
            await server.wait_closed()
        await self.channel.close()


# websockets' own log: warnings and errors only. At info it writes two lines per HTTP request ("HTTP response sent",
# "connection closed"), which Kubernetes' probes of /healthz and /readyz turn into steady noise; sessions are
# logged by this module ("session opened", "session closed").
_WEBSOCKETS_LOG = logging.getLogger("vita.realtime.websockets")
_WEBSOCKETS_LOG.setLevel(logging.WARNING)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="vita serve realtime",
                                description="The OpenAI-Realtime-compatible WebSocket endpoint (/v1/realtime), "
                                            "a gateway to the orchestrator's Converse API; see docs/realtime.md.")
    p.add_argument("--orchestrator", default=os.environ.get("VITA_ORCHESTRATOR", "127.0.0.1:50051"),
                   help="the orchestrator's gRPC address (env VITA_ORCHESTRATOR)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a cluster)")
    p.add_argument("--port", type=PORT, default=8080, help="WebSocket port (0 picks a free one)")
    p.add_argument("--api-tokens", default=os.environ.get("VITA_API_TOKENS_FILE"),
                   help="file of accepted bearer tokens, one per line (env VITA_API_TOKENS_FILE); unset: no auth")
    p.add_argument("--orchestrator-tls-ca", default=None,
                   help="reach the orchestrator over TLS, trusting this CA (PEM)")
    p.add_argument("--orchestrator-tls-cert", default=None,
                   help="this gateway's client certificate (PEM) for an orchestrator that requires mutual TLS")
    p.add_argument("--orchestrator-tls-key", default=None, help="the --orchestrator-tls-cert's key (PEM)")
    p.add_argument("--tts", default="espeak", choices=["espeak"], help="text-to-speech engine for spoken answers")
    p.add_argument("--audio-lead-ms", type=int, default=500,
                   help="spoken answers go out at playback pace, this far ahead of it (a client's jitter buffer)")
    p.add_argument("--no-echo-guard", action="store_true",
                   help="do not remove the assistant's own voice from the microphone input")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    tokens = load_tokens(args.api_tokens) if args.api_tokens else None
    make_tts(args.tts)  # fail at start-up, not in the first session, when the engine is missing
    tls = None
    if args.orchestrator_tls_ca or args.orchestrator_tls_cert:
        tls = channel_credentials(args.orchestrator_tls_ca, args.orchestrator_tls_cert, args.orchestrator_tls_key)
    server = RealtimeServer(args.orchestrator, host=args.host, port=args.port, tokens=tokens, tts=args.tts,
                            echo_guard=not args.no_echo_guard, audio_lead_ms=args.audio_lead_ms,
                            orchestrator_tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    install_stack_dumps(loop)  # kill -USR1: where it is stuck, in its log
    await server.serve(stop)


def main(argv: Sequence[str] | None = None) -> int:
    from vita.telemetry.logging import configure_logging

    args = parse_args(argv)
    configure_logging("realtime", args.log_level, json_format=not args.plain_logs)
    try:
        asyncio.run(_serve(args))
    except VitaError as e:
        print(f"vita serve realtime: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
