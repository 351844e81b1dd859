"""The one way a service connects to the bus: a URL with its credentials, TLS files, and cluster or not.

    redis://[user:password@]host:port/db     plain; AUTH as `user` (an ACL user, docs/deployment.md) when given
    rediss://[user:password@]host:port/db    TLS; `ca_file` is the CA the server's certificate must chain to,
                                             `cert_file` + `key_file` a client certificate (tls-auth-clients yes)

With `cluster`, the URL names any one node of a Redis Cluster and the client is `redis.asyncio.RedisCluster`,
which follows the cluster's slot map; every multi-key command the services send stays in one hash slot
(services/vita/bus/README.md, "Redis Cluster").
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from vita.errors import InvalidInputError, VitaError

T = TypeVar("T")


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    ca_file: str | None = None  # rediss://: trust this CA (default: the system's roots)
    cert_file: str | None = None  # rediss://: client certificate, for servers with tls-auth-clients yes
    key_file: str | None = None

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss"):
            raise VitaError(f"Redis URL {redacted(self.url)!r} must start with redis:// or rediss:// (TLS)")
        tls_files = [f for f in (self.ca_file, self.cert_file, self.key_file) if f is not None]
        if tls_files and scheme != "rediss":
            raise VitaError("--redis-ca/--redis-cert/--redis-key need a rediss:// URL (TLS)")
        if (self.cert_file is None) != (self.key_file is None):
            raise VitaError("--redis-cert and --redis-key go together")
        for f in tls_files:
            if not Path(f).is_file():
                raise VitaError(f"Redis TLS file {f} does not exist")
        if self.cluster and urlsplit(self.url).path not in ("", "/", "/0"):
            raise VitaError("a Redis Cluster has only database 0: drop the /db from the URL")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one command keeps reconnecting before it raises; the sleeps double from `base_s` up to `cap_s`.

    redis-py's client from a URL retries nothing: a Redis restart (or a failover, a dropped connection) made the
    next command of every service fail at once, which ended the worker loops and failed every request in flight.
    With this policy each command reconnects (a pub/sub connection re-subscribes) for `outage_s`. A command whose
    reply was lost with the connection may run twice; everything on the bus is idempotent or deduplicated for that
    reason (bus/README.md, "Delivery semantics").
    """

    outage_s: float = 15.0  # a Redis restart or a 5 s network stall is invisible to the services
    base_s: float = 0.05
    cap_s: float = 0.5

    def __post_init__(self) -> None:
        if not (self.outage_s >= 0 and 0 < self.base_s <= self.cap_s):
            raise InvalidInputError(f"retry policy needs outage_s >= 0 and 0 < base_s <= cap_s; got {self}")

    def retry(self) -> OutageRetry:
        return OutageRetry(self.outage_s, ExponentialBackoff(cap=self.cap_s, base=self.base_s))


# The deadline of the outermost retrying call in this task (None outside one): see OutageRetry.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("vita_redis_retry_deadline", default=None)


class OutageRetry(Retry):
    """redis-py's Retry bounded by time: `outage_s` from the start of the outermost call, shared by nested calls.

    redis-py 8 retries a command (`execute_command`) and, inside each attempt, the connection's own connect
    (`connect_check_health`) with the same Retry object. A policy bounded by a count multiplies there: a command
    whose pooled connection Redis had closed retried its connect 33 times inside each of its 33 attempts, so the
    first request after Redis died hung for minutes, past its client's deadline (an operator's try, 2026-12-04),
    while later ones, whose connections were new, failed after 15 s. Here the outermost call sets the deadline and
    every call nested in it (same task: a context variable) stops at that same moment, with the last error. The
    call's own time counts against it: a blocked XREAD that fails after 2.5 s has 12.5 s of a 15 s bound left.
    """

    def __init__(self, outage_s: float, backoff: ExponentialBackoff) -> None:
        super().__init__(backoff, -1, supported_errors=(RedisConnectionError, RedisTimeoutError, OSError))
        self.outage_s = outage_s

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                              is_retryable: Callable[[Exception], bool] | None = None,
                              with_failure_count: bool = False) -> T:
        deadline = _DEADLINE.get()
        token = _DEADLINE.set(time.monotonic() + self.outage_s) if deadline is None else None
        deadline = _DEADLINE.get()
        try:
            failures = 0
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    await (fail(error, failures) if with_failure_count else fail(error))
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise error
                    await asyncio.sleep(min(self._backoff.compute(failures), remaining))
        finally:
            if token is not None:
                _DEADLINE.reset(token)


def connect(settings: RedisSettings, *, socket_timeout: float | None = None,
            socket_connect_timeout: float | None = 5.0, retry: RetryPolicy | None = None) -> Redis | RedisCluster:
    """A client for the bus (binary replies: entries are protobuf). No I/O happens until the first command.

    `retry`: ride out an outage that long (the services pass `--redis-outage-s`); None retries nothing.
    """
    kwargs: dict[str, object] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    if retry is not None:
        kwargs["retry"] = retry.retry()
        if not settings.cluster:  # the cluster client retries through its own slot-map refresh
            kwargs["retry_on_error"] = [RedisConnectionError, RedisTimeoutError, OSError]
    if settings.ca_file is not None:
        kwargs["ssl_ca_certs"] = settings.ca_file
    if settings.cert_file is not None:
        kwargs["ssl_certfile"], kwargs["ssl_keyfile"] = settings.cert_file, settings.key_file
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **kwargs)
    return Redis.from_url(settings.url, **kwargs)


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
