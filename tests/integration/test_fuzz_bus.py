"""Fuzzing every decoder of bus messages with hypothesis, against the real Redis where the decoder reads from it.

A decoder may accept its input or refuse it with its documented error (`MalformedEntry`, `InvalidInputError`,
`EmbeddingMissing`); any other exception is a crash of the worker or request that met the bytes. Example counts come
from the hypothesis profile (tests/conftest.py: `ci`, derandomized).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
import torch
from conftest import REDIS_URL, delete_prefix
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from vita.bus.codec import MalformedEntry, blob_to_tensor, decode_entry, encode_entry
from vita.bus.embeddings import EmbeddingMissing, read_embeddings
from vita.bus.queue import Consumer, submit
from vita.bus.replies import ReplyTimeout, events, publish_event
from vita.bus.streams import JOB_TYPES, REPLY_TYPES, BusConfig, Pool
from vita.errors import InvalidInputError
from vita.llm.worker import prompt_from_job, sampling_from_job
from vita.v1.bus_pb2 import (
    EmbeddingPlacement,
    EmbeddingRef,
    EncodeJob,
    GenerationEvent,
    GenerationJob,
    TensorBlob,
)
from vita.v1.media_pb2 import SamplingParams

_names = st.one_of(st.binary(max_size=24), st.sampled_from([t.DESCRIPTOR.full_name.encode()
                                                            for t in (*REPLY_TYPES, EncodeJob, GenerationJob)]))
_fields = st.dictionaries(_names, st.binary(max_size=64), max_size=3)
_blobs = st.builds(TensorBlob, dtype=st.integers(-3, 9), shape=st.lists(st.integers(0, 6), max_size=3),
                   data=st.binary(max_size=96))


def run(body) -> None:
    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        try:
            await body(redis)
        finally:
            await redis.aclose()

    asyncio.run(main())


@given(fields=_fields)
def test_decode_entry_accepts_or_refuses_any_entry(fields):
    for types in ((GenerationJob,), (EncodeJob,), REPLY_TYPES):
        try:
            message = decode_entry(fields, types)
        except MalformedEntry:
            continue
        assert isinstance(message, types)


@given(blob=_blobs)
def test_blob_to_tensor_accepts_or_refuses_any_blob(blob):
    try:
        tensor = blob_to_tensor(blob)
    except MalformedEntry:
        return
    assert list(tensor.shape) == list(blob.shape)


@given(stored=st.one_of(st.binary(max_size=64), _blobs.map(TensorBlob.SerializeToString)), ref=st.builds(
    EmbeddingRef, dtype=st.integers(-2, 5), shape=st.lists(st.integers(0, 6), max_size=3)))
def test_read_embeddings_accepts_or_refuses_any_stored_bytes(stored, ref):
    config = BusConfig(prefix=f"test:{uuid.uuid4().hex}")
    ref.key = config.embedding("blob")

    async def body(redis: Redis) -> None:
        await redis.set(ref.key, stored, px=10_000)
        with contextlib.suppress(MalformedEntry, EmbeddingMissing):
            await read_embeddings(redis, [ref])

    try:
        run(body)
    finally:
        delete_prefix(config.prefix)


@given(entries=st.lists(_fields.filter(bool), min_size=1, max_size=4), pool=st.sampled_from(list(Pool)))
def test_consumers_dead_letter_any_undecodable_entry_and_keep_working(entries, pool):
    config = BusConfig(prefix=f"test:{uuid.uuid4().hex}")
    job = JOB_TYPES[pool]()
    if isinstance(job, GenerationJob):
        job.role = GenerationJob.GENERATOR if pool == Pool.LLM_GENERATOR else GenerationJob.MONITOR
    job.request_id = "valid"

    async def body(redis: Redis) -> None:
        consumer = Consumer(redis, config, pool)
        for fields in entries:
            await redis.xadd(config.jobs(pool), fields)
        await submit(redis, config, pool, job)
        got = []
        while not any(d.message.request_id == "valid" for d in got):
            got += await consumer.read(count=8, block_ms=None)
        assert all(isinstance(d.message, JOB_TYPES[pool]) for d in got)
        dead = await redis.xlen(config.dead_letters(pool))
        decodable = sum(1 for fields in entries if _decodes(fields, JOB_TYPES[pool]))
        assert dead == len(entries) - decodable

    try:
        run(body)
    finally:
        delete_prefix(config.prefix)


def _decodes(fields, message_type) -> bool:
    try:
        decode_entry(fields, (message_type,))
        return True
    except MalformedEntry:
        return False


@given(junk=st.lists(_fields.filter(bool), min_size=1, max_size=3))
def test_reply_readers_skip_undecodable_entries(junk):
    """A stray or corrupt entry on a reply stream must not fail the request that reads it."""
    config = BusConfig(prefix=f"test:{uuid.uuid4().hex}")
    stream = config.reply("r1")

    async def body(redis: Redis) -> None:
        for fields in junk:
            await redis.xadd(stream, fields)
        await publish_event(redis, config, stream, GenerationEvent(request_id="r1", sequence=0))
        seen = []
        try:
            async for event in events(redis, stream, timeout_s=0.5):
                seen.append(event)
                if isinstance(event, GenerationEvent) and event.request_id == "r1" and event.sequence == 0:
                    break
        except ReplyTimeout:
            pytest.fail(f"the valid event after {junk} was never read")

    try:
        run(body)
    finally:
        delete_prefix(config.prefix)


_spans = st.lists(st.builds(EmbeddingPlacement.Span, start=st.integers(-5, 40), length=st.integers(-5, 40)),
                  max_size=3)


@given(ids=st.lists(st.integers(-3, (1 << 31) - 1), max_size=30), spans=st.lists(_spans, max_size=2),
       rows=st.lists(st.integers(0, 12), max_size=2), sampling=st.builds(
           SamplingParams, temperature=st.floats(width=32), top_p=st.floats(width=32),
           top_k=st.integers(-5, 50), seed=st.one_of(st.none(), st.integers(0, (1 << 64) - 1))),
       max_tokens=st.integers(-3, 10))
def test_a_generation_job_becomes_a_prompt_or_an_invalid_argument(ids, spans, rows, sampling, max_tokens):
    job = GenerationJob(prompt_token_ids=ids, sampling=sampling, max_tokens=max_tokens,
                        embeddings=[EmbeddingPlacement(spans=s) for s in spans])
    embeddings = [torch.zeros(n, 4) for n in rows[: len(spans)]] + [torch.zeros(1, 4)] * (len(spans) - len(rows))
    try:
        prompt_from_job(job, embeddings)
        sampling_from_job(job)
    except InvalidInputError:
        pass


def test_encode_entry_round_trips_every_job_and_reply_type():
    for message_type in (EncodeJob, GenerationJob, *REPLY_TYPES):
        assert decode_entry(encode_entry(message_type()), (message_type,)) == message_type()
