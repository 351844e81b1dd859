"""Readiness that follows the bus: a service that cannot reach Redis says so on its gRPC health service.

Every service needs Redis for its work (the orchestrator puts jobs on it, the workers read them from it), so while
Redis does not answer a replica cannot serve, though its process is fine. The gRPC health service then answers:

- `""` (the server as a whole): SERVING while the process runs, NOT_SERVING once it drains. What a liveness probe
  asks: an outage of Redis must not restart every pod of the release.
- `readiness` and each API service's full name (e.g. `vita.v1.Assistant`): SERVING only while Redis answered the
  last ping. What a readiness probe asks (Kubernetes' `grpc: {port, service: readiness}`), so a Service stops
  routing to a replica that would fail every call, and what the Realtime gateway's `/readyz` follows.

The split is grpc.health.v1's own: the empty name is the server's health, a named service that service's
(https://github.com/grpc/grpc/blob/master/doc/health-checking.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from vita.runtime.redis_client import redacted

log = logging.getLogger(__name__)

READINESS = "readiness"  # the health service name a readiness probe asks
PING_INTERVAL_S = 2.0  # between pings while Redis answers
PING_TIMEOUT_S = 2.0  # a ping slower than this counts as Redis not answering


class BusReadiness:
    """Pings Redis every `interval_s` and calls `set_ready(False)` when a ping fails or takes over `timeout_s`,
    `set_ready(True)` when one answers again, and `on_change` with the same; logs each change once (a warning, then
    an info line). `run` loops until its task is cancelled."""

    def __init__(self, redis: Redis, set_ready: Callable[[bool], Awaitable[None]], *, url: str = "",
                 interval_s: float = PING_INTERVAL_S, timeout_s: float = PING_TIMEOUT_S,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.redis, self.set_ready, self.url = redis, set_ready, url
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.on_change = on_change
        self.ready = True  # serve() checked Redis before the server started

    async def ping(self) -> str | None:
        """None when Redis answered within `timeout_s`, else why not (one line)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.redis.ping()
        except TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except (RedisError, OSError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    async def run(self) -> None:
        while True:
            reason = await self.ping()
            ready = reason is None
            if ready != self.ready:
                self.ready = ready
                await self.set_ready(ready)
                if self.on_change is not None:
                    self.on_change(ready)
                if ready:
                    log.info("bus reachable again: ready", extra={"redis": redacted(self.url)})
                else:
                    log.warning("bus unreachable: not ready", extra={"redis": redacted(self.url), "reason": reason})
            await asyncio.sleep(self.interval_s)
