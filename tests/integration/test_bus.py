"""The Redis streams bus against a real Redis (127.0.0.1:6379 unless VITA_REDIS_URL says otherwise).

Every test works under its own `test:{uuid}` prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator

import numpy as np
import pytest
import torch
from conftest import delete_prefix
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import Redis

from vita.bus.cancel import CancelWatcher, cancel
from vita.bus.codec import MalformedEntry, tensor_to_blob
from vita.bus.embeddings import EmbeddingMissing, blob_digest, read_embeddings, write_embedding
from vita.bus.lease import LeaseKeeper, grace_s, stop_bound_s
from vita.bus.queue import Backpressure, Consumer, PoolLag, lag, submit
from vita.bus.replies import Reply, ReplyTimeout, events, publish_event
from vita.bus.streams import BusConfig, Pool
from vita.bus.trace import current_trace_context, trace_parent
from vita.errors import InvalidInputError, VitaError
from vita.telemetry.metrics import Metrics
from vita.v1.assistant_pb2 import Completed, TextDelta, Timings, Usage
from vita.v1.bus_pb2 import (
    EmbeddingPlacement,
    EmbeddingRef,
    EncodeJob,
    EncodeResult,
    GenerationEvent,
    GenerationJob,
    JobError,
    MediaItem,
    TensorBlob,
)
from vita.v1.media_pb2 import Audio, Image, SamplingParams, TimestampedFrame, Video

REDIS_URL = os.environ.get("VITA_REDIS_URL", "redis://127.0.0.1:6379/0")
IDLE_MS = 50  # reclaim threshold in these tests; sleeps wait a comfortable multiple of it


@pytest.fixture
def config() -> Iterator[BusConfig]:
    cfg = BusConfig(
        prefix=f"test:{uuid.uuid4().hex}",
        jobs_maxlen=50,
        backlog_limits=dict.fromkeys(Pool, 20),
        reclaim_idle_ms=IDLE_MS,
        max_deliveries=2,
    )
    yield cfg
    delete_prefix(cfg.prefix)


def run(body: Callable[[Redis], Awaitable[None]]) -> None:
    """Each test gets a fresh event loop and client: redis.asyncio connections belong to the loop that made them."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        try:
            await body(redis)
        finally:
            await redis.aclose()

    asyncio.run(main())


async def take(stream: AsyncGenerator[Reply, None], n: int) -> list[Reply]:
    out: list[Reply] = []
    async with contextlib.aclosing(stream) as replies:
        async for message in replies:
            out.append(message)
            if len(out) == n:
                break
    return out


def image_job(job_id: str, config: BusConfig) -> EncodeJob:
    return EncodeJob(
        job_id=job_id,
        request_id="req-1",
        reply_stream=config.reply("req-1"),
        kind=EncodeJob.IMAGE,
        items=[MediaItem(image=Image(data=b"\x89PNG\r\n\x1a\n" + bytes(range(256)), mime_type="image/png"))],
        deadline_unix_ms=1_900_000_000_000,
        trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


def generation_job(request_id: str, config: BusConfig, role: int = GenerationJob.GENERATOR) -> GenerationJob:
    ref = EmbeddingRef(key=config.embedding("job-a"), dtype=TensorBlob.BFLOAT16, shape=[5, 8], item_tokens=[2, 3])
    return GenerationJob(
        request_id=request_id,
        role=role,
        reply_stream=config.reply(request_id),
        prompt_token_ids=[1, 100, 32000, 32000, 32000, 32000, 32000, 7, 2],
        embeddings=[EmbeddingPlacement(embedding=ref, spans=[EmbeddingPlacement.Span(start=2, length=5)])],
        sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=1234),
        max_tokens=64,
        deadline_unix_ms=1_900_000_000_000,
    )


def job_cases(config: BusConfig) -> list[tuple[Pool, EncodeJob | GenerationJob]]:
    frames = [TimestampedFrame(timestamp_s=0.25 * i, image=Image(data=bytes([i]) * 9)) for i in range(3)]
    camera = MediaItem(video=Video(frames=Video.Frames(frames=frames)))
    clip = MediaItem(video=Video(file=b"\x00\x00\x00\x18ftypmp42"))
    speech = MediaItem(audio=Audio(data=b"\x01\x00\xff\x7f", encoding=Audio.PCM16, sample_rate_hz=16000))
    fbank = MediaItem(features=tensor_to_blob(torch.arange(12, dtype=torch.float32).reshape(3, 4)))
    return [
        (Pool.VISION_ENCODER, image_job("job-image", config)),
        (Pool.VISION_ENCODER, EncodeJob(job_id="job-camera", request_id="req-1", kind=EncodeJob.VIDEO, items=[camera])),
        (Pool.VISION_ENCODER, EncodeJob(job_id="job-clip", request_id="req-1", kind=EncodeJob.VIDEO, items=[clip])),
        (Pool.AUDIO_ENCODER, EncodeJob(job_id="job-audio", request_id="req-1", kind=EncodeJob.AUDIO, items=[speech, fbank])),
        (Pool.LLM_GENERATOR, generation_job("req-gen", config)),
        (Pool.LLM_MONITOR, generation_job("req-mon", config, GenerationJob.MONITOR)),
    ]


