"""Every service as its own process on 127.0.0.1 (the local stack), called through the public API."""

import os
import uuid

import grpc
import numpy as np
import pytest

from vita.client import VitaClient, build_request
from vita.inference import GenerationRequest, VitaPipeline
from vita.model.generation import SamplingParams
from vita.stack import LocalStack
from vita.v1.assistant_pb2 import Completed, GenerateRequest
from vita.v1.media_pb2 import Audio, Image


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    with LocalStack(model_dir=str(tiny_model_dir), prefix=f"e2e{uuid.uuid4().hex[:8]}",
                    log_dir=str(tmp_path_factory.mktemp("logs"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack):
    with VitaClient(stack.target, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


def run(client, request):
    tokens, done = [], None
    for r in client.generate(request):
        if r.HasField("delta"):
            tokens += list(r.delta.token_ids)
        else:
            done = r.completed
    return tokens, done


@pytest.mark.parametrize("mix", ["text", "image", "image+audio", "video+text", "audio", "image+video+audio"])
def test_each_modality_mix_matches_in_process(client, pipeline, mix, wide_png, short_mp4, speech_wav):
    media = {
        "images": [wide_png] if "image" in mix else [],
        "video": short_mp4 if "video" in mix else None,
        "audio": [speech_wav] if "audio" in mix else [],
    }
    text = "What do you see and hear?" if mix != "audio" else ""
    tokens, done = run(client, build_request(text, max_tokens=12, **media))
    events = list(pipeline.stream(GenerationRequest(text=text, sampling=SamplingParams(12), **media)))
    expected = [t for e in events for t in e.token_ids]
    usage = events[-1].usage
    assert done is not None and done.finish_reason in (Completed.STOP, Completed.LENGTH)
    assert done.usage.prompt_tokens == usage.prompt_tokens
    assert done.usage.image_tokens == usage.prompt.image_tokens
    assert done.usage.video_tokens == usage.prompt.video_tokens
    assert done.usage.audio_tokens == usage.prompt.audio_tokens
    assert tokens[: len(expected)] == expected


def _status(client, request):
    with pytest.raises(grpc.RpcError) as err:
        run(client, request)
    return err.value.code(), err.value.details()


def test_malformed_inputs_get_clear_statuses_and_others_are_unaffected(client, wide_png):
    cases = {
        "corrupt jpeg": GenerateRequest(text="hi", images=[Image(data=b"\xff\xd8\xff\xe0garbage")]),
        "undecodable audio": GenerateRequest(text="hi", audio=[Audio(data=b"RIFF....WAVEjunk")]),
        "bad sample rate": GenerateRequest(text="hi", audio=[Audio(
            data=np.zeros(1600, "<i2").tobytes(), encoding=Audio.PCM16, sample_rate_hz=3)]),
        "empty request": GenerateRequest(),
    }
    for name, request in cases.items():
        code, details = _status(client, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
        assert details and "Traceback" not in details, name
    code, _ = _status(client, GenerateRequest(text="x", images=[Image(data=os.urandom(70 << 20))]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # over the 64 MiB message limit
    tokens, done = run(client, build_request("still working?", images=[wide_png], max_tokens=4))
    assert done is not None and tokens
