"""Per-request reply streams: workers append results and events, the orchestrator follows them.

A reply stream lives only as long as someone may read it: every write refreshes its TTL, so an abandoned
request's stream disappears on its own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from redis.asyncio import Redis

from vita.bus.codec import decode_entry, encode_entry
from vita.bus.streams import REPLY_TYPES, BusConfig, milliseconds
from vita.errors import InvalidInputError, VitaError
from vita.v1.bus_pb2 import EncodeResult, GenerationEvent

Reply = EncodeResult | GenerationEvent


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
    while True:
        reply = await redis.xread({reply_stream: after}, count=64, block=milliseconds(timeout_s))
        if not reply:
            raise ReplyTimeout(f"no reply on {reply_stream} within {timeout_s:g} s")
        for entry_id, fields in reply[0][1]:
            after = entry_id.decode()
            message = decode_entry(fields, REPLY_TYPES)
            if isinstance(message, EncodeResult):
                if message.job_id in seen_jobs:
                    continue
                seen_jobs.add(message.job_id)
            else:
                if message.sequence < next_sequence.get(message.request_id, 0):
                    continue
                next_sequence[message.request_id] = message.sequence + 1
            yield message
