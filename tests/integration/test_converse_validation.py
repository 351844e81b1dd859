"""Values a backend developer's own client can send that the server once took in silence (or took, then failed on
later), against the real services: the orchestrator's gRPC server on loopback, real Redis, and, where an answer is
needed, a real llm worker (and vision encoder) on the tiny model (tests/bus_stack.py). Found by a new user's client
built from the protos:

- Converse took `SessionConfig.sampling` unchecked (top_p 2, NaN temperature, max_tokens -5): the session started,
  then every turn got AnswerStarted, an error from the worker and no end at all. Its sampling (and every other
  field) is now checked with Generate's rules when it arrives: a bad start creates no session, a bad update keeps
  the previous config;
- an answer that fails after AnswerStarted ends with an ErrorEvent and then AnswerInterrupted, never with nothing;
- Generate took `max_tokens` -5 (one token, LENGTH), `Audio.encoding` 7 (read as WAV), a PNG as `Video.file` (a
  one-frame video); Converse took an AudioChunk of 321 bytes, which Generate refuses as PCM16;
- the behaviours docs/serving.md now states: a reused session id without resume (FAILED_PRECONDITION), and a
  ClientEvent that is not a valid protobuf message (it ends the input, then the call: INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import uuid
import wave
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from conftest import REDIS_URL, delete_prefix
from PIL import Image as PILImage
from redis.asyncio import Redis

from tests.bus_stack import running_stack
from vita.bus.streams import BusConfig
from vita.client import END, speech_events, text_event
from vita.inference import VitaPipeline
from vita.orchestrator.service import AssistantService, OrchestratorConfig
from vita.orchestrator.sessions import SessionStore
from vita.processing.audio import load_audio
from vita.runtime.server import GrpcService, ServiceServer
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import AudioChunk, ClientEvent, GenerateRequest, ServerEvent, SessionConfig
from vita.v1.bus_pb2 import GenerationJob
from vita.v1.media_pb2 import Audio, SamplingParams, Video
from vita.v1.session_pb2 import SessionState

INVALID_ARGUMENT, FAILED_PRECONDITION, UNAVAILABLE = 3, 9, 14
CALL_S = 60.0  # the longest one call may take on a busy machine: a hang is a failure


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


def config(**fields) -> ClientEvent:
    return ClientEvent(config=SessionConfig(**fields))


def png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (64, 48), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


async def converse(stub, events: list[ClientEvent]) -> list[ServerEvent]:
    """Every server event of one call that sends `events` (and ends when the server ends it)."""
    async def requests():
        for event in events:
            yield event

    return await asyncio.wait_for(_collect(stub.Converse(requests())), CALL_S)


async def _collect(call) -> list[ServerEvent]:
    return [event async for event in call]


def kinds(events: list[ServerEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def with_workers(pipeline, tiny_model_dir, body, **kwargs):
    """`body(stub, bus, channel)` against the orchestrator with an llm generator worker (and whatever `kwargs` add)."""
    async def main():
        redis = Redis.from_url(REDIS_URL)
        bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
        try:
            async with (running_stack(pipeline, tiny_model_dir, redis, bus, **kwargs) as stack,
                        grpc.aio.insecure_channel(stack.target) as channel):
                return await body(assistant_pb2_grpc.AssistantStub(channel), bus, channel)
        finally:
            delete_prefix(bus.prefix)
            await redis.aclose()

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def orchestrator_alone(pipeline, config: OrchestratorConfig) -> AsyncIterator[assistant_pb2_grpc.AssistantStub]:
    """The orchestrator with no worker at all: whatever it queues waits until its timeout."""
    redis = Redis.from_url(REDIS_URL)
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
    service = AssistantService(redis, bus, pipeline.model.vita_config, pipeline.tokenizer, config)
    server = ServiceServer([GrpcService("vita.v1.Assistant",
                                        lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield assistant_pb2_grpc.AssistantStub(channel)
    finally:
        await server.drain()
        delete_prefix(bus.prefix)
        await redis.aclose()


# ------------------------------------------------------------------------------------------------------------------
# Sampling: one rule for Generate and Converse

BAD_SAMPLING = [
    (SamplingParams(temperature=1, top_p=2), "sampling.top_p must be in (0, 1]"),
    (SamplingParams(temperature=math.nan), "sampling.temperature must be a finite number"),
    (SamplingParams(temperature=math.inf), "sampling.temperature must be a finite number"),
    (SamplingParams(temperature=-0.5), "sampling.temperature must be a finite number"),
    (SamplingParams(top_p=math.nan), "sampling.top_p must be in (0, 1]"),
    (SamplingParams(top_k=-1), "sampling.top_k must be an integer >= 0"),
    (SamplingParams(max_tokens=-5), "sampling.max_tokens must be >= 0"),
]


def test_generate_refuses_bad_values_up_front_naming_the_field(pipeline, tiny_model_dir):
    """Each is INVALID_ARGUMENT naming what is wrong, and nothing is generated: `max_tokens` -5 gave one token
    (LENGTH), `Audio.encoding` 7 was read as a WAV file, a PNG sent as `Video.file` was a one-frame video, odd
    PCM16 met the audio encoder (none runs here: it waited for the encode timeout)."""
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    requests = [(GenerateRequest(text="hi", sampling=s), message) for s, message in BAD_SAMPLING] + [
        (GenerateRequest(audio=[Audio(data=wav.getvalue(), encoding=7)]), "audio 0: encoding 7 is not an Audio"),
        (GenerateRequest(audio=[Audio(data=b"\0" * 321, encoding=Audio.PCM16, sample_rate_hz=16000)]),
         "audio 0: PCM16 audio must have an even number of bytes; got 321"),
        (GenerateRequest(text="what moves?", video=Video(file=png())),
         "the video file is a PNG image, not a video: send an image as an Image"),
    ]

    async def body(stub, bus, channel):
        refused = []
        for request, _ in requests:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(request, timeout=CALL_S):
                    pass
            refused.append(err.value)
        answered = [r async for r in stub.Generate(GenerateRequest(text="still there?",
                                                                   sampling=SamplingParams(max_tokens=2)))]
        return refused, answered

    refused, answered = with_workers(pipeline, tiny_model_dir, body, vision=True,
                                     config=OrchestratorConfig(encode_timeout_s=10))
    for err, (_, message) in zip(refused, requests, strict=True):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details(), (err.details(), message)
    assert answered[-1].HasField("completed")


def test_converse_checks_the_session_config_at_the_start_and_on_every_update(pipeline, tiny_model_dir):
    """A bad SessionConfig at the start gets an ErrorEvent and no session (a good one then starts it); a bad update
    gets an ErrorEvent and the session keeps its previous config (its max_tokens here)."""
    bad_starts = [config(sampling=s) for s, _ in BAD_SAMPLING] + [config(language="not a language tag!")]

    async def body(stub, bus, channel):
        return await converse(stub, [
            *bad_starts,
            config(sampling=SamplingParams(max_tokens=3)),
            config(sampling=SamplingParams(temperature=1, top_p=2, max_tokens=7)),
            config(sampling=SamplingParams(max_tokens=-5)),
            text_event("Are you there?"),
            END,
        ])

    events = with_workers(pipeline, tiny_model_dir, body)
    refusals = events[:len(bad_starts)]
    assert [(e.WhichOneof("event"), e.error.code, e.session_id) for e in refusals] == [
        ("error", INVALID_ARGUMENT, "")] * len(bad_starts), events
    for event, (_, message) in zip(refusals, BAD_SAMPLING, strict=False):
        assert f"SessionConfig.{message}" in event.error.message, event.error.message
    assert "SessionConfig.language must be a BCP-47 language tag" in refusals[-1].error.message
    rest = events[len(bad_starts):]
    assert kinds(rest)[:3] == ["session_started", "error", "error"], rest
    assert "SessionConfig.sampling.top_p must be in (0, 1]" in rest[1].error.message
    assert "SessionConfig.sampling.max_tokens must be >= 0" in rest[2].error.message
    started = next(e for e in rest if e.HasField("answer_started"))
    assert started.answer_started.max_tokens == 3  # the config before the refused updates
    assert kinds(rest)[-1] == "completed" and "error" not in kinds(rest)[3:], rest


# ------------------------------------------------------------------------------------------------------------------
# Every AnswerStarted ends


def test_an_answer_the_worker_fails_ends_with_an_error_then_interrupted(pipeline, tiny_model_dir):
    """A session stored before its sampling was checked (by an older orchestrator) still holds top_p 2: resumed,
    its text turn is refused by the llm worker after AnswerStarted. The turn ends all the same: the error with the
    turn's id, then AnswerInterrupted, and the history keeps the turn as interrupted."""
    session_id = f"old-{uuid.uuid4().hex[:8]}"

    async def body(stub, bus, channel):
        redis = Redis.from_url(REDIS_URL)
        try:
            await SessionStore(redis, bus).create(SessionState(
                session_id=session_id, config=SessionConfig(sampling=SamplingParams(temperature=1, top_p=2)),
                next_turn_id=1, generator_role=GenerationJob.GENERATOR, owner="an older call"))
            events = await converse(stub, [config(session_id=session_id, resume=True), text_event("Hello?"), END])
            stored = await SessionStore(redis, bus).load(session_id)
        finally:
            await redis.aclose()
        return events, stored

    events, stored = with_workers(pipeline, tiny_model_dir, body)
    assert kinds(events) == ["session_started", "answer_started", "error", "interrupted"], events
    turn = events[1].turn_id
    assert [e.turn_id for e in events[1:]] == [turn] * 3
    assert events[2].error.code == INVALID_ARGUMENT and "top_p must be in (0, 1]" in events[2].error.message
    assert events[3].interrupted.tokens_sent == 0
    assert [(t.role, t.interrupted) for t in stored.turns if t.turn_id == turn][-1][1]


