"""Job queues: the orchestrator submits to a pool's stream, one worker of the pool takes each job.

Delivery is at least once: a job is acknowledged only after its result is published, a dead worker's jobs are
reclaimed by the living, and a job that keeps killing its workers goes to the dead letters instead of looping.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from vita.bus.codec import MalformedEntry, decode_entry, encode_entry
from vita.bus.streams import JOB_TYPES, ROLE_POOLS, BusConfig, Pool
from vita.errors import VitaError
from vita.v1.bus_pb2 import GenerationJob

if TYPE_CHECKING:
    from vita.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

# An entry as `Consumer._fetch` returns it: id, fields, deliveries, and the consumer it was taken over from ("" for
# a first delivery).
_Entry = tuple[bytes, dict[bytes, bytes], int, str]


class Backpressure(VitaError):
    """A pool's backlog is at its bound: answer RESOURCE_EXHAUSTED now rather than queue without limit."""


@dataclass(frozen=True)
class PoolLag:
    lag: int  # submitted, not yet delivered to any worker
    pending: int  # delivered, not yet acknowledged (in progress, or held by a dead worker)

    @property
    def backlog(self) -> int:
        return self.lag + self.pending


@dataclass(frozen=True)
class Delivery:
    entry_id: str
    message: Message
    deliveries: int  # 1 on first delivery; more means a retry, possibly after another worker died on it


async def submit(redis: Redis, config: BusConfig, pool: Pool, message: Message) -> str:
    """Queue a job for `pool` and return its entry id; raises Backpressure when the pool is saturated."""
    if not isinstance(message, JOB_TYPES[pool]):
        raise TypeError(f"the {pool} pool takes {JOB_TYPES[pool].__name__}, not {type(message).__name__}")
    if isinstance(message, GenerationJob) and ROLE_POOLS.get(message.role) != pool:
        raise TypeError(f"a {GenerationJob.Role.Name(message.role)} job does not belong in the {pool} pool")
    depth = await lag(redis, config, pool)
    limit = config.backlog_limits[pool]
    if depth.backlog >= limit:
        raise Backpressure(
            f"the {pool} pool is {depth.backlog} jobs deep ({depth.lag} waiting, {depth.pending} in progress), "
            f"at its limit of {limit}: retry later"
        )
    entry_id = await redis.xadd(config.jobs(pool), encode_entry(message), maxlen=config.jobs_maxlen)
    return entry_id.decode()


async def lag(redis: Redis, config: BusConfig, pool: Pool) -> PoolLag:
    """Backlog from XINFO GROUPS; creates the group if needed, so jobs queued before any worker starts are kept."""
    stream = config.jobs(pool)
    pipe = redis.pipeline(transaction=False)
    pipe.xgroup_create(stream, pool.group, id="0", mkstream=True)
    pipe.xinfo_groups(stream)
    pipe.xlen(stream)
    _, groups, length = _raise_errors(await pipe.execute(raise_on_error=False))
    info = next(g for g in groups if g["name"].decode() == pool.group)
    # Redis reports a nil lag when deletions make it uncountable; the stream length is a safe upper bound.
    waiting = length if info["lag"] is None else info["lag"]
    return PoolLag(lag=waiting, pending=info["pending"])


