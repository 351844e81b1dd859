"""`Assistant/ModelMetadata` and what a backend developer met on a real orchestrator process (`python -m
vita.orchestrator`, the tiny model's config and tokenizer, bearer tokens on): the model, its context length and
max_tokens, modalities and input limits in one call, under the same access policy as the other RPCs (health stays
open); `vita model-info --target`; audio longer than the encoder takes refused on arrival (the limit was 600 s, the
encoder's 200 s); Converse errors that name what the client set. No pool runs: nothing here needs an answer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Iterator

import grpc
import pytest
from conftest import REDIS_URL, delete_prefix
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service_process import running
from vita import cli
from vita.client import VitaClient, session_config
from vita.model.config import PRESETS
from vita.orchestrator.limits import InputLimits
from vita.runtime.ports import free_port
from vita.stack import ServiceProcess
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import (
    ClientEvent,
    EndOfInput,
    GenerateRequest,
    ModelMetadataRequest,
    SessionConfig,
    VadParams,
)
from vita.v1.media_pb2 import Audio

TOKEN = "alpha-token"
BEARER = (("authorization", f"Bearer {TOKEN}"),)
DEFAULT_MAX_TOKENS = 100


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """A real orchestrator with --api-tokens; its address. Encodes would wait 5 s for pools that do not run."""
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    home = tmp_path_factory.mktemp("metadata")
    tokens = home / "tokens"
    tokens.write_text(f"# the test's token\n{TOKEN}\n")
    port = free_port()
    service = ServiceProcess("orchestrator", [
        sys.executable, "-m", "vita.orchestrator", "--model", str(tiny_model_dir), "--redis", REDIS_URL,
        "--prefix", prefix, "--grpc-port", str(port), "--plain-logs", "--api-tokens", str(tokens),
        "--encode-timeout", "5", "--default-max-tokens", str(DEFAULT_MAX_TOKENS)], port, str(home / "log"))
    try:
        with running(service):
            yield f"127.0.0.1:{port}"
    finally:
        delete_prefix(prefix)


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


def test_model_metadata_reports_the_served_model(served, tiny_model_dir):
    with grpc.insecure_channel(served) as channel:
        m = assistant_pb2_grpc.AssistantStub(channel).ModelMetadata(ModelMetadataRequest(), metadata=BEARER,
                                                                     timeout=30)
        same = assistant_pb2_grpc.AssistantStub(channel).ModelMetadata(ModelMetadataRequest(name="tiny"),
                                                                        metadata=BEARER, timeout=30)
        other = refused(assistant_pb2_grpc.AssistantStub(channel).ModelMetadata,
                        ModelMetadataRequest(name="mixtral-8x7b"), metadata=BEARER, timeout=30)
    tiny = PRESETS["tiny"]()
    assert (m.name, m.architecture, m.preset) == ("tiny", "VitaForCausalLM", "tiny")
    assert str(tiny_model_dir.parent) not in str(m)  # the server's paths are not stated
    assert (m.context_length, m.max_prompt_tokens) == (4096, 4095)  # what the context errors said
    assert (m.default_max_tokens, m.max_tokens_limit, m.vocab_size) == (DEFAULT_MAX_TOKENS, 4095, 2048)
    assert list(m.modalities) == ["text", "image", "video", "audio"]
    assert (m.image.tile_size, m.image.tokens_per_tile, m.image.max_tiles, m.image.thumbnail,
            m.image.max_tokens) == (448, 256, 12, True, 13 * 256)
    assert (m.video.max_frames, m.video.tokens_per_frame) == (16, 256)
    assert (m.audio.sample_rate_hz, m.audio.max_seconds, m.audio.tokens_per_second) == (16000, 200.0, 12.5)
    assert m.audio.max_seconds == tiny.audio.max_seconds
    d, g = InputLimits(), m.generate_limits
    assert (g.max_text_chars, g.max_images, g.max_image_pixels, g.max_audio_clips, g.max_video_seconds,
            g.max_video_frames) == (d.max_text_chars, d.max_images, d.max_image_pixels, d.max_audio_clips,
                                    d.max_video_s, d.max_video_frames)
    assert g.max_audio_seconds == m.audio.max_seconds  # the arrival check is the encoder's limit
    assert m.converse_limits == d.converse()  # what SessionStarted.limits states
    assert same == m
    assert other.code() == grpc.StatusCode.NOT_FOUND and "'mixtral-8x7b' is not served here" in other.details()


def test_model_metadata_follows_the_access_policy_and_health_stays_open(served):
    with grpc.insecure_channel(served) as channel:
        stub = assistant_pb2_grpc.AssistantStub(channel)
        missing = refused(stub.ModelMetadata, ModelMetadataRequest(), timeout=30)
        wrong = refused(stub.ModelMetadata, ModelMetadataRequest(), metadata=(("authorization", "Bearer nope"),),
                        timeout=30)
        bare = refused(stub.ModelMetadata, ModelMetadataRequest(), metadata=(("authorization", TOKEN),), timeout=30)
        basic = refused(stub.ModelMetadata, ModelMetadataRequest(), metadata=(("authorization", "Basic YWxw"),),
                        timeout=30)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    with VitaClient(served, token=TOKEN) as client:
        answered = client.model_metadata()
    for err in (missing, wrong, bare, basic):
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
    assert missing.details().startswith("missing bearer token")
    assert wrong.details() == "unknown bearer token"
    # A bare token (no scheme) was answered "missing bearer token": say what is wrong, never echoing the token.
    assert bare.details().startswith("the authorization metadata has no scheme (a bare token?): the Bearer scheme "
                                     "is expected: send metadata 'authorization: Bearer <token>'")
    assert TOKEN not in bare.details()
    assert basic.details().startswith("the authorization metadata uses the 'Basic' scheme, not Bearer")
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert answered.context_length == 4096


def test_vita_model_info_asks_the_running_server(served, capsys):
    statuses = [cli.main(["model-info", "--target", served, "--token", TOKEN]),
                cli.main(["model-info", "--target", served, "--token", TOKEN, "--json"])]
    out = capsys.readouterr().out
    denied = cli.main(["model-info", "--target", served])
    err = capsys.readouterr().err
    assert statuses == [cli.EXIT_OK, cli.EXIT_OK]
    text, _, body = out.partition("{")
    assert text.startswith("model tiny: VitaForCausalLM, preset tiny")
    assert "context          4096 tokens, prompt at most 4095" in text
    assert f"max_tokens       default {DEFAULT_MAX_TOKENS}, at most 4095" in text
    assert "audio            16000 Hz, 12.5 tokens/s, the encoder takes at most 200 s" in text
    answer = json.loads("{" + body)
    assert answer["context_length"] == 4096 and answer["generate_limits"]["max_audio_seconds"] == 200
    assert denied == cli.EXIT_FAILED
    assert err.strip() == ("vita model-info: error: UNAUTHENTICATED: missing bearer token: send metadata "
                           "'authorization: Bearer <token>' (vita --token, VitaClient(token=...))")


def _silent_wav(seconds: int, rate: int = 8_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * rate * seconds)
    return buffer.getvalue()


def test_audio_longer_than_the_encoder_takes_is_refused_on_arrival(served):
    """590 s passed the arrival check (600 s) and failed in the encoder after it decoded the file; it is now refused
    before anything is queued (no pool runs here: a queued encode would wait out --encode-timeout, 5 s)."""
    request = GenerateRequest(text="what is said?", audio=[Audio(data=_silent_wav(590))])
    with grpc.insecure_channel(served, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = assistant_pb2_grpc.AssistantStub(channel)
        stub.ModelMetadata(ModelMetadataRequest(), metadata=BEARER, timeout=30)  # connected before timing
        start = time.monotonic()
        err = refused(lambda: list(stub.Generate(request, metadata=BEARER, timeout=60)))
        took = time.monotonic() - start
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == "audio 0 is 590.0 s long; the limit is 200 s"
    assert took < 4.0, took


def test_converse_errors_name_what_the_client_set(served):
    def events():
        yield ClientEvent(config=SessionConfig(vad=VadParams(start_threshold=-0.5)))
        yield session_config()
        yield ClientEvent()  # no event set
        yield ClientEvent(end=EndOfInput())

    with grpc.insecure_channel(served) as channel:
        replies = list(assistant_pb2_grpc.AssistantStub(channel).Converse(events(), metadata=BEARER, timeout=60))
    errors = [e.error.message for e in replies if e.HasField("error")]
    assert [e.WhichOneof("event") for e in replies].count("session_started") == 1
    assert errors[0] == "SessionConfig.vad.start_threshold must be a probability in (0, 1); got -0.5"
    names = ", ".join(f.name for f in ClientEvent.DESCRIPTOR.oneofs_by_name["event"].fields)
    assert errors[1] == f"empty client event: set one of {names}"
    assert "cut, cancel, truncate, playback" in errors[1]


def test_an_audio_limit_above_the_encoders_stops_the_orchestrator_at_start(tiny_model_dir, redis_prefix):
    started = subprocess.run(
        [sys.executable, "-m", "vita.cli", "serve", "orchestrator", "--model", str(tiny_model_dir), "--redis",
         REDIS_URL, "--prefix", redis_prefix, "--plain-logs", "--max-audio-seconds", "600"],
        capture_output=True, text=True, timeout=180)
    assert started.returncode == 2, started
    assert started.stderr.strip().splitlines()[-1] == (
        "vita serve orchestrator: error: --max-audio-seconds 600 is above what the model's audio encoder takes "
        "(200 s, 20000 filterbank frames): give at most that, or leave the flag out to use it")
