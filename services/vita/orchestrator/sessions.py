"""Converse sessions in Redis, so any orchestrator replica (or a restarted one) continues a session.

One key per session holds its `SessionState` (history, roles, the answer in flight); writes are compare-and-set
on `version` (WATCH/MULTI), so two replicas touching one session never lose each other's turns. Pending camera
frames and images sit in two lists beside it. Every write refreshes the TTL of the session, its lists and the
embeddings its history refers to: they expire together, `session_ttl_s` after the last activity.

One owner. A session is driven by one Converse call at a time, named in `SessionState.owner`: a write made for
an owner that is no longer the session's raises `SessionTakenOver`, inside the same compare-and-set, so two
connections on one session can never both hand out turn ids or both append turns. `claim` (a resume) takes the
session over; the call that owned it finds out at its next write.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import WatchError

from vita.bus.streams import BusConfig, milliseconds
from vita.errors import VitaError
from vita.v1.media_pb2 import Image, TimestampedFrame
from vita.v1.session_pb2 import SessionState

MAX_PENDING_FRAMES = 256  # oldest dropped beyond this: the video rule samples at most 16 frames anyway
MAX_PENDING_IMAGES = 8


class SessionNotFound(VitaError):
    """Resume of a session id that never existed or has expired."""


class SessionTakenOver(VitaError):
    """The session was resumed by another call, which owns it now: this call may not write to it any more."""


class ImageLimitExceeded(VitaError):
    """Too many images wait for the next turn; the client hears RESOURCE_EXHAUSTED."""


class SessionConflict(VitaError):
    """Too many concurrent writers on one session: the write was not applied."""


class SessionStore:
    def __init__(self, redis: Redis, bus: BusConfig, *, retries: int = 50) -> None:
        self.redis = redis
        self.bus = bus
        self.retries = retries

    @property
    def ttl_ms(self) -> int:
        return milliseconds(self.bus.session_ttl_s)

    async def create(self, state: SessionState) -> SessionState:
        now = time.time()
        state.version, state.created_unix_s, state.updated_unix_s = 1, now, now
        if not await self.redis.set(self.bus.session(state.session_id), state.SerializeToString(),
                                    px=self.ttl_ms, nx=True):
            raise VitaError(f"session {state.session_id!r} already exists: resume=true continues it, an empty "
                            "session_id starts a new session")
        return state

    async def load(self, session_id: str) -> SessionState:
        raw = await self.redis.get(self.bus.session(session_id))
        if raw is None:
            raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
        return SessionState.FromString(raw)

    async def update(self, session_id: str, change: Callable[[SessionState], None], *,
                     owner: str | None = None) -> SessionState:
        """Apply `change` to the stored state and write it back if nobody wrote in between; else re-read, retry.

        With `owner`, the write is made only while that call owns the session (else SessionTakenOver).
        """
        key = self.bus.session(session_id)
        for attempt in range(self.retries):
            if attempt:  # a random pause, so writers that collided do not collide again in lockstep
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 10)))
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise SessionNotFound(f"session {session_id!r} does not exist or has expired")
                    state = SessionState.FromString(raw)
                    if owner is not None and state.owner != owner:
                        raise SessionTakenOver(f"session {session_id!r} was resumed by another connection")
                    change(state)
                    state.version += 1
                    state.updated_unix_s = time.time()
                    pipe.multi()
                    pipe.set(key, state.SerializeToString(), px=self.ttl_ms)
                    for name in (self.bus.session_frames(session_id), self.bus.session_images(session_id)):
                        pipe.pexpire(name, self.ttl_ms)
                    await pipe.execute()
                except WatchError:
                    continue
                await self._keep_embeddings(state)
                return state
        raise SessionConflict(f"session {session_id!r}: {self.retries} concurrent writes in a row; try again")

    async def _keep_embeddings(self, state: SessionState) -> None:
        """The history's embedding blobs live as long as the session. Not inside the session's MULTI: on a Redis
        Cluster they sit in other hash slots (one pipelined round trip, per node)."""
        keys = [media.embedding.key for turn in state.turns for media in turn.media]
        if keys:
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def claim(self, session_id: str, owner: str) -> SessionState:
        """Make `owner` the session's one writer (a resume): the previous owner's next write fails."""
        def take(state: SessionState) -> None:
            state.owner = owner

        return await self.update(session_id, take)

    async def reserve_turn(self, session_id: str, owner: str) -> tuple[int, SessionState]:
        """A new turn id, handed out once per session (compare-and-set on `next_turn_id`), and the new state."""
        def bump(state: SessionState) -> None:
            state.next_turn_id += 1

        state = await self.update(session_id, bump, owner=owner)
        return state.next_turn_id - 1, state

    async def add_frame(self, session_id: str, frame: TimestampedFrame) -> int:
        """Keep `frame` for the next turn; returns how many older frames were dropped to keep the latest
        MAX_PENDING_FRAMES (0 or 1)."""
        length = await self._push(self.bus.session_frames(session_id), frame.SerializeToString(),
                                  MAX_PENDING_FRAMES)
        return max(0, length - MAX_PENDING_FRAMES)

    async def add_image(self, session_id: str, image: Image) -> None:
        """Keep `image` for the next turn; ImageLimitExceeded (and it is not kept) when MAX_PENDING_IMAGES wait.

        Pushed, then taken back off if that made too many: concurrent adders each remove one of their own, so the
        first MAX_PENDING_IMAGES stay, whatever the interleaving.
        """
        key = self.bus.session_images(session_id)
        if await self._push(key, image.SerializeToString(), 0) > MAX_PENDING_IMAGES:
            await self.redis.rpop(key)
            raise ImageLimitExceeded(f"{MAX_PENDING_IMAGES} images already wait for the next turn; this one was "
                                     "not kept (send it after the next answer starts)")

    async def take_media(self, session_id: str) -> tuple[list[Image], list[TimestampedFrame]]:
        """The images and frames waiting for this turn, removed in one transaction (a turn takes them once)."""
        images_key, frames_key = self.bus.session_images(session_id), self.bus.session_frames(session_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(images_key, 0, -1)
        pipe.lrange(frames_key, 0, -1)
        pipe.delete(images_key, frames_key)
        images, frames, _ = await pipe.execute()
        return [Image.FromString(x) for x in images], [TimestampedFrame.FromString(x) for x in frames]

    async def peek_media(self, session_id: str) -> tuple[list[Image], list[TimestampedFrame]]:
        """The images and frames waiting for the next turn, left in place (a preemptive answer may be discarded)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(self.bus.session_images(session_id), 0, -1)
        pipe.lrange(self.bus.session_frames(session_id), 0, -1)
        images, frames = await pipe.execute()
        return [Image.FromString(x) for x in images], [TimestampedFrame.FromString(x) for x in frames]

    async def take_media_if(self, session_id: str, images: list[Image], frames: list[TimestampedFrame]) -> bool:
        """Take the waiting media only if they are exactly `images` and `frames` (what `peek_media` saw); False,
        and nothing taken, when any was added or dropped since (compare-and-set on both lists)."""
        keys = self.bus.session_images(session_id), self.bus.session_frames(session_id)
        if not images and not frames:  # the usual case: one round trip (what comes after it is the next turn's)
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.llen(key)
            return not any(await pipe.execute())
        for _ in range(self.retries):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(*keys)
                    now = [await pipe.lrange(key, 0, -1) for key in keys]
                    if ([Image.FromString(x) for x in now[0]] != images
                            or [TimestampedFrame.FromString(x) for x in now[1]] != frames):
                        return False
                    pipe.multi()
                    pipe.delete(*keys)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        return False

    async def _push(self, key: str, value: bytes, keep: int) -> int:
        """Append; with `keep`, trim to the newest `keep`. Returns the length right after the append."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, value)
        if keep:
            pipe.ltrim(key, -keep, -1)
        pipe.pexpire(key, self.ttl_ms)
        return (await pipe.execute())[0]