def default_consumer_name() -> str:
    """Unique per process and incarnation: a restarted worker must not inherit (and then ignore) its old jobs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


@dataclass
class Consumer:
    """One worker's membership in its pool's consumer group. `metrics`: where take-overs of other consumers' jobs
    are counted (`vita:jobs_reclaimed_total`)."""

    redis: Redis
    config: BusConfig
    pool: Pool
    name: str = field(default_factory=default_consumer_name)
    metrics: Metrics | None = None
    _cursor: str = field(default="0-0", init=False)  # XAUTOCLAIM resumes its scan of the pending list here
    _ready: bool = field(default=False, init=False)
    _next_sweep: float = field(default=0.0, init=False)  # monotonic time of the next dead-consumer sweep

    def __post_init__(self) -> None:
        if self.metrics is not None:
            self.metrics.jobs_reclaimed.labels(self.pool.value)  # a series at 0 from the start, for rate()

    @property
    def stream(self) -> str:
        return self.config.jobs(self.pool)

    async def read(self, count: int = 1, block_ms: int | None = 1000) -> list[Delivery]:
        """Up to `count` jobs: first any a dead worker left behind, else new ones, waiting up to `block_ms`.

        `block_ms=None` returns at once; 0 would block until a job arrives, skipping reclaim meanwhile.
        A group that vanished (Redis restarted without persistence, the stream deleted) is created again.
        """
        try:
            entries = await self._fetch(count, block_ms)
        except ResponseError as e:
            if not str(e).startswith("NOGROUP"):
                raise
            log.warning("%s: the consumer group is gone (Redis lost its data?); creating it again", self.stream)
            self._ready, self._cursor = False, "0-0"
            entries = await self._fetch(count, block_ms)
        deliveries, taken = [], []
        for entry_id, fields, n, owner in entries:
            message = await self._decode(entry_id, fields, n)
            if owner:
                taken.append((entry_id.decode(), owner, getattr(message, "request_id", "")))
            if message is not None:
                deliveries.append(Delivery(entry_id.decode(), message, n))
        if taken:
            self._report_take_over(taken)
        return deliveries

    async def _decode(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> Message | None:
        """The entry's job; None when it went to the dead letters instead (delivered too often, undecodable)."""
        if deliveries > self.config.max_deliveries:
            await self._dead_letter(entry_id, fields, deliveries,
                                    f"delivered {deliveries} times (limit {self.config.max_deliveries})")
            return None
        try:
            return decode_entry(fields, (JOB_TYPES[self.pool],))
        except MalformedEntry as e:
            await self._dead_letter(entry_id, fields, deliveries, str(e))
            return None

    def _report_take_over(self, taken: list[tuple[str, str, str]]) -> None:
        """One log line per read that took over jobs (entry id, previous owner, request id), and the count."""
        log.info("took over jobs another consumer left unacknowledged past reclaim_idle_ms (a killed or stalled "
                 "worker)", extra={"stream": self.stream, "consumer": self.name,
                                   "from_consumers": sorted({owner for _, owner, _ in taken}), "jobs": len(taken),
                                   "entry_ids": [e for e, _, _ in taken], "request_ids": [r for _, _, r in taken],
                                   "reclaim_idle_ms": self.config.reclaim_idle_ms})
        if self.metrics is not None:
            self.metrics.jobs_reclaimed.labels(self.pool.value).inc(len(taken))

    async def _fetch(self, count: int, block_ms: int | None) -> list[_Entry]:
        await self._ensure_group()
        entries = await self._reclaim(count)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.config.dead_consumer_ms / 2000
            await self.remove_dead_consumers()
        if not entries:
            reply = await self.redis.xreadgroup(
                self.pool.group, self.name, {self.stream: ">"}, count=count, block=block_ms
            )
            entries = [(entry_id, fields, 1, "") for entry_id, fields in (reply[0][1] if reply else [])]
        return entries

    async def remove_dead_consumers(self) -> list[str]:
        """Delete the group's consumers idle past `dead_consumer_ms` that hold no pending job; returns their names.

        Killed workers stay in XINFO CONSUMERS forever otherwise. `read` calls this every `dead_consumer_ms / 2`,
        after its XAUTOCLAIM, so a dead consumer's jobs were taken over before it is removed. The pending check and
        XGROUP DELCONSUMER run in one script: a consumer that took a job meanwhile is kept (deleting it would drop
        its pending entries).

        Idle is not dead. Before Redis 7.2 a consumer's idle time counts from the last read that returned entries:
        a live worker whose pool has had no job that long is removed too (an idle pool then shows no consumers at
        all). It loses only its name, holding no job: Redis creates it again with the next entry it reads, a read
        blocked at the time of the removal included. From 7.2 every read attempt resets it, and only workers that
        stopped reading are removed.
        """
        consumers = await self.redis.xinfo_consumers(self.stream, self.pool.group)
        removed = []
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == self.name or c["idle"] < self.config.dead_consumer_ms or c["pending"]:
                continue
            if await self.redis.eval(_DELETE_IF_IDLE, 1, self.stream, self.pool.group, name):
                removed.append(name)
        if removed:
            idle_s = self.config.dead_consumer_ms / 1000
            log.info("removed idle consumers (no job taken for %g s, none pending: killed workers, or live ones "
                     "with nothing to do, which come back with their next job)", idle_s,
                     extra={"stream": self.stream, "consumers": removed, "idle_s": idle_s})
        return removed

    async def ack(self, *entry_ids: str) -> None:
        """Call after the job's final event is published: until then a crash must leave it reclaimable."""
        await self.redis.xack(self.stream, self.pool.group, *entry_ids)

    async def keep_alive(self, *entry_ids: str) -> list[str]:
        """Reset the idle time of jobs still running (a long generation), so nobody reclaims them as abandoned;
        returns the entry ids this consumer still owns, in order.

        Call more often than `reclaim_idle_ms`; JUSTID leaves the delivery counter alone. Only entries still pending
        under this consumer are refreshed: one another consumer reclaimed while this worker stalled past
        `reclaim_idle_ms` stays with it (taking it back would have both answer it), and one acknowledged meanwhile
        stays done. The ownership check and the XCLAIM run in one script. A group lost with Redis' data is not an
        error here: every entry counts as owned and the job runs on, with nobody left to reclaim it from.
        """
        if not entry_ids:
            return []
        try:
            owned = await self.redis.eval(_REFRESH_IF_OWNED, 1, self.stream, self.pool.group, self.name, *entry_ids)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            return list(entry_ids)
        return [x.decode() if isinstance(x, bytes) else x for x in owned]

    async def _ensure_group(self) -> None:
        if self._ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.pool.group, id="0", mkstream=True)
        except ResponseError as e:
            _raise_errors([e])
        self._ready = True

    async def _reclaim(self, count: int) -> list[_Entry]:
        """Take over jobs idle past `reclaim_idle_ms`, with their delivery counts (which XAUTOCLAIM just raised) and
        the consumers they were taken from."""
        idle_ms = self.config.reclaim_idle_ms
        pipe = self.redis.pipeline(transaction=True)
        # XAUTOCLAIM does not say whose jobs it took: their owners are read first, in the same MULTI. It looks at
        # no more than count * 10 pending entries from the cursor, so the first count * 10 idle ones hold them all.
        pipe.xpending_range(self.stream, self.pool.group, min=self._cursor, max="+", count=count * 10, idle=idle_ms)
        pipe.xautoclaim(self.stream, self.pool.group, self.name, idle_ms, self._cursor, count=count)
        abandoned, (cursor, claimed, deleted) = _raise_errors(await pipe.execute(raise_on_error=False))
        self._cursor = cursor.decode()
        if deleted:
            log.error("%s: %d unfinished jobs were trimmed by MAXLEN and are lost", self.stream, len(deleted))
        if not claimed:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(self.stream, self.pool.group, min=entry_id, max=entry_id, count=1)
        pending = await pipe.execute()
        owners = {p["message_id"]: p["consumer"].decode() for p in abandoned}
        # An entry missing from the pending list was acknowledged meanwhile by its slow first owner: it is done.
        return [(eid, fields, p[0]["times_delivered"], owners.get(eid, "?"))
                for (eid, fields), p in zip(claimed, pending) if p]

    async def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int, reason: str) -> None:
        """Park the entry, with why, on the pool's dead-letter stream and acknowledge it, atomically."""
        log.error("%s %s dead-lettered: %s", self.stream, entry_id.decode(), reason)
        letter = {
            **fields,
            b"dead:stream": self.stream,
            b"dead:entry_id": entry_id,
            b"dead:deliveries": deliveries,
            b"dead:consumer": self.name,
            b"dead:reason": reason,
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.config.dead_letters(self.pool), letter, maxlen=self.config.dead_letter_maxlen)
        pipe.xack(self.stream, self.pool.group, entry_id)
        await pipe.execute()


# KEYS[1] stream, ARGV[1] group, ARGV[2] consumer: delete the consumer only if it holds no pending entry, so no
# job is dropped with it (XGROUP DELCONSUMER discards a consumer's pending entries).
_DELETE_IF_IDLE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
"""


# KEYS[1] stream, ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids: refresh (XCLAIM min-idle 0 JUSTID) only the
# entries still pending under this consumer, and return those.
_REFRESH_IF_OWNED = """
local owned = {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    owned[#owned + 1] = ARGV[i]
  end
end
return owned
"""


def _raise_errors(results: list[Any]) -> list[Any]:
    """Pipeline results, raising any error except BUSYGROUP (the group already exists, which is the goal)."""
    for result in results:
        if isinstance(result, Exception) and not str(result).startswith("BUSYGROUP"):
            raise result
    return results
