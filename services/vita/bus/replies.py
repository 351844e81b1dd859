"""Per-request reply streams: workers append results and events, the orchestrator follows them.

A reply stream lives only as long as someone may read it: every write refreshes its TTL, so an abandoned
request's stream disappears on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

from redis.asyncio import Redis

from vita.bus.cluster import by_slot, socket_timeout
from vita.bus.codec import MalformedEntry, decode_entry, encode_entry
from vita.bus.streams import REPLY_TYPES, BusConfig, milliseconds
from vita.errors import InvalidInputError, VitaError
from vita.v1.bus_pb2 import EncodeResult, GenerationEvent

log = logging.getLogger(__name__)

Reply = EncodeResult | GenerationEvent
_MAX_BLOCK_S = 1.0  # one blocking read of `events`: below any socket timeout a client is likely to have


class ReplyTimeout(VitaError, TimeoutError):
    """No worker answered in time (it may be dead or overloaded); the orchestrator answers UNAVAILABLE."""


async def publish_event(redis: Redis, config: BusConfig, reply_stream: str, event: Reply) -> str:
    """Append to the job's `reply_stream`; XADD and EXPIRE in one MULTI so the stream never lacks its TTL."""
    config.check_reply_stream(reply_stream)
    if not isinstance(event, REPLY_TYPES):
        raise TypeError(f"reply streams carry EncodeResult or GenerationEvent, not {type(event).__name__}")
    pipe = redis.pipeline(transaction=True)
    pipe.xadd(reply_stream, encode_entry(event))
    pipe.pexpire(reply_stream, milliseconds(config.reply_ttl_s))
    entry_id, _ = await pipe.execute()
    return entry_id.decode()


class ReplyPublisher:
    """Group commit for reply streams: events sent while a write is in flight go out together in the next MULTI.

    An llm worker streams one token per running request per decode step; sent one by one they cost a round trip
    each, batched they cost one per step. Order per stream is kept (one flush at a time, in arrival order), and
    every stream written still gets its TTL in the same transaction.
    """

    def __init__(self, redis: Redis, config: BusConfig) -> None:
        self.redis, self.config = redis, config
        self._pending: list[tuple[str, dict, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task | None = None

    async def publish(self, reply_stream: str, event: Reply) -> None:
        """Returns once the event is in Redis; raises what the write raised."""
        self.config.check_reply_stream(reply_stream)
        if not isinstance(event, REPLY_TYPES):
            raise TypeError(f"reply streams carry EncodeResult or GenerationEvent, not {type(event).__name__}")
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((reply_stream, encode_entry(event), written))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await written

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            # One MULTI on a single Redis; on a Cluster one per hash slot (a reply stream is its own slot), sent
            # together. A stream's events and its TTL are always in the same transaction.
            groups = by_slot(dict.fromkeys(stream for stream, _, _ in batch), self.redis)
            await asyncio.gather(*(self._write([b for b in batch if b[0] in set(streams)], streams)
                                   for streams in groups))

    async def _write(self, batch: list[tuple[str, dict, asyncio.Future[None]]], streams: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for stream, fields, _ in batch:
            pipe.xadd(stream, fields)
        for stream in streams:
            pipe.pexpire(stream, milliseconds(self.config.reply_ttl_s))
        try:
            await pipe.execute()
        except Exception as e:  # every waiter of this batch hears it; later batches try again
            for _, _, written in batch:
                if not written.done():
                    written.set_exception(e)
            return
        for _, _, written in batch:
            if not written.done():
                written.set_result(None)


async def events(
    redis: Redis, reply_stream: str, timeout_s: float, after: str = "0-0"
) -> AsyncGenerator[Reply, None]:
    """Replies in order, each at most once; raises ReplyTimeout when `timeout_s` passes without a new entry.

    Starts at the beginning of the stream by default, so replies published before the reader started are kept.
    A redelivered job publishes again: results already seen (same job id) and events whose sequence number was
    already passed are dropped here, which makes at-least-once delivery look exactly-once to the caller.
    """
    if not timeout_s > 0:
        raise InvalidInputError(f"reply timeout must be positive; got {timeout_s}")
    seen_jobs: set[str] = set()
    next_sequence: dict[str, int] = {}
    # One XREAD BLOCK must end before the client's socket timeout (redis-py 8 defaults it to 5 s), else the
    # read fails with redis' TimeoutError: a longer wait is a series of shorter blocks.
    timeout = socket_timeout(redis)
    slice_s = min(_MAX_BLOCK_S, timeout / 2) if timeout else _MAX_BLOCK_S
    while True:
        deadline = time.monotonic() + timeout_s
        reply = None
        while not reply:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplyTimeout(f"no reply on {reply_stream} within {timeout_s:g} s")
            reply = await redis.xread({reply_stream: after}, count=64, block=milliseconds(min(remaining, slice_s)))
        for entry_id, fields in reply[0][1]:
            after = entry_id.decode()
            try:
                message = decode_entry(fields, REPLY_TYPES)
            except MalformedEntry as e:  # a stray writer must not fail the request: its real events may follow
                log.error("%s %s skipped: %s", reply_stream, after, e)
                continue
            if isinstance(message, EncodeResult):
                if message.job_id in seen_jobs:
                    continue
                seen_jobs.add(message.job_id)
            else:
                if message.sequence < next_sequence.get(message.request_id, 0):
                    continue
                next_sequence[message.request_id] = message.sequence + 1
            yield message