def test_every_job_type_round_trips_through_its_pool(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        for pool, job in job_cases(config):
            await submit(redis, config, pool, job)
            consumer = Consumer(redis, config, pool)
            (delivery,) = await consumer.read(count=10, block_ms=None)
            assert delivery.message == job and type(delivery.message) is type(job)
            assert delivery.deliveries == 1
            await consumer.ack(delivery.entry_id)
            assert await lag(redis, config, pool) == PoolLag(lag=0, pending=0)

    run(body)


def test_every_reply_type_round_trips_in_order(config: BusConfig) -> None:
    stream = config.reply("req-1")
    ref = EmbeddingRef(key=config.embedding("job-image"), dtype=TensorBlob.FLOAT32, shape=[512, 64], item_tokens=[256, 256])
    replies = [
        EncodeResult(job_id="job-image", request_id="req-1", embedding=ref),
        EncodeResult(job_id="job-audio", request_id="req-1", error=JobError(code=JobError.INVALID_ARGUMENT, message="audio is empty")),
        GenerationEvent(request_id="req-1", sequence=0, delta=TextDelta(text="Hé", token_ids=[5, 6])),
        GenerationEvent(
            request_id="req-1",
            sequence=1,
            finished=Completed(
                finish_reason=Completed.LENGTH,
                usage=Usage(prompt_tokens=530, completion_tokens=2, image_tokens=512),
                timings=Timings(time_to_first_token_s=0.12, total_s=0.5),
            ),
        ),
        GenerationEvent(request_id="req-2", sequence=0, error=JobError(code=JobError.DEADLINE_EXCEEDED, message="deadline passed")),
    ]

    async def body(redis: Redis) -> None:
        for reply in replies:
            await publish_event(redis, config, stream, reply)
        assert await take(events(redis, stream, timeout_s=2.0), len(replies)) == replies

    run(body)


def test_two_consumers_share_a_pool_without_duplicates(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        sent = [f"job-{i:02d}" for i in range(12)]
        for job_id in sent:
            await submit(redis, config, Pool.VISION_ENCODER, image_job(job_id, config))
        consumers = [Consumer(redis, config, Pool.VISION_ENCODER) for _ in range(2)]
        received: list[list[str]] = [[], []]
        while batches := [await c.read(count=2, block_ms=None) for c in consumers]:
            if not any(batches):
                break
            for consumer, batch, mine in zip(consumers, batches, received):
                mine.extend(d.message.job_id for d in batch)
                if batch:
                    await consumer.ack(*(d.entry_id for d in batch))
        assert all(received), "both consumers should get work"
        assert sorted(received[0] + received[1]) == sent  # everything delivered, nothing twice

    run(body)


def test_jobs_of_a_dead_consumer_are_reclaimed(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        job = image_job("job-1", config)
        await submit(redis, config, Pool.VISION_ENCODER, job)
        dead, alive = Consumer(redis, config, Pool.VISION_ENCODER), Consumer(redis, config, Pool.VISION_ENCODER)
        (first,) = await dead.read(block_ms=None)  # ... and never acks
        assert await alive.read(block_ms=None) == []  # not idle long enough to count as abandoned
        await asyncio.sleep(3 * IDLE_MS / 1000)
        (again,) = await alive.read(block_ms=None)
        assert (again.entry_id, again.message, again.deliveries) == (first.entry_id, job, 2)
        await alive.ack(again.entry_id)
        assert await lag(redis, config, Pool.VISION_ENCODER) == PoolLag(lag=0, pending=0)

    run(body)


def test_keep_alive_protects_a_long_job_from_reclaim(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        await submit(redis, config, Pool.LLM_GENERATOR, generation_job("req-long", config))
        busy, other = Consumer(redis, config, Pool.LLM_GENERATOR), Consumer(redis, config, Pool.LLM_GENERATOR)
        (delivery,) = await busy.read(block_ms=None)
        await asyncio.sleep(3 * IDLE_MS / 1000)
        assert await busy.keep_alive(delivery.entry_id) == [delivery.entry_id]
        assert await other.read(block_ms=None) == []
        await busy.ack(delivery.entry_id)
        assert await lag(redis, config, Pool.LLM_GENERATOR) == PoolLag(lag=0, pending=0)
        assert await busy.keep_alive(delivery.entry_id) == []  # done: nothing to refresh

    run(body)


def test_keep_alive_leaves_a_job_reclaimed_from_a_stalled_worker_to_its_new_owner(config: BusConfig) -> None:
    """A worker that stalled past reclaim_idle_ms lost its job: its next keep-alive says so and takes nothing back
    (an XCLAIM would have both workers answer it), while it still refreshes the jobs it kept."""
    async def body(redis: Redis) -> None:
        for k in range(2):
            await submit(redis, config, Pool.VISION_ENCODER, image_job(f"job-{k}", config))
        stalled, heir = Consumer(redis, config, Pool.VISION_ENCODER), Consumer(redis, config, Pool.VISION_ENCODER)
        lost, kept = await stalled.read(count=2, block_ms=None)
        await asyncio.sleep(3 * IDLE_MS / 1000)
        (taken,) = await heir.read(count=1, block_ms=None)
        assert taken.entry_id == lost.entry_id
        assert await stalled.keep_alive(lost.entry_id, kept.entry_id) == [kept.entry_id]
        pending = await redis.xpending_range(config.jobs(Pool.VISION_ENCODER), Pool.VISION_ENCODER.group,
                                             min="-", max="+", count=10)
        owners = {p["message_id"].decode(): p["consumer"].decode() for p in pending}
        assert owners == {lost.entry_id: heir.name, kept.entry_id: stalled.name}
        assert await heir.read(count=1, block_ms=None) == []  # the kept job was refreshed: not idle

    run(body)


def test_poison_and_malformed_jobs_go_to_dead_letters(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        job = image_job("job-poison", config)
        await submit(redis, config, Pool.VISION_ENCODER, job)
        a, b = Consumer(redis, config, Pool.VISION_ENCODER), Consumer(redis, config, Pool.VISION_ENCODER)
        for consumer, deliveries in ((a, 1), (b, 2)):  # each takes it and dies
            (delivery,) = await consumer.read(block_ms=None)
            assert delivery.deliveries == deliveries
            await asyncio.sleep(3 * IDLE_MS / 1000)
        assert await a.read(block_ms=None) == []  # third delivery > max_deliveries=2: dead-lettered, not returned

        await redis.xadd(config.jobs(Pool.VISION_ENCODER), {b"not-a-bus-field": b"\xff"})
        assert await a.read(block_ms=None) == []

        letters = await redis.xrange(config.dead_letters(Pool.VISION_ENCODER))
        assert len(letters) == 2
        poison, malformed = (fields for _, fields in letters)
        assert EncodeJob.FromString(poison[b"vita.v1.EncodeJob"]) == job
        assert poison[b"dead:reason"] == b"delivered 3 times (limit 2)" and poison[b"dead:deliveries"] == b"3"
        assert b"unexpected message type" in malformed[b"dead:reason"]
        assert await lag(redis, config, Pool.VISION_ENCODER) == PoolLag(lag=0, pending=0)

    run(body)


def test_job_streams_are_bounded_by_maxlen(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        stream = config.jobs(Pool.AUDIO_ENCODER)
        consumer = Consumer(redis, config, Pool.AUDIO_ENCODER)
        for i in range(300):
            await submit(redis, config, Pool.AUDIO_ENCODER, EncodeJob(job_id=f"job-{i}", kind=EncodeJob.AUDIO))
            (delivery,) = await consumer.read(block_ms=None)
            await consumer.ack(delivery.entry_id)
        # MAXLEN ~ trims whole radix-tree nodes, so the length may exceed the bound by up to one node.
        node = int((await redis.config_get("stream-node-max-entries"))["stream-node-max-entries"])
        assert config.jobs_maxlen <= await redis.xlen(stream) <= config.jobs_maxlen + node

    run(body)


def test_reply_stream_ttl_is_set_and_refreshed(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        stream = config.reply("req-ttl")
        ttl_ms = config.reply_ttl_s * 1000
        await publish_event(redis, config, stream, GenerationEvent(request_id="req-ttl", sequence=0))
        assert ttl_ms - 5000 < await redis.pttl(stream) <= ttl_ms
        await redis.pexpire(stream, 2000)  # as if most of the TTL had passed
        await publish_event(redis, config, stream, GenerationEvent(request_id="req-ttl", sequence=1))
        assert ttl_ms - 5000 < await redis.pttl(stream) <= ttl_ms
        with pytest.raises(InvalidInputError, match="is not under"):
            await publish_event(redis, config, config.jobs(Pool.LLM_GENERATOR), GenerationEvent())

    run(body)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_blob_is_written_once_and_read_back_bit_exact(config: BusConfig, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    embedding = torch.randn(7, 16).to(dtype)
    embedding[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])  # bit patterns a float compare would blur
    bits = torch.int32 if dtype == torch.float32 else torch.int16

    async def body(redis: Redis) -> None:
        ref = await write_embedding(redis, config, "job-emb", embedding, item_tokens=[3, 4])
        assert [k async for k in redis.scan_iter(match=f"{config.prefix}:*")] == [ref.key.encode()]
        assert 0 < await redis.pttl(ref.key) <= config.embedding_ttl_s * 1000
        assert (list(ref.shape), list(ref.item_tokens)) == ([7, 16], [3, 4])
        # The digest is the blob's, once: the same rows written again have it, other rows another.
        assert ref.digest == blob_digest(TensorBlob.FromString(await redis.get(ref.key))) and len(ref.digest) == 16
        again = await write_embedding(redis, config, "job-emb-again", embedding.clone(), item_tokens=[7])
        other = await write_embedding(redis, config, "job-emb-other", embedding + 1, item_tokens=[7])
        assert again.digest == ref.digest and other.digest != ref.digest
        await redis.delete(again.key, other.key)

        raw = TensorBlob.FromString(await redis.get(ref.key)).data  # the wire format: little-endian bits
        wire = np.dtype("<f4") if dtype == torch.float32 else np.dtype("<u2")
        expected = embedding.view(torch.int32 if dtype == torch.float32 else torch.uint16).numpy()
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=wire).view(expected.dtype), expected.ravel())

        (back,) = await read_embeddings(redis, [ref])
        assert back.dtype == dtype and torch.equal(back.view(bits), embedding.view(bits))

        wrong = EmbeddingRef(key=ref.key, dtype=ref.dtype, shape=[16, 7])
        with pytest.raises(MalformedEntry, match="its reference says"):
            await read_embeddings(redis, [wrong])

        short = dataclasses.replace(config, embedding_ttl_s=0.05)
        gone = await write_embedding(redis, short, "job-short", embedding, item_tokens=[7])
        await asyncio.sleep(0.2)
        with pytest.raises(EmbeddingMissing, match="job-short"):
            await read_embeddings(redis, [ref, gone])

    run(body)


def test_write_embedding_rejects_bad_input(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        with pytest.raises(InvalidInputError, match="add up to the 4 rows"):
            await write_embedding(redis, config, "job-x", torch.zeros(4, 2), item_tokens=[3])
        with pytest.raises(InvalidInputError, match="tokens, hidden"):
            await write_embedding(redis, config, "job-x", torch.zeros(4), item_tokens=[4])
        with pytest.raises(InvalidInputError, match=r"torch\.int64"):
            await write_embedding(redis, config, "job-x", torch.zeros(4, 2, dtype=torch.int64), item_tokens=[4])
        with pytest.raises(InvalidInputError, match="embedding id 'a b'"):
            await write_embedding(redis, config, "a b", torch.zeros(4, 2), item_tokens=[4])

    run(body)


def test_backpressure_at_the_backlog_bound(config: BusConfig) -> None:
    config = dataclasses.replace(config, backlog_limits={**config.backlog_limits, Pool.LLM_GENERATOR: 3})

    async def body(redis: Redis) -> None:
        for i in range(3):
            await submit(redis, config, Pool.LLM_GENERATOR, generation_job(f"req-{i}", config))
        assert await lag(redis, config, Pool.LLM_GENERATOR) == PoolLag(lag=3, pending=0)
        consumer = Consumer(redis, config, Pool.LLM_GENERATOR)
        (delivery,) = await consumer.read(block_ms=None)
        assert await lag(redis, config, Pool.LLM_GENERATOR) == PoolLag(lag=2, pending=1)

        with pytest.raises(Backpressure, match=r"llm:generator pool is 3 jobs deep \(2 waiting, 1 in progress\)") as err:
            await submit(redis, config, Pool.LLM_GENERATOR, generation_job("req-3", config))
        assert isinstance(err.value, VitaError)
        await submit(redis, config, Pool.LLM_MONITOR, generation_job("req-3", config, GenerationJob.MONITOR))

        await consumer.ack(delivery.entry_id)
        await submit(redis, config, Pool.LLM_GENERATOR, generation_job("req-3", config))

    run(body)


def test_submit_rejects_a_job_for_the_wrong_pool(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        with pytest.raises(TypeError, match="takes GenerationJob"):
            await submit(redis, config, Pool.LLM_GENERATOR, image_job("job-1", config))
        with pytest.raises(TypeError, match="MONITOR job does not belong"):
            await submit(redis, config, Pool.LLM_GENERATOR, generation_job("r", config, GenerationJob.MONITOR))
        with pytest.raises(InvalidInputError, match="request id"):
            config.reply("has space")

    run(body)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> float:
    """Seconds until `predicate` held; polling with a generous timeout keeps a loaded CI machine from flaking."""
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout_s, "condition not reached"
        await asyncio.sleep(0.001)
    return time.perf_counter() - start


def test_cancellation_reaches_a_running_worker(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        async with CancelWatcher(redis, config, resync_s=30.0) as watcher:  # no resync: pub/sub alone
            assert not await watcher.watch("req-run")
            await cancel(redis, config, "req-run")
            seconds = await wait_until(lambda: watcher.cancelled("req-run"))
            print(f"cancellation seen after {seconds * 1000:.1f} ms")

            await cancel(redis, config, "req-queued")  # cancelled before any worker took it
            assert await watcher.watch("req-queued")

            await cancel(redis, config, "req-elsewhere")  # another worker's request stays out of our sets
            await asyncio.sleep(0.05)
            assert not watcher.cancelled("req-elsewhere")

            watcher.forget("req-run")
            assert not watcher.cancelled("req-run")

    run(body)


def test_cancel_watcher_resync_catches_a_lost_message(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        async with CancelWatcher(redis, config, resync_s=0.05) as watcher:
            assert not await watcher.watch("req-1")
            await redis.set(config.cancel_key("req-1"), 1)  # the key without its pub/sub message
            await wait_until(lambda: watcher.cancelled("req-1"))

    run(body)


def test_cancel_watcher_calls_on_cancel_once_per_running_request(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        heard: list[str] = []

        async def on_cancel(request_id: str) -> None:
            heard.append(request_id)
            if request_id == "req-bad":
                raise RuntimeError("a failing callback must not stop the listener")

        async with CancelWatcher(redis, config, resync_s=0.05, on_cancel=on_cancel) as watcher:
            for rid in ("req-bad", "req-pubsub", "req-resync"):
                assert not await watcher.watch(rid)
            await cancel(redis, config, "req-bad")
            await cancel(redis, config, "req-pubsub")
            await cancel(redis, config, "req-pubsub")  # twice: one callback
            await redis.set(config.cancel_key("req-resync"), 1)  # no pub/sub message: found by the resync
            await cancel(redis, config, "req-not-ours")
            await wait_until(lambda: len(heard) >= 3)
            await asyncio.sleep(0.2)  # a few more resyncs: nothing is heard twice
            assert sorted(heard) == ["req-bad", "req-pubsub", "req-resync"]
            assert watcher.cancelled("req-pubsub")  # the listener is alive

    run(body)


# ------------------------------------------------------------------------------------------------------------------
# Leases (bus/lease.py): a worker stops the requests of an owner that died


def test_a_held_lease_is_renewed_and_set_again_when_redis_lost_it(config: BusConfig) -> None:
    config = dataclasses.replace(config, lease_ttl_s=1.0)

    async def body(redis: Redis) -> None:
        keeper = LeaseKeeper(redis, config, owner="orchestrator-1")
        key = config.lease_key("req-1")
        assert await keeper.acquire("req-1")
        assert await redis.get(key) == b"orchestrator-1" and 0 < await redis.pttl(key) <= 1000
        await _until(_rises(redis, key), "renewed (its TTL went back up)")
        await redis.delete(key)  # Redis restarted without its data
        await _until(lambda: redis.exists(key), "set again by the next renewal")
        keeper.release("req-1")
        await _until(lambda: _gone(redis, key), "expired once released")
        assert keeper._renewer is not None and keeper._renewer.done()  # nothing held: the renewer ended
        assert keeper.held == frozenset()

    run(body)


def _rises(redis: Redis, key: str) -> Callable[[], Awaitable[bool]]:
    """A predicate: the key's TTL is above the lowest it was seen at (it was renewed since)."""
    lowest: list[int] = []

    async def rose() -> bool:
        ttl = await redis.pttl(key)
        risen = bool(lowest) and ttl > lowest[0]
        lowest[:] = [min([ttl, *lowest])]
        return risen
    return rose


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


def test_leases_off_set_nothing(config: BusConfig) -> None:
    config = dataclasses.replace(config, lease_ttl_s=0)

    async def body(redis: Redis) -> None:
        keeper = LeaseKeeper(redis, config)
        assert not await keeper.acquire("req-1")
        assert not await redis.exists(config.lease_key("req-1")) and keeper.held == frozenset()

    run(body)


def test_lease_ttl_must_be_off_or_long_enough() -> None:
    with pytest.raises(InvalidInputError, match="lease_ttl_s must be 0"):
        BusConfig(lease_ttl_s=0.1)
    assert stop_bound_s(BusConfig(lease_ttl_s=5)) == 5 + 2.5 + 2 * 1.0


def test_cancel_watcher_stops_a_running_request_whose_lease_expired(config: BusConfig) -> None:
    """The owner stops renewing without cancelling (a killed orchestrator): the watcher tells the backend, as for a
    cancel, and calls it orphaned. A renewed lease and a request without one are left alone."""
    config = dataclasses.replace(config, lease_ttl_s=1.0)

    async def body(redis: Redis) -> None:
        heard: list[str] = []

        async def on_cancel(request_id: str) -> None:
            heard.append(request_id)

        keeper = LeaseKeeper(redis, config)
        async with CancelWatcher(redis, config, on_cancel=on_cancel) as watcher:
            for rid in ("kept", "orphan"):
                assert await keeper.acquire(rid)
                assert not await watcher.watch(rid, leased=True)
            assert not await watcher.watch("unleased")  # no lease key, and none expected
            keeper.release("orphan")  # no renewal, no cancel
            seconds = await wait_until(lambda: bool(heard), timeout_s=60)
            print(f"orphan stopped {seconds:.2f} s after its last renewal (bound {stop_bound_s(config):.2f} s)")
            assert heard == ["orphan"] and watcher.orphaned("orphan") and watcher.cancelled("orphan")
            assert not watcher.cancelled("kept") and not watcher.cancelled("unleased")
            await cancel(redis, config, "kept")  # a cancel is a cancel, not an orphan
            await wait_until(lambda: watcher.cancelled("kept"), timeout_s=60)
            assert not watcher.orphaned("kept")
            watcher.forget("orphan")
            assert not watcher.orphaned("orphan")
        keeper.release("kept")

    run(body)


def test_a_lease_missing_for_less_than_the_grace_is_not_an_orphan(config: BusConfig) -> None:
    """Redis lost the key (restarted without its data, or stalled past the TTL) while the owner lives: it is back
    before the grace ends, and the request runs on. (A long TTL: the grace cannot pass during the test.)"""
    config = dataclasses.replace(config, lease_ttl_s=60.0)

    async def body(redis: Redis) -> None:
        key = config.lease_key("req-1")
        await redis.set(key, "owner", px=60_000)
        async with CancelWatcher(redis, config, resync_s=0.02) as watcher:
            assert not await watcher.watch("req-1", leased=True)
            await redis.delete(key)
            await wait_until(lambda: "req-1" in watcher._lease_missing_since, timeout_s=60)  # seen gone
            await redis.set(key, "owner", px=60_000)  # the owner's next renewal
            await wait_until(lambda: "req-1" not in watcher._lease_missing_since, timeout_s=60)  # seen back
            assert not watcher.cancelled("req-1") and not watcher.orphaned("req-1")

    run(body)


def test_a_queued_request_whose_owner_died_is_skipped_after_the_grace(config: BusConfig) -> None:
    """No lease when the job starts: the watcher asks again after the grace; still gone, it is skipped (orphaned);
    set again meanwhile (the owner lives, Redis had lost it), it runs."""
    config = dataclasses.replace(config, lease_ttl_s=2.0)

    async def body(redis: Redis) -> None:
        async with CancelWatcher(redis, config, resync_s=30.0) as watcher:  # no resync: watch() alone decides
            start = time.perf_counter()
            assert await watcher.watch("dead-owner", leased=True)
            assert time.perf_counter() - start >= grace_s(config) and watcher.orphaned("dead-owner")

            waiting = asyncio.create_task(watcher.watch("live-owner", leased=True))
            await wait_until(lambda: "live-owner" in watcher._lease_missing_since, timeout_s=60)
            await redis.set(config.lease_key("live-owner"), "owner", px=2000)
            assert not await waiting and not watcher.orphaned("live-owner")

    run(body)


def test_events_time_out_with_a_clear_error(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        stream = config.reply("req-silent")
        with pytest.raises(ReplyTimeout, match=f"no reply on {stream} within 0.1 s") as err:
            await take(events(redis, stream, timeout_s=0.1), 1)
        assert isinstance(err.value, TimeoutError)

        await publish_event(redis, config, stream, GenerationEvent(request_id="req-silent", sequence=0))
        replies = events(redis, stream, timeout_s=0.1)
        assert (await anext(replies)).sequence == 0
        with pytest.raises(ReplyTimeout):
            await anext(replies)

    run(body)


def test_events_wait_longer_than_the_socket_timeout(config: BusConfig) -> None:
    """A reply later than the client's socket timeout (redis-py's default, 5 s) still arrives; silence ends in
    ReplyTimeout, not in redis' own TimeoutError."""

    async def body(redis: Redis) -> None:
        stream = config.reply("req-slow")
        with pytest.raises(ReplyTimeout, match=r"within 0\.8 s"):
            await take(events(redis, stream, timeout_s=0.8), 1)

        async def publish_late() -> None:
            await asyncio.sleep(5.5)  # longer than the socket timeout, on any machine
            await publish_event(redis, config, stream, GenerationEvent(request_id="req-slow", sequence=0))

        late = asyncio.create_task(publish_late())
        (reply,) = await take(events(redis, stream, timeout_s=30), 1)
        await late
        assert reply.sequence == 0

    run(body)


def test_events_drop_replies_of_a_redelivered_job(config: BusConfig) -> None:
    async def body(redis: Redis) -> None:
        stream = config.reply("req-1")
        result = EncodeResult(job_id="job-1", request_id="req-1", error=JobError(code=JobError.INTERNAL))
        # A worker died after two events; its replacement starts over and goes further.
        for sequence in (0, 1, 0, 1, 2):
            await publish_event(redis, config, stream, GenerationEvent(request_id="req-1", sequence=sequence))
        for _ in range(2):
            await publish_event(redis, config, stream, result)
        received = await take(events(redis, stream, timeout_s=0.2), 4)
        assert [m.sequence for m in received[:3]] == [0, 1, 2] and received[3] == result

    run(body)


def test_trace_context_crosses_the_bus(config: BusConfig) -> None:
    tracer = TracerProvider().get_tracer("test")

    async def body(redis: Redis) -> None:
        with tracer.start_as_current_span("orchestrator.generate") as producer:
            job = generation_job("req-trace", config)
            job.trace_context.update(current_trace_context())
            await submit(redis, config, Pool.LLM_GENERATOR, job)
        (delivery,) = await Consumer(redis, config, Pool.LLM_GENERATOR).read(block_ms=None)
        with tracer.start_as_current_span("llm.generate", context=trace_parent(delivery.message)) as worker:
            assert worker.get_span_context().trace_id == producer.get_span_context().trace_id
            assert worker.parent is not None and worker.parent.span_id == producer.get_span_context().span_id

    run(body)


async def _until(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    """Poll a state Redis reaches; the timeout only stops a hang."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        await asyncio.sleep(0.01)


async def _consumers(redis: Redis, config: BusConfig, pool: Pool) -> dict[str, dict]:
    return {c["name"].decode(): c for c in await redis.xinfo_consumers(config.jobs(pool), pool.group)}


def test_dead_consumers_are_removed_once_their_jobs_are_reclaimed(config: BusConfig) -> None:
    config = dataclasses.replace(config, dead_consumer_ms=2 * IDLE_MS)
    pool = Pool.VISION_ENCODER

    async def body(redis: Redis) -> None:
        await submit(redis, config, pool, image_job("job-1", config))
        dead, alive = Consumer(redis, config, pool), Consumer(redis, config, pool)
        (first,) = await dead.read(block_ms=None)  # and never reads again: killed
        got: list = []

        async def reclaimed_and_removed() -> bool:
            got.extend(await alive.read(block_ms=None))
            return bool(got) and dead.name not in await _consumers(redis, config, pool)

        await _until(reclaimed_and_removed, "the dead consumer's job reclaimed and the consumer removed")
        assert [d.entry_id for d in got] == [first.entry_id]
        await alive.ack(first.entry_id)
        assert alive.name in await _consumers(redis, config, pool)

    run(body)


def test_a_consumer_holding_a_job_is_never_removed(config: BusConfig) -> None:
    config = dataclasses.replace(config, dead_consumer_ms=2 * IDLE_MS)
    pool = Pool.LLM_GENERATOR

    async def body(redis: Redis) -> None:
        await submit(redis, config, pool, generation_job("req-1", config))
        holder, other = Consumer(redis, config, pool), Consumer(redis, config, pool)
        await holder.read(block_ms=None)

        async def idle_past_threshold() -> bool:
            return (await _consumers(redis, config, pool))[holder.name]["idle"] > config.dead_consumer_ms

        await _until(idle_past_threshold, "the holder idle past the dead-consumer threshold")
        # Idle long enough, but its job was not reclaimed yet (no XAUTOCLAIM here): it must stay with its job.
        assert await other.remove_dead_consumers() == []
        assert (await _consumers(redis, config, pool))[holder.name]["pending"] == 1

    run(body)


def test_a_take_over_is_logged_once_and_counted(config: BusConfig, caplog: pytest.LogCaptureFixture) -> None:
    """An operator's try: a worker took over a killed worker's jobs and said nothing. One info line per read that
    takes jobs over (the stream, whose they were, how many, their request ids) and vita:jobs_reclaimed_total."""
    pool = Pool.LLM_GENERATOR
    metrics = Metrics()

    def reclaimed() -> float | None:
        return metrics.registry.get_sample_value("vita:jobs_reclaimed_total", {"pool": pool.value})

    async def body(redis: Redis) -> None:
        for rid in ("req-a", "req-b"):
            await submit(redis, config, pool, generation_job(rid, config))
        dead = Consumer(redis, config, pool)
        alive = Consumer(redis, config, pool, metrics=metrics)
        assert reclaimed() == 0  # exported from the start, for rate() and alerts
        taken = await dead.read(count=2, block_ms=None)  # and never acks: killed
        assert await alive.read(count=2, block_ms=None) == []
        await asyncio.sleep(3 * IDLE_MS / 1000)
        caplog.set_level(logging.INFO, logger="vita.bus.queue")
        again = await alive.read(count=2, block_ms=None)
        assert [d.entry_id for d in again] == [d.entry_id for d in taken]
        for d in again:
            await alive.ack(d.entry_id)
        assert await alive.read(count=2, block_ms=None) == []  # nothing left to take over: no second line
        [record] = [r for r in caplog.records if r.getMessage().startswith("took over jobs")]
        assert record.levelno == logging.INFO
        assert (record.stream, record.consumer, record.from_consumers, record.jobs) == (
            config.jobs(pool), alive.name, [dead.name], 2)
        assert record.request_ids == ["req-a", "req-b"]
        assert record.entry_ids == [d.entry_id for d in taken]
        assert reclaimed() == 2

    run(body)


def test_idle_consumers_are_removed_as_idle_not_dead(config: BusConfig, caplog: pytest.LogCaptureFixture) -> None:
    """An operator's try: a new worker logged `removed dead consumers [...]` naming a live, merely idle worker.
    On Redis before 7.2 a consumer's idle time counts from its last read that returned a job, so a live worker of
    an idle pool is removed too; the line says what is known: idle, nothing pending."""
    config = dataclasses.replace(config, dead_consumer_ms=2 * IDLE_MS)
    pool = Pool.VISION_ENCODER

    async def body(redis: Redis) -> None:
        await submit(redis, config, pool, image_job("job-1", config))
        worker, newcomer = Consumer(redis, config, pool), Consumer(redis, config, pool)
        (delivery,) = await worker.read(block_ms=None)
        await worker.ack(delivery.entry_id)  # done, and nothing more to read

        async def idle_past_threshold() -> bool:
            return (await _consumers(redis, config, pool))[worker.name]["idle"] > config.dead_consumer_ms

        await _until(idle_past_threshold, "the worker idle past the dead-consumer threshold")
        caplog.set_level(logging.INFO, logger="vita.bus.queue")
        assert await newcomer.remove_dead_consumers() == [worker.name]
        [record] = [r for r in caplog.records if "consumers" in r.getMessage()]
        assert record.getMessage().startswith("removed idle consumers (no job taken for 0.1 s, none pending")
        assert "dead" not in record.getMessage()
        assert (record.stream, record.consumers, record.idle_s) == (config.jobs(pool), [worker.name], 0.1)

    run(body)


def test_a_live_worker_whose_consumer_was_removed_gets_its_next_job(config: BusConfig) -> None:
    """What a live worker loses when its idle consumer is removed: only the name. Redis creates the consumer again
    with the next entry it reads, here in a read that was already blocked when the consumer was deleted."""
    pool = Pool.LLM_MONITOR

    async def body(redis: Redis) -> None:
        await submit(redis, config, pool, generation_job("req-1", config, GenerationJob.MONITOR))
        worker = Consumer(redis, config, pool)
        (first,) = await worker.read(block_ms=None)
        await worker.ack(first.entry_id)
        reading = asyncio.create_task(worker.read(block_ms=5000))
        await asyncio.sleep(0.3)  # blocked in XREADGROUP by now
        await redis.xgroup_delconsumer(config.jobs(pool), pool.group, worker.name)  # what the sweep does
        assert worker.name not in await _consumers(redis, config, pool)
        job = generation_job("req-2", config, GenerationJob.MONITOR)
        await submit(redis, config, pool, job)
        (second,) = await asyncio.wait_for(reading, 10)
        assert second.message == job
        assert (await _consumers(redis, config, pool))[worker.name]["pending"] == 1
        await worker.ack(second.entry_id)
        assert await lag(redis, config, pool) == PoolLag(lag=0, pending=0)

    run(body)


def test_a_group_lost_with_the_data_is_created_again(config: BusConfig) -> None:
    pool = Pool.AUDIO_ENCODER

    async def body(redis: Redis) -> None:
        consumer = Consumer(redis, config, pool)
        assert await consumer.read(block_ms=None) == []
        await redis.delete(config.jobs(pool))  # what a Redis restarted without its data looks like
        assert await consumer.read(block_ms=None) == []
        job = EncodeJob(job_id="j1", request_id="r1", reply_stream=config.reply("r1"), kind=EncodeJob.AUDIO)
        await submit(redis, config, pool, job)
        (delivery,) = await consumer.read(block_ms=None)
        assert delivery.message == job
        assert await consumer.keep_alive(delivery.entry_id) == [delivery.entry_id]
        await redis.delete(config.jobs(pool))
        # The group is gone: no error, and the job counts as still owned (it runs on and is answered).
        assert await consumer.keep_alive(delivery.entry_id) == [delivery.entry_id]

    run(body)


def test_a_bus_client_and_cancel_watcher_ride_out_a_redis_restart(tmp_path) -> None:
    from vita.runtime.redis_client import RedisSettings, RetryPolicy, connect
    from vita.stack import RedisServer

    config = BusConfig(prefix="test:restart")
    with RedisServer(str(tmp_path / "redis")) as server:
        async def main() -> None:
            redis = connect(RedisSettings(server.url), socket_timeout=10, retry=RetryPolicy(outage_s=10))
            heard = asyncio.Event()

            async def on_cancel(request_id: str) -> None:
                heard.set()

            try:
                async with CancelWatcher(redis, config, on_cancel=on_cancel) as watcher:
                    await watcher.watch("r1")
                    await redis.set("test:restart:k", 1)
                    server.restart(keep_data=False)
                    assert await redis.get("test:restart:k") is None  # reconnected, to the empty server
                    await cancel(redis, config, "r1")
                    await asyncio.wait_for(heard.wait(), 30)
                    assert watcher.cancelled("r1")
            finally:
                await redis.aclose()

        asyncio.run(main())


def test_a_command_after_redis_died_fails_within_the_outage_bound(tmp_path) -> None:
    """An operator's try (2026-12-04): after Redis died, the orchestrator's first request hung until the client's
    deadline (60 s and more) while later ones failed after 15 s. redis-py retries a command and, inside each try,
    the connection's connect with the same Retry: a count-bounded policy multiplied (N tries of N tries). The
    first command's pooled connection was open (so the command's own retry ran), later ones were new."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from vita.runtime.redis_client import RedisSettings, RetryPolicy, connect
    from vita.stack import RedisServer

    with RedisServer(str(tmp_path / "redis")) as server:
        async def main() -> float:
            redis = connect(RedisSettings(server.url), socket_timeout=5, retry=RetryPolicy(outage_s=3))
            try:
                await redis.set("test:outage:k", 1)  # a pooled connection, open when Redis dies
                server.kill()
                start = time.monotonic()
                with pytest.raises(RedisConnectionError):
                    await redis.get("test:outage:k")
                return time.monotonic() - start
            finally:
                await redis.aclose()

        elapsed = asyncio.run(main())
    # 3 s of retries and the last attempt's own time; the nested count-bounded retries took about 8 x 3.3 s.
    assert 2.5 <= elapsed < 12, elapsed
