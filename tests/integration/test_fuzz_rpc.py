"""Fuzzing every public RPC of the serving stack with hypothesis: Assistant.Generate, Assistant.Converse and
grpc.health.v1.Health.Check, with well-formed messages of arbitrary content and with arbitrary bytes on the wire
(invalid UTF-8 in a string field included).

The stack is real and in-process: orchestrator, both encoder pools and both llm pools on the tiny model, over
loopback gRPC and the shared Redis (a test prefix). Every answer must be a proper status - never UNKNOWN or INTERNAL -
every Converse error event likewise, the server must stay up, and a valid request must succeed afterwards.
Example counts come from the hypothesis profile (tests/conftest.py: `ci`, derandomized).
"""

from __future__ import annotations

import io
import uuid
import wave

import grpc
import numpy as np
import pytest
from conftest import delete_prefix
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image as PILImage

from tests.bus_stack import stack_in_thread
from vita.bus.streams import BusConfig
from vita.inference import VitaPipeline
from vita.orchestrator.service import OrchestratorConfig
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import (
    AudioChunk,
    CancelAnswer,
    ClientEvent,
    CutSpeech,
    EndOfInput,
    GenerateRequest,
    PlaybackState,
    SessionConfig,
    TextMessage,
    TruncateAnswer,
    VadParams,
)
from vita.v1.media_pb2 import Audio, Image, SamplingParams, TimestampedFrame, Video

pytestmark = pytest.mark.slow
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_S = 30.0  # a deadline on every fuzzed call: DEADLINE_EXCEEDED is a proper answer, a hang is not


def _png() -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (40, 30), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def _wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 5) * 8000).astype("<i2").tobytes())
    return out.getvalue()


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    """The whole stack in one background event loop; yields the orchestrator's address."""
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
    config = OrchestratorConfig(default_max_tokens=4, encode_timeout_s=20, token_timeout_s=20, judge_timeout_s=20)
    try:
        with stack_in_thread(VitaPipeline.load(tiny_model_dir), tiny_model_dir, bus, config) as address:
            yield address
    finally:
        delete_prefix(bus.prefix)


@pytest.fixture(scope="module")
def channel(target):
    with grpc.insecure_channel(target) as ch:
        yield ch


def healthy_and_answering(channel) -> None:
    """The next valid request succeeds."""
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    stub = assistant_pb2_grpc.AssistantStub(channel)
    responses = list(stub.Generate(GenerateRequest(text="Hello?", sampling=SamplingParams(max_tokens=2)),
                                   timeout=120))
    assert responses[-1].HasField("completed"), responses


# ------------------------------------------------------------------------------------------------------------------
# Strategies

_text = st.one_of(st.text(max_size=80), st.sampled_from(["", " ", "<1>", "<2>", "<3>", "<image>", "<audio>",
                                                         "<video>", "</s>", "system:", "\x00", "word " * 300]))
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
_sampling = st.builds(
    SamplingParams, temperature=st.one_of(st.just(0.0), _floats), top_p=st.one_of(st.just(0.0), _floats),
    top_k=st.integers(-3, 1 << 20), max_tokens=st.integers(-2, 6), ignore_eos=st.booleans(),
    seed=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
_image = st.builds(Image, data=st.one_of(st.binary(max_size=64), st.just(_png()), st.just(b"")))
_audio = st.builds(Audio, data=st.one_of(st.binary(max_size=256), st.just(_wav())),
                   encoding=st.integers(0, 3), sample_rate_hz=st.integers(-1, 200_000))
_frame = st.builds(TimestampedFrame, timestamp_s=st.floats(allow_nan=True, allow_infinity=True), image=_image)
_video = st.one_of(st.none(), st.builds(Video, file=st.binary(max_size=128)),
                   st.builds(Video, frames=st.builds(Video.Frames, frames=st.lists(_frame, max_size=3))))


@st.composite
def generate_requests(draw) -> GenerateRequest:
    request = GenerateRequest(
        request_id=draw(st.one_of(st.just(""), st.text(max_size=20))), text=draw(_text),
        images=draw(st.lists(_image, max_size=2)), audio=draw(st.lists(_audio, max_size=2)),
        sampling=draw(_sampling))
    video = draw(_video)
    if video is not None:
        request.video.CopyFrom(video)
    if draw(st.booleans()):
        request.system_prompt = draw(_text)
    return request


_config = st.builds(
    SessionConfig, session_id=st.one_of(st.just(""), st.text(max_size=20)), resume=st.booleans(),
    sampling=_sampling, audio_sample_rate_hz=st.integers(-1, 100_000), language=st.text(max_size=5),
    preemptive_generation=st.booleans(),
    vad=st.builds(VadParams, start_threshold=_floats, end_threshold=_floats,
                  min_speech_ms=st.integers(-5, 5000), end_silence_ms=st.integers(-5, 5000),
                  early_judge_ms=st.integers(-5, 5000), complete_silence_ms=st.integers(-5, 5000)))
_event = st.one_of(
    st.builds(ClientEvent, config=_config),
    st.builds(ClientEvent, audio=st.builds(AudioChunk, pcm16=st.one_of(
        st.binary(max_size=640), st.just((np.sin(np.arange(16000) / 3) * 20000).astype("<i2").tobytes())))),
    st.builds(ClientEvent, frame=_frame),
    st.builds(ClientEvent, image=_image),
    st.builds(ClientEvent, text=st.builds(TextMessage, text=_text)),
    st.builds(ClientEvent, cut=st.builds(CutSpeech, discard=st.booleans())),
    st.builds(ClientEvent, cancel=st.builds(CancelAnswer, turn_id=st.integers(-1, 5))),
    st.builds(ClientEvent, truncate=st.builds(TruncateAnswer, turn_id=st.integers(-1, 5), content=_text)),
    st.builds(ClientEvent, playback=st.builds(PlaybackState, playing=st.booleans())),
    st.just(ClientEvent()),
)


def _with_invalid_utf8(message_bytes: bytes, field_number: int, junk: bytes) -> bytes:
    """Append a length-delimited field whose bytes are not UTF-8: the parser refuses it for a string field."""
    return message_bytes + bytes([field_number << 3 | 2, len(junk)]) + junk


# ------------------------------------------------------------------------------------------------------------------
# Generate


@given(request=generate_requests())
def test_generate_answers_any_request_with_a_proper_status(channel, request):
    stub = assistant_pb2_grpc.AssistantStub(channel)
    try:
        responses = list(stub.Generate(request, timeout=CALL_S))
        assert responses and responses[-1].HasField("completed"), responses
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details(), request)


