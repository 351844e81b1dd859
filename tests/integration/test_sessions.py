"""The session store on the real Redis: compare-and-set writes, TTLs, pending media."""

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from vita.bus.streams import BusConfig
from vita.orchestrator.sessions import ImageLimitExceeded, SessionNotFound, SessionStore, SessionTakenOver
from vita.v1.bus_pb2 import EmbeddingRef
from vita.v1.media_pb2 import Image, TimestampedFrame
from vita.v1.session_pb2 import SessionMedia, SessionState, SessionTurn


@pytest.fixture
def store():
    async def make():
        return SessionStore(Redis.from_url("redis://127.0.0.1:6379/0"),
                            BusConfig(prefix=f"test:{uuid.uuid4().hex}", session_ttl_s=60))
    return make


def test_concurrent_writers_never_lose_a_turn(store):
    async def main():
        s = await store()
        await s.create(SessionState(session_id="s1", next_turn_id=1))

        async def writer(k: int) -> None:
            for i in range(10):
                await s.update("s1", lambda st, k=k, i=i: st.turns.append(
                    SessionTurn(role=SessionTurn.USER, content=f"{k}-{i}")))

        await asyncio.gather(*(writer(k) for k in range(4)))
        state = await s.load("s1")
        await s.redis.aclose()
        return state

    state = asyncio.run(main())
    assert sorted(t.content for t in state.turns) == sorted(f"{k}-{i}" for k in range(4) for i in range(10))
    assert state.version == 41


def test_history_embeddings_live_as_long_as_the_session(store):
    async def main():
        s = await store()
        emb = s.bus.embedding("e1")
        await s.redis.set(emb, b"x", px=1000)
        await s.create(SessionState(session_id="s2"))
        await s.update("s2", lambda st: st.turns.append(SessionTurn(
            role=SessionTurn.USER, media=[SessionMedia(modality="audio", embedding=EmbeddingRef(key=emb))])))
        ttl = await s.redis.pttl(emb), await s.redis.pttl(s.bus.session("s2"))
        await s.redis.aclose()
        return ttl

    emb_ttl, session_ttl = asyncio.run(main())
    assert 59_000 < emb_ttl <= 60_000 and 59_000 < session_ttl <= 60_000


def test_pending_media_are_taken_once_and_bounded_and_every_drop_is_counted(store):
    async def main():
        s = await store()
        dropped = 0
        for k in range(300):
            dropped += await s.add_frame("s3", TimestampedFrame(timestamp_s=k, image=Image(data=b"f")))
        await s.add_image("s3", Image(data=b"i"))
        first = await s.take_media("s3")
        second = await s.take_media("s3")
        await s.redis.aclose()
        return dropped, first, second

    dropped, (images, frames), again = asyncio.run(main())
    assert len(images) == 1 and len(frames) == 256 and frames[0].timestamp_s == 44  # the newest kept
    assert dropped == 44
    assert again == ([], [])


def test_media_peeked_for_a_preemptive_answer_are_taken_only_if_nothing_changed(store):
    async def main():
        s = await store()
        out = {"nothing waits": await s.take_media_if("s6", [], [])}
        await s.add_image("s6", Image(data=b"a"))
        await s.add_frame("s6", TimestampedFrame(timestamp_s=1, image=Image(data=b"f")))
        images, frames = await s.peek_media("s6")
        out["an image came, none was seen"] = await s.take_media_if("s6", [], [])
        await s.add_image("s6", Image(data=b"b"))
        out["one more since the peek"] = await s.take_media_if("s6", images, frames)
        out["left in place"] = await s.take_media("s6")
        await s.add_image("s6", Image(data=b"c"))
        images, frames = await s.peek_media("s6")
        out["unchanged"] = await s.take_media_if("s6", images, frames)
        out["taken"] = await s.take_media("s6")
        await s.redis.aclose()
        return out

    out = asyncio.run(main())
    assert out["nothing waits"] and out["unchanged"]
    assert not out["an image came, none was seen"] and not out["one more since the peek"]
    images, frames = out["left in place"]
    assert [i.data for i in images] == [b"a", b"b"] and [f.timestamp_s for f in frames] == [1]
    assert out["taken"] == ([], [])


def test_images_beyond_the_limit_are_refused_not_dropped_in_silence(store):
    async def main():
        s = await store()
        outcomes = await asyncio.gather(*(s.add_image("s5", Image(data=bytes([k]))) for k in range(12)),
                                        return_exceptions=True)
        images, _ = await s.take_media("s5")
        await s.redis.aclose()
        return outcomes, images

    outcomes, images = asyncio.run(main())
    refused = [o for o in outcomes if isinstance(o, ImageLimitExceeded)]
    assert len(refused) == 4 and outcomes.count(None) == 8
    kept = {i.data[0] for i in images}
    assert len(images) == 8 and kept == {k for k, o in enumerate(outcomes) if o is None}


def test_one_owner_hands_out_turn_ids_and_a_claim_takes_the_session_over(store):
    async def main():
        s = await store()
        await s.create(SessionState(session_id="s6", next_turn_id=1, owner="a"))
        ids = await asyncio.gather(*(s.reserve_turn("s6", "a") for _ in range(20)))
        await s.claim("s6", "b")
        with pytest.raises(SessionTakenOver):
            await s.reserve_turn("s6", "a")
        with pytest.raises(SessionTakenOver):
            await s.update("s6", lambda st: st.turns.append(SessionTurn()), owner="a")
        last, state = await s.reserve_turn("s6", "b")
        await s.redis.aclose()
        return [i for i, _ in ids], last, state

    ids, last, state = asyncio.run(main())
    assert sorted(ids) == list(range(1, 21)) and last == 21
    assert state.owner == "b" and not state.turns and state.next_turn_id == 22


def test_unknown_session(store):
    async def main():
        s = await store()
        try:
            with pytest.raises(SessionNotFound):
                await s.load("nope")
            with pytest.raises(SessionNotFound):
                await s.update("nope", lambda st: None)
        finally:
            await s.redis.aclose()

    asyncio.run(main())
