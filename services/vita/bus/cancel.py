"""Request cancellation: the orchestrator signals once; a worker hears it and stops the compute at once.

The signal is both a key (for jobs not yet running, and for anything pub/sub lost) and a pub/sub message (so a
running generation stops within one decode step without a Redis round trip per step). The watcher calls its
`on_cancel` callback the moment the signal for a running request arrives, so a worker can tell its backend
directly: the engine must not wait for the worker's own loop to get round to the request (under load, the loop
that relays tokens to Redis lags the engine by many tokens).

An owner that died cannot cancel: the watcher also reads the leases of leased requests (lease.py) in its periodic
round trip, and stops a request whose lease is gone as if it had been cancelled (`orphaned` tells the two apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from vita.bus.cluster import is_cluster
from vita.bus.lease import check_every_s, grace_s
from vita.bus.streams import BusConfig, milliseconds

log = logging.getLogger(__name__)


async def cancel(redis: Redis, config: BusConfig, request_id: str) -> None:
    """Mark `request_id` cancelled, then tell every subscribed worker: one MULTI on a single Redis; two commands,
    key first, on a Redis Cluster (PUBLISH has no key, so it shares no slot and cannot be pipelined there)."""
    key, ttl_ms = config.cancel_key(request_id), milliseconds(config.cancel_ttl_s)
    if is_cluster(redis):
        await redis.set(key, 1, px=ttl_ms)
        await redis.publish(config.cancel_channel, request_id)
        return
    pipe = redis.pipeline(transaction=True)
    pipe.set(key, 1, px=ttl_ms)
    pipe.publish(config.cancel_channel, request_id)
    await pipe.execute()


@dataclass
class CancelWatcher:
    """A worker's view of which of its running requests were cancelled; use as `async with`.

    Pub/sub is fire-and-forget (a reconnect drops messages), so every `resync_s` (default: the lease check period,
    `lease.check_every_s`) the cancel keys of all running requests, and the leases of the leased ones, are read in
    one pipelined round trip: a missed signal is late by at most that long.

    `on_cancel(request_id)` is awaited once per cancelled running request, from the listener task, as soon as
    the signal (or the resync) shows it; it should be quick (e.g. `backend.cancel`). An exception in it is logged
    and does not stop the listener.
    """

    redis: Redis
    config: BusConfig
    resync_s: float | None = None
    on_cancel: Callable[[str], Awaitable[None]] | None = None
    _running: set[str] = field(default_factory=set, init=False)
    _cancelled: set[str] = field(default_factory=set, init=False)
    _leased: set[str] = field(default_factory=set, init=False)
    _orphaned: set[str] = field(default_factory=set, init=False)
    _lease_missing_since: dict[str, float] = field(default_factory=dict, init=False)  # loop time, first seen gone
    _pubsub: PubSub | None = field(default=None, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.resync_s is None:
            self.resync_s = check_every_s(self.config)

    async def __aenter__(self) -> CancelWatcher:
        if is_cluster(self.redis):  # its pub/sub needs the slot map, which the first command would load
            await self.redis.initialize()
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.config.cancel_channel)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def watch(self, request_id: str, *, leased: bool = False) -> bool:
        """Track a request about to run; True when it was cancelled already, or its owner is gone (`leased`: its
        lease stayed missing for the grace period), and it should be skipped.

        Subscribing happened before, so a cancel sent after this key check cannot be missed.
        """
        self._running.add(request_id)
        if leased and self.config.lease_ttl_s:
            self._leased.add(request_id)
        ((cancelled, orphaned),) = await self._check([request_id])
        if not cancelled and request_id in self._lease_missing_since:
            # Its owner died while it was queued, or Redis lost the key while the owner lives: by the end of the
            # grace the owner has set it again.
            await asyncio.sleep(grace_s(self.config))
            ((cancelled, orphaned),) = await self._check([request_id])
        if orphaned and not cancelled:
            self._orphaned.add(request_id)
        if cancelled or orphaned:
            self._cancelled.add(request_id)
        return request_id in self._cancelled

    def cancelled(self, request_id: str) -> bool:
        """The per-decode-step check: a set lookup, no I/O. Raises if the listener died, rather than never firing."""
        if self._task is not None and self._task.done():
            self._task.result()
        return request_id in self._cancelled

    def orphaned(self, request_id: str) -> bool:
        """Stopped because its owner's lease expired, not by a cancel."""
        return request_id in self._orphaned

    def forget(self, request_id: str) -> None:
        """Call when the request finished, so the sets only ever hold running requests."""
        self._running.discard(request_id)
        self._cancelled.discard(request_id)
        self._leased.discard(request_id)
        self._orphaned.discard(request_id)
        self._lease_missing_since.pop(request_id, None)

    async def _listen(self) -> None:
        """Runs as long as the watcher: a Redis outage past the client's retries is waited out (subscribing
        again), never fatal, and the resync that follows catches the cancels sent meanwhile."""
        loop = asyncio.get_running_loop()
        resync_at = loop.time() + self.resync_s
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    await self._pubsub.subscribe(self.config.cancel_channel)
                message = await self._pubsub.get_message(timeout=self.resync_s)
                if message is not None and (request_id := message["data"].decode()) in self._running:
                    await self._mark(request_id)
                if loop.time() >= resync_at:
                    await self._resync()
                    resync_at = loop.time() + self.resync_s
            except RedisError as e:
                log.warning("cancel listener lost Redis, subscribing again: %s", e)
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()
                await asyncio.sleep(self.resync_s)
                resync_at = loop.time()  # at once: cancels sent while unsubscribed are only in their keys

    async def _resync(self) -> None:
        unseen = list(self._running - self._cancelled)
        if not unseen:
            return
        for request_id, (cancelled, orphaned) in zip(unseen, await self._check(unseen)):
            if request_id not in self._running:  # forgotten while we waited
                continue
            if orphaned and not cancelled:
                self._orphaned.add(request_id)
            if cancelled or orphaned:
                await self._mark(request_id)

    async def _check(self, request_ids: list[str]) -> list[tuple[bool, bool]]:
        """(cancelled, orphaned) per request, from one pipelined round trip: an EXISTS of the cancel key, and for a
        leased request of its lease too. (Not MGET: a Cluster pipeline refuses multi-key commands. The two keys
        share the request's hash tag, so on a Cluster both go to the same node.)"""
        leased = [request_id in self._leased for request_id in request_ids]
        pipe = self.redis.pipeline(transaction=False)
        for request_id, with_lease in zip(request_ids, leased):
            pipe.exists(self.config.cancel_key(request_id))
            if with_lease:
                pipe.exists(self.config.lease_key(request_id))
        replies = iter(await pipe.execute())
        now = asyncio.get_running_loop().time()
        checked = []
        for request_id, with_lease in zip(request_ids, leased):
            cancelled = bool(next(replies))
            lapsed = with_lease and self._lease_lapsed(request_id, bool(next(replies)), now)
            checked.append((cancelled, lapsed))
        return checked

    def _lease_lapsed(self, request_id: str, present: bool, now: float) -> bool:
        """True once the lease has been missing for the grace period, as seen by successful reads only (a worker
        cut off from Redis never counts the outage against a lease)."""
        if present:
            self._lease_missing_since.pop(request_id, None)
            return False
        since = self._lease_missing_since.setdefault(request_id, now)
        return now - since >= grace_s(self.config)

    async def _mark(self, request_id: str) -> None:
        if request_id in self._cancelled:
            return  # the callback runs once per request
        self._cancelled.add(request_id)
        if self.on_cancel is not None:
            try:
                await self.on_cancel(request_id)
            except Exception:
                log.exception("on_cancel failed", extra={"request_id": request_id})