@given(data=st.binary(max_size=64), junk=st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)))
def test_generate_refuses_bytes_that_are_not_a_request(channel, data, junk):
    generate = channel.unary_stream("/vita.v1.Assistant/Generate", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
    for wire in (data, _with_invalid_utf8(b"", 2, junk), _with_invalid_utf8(b"", 1, junk)):
        try:
            list(generate(wire, timeout=CALL_S))
        except grpc.RpcError as e:
            assert e.code() not in BAD, (e.code(), e.details(), wire)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_invalid_utf8_in_a_string_field_is_invalid_argument(channel):
    generate = channel.unary_stream("/vita.v1.Assistant/Generate", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(generate(_with_invalid_utf8(b"", 2, b"\xff\xfe caf\xe9"), timeout=CALL_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details()
    converse = channel.stream_stream("/vita.v1.Assistant/Converse", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
    text_event = ClientEvent(text=TextMessage(text="x")).SerializeToString()[:2]  # field 5, length-delimited
    bad = bytes([5 << 3 | 2, 4]) + bytes([1 << 3 | 2, 2]) + b"\xc3\x28"
    assert text_event[0] == bad[0]
    with pytest.raises(grpc.RpcError) as err:
        list(converse(iter([ClientEvent(config=SessionConfig()).SerializeToString(), bad]), timeout=CALL_S))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    healthy_and_answering(channel)


# ------------------------------------------------------------------------------------------------------------------
# Converse


_START = ClientEvent(config=SessionConfig(sampling=SamplingParams(max_tokens=2)))


@given(started=st.booleans(), events=st.lists(_event, max_size=6), end=st.booleans())
def test_converse_answers_any_event_sequence_with_proper_statuses(channel, started, events, end):
    """Half the calls start with a valid config, so the events after it reach the session's handling."""
    stub = assistant_pb2_grpc.AssistantStub(channel)
    sent = [_START] * started + events + [ClientEvent(end=EndOfInput())] * end
    try:
        for event in stub.Converse(iter(sent), timeout=CALL_S):
            if event.HasField("error"):
                code = next(c for c in grpc.StatusCode if c.value[0] == event.error.code)
                assert code not in BAD, (event.error, sent)
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details(), sent)


@given(frames=st.lists(st.binary(max_size=48), min_size=1, max_size=4))
def test_converse_refuses_bytes_that_are_not_events(channel, frames):
    converse = channel.stream_stream("/vita.v1.Assistant/Converse", request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)
    try:
        list(converse(iter(frames), timeout=CALL_S))
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details(), frames)


@given(data=st.binary(max_size=48))
def test_health_check_refuses_bytes_that_are_not_a_request(channel, data):
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    try:
        check(data, timeout=CALL_S)
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details(), data)


def test_the_stack_answers_after_the_fuzzing(channel):
    healthy_and_answering(channel)