def test_an_answer_nobody_relays_ends_with_an_error_then_interrupted(pipeline):
    """No llm worker: the answer is queued, started, and times out. The error, then AnswerInterrupted."""
    async def main():
        async with orchestrator_alone(pipeline, OrchestratorConfig(token_timeout_s=0.5)) as stub:
            return await converse(stub, [config(), text_event("Anyone?"), END])

    events = asyncio.run(main())
    assert kinds(events) == ["session_started", "answer_started", "error", "interrupted"], events
    assert events[2].error.code == UNAVAILABLE
    assert {e.turn_id for e in events[1:]} == {events[1].turn_id}


# ------------------------------------------------------------------------------------------------------------------
# Audio chunks: whole PCM16 samples, as Generate's


def test_an_odd_length_audio_chunk_is_refused_and_nothing_accepted_is_lost(pipeline, speech_wav):
    """321 bytes are not whole samples: an ErrorEvent, the chunk dropped, the session goes on. The audio around it
    is heard exactly as without it: the same speech offsets (had the chunk been taken, every later sample would be
    off by one byte)."""
    speech = load_audio(str(speech_wav)).numpy().reshape(-1)
    audio = [e for e in speech_events(np.concatenate([np.zeros(8000, np.float32), speech]), realtime=False,
                                      chunk_ms=100)]
    odd = ClientEvent(audio=AudioChunk(pcm16=b"\x10" * 321))

    async def main():
        # No encoder runs: each segment's judgement fails after the encode timeout; only the VAD is looked at.
        async with orchestrator_alone(pipeline, OrchestratorConfig(encode_timeout_s=0.2)) as stub:
            plain = await converse(stub, [config(), *audio, END])
            with_odd = await converse(stub, [config(), *audio[:3], odd, *audio[3:], END])
            return plain, with_odd

    plain, with_odd = asyncio.run(main())
    refused = [e for e in with_odd if e.HasField("error") and "even number of bytes" in e.error.message]
    assert len(refused) == 1 and refused[0].error.code == INVALID_ARGUMENT
    assert "got 321" in refused[0].error.message

    def speech_offsets(events):
        return [(e.WhichOneof("event"), round(getattr(e, e.WhichOneof("event")).audio_start_s, 4)) for e in events
                if e.WhichOneof("event") in ("speech_started", "speech_ended")]

    assert speech_offsets(plain) and speech_offsets(with_odd) == speech_offsets(plain)


