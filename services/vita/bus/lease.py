"""Leases: a worker stops a generation whose owner (the orchestrator that asked for it) is gone.

A killed orchestrator sends no cancel, so without a lease its running generations decode to max_tokens for nobody.
The owner sets `{prefix}:lease:{request_id}` (`SET ... PX lease_ttl_s`) before it queues the job and keeps it until
it no longer wants the output; `LeaseKeeper` renews all of one process's leases together, in one pipelined round
trip every quarter TTL, on a clock of its own, so a live owner's leases never lapse however slowly its client
reads. Workers read the leases of their running requests together with their cancel keys, in the one pipelined
round trip `CancelWatcher` makes every check period anyway (no Redis call per token), and stop a request whose
lease has been missing for `grace_s`: the grace covers a Redis that lost or expired the key while its owner lives
(restarted without its data, stalled past the TTL): the owner sets it again at its next renewal.

From the owner's death to the worker's stop: at most the TTL (the key expires), the grace, and two check periods
(`stop_bound_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from redis.asyncio import Redis

from vita.bus.streams import BusConfig, milliseconds

log = logging.getLogger(__name__)


def renew_every_s(config: BusConfig) -> float:
    """A lease is renewed four times per TTL: three renewals may be late before it expires."""
    return config.lease_ttl_s / 4


def check_every_s(config: BusConfig) -> float:
    """How often a worker reads its running requests' cancel keys and leases (one round trip for all)."""
    return min(1.0, config.lease_ttl_s / 4) if config.lease_ttl_s else 1.0


def grace_s(config: BusConfig) -> float:
    """How long a lease must stay missing before its request counts as orphaned: more than a renewal period,
    so an owner that lost its key with Redis' data has set it again by then."""
    return config.lease_ttl_s / 2


def stop_bound_s(config: BusConfig) -> float:
    """The longest from an owner's death to its workers' stop (on an idle machine)."""
    return config.lease_ttl_s + grace_s(config) + 2 * check_every_s(config)


def owner_name() -> str:
    """The lease's value: who holds it, for an operator reading the key."""
    return f"{socket.gethostname()}-{os.getpid()}"


class LeaseKeeper:
    """The owner's side: `acquire` before the job is queued, `release` once its output is no longer wanted (its last
    event arrived, or it was cancelled). One task renews every held lease; it ends as soon as none is held, so an
    idle process runs nothing for leases."""

    def __init__(self, redis: Redis, config: BusConfig, owner: str | None = None) -> None:
        self.redis, self.config = redis, config
        self.owner = owner or owner_name()
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._emptied = asyncio.Event()  # the last lease was released: the renewer ends now, not a period later

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    async def acquire(self, request_id: str) -> bool:
        """Set the lease of `request_id` and renew it from now on; False (nothing set) when leases are off."""
        if not self.config.lease_ttl_s:
            return False
        await self.redis.set(self.config.lease_key(request_id), self.owner,
                             px=milliseconds(self.config.lease_ttl_s))
        self._held.add(request_id)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew())
        return True

    def release(self, request_id: str) -> None:
        """No more renewals; the key expires by itself (a worker still on the request has been told, or is done)."""
        self._held.discard(request_id)
        if not self._held:
            self._emptied.set()

    async def _renew(self) -> None:
        """SET (not PEXPIRE), so a key that Redis lost is back at the next renewal. Never dies of an error: a
        renewer that stopped would let every lease of this process lapse."""
        ttl_ms = milliseconds(self.config.lease_ttl_s)
        while self._held:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), renew_every_s(self.config))
            held = list(self._held)
            if not held:
                return
            pipe = self.redis.pipeline(transaction=False)  # on a Cluster, split per node by the client
            for request_id in held:
                pipe.set(self.config.lease_key(request_id), self.owner, px=ttl_ms)
            try:
                await pipe.execute()
            except Exception as e:  # Redis gone past the client's retries: the next period tries again
                log.warning("renewing %d leases failed: %s", len(held), e)
