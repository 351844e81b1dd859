"""Who may call a service's gRPC API, how often, and with how many sessions at once: one server interceptor.

Callers authenticate with a bearer token (`authorization: Bearer TOKEN` metadata, what the openai SDK and most
gRPC clients send). Tokens come from a file (`--api-tokens`, a Kubernetes Secret mounted as a file): one per line,
blank lines and `#` comments skipped. Health checking and reflection stay open, so probes need no token.

Per caller (the token; without authentication, all callers together as one):
- a token bucket on call starts (`--rate-limit` calls/s, `--rate-burst`): beyond it RESOURCE_EXHAUSTED with a
  `google.rpc.RetryInfo` detail (and the wait in the message), so a client knows when to try again;
- at most `--max-sessions-per-token` open Converse calls: beyond it RESOURCE_EXHAUSTED.
The counts are per process (each orchestrator replica keeps its own), so a deployment's limit is the per-replica
limit times the replicas a caller's calls are spread over.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2

from vita.errors import VitaError

# Methods any caller may use: Kubernetes probes and grpcurl's discovery carry no token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")
# Calls that hold a conversation open: counted against --max-sessions-per-token while they last.
SESSION_METHODS = frozenset({"/vita.v1.Assistant/Converse"})


def load_tokens(path: str | Path) -> frozenset[str]:
    """One token per line; blank lines and `#` comments are skipped. VitaError if the file is unreadable or empty."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VitaError(f"cannot read the API token file {path}: {getattr(e, 'strerror', None) or e}") from None
    tokens = frozenset(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise VitaError(f"the API token file {path} holds no token")
    return tokens


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` value (scheme case-insensitive), else None."""
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None


def _no_bearer(authorization: str | None) -> str:
    """Why an `authorization` value gave no bearer token (never echoing it: it may be a credential)."""
    if not authorization or not authorization.strip():
        return "missing bearer token"
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return "empty bearer token"
    if rest:  # `Basic ...`, `Token ...`: another scheme, named (a scheme is not secret)
        return f"the authorization metadata uses the {scheme[:20]!r} scheme, not Bearer"
    return "the authorization metadata has no scheme (a bare token?): the Bearer scheme is expected"


def token_id(token: str) -> str:
    """A short, stable, non-secret name for a token (logs, limits): the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenSet:
    """Known tokens, compared in constant time (by SHA-256 digest, so the comparison leaks no token prefix)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def __contains__(self, token: object) -> bool:
        if not isinstance(token, str):
            return False
        digest = hashlib.sha256(token.encode()).digest()
        found = False
        for known in self._digests:  # no early exit: the time does not depend on which token matched
            found |= hmac.compare_digest(digest, known)
        return found


@dataclass
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take` returns 0 when allowed, else seconds to wait."""

    rate: float
    burst: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.burst

    def take(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


@dataclass(frozen=True)
class AccessPolicy:
    """The interceptor's settings; zero or None switches a check off."""

    tokens: frozenset[str] | None = None  # None: no authentication
    rate_per_s: float = 0.0  # call starts per second per caller
    burst: int = 0  # calls a caller may start at once after a quiet spell (0: max(1, ceil(rate)))
    max_sessions: int = 0  # open Converse calls per caller

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.rate_per_s > 0 or self.max_sessions > 0


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """A `google.rpc.Status` with RetryInfo in `grpc-status-details-bin` (gRPC's rich error model)."""
        if self.retry_after_s is None:
            return ()
        seconds = math.ceil(self.retry_after_s * 1000) / 1000
        detail = AnyProto()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=Duration(
            seconds=int(seconds), nanos=round((seconds % 1) * 1e9))))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])
        return (("grpc-status-details-bin", status.SerializeToString()),)


_MAX_BUCKETS = 10_000  # beyond this many callers, full (idle) buckets are forgotten


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, rate-limits and counts sessions of every call except health and reflection."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy
        self._tokens = TokenSet(policy.tokens) if policy.tokens is not None else None
        self._buckets: dict[str, TokenBucket] = {}
        self.sessions: dict[str, int] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        try:
            caller = self._admit(details)
        except Refusal as refusal:
            return _refusing(handler, refusal)
        if details.method in SESSION_METHODS and self.policy.max_sessions > 0 and handler.stream_stream:
            return _counted(handler, self, caller)
        return handler

    def _admit(self, details: grpc.HandlerCallDetails) -> str:
        """The caller's id, or Refusal (UNAUTHENTICATED, or RESOURCE_EXHAUSTED from the rate limit)."""
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        authorization = metadata.get("authorization")
        token = bearer_token(authorization)
        if self._tokens is not None:
            if token is None:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"{_no_bearer(authorization)}: send metadata "
                              "'authorization: Bearer <token>' (vita --token, VitaClient(token=...))")
            if token not in self._tokens:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        caller = f"token:{token_id(token)}" if token is not None else "anonymous"
        if self.policy.rate_per_s > 0:
            wait = self._bucket(caller).take()
            if wait > 0:
                raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"rate limit of {self.policy.rate_per_s:g} calls/s for this token reached: "
                              f"retry in {wait:.2f} s", retry_after_s=wait)
        return caller

    def _bucket(self, caller: str) -> TokenBucket:
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                now = time.monotonic()
                self._buckets = {k: b for k, b in self._buckets.items()
                                 if b.level + (now - b.updated) * b.rate < b.burst}
            burst = self.policy.burst or max(1, math.ceil(self.policy.rate_per_s))
            bucket = self._buckets[caller] = TokenBucket(self.policy.rate_per_s, float(burst))
        return bucket

    def open_session(self, caller: str) -> None:
        if self.sessions.get(caller, 0) >= self.policy.max_sessions:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this token already has {self.policy.max_sessions} open Converse sessions, the limit: "
                          "close one first")
        self.sessions[caller] = self.sessions.get(caller, 0) + 1

    def close_session(self, caller: str) -> None:
        left = self.sessions.get(caller, 0) - 1
        if left > 0:
            self.sessions[caller] = left
        else:
            self.sessions.pop(caller, None)


def _refusing(handler: Any, refusal: Refusal) -> Any:
    """A handler of the same kind as `handler` that ends the call with the refusal's status."""
    async def abort(context: grpc.aio.ServicerContext) -> None:
        await context.abort(refusal.code, refusal.message, trailing_metadata=refusal.trailing_metadata())

    async def unary(_: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context)

    async def streaming(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await abort(context)
        yield  # pragma: no cover  (abort raises; the yield makes this an async generator)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)


def _counted(handler: Any, interceptor: AccessInterceptor, caller: str) -> Any:
    """The streaming handler, holding one of the caller's session slots for as long as it runs."""
    async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            interceptor.open_session(caller)
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
        try:
            async for response in handler.stream_stream(requests, context):
                yield response
        finally:
            interceptor.close_session(caller)

    return grpc.stream_stream_rpc_method_handler(run, request_deserializer=handler.request_deserializer,
                                                 response_serializer=handler.response_serializer)
