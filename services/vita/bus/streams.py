"""Every Redis key the services share, what each stream carries, and how long it lives.

This is the single source of truth that README.md documents: services never format a key themselves.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from google.protobuf.message import Message

from vita.errors import InvalidInputError
from vita.v1.bus_pb2 import EncodeJob, EncodeResult, GenerationEvent, GenerationJob

_ID = re.compile(r"[A-Za-z0-9_.:@+=/-]{1,128}")  # no spaces, glob characters or hash-tag braces
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*")


class Pool(StrEnum):
    """A set of interchangeable workers behind one job stream; the value names both the stream and its group."""

    AUDIO_ENCODER = "audio-encoder"
    VISION_ENCODER = "vision-encoder"
    LLM_GENERATOR = "llm:generator"
    LLM_MONITOR = "llm:monitor"

    @property
    def group(self) -> str:
        """One consumer group per pool, so each job goes to exactly one worker of that pool."""
        return self.value


JOB_TYPES: dict[Pool, type[Message]] = {
    Pool.AUDIO_ENCODER: EncodeJob,
    Pool.VISION_ENCODER: EncodeJob,
    Pool.LLM_GENERATOR: GenerationJob,
    Pool.LLM_MONITOR: GenerationJob,
}
REPLY_TYPES: tuple[type[Message], ...] = (EncodeResult, GenerationEvent)
ROLE_POOLS = {GenerationJob.GENERATOR: Pool.LLM_GENERATOR, GenerationJob.MONITOR: Pool.LLM_MONITOR}


def check_id(what: str, value: str) -> str:
    """Ids become key suffixes, so they must not collide with Redis patterns or cluster hash tags. The error quotes
    at most the first 40 characters of a bad id (it is the client's: it goes to logs and statuses)."""
    if not _ID.fullmatch(value):
        shown = repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"
        raise InvalidInputError(f"{what} {shown} must be 1-128 characters of A-Z a-z 0-9 _ . : @ + = / -")
    return value


# The longest suffix a request's jobs add to its id (`.image`, `.video`, `.audio`: PoolClient.encode).
_JOB_SUFFIX = 8


def unique_id(caller_id: str, kind: str) -> str:
    """The id one call's state is keyed by on the bus (jobs, reply stream, cancel key, lease, the engine's
    sequence): `{caller_id}.{kind}.{16 hex digits}`, new for every call. A caller's id is only echoed (two calls
    may share one, or reuse it); this one is the server's, so no call ever reads another's replies. The caller's
    id leads it for correlation in logs and Redis, cut so that the id and its job suffixes fit 128 characters.
    `caller_id` and `kind` must pass `check_id`."""
    suffix = f".{kind}.{uuid.uuid4().hex[:16]}"
    return check_id("request id", caller_id[: 128 - _JOB_SUFFIX - len(suffix)] + suffix)


# Below this a lease's renewals (every quarter of it) would be too close to the round trip that renews it.
MIN_LEASE_TTL_S = 0.5


def milliseconds(seconds: float) -> int:
    """Redis TTLs and blocking reads take integer milliseconds; 0 would mean 'forever' for XREAD."""
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class BusConfig:
    """Key prefix, retention and limits; one instance per deployment, identical in every service."""

    prefix: str = "vita"
    jobs_maxlen: int = 10_000  # approximate (XADD MAXLEN ~): acknowledged history kept for inspection
    dead_letter_maxlen: int = 10_000
    backlog_limits: dict[Pool, int] = field(default_factory=lambda: dict.fromkeys(Pool, 1_000))
    reply_ttl_s: float = 300.0  # refreshed on every write: counts from the last event
    embedding_ttl_s: float = 600.0  # must exceed the longest wait of a generation job in its queue
    cancel_ttl_s: float = 600.0  # covers jobs still queued when their request is cancelled
    session_ttl_s: float = 1800.0  # a Converse session, its pending media and history embeddings; reset on writes
    reclaim_idle_ms: int = 30_000  # an unacknowledged job idle this long belongs to a dead worker
    max_deliveries: int = 3  # a job delivered more often than this is dead-lettered
    # A consumer idle this long with nothing pending is dead (a killed pod): removed from its group. At least
    # reclaim_idle_ms, so its pending jobs were taken over first.
    dead_consumer_ms: int = 60_000
    # A request's owner renews its lease this often over; a worker stops a leased job whose lease is gone
    # (lease.py). 0: requests are not leased.
    lease_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise InvalidInputError(f"bus prefix {self.prefix!r} must be ':'-separated words of A-Z a-z 0-9 _ . -")
        for name in ("jobs_maxlen", "dead_letter_maxlen", "reclaim_idle_ms", "max_deliveries", "dead_consumer_ms"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be at least 1; got {getattr(self, name)}")
        for name in ("reply_ttl_s", "embedding_ttl_s", "cancel_ttl_s", "session_ttl_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be positive; got {getattr(self, name)}")
        if self.lease_ttl_s != 0 and not self.lease_ttl_s >= MIN_LEASE_TTL_S:
            raise InvalidInputError(f"lease_ttl_s must be 0 (off) or at least {MIN_LEASE_TTL_S:g} s; "
                                    f"got {self.lease_ttl_s}")
        if self.dead_consumer_ms < self.reclaim_idle_ms:
            raise InvalidInputError(f"dead_consumer_ms ({self.dead_consumer_ms}) must be at least reclaim_idle_ms "
                                    f"({self.reclaim_idle_ms}): a consumer's jobs are reclaimed before it is removed")
        for pool in Pool:
            limit = self.backlog_limits.get(pool)
            # Backpressure must refuse work before MAXLEN trimming could drop jobs nobody has read.
            if limit is None or not 1 <= limit < self.jobs_maxlen:
                raise InvalidInputError(f"backlog limit of {pool} must be in [1, jobs_maxlen={self.jobs_maxlen}); got {limit}")

    # Redis Cluster hash tags: the part in braces alone picks a key's slot. A pool's job stream and its dead
    # letters share one tag (a dead letter is written and its job acked in one MULTI); a session's state and its
    # pending-media lists share the session id (one WATCH/MULTI touches all three). Ids never contain braces.

    def jobs(self, pool: Pool) -> str:
        return f"{self.prefix}:jobs:{{{pool}}}"

    def dead_letters(self, pool: Pool) -> str:
        return f"{self.prefix}:dead:{{{pool}}}"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{{{check_id('request id', request_id)}}}"

    def embedding(self, blob_id: str) -> str:
        return f"{self.prefix}:emb:{{{check_id('embedding id', blob_id)}}}"

    def cancel_key(self, request_id: str) -> str:
        return f"{self.prefix}:cancel:{{{check_id('request id', request_id)}}}"

    def lease_key(self, request_id: str) -> str:
        """Tagged like the cancel key and reply stream: on a Cluster, a request's keys live on one node."""
        return f"{self.prefix}:lease:{{{check_id('request id', request_id)}}}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{{{check_id('session id', session_id)}}}"

    def session_frames(self, session_id: str) -> str:
        """Camera frames (TimestampedFrame) waiting for the session's next answered turn, oldest first."""
        return f"{self.session(session_id)}:frames"

    def session_images(self, session_id: str) -> str:
        """Images (Image) attached to the session's next answered turn."""
        return f"{self.session(session_id)}:images"

    @property
    def cancel_channel(self) -> str:
        """One pub/sub channel for all cancellations: a worker subscribes once, not per request."""
        return f"{self.prefix}:cancel"

    def check_reply_stream(self, key: str) -> str:
        """Workers write where a job tells them; this keeps a bad job from writing outside the reply streams."""
        head = f"{self.prefix}:reply:{{"
        if not (key.startswith(head) and key.endswith("}")):
            raise InvalidInputError(f"reply stream {key!r} is not under {head + '...}'!r}")
        check_id("request id", key.removeprefix(head).removesuffix("}"))
        return key