# ------------------------------------------------------------------------------------------------------------------
# What the docs state


def test_a_reused_session_id_without_resume_is_failed_precondition(pipeline, tiny_model_dir):
    session_id = f"mine-{uuid.uuid4().hex[:8]}"

    async def body(stub, bus, channel):
        first = await converse(stub, [config(session_id=session_id), END])
        again = await converse(stub, [config(session_id=session_id), config(session_id=session_id, resume=True),
                                      END])
        return first, again

    first, again = with_workers(pipeline, tiny_model_dir, body)
    assert kinds(first) == ["session_started"] and first[0].session_id == session_id
    assert kinds(again) == ["error", "session_started"], again
    assert again[0].error.code == FAILED_PRECONDITION
    assert f"session {session_id!r} already exists" in again[0].error.message
    assert "resume=true" in again[0].error.message
    assert again[1].session_started.resumed and again[1].session_id == session_id


def test_a_client_event_that_is_not_a_protobuf_message_ends_the_input_then_the_call(pipeline, tiny_model_dir):
    """Not an ErrorEvent: gRPC cannot parse it, so the call cannot go on. Events before it are handled as if
    EndOfInput came there (the typed question is answered), then the status is INVALID_ARGUMENT."""
    not_utf8 = bytes([5 << 3 | 2, 4]) + bytes([1 << 3 | 2, 2]) + b"\xc3\x28"  # TextMessage.text, not UTF-8

    async def body(stub, bus, channel):
        converse_raw = channel.stream_stream(
            "/vita.v1.Assistant/Converse", request_serializer=lambda b: b, response_deserializer=ServerEvent.FromString)

        async def requests():
            yield config(sampling=SamplingParams(max_tokens=2)).SerializeToString()
            yield text_event("One question.").SerializeToString()
            yield not_utf8

        call = converse_raw(requests(), timeout=CALL_S)
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for event in call:
                events.append(event)
        return events, err.value

    events, err = with_workers(pipeline, tiny_model_dir, body)
    assert kinds(events)[0] == "session_started" and kinds(events)[-1] == "completed", events
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Converse: the request is not a valid protobuf message" in err.details(), err.details()


# ------------------------------------------------------------------------------------------------------------------
# Camera frames: refused when they arrive, not by the turn that would sample them


def test_camera_frames_out_of_order_or_off_the_clock_are_refused_and_the_next_turn_is_answered(pipeline,
                                                                                              tiny_model_dir):
    """A frame whose timestamp is NaN, negative, or not after the previous one was stored, and the vision encoder
    refused the whole clip at the next answered turn: that turn failed. Now each gets an ErrorEvent on arrival and
    is dropped; the turn is answered with the frames that were taken."""
    from vita.v1.media_pb2 import Image as ImageProto
    from vita.v1.media_pb2 import TimestampedFrame

    def frame(t: float) -> ClientEvent:
        return ClientEvent(frame=TimestampedFrame(timestamp_s=t, image=ImageProto(data=png())))

    async def body(stub, bus, channel):
        return await converse(stub, [config(sampling=SamplingParams(max_tokens=2)), frame(0.0), frame(0.25),
                                     frame(math.nan), frame(-1.0), frame(0.25), frame(0.1), frame(0.5),
                                     text_event("What do you see?"), END])

    events = with_workers(pipeline, tiny_model_dir, body, vision=True)
    errors = [e.error for e in events if e.HasField("error")]
    assert [e.code for e in errors] == [INVALID_ARGUMENT] * 4, events
    assert all("camera frame" in e.message for e in errors)
    assert "finite" in errors[0].message and "finite" in errors[1].message
    assert "must increase" in errors[2].message and "must increase" in errors[3].message
    assert kinds(events)[-1] == "completed", events
    assert events[-1].completed.usage.video_tokens == 3 * 256  # 0, 0.25 and 0.5 s: 0.75 s at 4 fps
