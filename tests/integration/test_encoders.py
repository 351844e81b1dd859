"""The vision-encoder and audio-encoder services as real processes on a real Redis, checked against the in-process
processor and towers.

KServe v2 is called with tritonclient, another implementation of the same protocol. This process must never import
kserve (or vita.encoders.kserve): the two register the same `inference.*` protobuf symbols.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
import time
import uuid
import wave
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from conftest import delete_prefix
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from PIL import Image, ImageDraw
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from tritonclient.utils import InferenceServerException

from tests.encoder_services import Service, Services, encoder_services, start
from vita.bus.cancel import cancel
from vita.bus.codec import encode_entry, tensor_to_blob
from vita.bus.embeddings import read_embeddings
from vita.bus.queue import lag, submit
from vita.bus.replies import events
from vita.bus.streams import BusConfig, Pool
from vita.bus.trace import current_trace_context
from vita.model.vita import VitaForCausalLM
from vita.processing.audio import fbank, num_audio_frames
from vita.processing.processor import VitaProcessor
from vita.processing.tokenizer import VitaTokenizer
from vita.v1.bus_pb2 import EncodeJob, EncodeResult, JobError, MediaItem
from vita.v1.media_pb2 import Audio, TimestampedFrame, Video
from vita.v1.media_pb2 import Image as ImageProto

REDIS_URL = os.environ.get("VITA_REDIS_URL", "redis://127.0.0.1:6379/0")
ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Services as subprocesses (tests/encoder_services.py)


@pytest.fixture(scope="module")
def services(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One vision and one audio encoder, each with its KServe port, shared by the tests of this module."""
    with encoder_services(tiny_model_dir, tmp_path_factory.mktemp("encoder-logs")) as running:
        yield running


# ----------------------------------------------------------------------------------------------------------------
# The in-process reference and the media


class Reference:
    """What the in-process path (processor, then the model's towers) makes of the same input."""

    def __init__(self, model_dir: Path) -> None:
        self.model = VitaForCausalLM.from_pretrained(model_dir)
        self.processor = VitaProcessor(VitaTokenizer.from_file(model_dir), self.model.vita_config)

    @torch.inference_mode()
    def image(self, source) -> torch.Tensor:
        inputs, _ = self.processor(images=[source])
        return self.model.vision_tower(inputs.image_pixels).flatten(0, 1)

    @torch.inference_mode()
    def video(self, source) -> torch.Tensor:
        inputs, _ = self.processor(video=source)
        return self.model.vision_tower(inputs.video_pixels).flatten(0, 1)

    @torch.inference_mode()
    def audio(self, source) -> torch.Tensor:
        inputs, _ = self.processor(audio=[source])
        return self.model.audio_tower.encode_features(inputs.audio_features)[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


def png(width: int, height: int, colour: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(250, 250, 20))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def corrupt_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, "JPEG")
    return out.getvalue()[: len(out.getvalue()) // 2]  # the header survives, half of the pixels do not


def wav_samples(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").copy(), w.getframerate()


# ----------------------------------------------------------------------------------------------------------------
# Jobs on the bus


def image_job(bus: BusConfig, *images: bytes) -> EncodeJob:
    return encode_job(bus, EncodeJob.IMAGE, [MediaItem(image=ImageProto(data=data)) for data in images])


def audio_job(bus: BusConfig, audio: Audio, **fields) -> EncodeJob:
    return encode_job(bus, EncodeJob.AUDIO, [MediaItem(audio=audio)], **fields)


def encode_job(bus: BusConfig, kind: int, items: list[MediaItem], **fields) -> EncodeJob:
    request_id = uuid.uuid4().hex
    return EncodeJob(job_id=f"{request_id}.{EncodeJob.Kind.Name(kind).lower()}", request_id=request_id,
                     reply_stream=bus.reply(request_id), kind=kind, items=items, **fields)


def heavy_image_job(bus: BusConfig) -> EncodeJob:
    """4 images of 12 tiles plus a thumbnail: long enough (~1 s on one thread) to act while it runs."""
    return image_job(bus, *[png(5376, 448, (40 * k, 90, 160)) for k in range(4)])


async def submit_together(redis: Redis, bus: BusConfig, pool: Pool, jobs: list[EncodeJob]) -> None:
    """One MULTI: a worker blocked on the stream wakes up to all the jobs at once, so they share a batch."""
    pipe = redis.pipeline(transaction=True)
    for job in jobs:
        pipe.xadd(bus.jobs(pool), encode_entry(job))
    await pipe.execute()


async def result_of(redis: Redis, job: EncodeJob, timeout_s: float = 60.0) -> EncodeResult:
    async for result in events(redis, job.reply_stream, timeout_s):
        if result.job_id == job.job_id:
            return result
    raise AssertionError("unreachable: events() raises ReplyTimeout")


async def embedding_of(redis: Redis, job: EncodeJob) -> tuple[torch.Tensor, list[int]]:
    result = await result_of(redis, job)
    assert result.WhichOneof("outcome") == "embedding", result.error.message
    (tensor,) = await read_embeddings(redis, [result.embedding])
    return tensor, list(result.embedding.item_tokens)


def run(body) -> None:
    async def main() -> None:
        # redis-py 8 gives every read a 5 s socket timeout, which would cut `events`' longer XREAD BLOCK short.
        redis = Redis.from_url(REDIS_URL, socket_timeout=None)
        try:
            await body(redis)
        finally:
            await redis.aclose()

    asyncio.run(main())


# ----------------------------------------------------------------------------------------------------------------
# Vision


def test_concurrent_image_jobs_share_one_forward_and_match_the_in_process_tower(services, reference, wide_png):
    bus, vision = services.bus, services.vision
    wide, square = wide_png.read_bytes(), png(300, 300)
    first, second = image_job(bus, wide, square), image_job(bus, square)
    forwards, items = vision.batches(Pool.VISION_ENCODER)

    async def body(redis: Redis) -> None:
        await submit_together(redis, bus, Pool.VISION_ENCODER, [first, second])
        got_first, tokens_first = await embedding_of(redis, first)
        got_second, tokens_second = await embedding_of(redis, second)
        assert tokens_first == [768, 256]  # 896x448: two tiles and a thumbnail, 256 tokens each; 300x300: one
        assert tokens_second == [256]
        expected_square = reference.image(square)
        torch.testing.assert_close(got_first, torch.cat([reference.image(wide), expected_square]), atol=ATOL, rtol=0)
        torch.testing.assert_close(got_second, expected_square, atol=ATOL, rtol=0)

    run(body)
    assert vision.batches(Pool.VISION_ENCODER) == (forwards + 1, items + 3)  # both jobs' 3 items, one forward


def test_video_file_and_camera_frames(services, reference, short_mp4):
    bus = services.bus
    clip = short_mp4.read_bytes()
    frames = [(0.25 * k, Image.new("RGB", (160, 120), (20 * k, 100, 255 - 20 * k))) for k in range(8)]
    encoded = [(t, png_bytes(image)) for t, image in frames]
    from_file = encode_job(bus, EncodeJob.VIDEO, [MediaItem(video=Video(file=clip))])
    from_camera = encode_job(bus, EncodeJob.VIDEO, [MediaItem(video=Video(frames=Video.Frames(frames=[
        TimestampedFrame(timestamp_s=t, image=ImageProto(data=data)) for t, data in encoded])))])

    async def body(redis: Redis) -> None:
        await submit(redis, bus, Pool.VISION_ENCODER, from_file)
        await submit(redis, bus, Pool.VISION_ENCODER, from_camera)
        got_file, tokens_file = await embedding_of(redis, from_file)
        got_camera, tokens_camera = await embedding_of(redis, from_camera)
        assert tokens_file == [6 * 256]  # 1.5 s sampled at 4 fps
        assert tokens_camera == [8 * 256]  # 8 frames spanning 2 s: 4 fps
        torch.testing.assert_close(got_file, reference.video(clip), atol=ATOL, rtol=0)
        torch.testing.assert_close(got_camera, reference.video(frames), atol=ATOL, rtol=0)

    run(body)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_corrupt_image_fails_alone_in_its_batch(services, reference):
    bus, vision = services.bus, services.vision
    bad, good = image_job(bus, png(64, 64), corrupt_jpeg()), image_job(bus, png(300, 300))
    forwards, items = vision.batches(Pool.VISION_ENCODER)

    async def body(redis: Redis) -> None:
        await submit_together(redis, bus, Pool.VISION_ENCODER, [bad, good])
        failed = await result_of(redis, bad)
        assert failed.error.code == JobError.INVALID_ARGUMENT
        assert failed.error.message.startswith("image 1: image data is corrupt")
        got, tokens = await embedding_of(redis, good)
        assert tokens == [256]
        torch.testing.assert_close(got, reference.image(png(300, 300)), atol=ATOL, rtol=0)

    run(body)
    assert vision.batches(Pool.VISION_ENCODER) == (forwards + 1, items + 1)


# ----------------------------------------------------------------------------------------------------------------
# Audio


def test_speech_as_wav_and_pcm16(services, reference, speech_wav):
    bus = services.bus
    samples, rate = wav_samples(speech_wav)
    as_wav = audio_job(bus, Audio(data=speech_wav.read_bytes(), encoding=Audio.WAV))
    as_pcm = audio_job(bus, Audio(data=samples.tobytes(), encoding=Audio.PCM16, sample_rate_hz=rate))
    config = reference.model.vita_config.audio
    frames = num_audio_frames(round(len(samples) * config.sample_rate / rate), config)

    async def body(redis: Redis) -> None:
        await submit_together(redis, bus, Pool.AUDIO_ENCODER, [as_wav, as_pcm])
        got_wav, tokens_wav = await embedding_of(redis, as_wav)
        got_pcm, tokens_pcm = await embedding_of(redis, as_pcm)
        assert tokens_wav == tokens_pcm == [math.ceil(frames / 8)]
        torch.testing.assert_close(got_wav, reference.audio(speech_wav.read_bytes()), atol=ATOL, rtol=0)
        torch.testing.assert_close(got_pcm, reference.audio((samples, rate)), atol=ATOL, rtol=0)

    run(body)


def test_undecodable_audio_and_bad_sample_rate_fail_alone(services, speech_wav):
    bus, audio = services.bus, services.audio
    garbage = audio_job(bus, Audio(data=b"this is not audio at all", encoding=Audio.WAV))
    no_rate = audio_job(bus, Audio(data=b"\x00\x01" * 1600, encoding=Audio.PCM16, sample_rate_hz=0))
    good = audio_job(bus, Audio(data=speech_wav.read_bytes()))
    forwards, items = audio.batches(Pool.AUDIO_ENCODER)

    async def body(redis: Redis) -> None:
        await submit_together(redis, bus, Pool.AUDIO_ENCODER, [garbage, no_rate, good])
        failed = await result_of(redis, garbage)
        assert failed.error.code == JobError.INVALID_ARGUMENT
        # one clean line, without FFmpeg's errno and '<none>' file name
        assert failed.error.message == ("audio 0: not a decodable audio file (WAV, FLAC, MP3, Ogg, AAC/M4A, ...); "
                                        "FFmpeg: invalid data found when processing input")
        failed = await result_of(redis, no_rate)
        assert failed.error.code == JobError.INVALID_ARGUMENT
        assert failed.error.message.startswith("audio 0: sample rate 0 is not supported")
        _, tokens = await embedding_of(redis, good)
        assert tokens[0] > 0

    run(body)
    assert audio.batches(Pool.AUDIO_ENCODER) == (forwards + 1, items + 1)


def test_an_unknown_audio_encoding_and_an_image_sent_as_a_video_file_are_refused(services, speech_wav):
    """Proto3 enums are open: `Audio.encoding` 7 parses, and was read as a WAV file. FFmpeg reads a PNG as a
    one-frame video, which passed for a clip. Both are INVALID_ARGUMENT now, on the bus and on the KServe port;
    the good job beside them is encoded."""
    bus = services.bus
    unknown = audio_job(bus, Audio(data=speech_wav.read_bytes(), encoding=7))
    still = encode_job(bus, EncodeJob.VIDEO, [MediaItem(video=Video(file=png(64, 48)))])
    good = audio_job(bus, Audio(data=speech_wav.read_bytes(), encoding=Audio.WAV))

    async def body(redis: Redis) -> None:
        await submit_together(redis, bus, Pool.AUDIO_ENCODER, [unknown, good])
        await submit(redis, bus, Pool.VISION_ENCODER, still)
        failed = await result_of(redis, unknown)
        assert failed.error.code == JobError.INVALID_ARGUMENT
        assert failed.error.message.startswith("audio 0: audio encoding 7 is not an Audio.Encoding")
        failed = await result_of(redis, still)
        assert failed.error.code == JobError.INVALID_ARGUMENT
        assert "the video file is a PNG image, not a video: send an image as an Image" in failed.error.message
        _, tokens = await embedding_of(redis, good)
        assert tokens[0] > 0

    run(body)
    with triton.InferenceServerClient(f"127.0.0.1:{services.vision.kserve_port}") as client:
        video = triton.InferInput("video", [1], "BYTES")
        video.set_data_from_numpy(np.array([png(64, 48)], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="the video file is a PNG image") as error:
            client.infer("vision-encoder", [video])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_expired_and_cancelled_jobs_are_answered_without_compute(services, speech_wav):
    bus, audio = services.bus, services.audio
    clip = Audio(data=speech_wav.read_bytes())
    expired = audio_job(bus, clip, deadline_unix_ms=int(time.time() * 1000) - 1)
    cancelled = audio_job(bus, clip)
    forwards, items = audio.batches(Pool.AUDIO_ENCODER)

    async def body(redis: Redis) -> None:
        await cancel(redis, bus, cancelled.request_id)
        await submit_together(redis, bus, Pool.AUDIO_ENCODER, [expired, cancelled])
        assert (await result_of(redis, expired)).error.code == JobError.DEADLINE_EXCEEDED
        assert (await result_of(redis, cancelled)).error.code == JobError.CANCELLED

    run(body)
    assert audio.batches(Pool.AUDIO_ENCODER) == (forwards, items)


def test_preprocessed_features_items(services, reference, wide_png, speech_wav):
    """Pixel tiles and filterbanks made elsewhere (`MediaItem.features`) encode like the media they came from."""
    bus = services.bus
    inputs, _ = reference.processor(images=[wide_png.read_bytes()], audio=[speech_wav.read_bytes()])
    feats, frames = fbank(inputs.audio_waveforms[0], config=reference.model.vita_config.audio)
    tiles = encode_job(bus, EncodeJob.IMAGE, [MediaItem(features=tensor_to_blob(inputs.image_pixels))])
    filterbank = encode_job(bus, EncodeJob.AUDIO, [MediaItem(features=tensor_to_blob(feats[0, : int(frames[0])]))])
    misshapen = encode_job(bus, EncodeJob.AUDIO, [MediaItem(features=tensor_to_blob(torch.zeros(10, 7)))])

    async def body(redis: Redis) -> None:
        await submit(redis, bus, Pool.VISION_ENCODER, tiles)
        await submit_together(redis, bus, Pool.AUDIO_ENCODER, [filterbank, misshapen])
        got, tokens = await embedding_of(redis, tiles)
        assert tokens == [768]
        torch.testing.assert_close(got, reference.image(wide_png.read_bytes()), atol=ATOL, rtol=0)
        got, _ = await embedding_of(redis, filterbank)
        torch.testing.assert_close(got, reference.audio(speech_wav.read_bytes()), atol=ATOL, rtol=0)
        failed = await result_of(redis, misshapen)
        assert failed.error.code == JobError.INVALID_ARGUMENT
        assert failed.error.message == "audio 0: filterbank features must have shape (N, 80); got (10, 7)"

    run(body)


# ----------------------------------------------------------------------------------------------------------------
# KServe v2 over gRPC


def embeddings(response: triton.InferResult) -> torch.Tensor:
    return torch.from_numpy(response.as_numpy("embeddings").copy())  # the response buffer is read-only


def test_kserve_v2_image_and_video(services, reference, wide_png, short_mp4):
    with triton.InferenceServerClient(f"127.0.0.1:{services.vision.kserve_port}") as client:
        assert client.is_server_live()
        assert client.is_model_ready("vision-encoder")
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([wide_png.read_bytes()], dtype=np.object_))
        response = client.infer("vision-encoder", [image])
        assert response.as_numpy("item_tokens").tolist() == [768]
        torch.testing.assert_close(embeddings(response), reference.image(wide_png.read_bytes()), atol=ATOL, rtol=0)

        video = triton.InferInput("video", [1], "BYTES")
        video.set_data_from_numpy(np.array([short_mp4.read_bytes()], dtype=np.object_))
        response = client.infer("vision-encoder", [video])
        assert response.as_numpy("item_tokens").tolist() == [6 * 256]
        torch.testing.assert_close(embeddings(response), reference.video(short_mp4.read_bytes()), atol=ATOL, rtol=0)

        broken = triton.InferInput("image", [1], "BYTES")
        broken.set_data_from_numpy(np.array([corrupt_jpeg()], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="image 0: image data is corrupt") as error:
            client.infer("vision-encoder", [broken])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_kserve_v2_audio_bytes_and_samples(services, reference, speech_wav):
    samples, rate = wav_samples(speech_wav)
    floats = samples.astype(np.float32) / 32768
    expected = reference.audio(speech_wav.read_bytes())
    with triton.InferenceServerClient(f"127.0.0.1:{services.audio.kserve_port}") as client:
        assert client.is_model_ready("audio-encoder")
        as_file = triton.InferInput("audio", [1], "BYTES")
        as_file.set_data_from_numpy(np.array([speech_wav.read_bytes()], dtype=np.object_))
        response = client.infer("audio-encoder", [as_file])
        assert response.as_numpy("item_tokens").tolist() == [expected.shape[0]]
        torch.testing.assert_close(embeddings(response), expected, atol=ATOL, rtol=0)

        as_samples = triton.InferInput("audio", [len(floats)], "FP32")
        as_samples.set_data_from_numpy(floats)
        response = client.infer("audio-encoder", [as_samples], parameters={"sample_rate": rate})
        torch.testing.assert_close(embeddings(response), reference.audio((floats, rate)), atol=ATOL, rtol=0)

        with pytest.raises(InferenceServerException, match="parameter 'sample_rate'") as error:
            client.infer("audio-encoder", [as_samples])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_kserve_v2_takes_the_inputs_of_the_triton_models_too(services, reference, wide_png, speech_wav):
    """UINT8 (one encoded file) and FP32 features / pixel tiles: what model_repository_cpu's encoder models take,
    without their batch dimension (test_triton_encoders.py)."""
    def uint8(name: str, data: bytes) -> triton.InferInput:
        tensor = triton.InferInput(name, [len(data)], "UINT8")
        tensor.set_data_from_numpy(np.frombuffer(data, dtype=np.uint8))
        return tensor

    def fp32(name: str, array: np.ndarray) -> triton.InferInput:
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return tensor

    with triton.InferenceServerClient(f"127.0.0.1:{services.vision.kserve_port}") as client:
        expected = reference.image(wide_png.read_bytes())
        response = client.infer("vision-encoder", [uint8("image", wide_png.read_bytes())])
        torch.testing.assert_close(embeddings(response), expected, atol=ATOL, rtol=0)
        pixels = reference.processor(images=[wide_png.read_bytes()])[0].image_pixels
        response = client.infer("vision-encoder", [fp32("pixel_values", pixels.numpy())])
        torch.testing.assert_close(embeddings(response), expected, atol=ATOL, rtol=0)
    with triton.InferenceServerClient(f"127.0.0.1:{services.audio.kserve_port}") as client:
        expected = reference.audio(speech_wav.read_bytes())
        response = client.infer("audio-encoder", [uint8("audio", speech_wav.read_bytes())])
        torch.testing.assert_close(embeddings(response), expected, atol=ATOL, rtol=0)
        features = reference.processor(audio=[speech_wav.read_bytes()])[0].audio_features[0]
        response = client.infer("audio-encoder", [fp32("features", features.numpy())])
        torch.testing.assert_close(embeddings(response), expected, atol=ATOL, rtol=0)
        with pytest.raises(InferenceServerException, match=r"filterbank features must have shape \(N, "):
            client.infer("audio-encoder", [fp32("features", features.numpy()[:, :-1])])


# ----------------------------------------------------------------------------------------------------------------
# Failure and shutdown


def wait_pending(redis: SyncRedis, bus: BusConfig, pool: Pool, timeout_s: float = 30.0) -> dict:
    """The one entry of the pool delivered to a worker and not acknowledged, as soon as there is one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pending = redis.xpending_range(bus.jobs(pool), pool.group, min="-", max="+", count=10)
        if pending:
            (entry,) = pending
            return entry
        time.sleep(0.005)
    pytest.fail("no worker picked the job up")


def test_killed_worker_job_is_reclaimed_and_answered_once(tiny_model_dir, tmp_path):
    """kill -9 mid-batch: one of two survivors reclaims the job; the other, polling the same pending list, must not
    take it from the first while it runs (keep-alive), so exactly one answer is published."""
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex}")
    doomed = start("vision-encoder", tiny_model_dir, bus.prefix, tmp_path / "doomed.log")
    heirs: list[Service] = []
    job = heavy_image_job(bus)
    try:
        doomed.wait_serving()
        run(lambda redis: submit(redis, bus, Pool.VISION_ENCODER, job))
        with SyncRedis.from_url(REDIS_URL) as redis:
            held = wait_pending(redis, bus, Pool.VISION_ENCODER)
            doomed.proc.kill()
            doomed.proc.wait()
            # It died holding the job: still pending under its name, and it never answered.
            (still,) = redis.xpending_range(bus.jobs(Pool.VISION_ENCODER), Pool.VISION_ENCODER.group,
                                            min="-", max="+", count=10)
            assert (still["message_id"], still["consumer"]) == (held["message_id"], held["consumer"])
            assert redis.xlen(job.reply_stream) == 0

            # The batch runs ~1 s, several times the 300 ms after which an idle job counts as abandoned.
            heirs = [start("vision-encoder", tiny_model_dir, bus.prefix, tmp_path / f"heir{k}.log",
                           "--reclaim-idle-ms", "300") for k in range(2)]

            async def body(redis: Redis) -> None:
                embedding, tokens = await embedding_of(redis, job)
                assert tokens == [13 * 256] * 4
                assert embedding.shape[0] == 4 * 13 * 256

            run(body)
            for heir in heirs:
                heir.stop()  # a worker that had taken the job too would finish and answer before exiting
            assert redis.xlen(job.reply_stream) == 1
            assert redis.xpending(bus.jobs(Pool.VISION_ENCODER), Pool.VISION_ENCODER.group)["pending"] == 0
    finally:
        for service in (doomed, *heirs):
            service.stop()
        delete_prefix(bus.prefix)
    # The heir said whose job it took over, in one line (an operator's try: nothing was logged).
    lines = [json.loads(line) for k in range(2) for line in (tmp_path / f"heir{k}.log").read_text().splitlines()
             if line.startswith("{")]
    [took] = [e for e in lines if e["msg"].startswith("took over jobs")]
    assert (took["level"], took["from_consumers"], took["jobs"], took["request_ids"]) == (
        "info", [held["consumer"].decode()], 1, [job.request_id])


def test_a_worker_that_stalled_past_reclaim_leaves_the_reclaimed_job_to_its_heir(tiny_model_dir):
    """The stall itself, made deterministic: a worker reads two jobs, another takes one over after reclaim_idle_ms
    (what happens when the first one's event loop stalls), then the first runs the batch. It answers and
    acknowledges only the job it still owns; the reclaimed one stays pending under the heir, unanswered by it."""
    from vita.bus.queue import Consumer
    from vita.encoders.__main__ import ENCODERS
    from vita.encoders.base import load_encoder
    from vita.encoders.worker import EncoderWorker

    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex}", reclaim_idle_ms=200, dead_consumer_ms=60_000)
    pool = Pool.VISION_ENCODER
    lost, kept = image_job(bus, png(64, 64)), image_job(bus, png(64, 96))

    async def body(redis: Redis) -> None:
        worker = EncoderWorker(redis, bus, load_encoder(ENCODERS["vision-encoder"][0], tiny_model_dir, "cpu",
                                                        "float32"))
        await submit_together(redis, bus, pool, [lost, kept])
        deliveries = await worker.consumer.read(count=2, block_ms=None)
        assert [d.message for d in deliveries] == [lost, kept]
        await asyncio.sleep(3 * bus.reclaim_idle_ms / 1000)
        heir = Consumer(redis, bus, pool)
        (taken,) = await heir.read(count=1, block_ms=None)
        assert taken.message == lost
        await worker.process(deliveries)
        await embedding_of(redis, kept)
        assert await redis.xlen(lost.reply_stream) == 0  # left to the heir
        (pending,) = await redis.xpending_range(bus.jobs(pool), pool.group, min="-", max="+", count=10)
        assert (pending["message_id"].decode(), pending["consumer"].decode()) == (taken.entry_id, heir.name)

    try:
        run(body)
    finally:
        delete_prefix(bus.prefix)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC endpoint: the spans the service exports, as (name, trace id, parent span id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes, bytes]] = []

    def Export(self, request, context):
        self.spans += [(s.name, s.trace_id, s.parent_span_id) for rs in request.resource_spans
                       for ss in rs.scope_spans for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_sigterm_finishes_the_batch_in_flight_then_exits(tiny_model_dir, tmp_path):
    """Health turns NOT_SERVING, the running job is still answered (in a span under the producer's), no new job
    is taken, and the process exits 0."""
    collector = Collector()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex}")
    service = start("vision-encoder", tiny_model_dir, bus.prefix, tmp_path / "vision.log",
                    "--otlp-endpoint", f"127.0.0.1:{otlp_port}")
    producer = TracerProvider().get_tracer("test")
    try:
        service.wait_serving()
        with producer.start_as_current_span("orchestrator") as parent:
            running = heavy_image_job(bus)
            running.trace_context.update(current_trace_context())
        late = image_job(bus, png(64, 64))
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel, \
                SyncRedis.from_url(REDIS_URL) as sync_redis:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            run(lambda redis: submit(redis, bus, Pool.VISION_ENCODER, running))
            wait_pending(sync_redis, bus, Pool.VISION_ENCODER)
            service.proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

        async def body(redis: Redis) -> None:
            await submit(redis, bus, Pool.VISION_ENCODER, late)
            _, tokens = await embedding_of(redis, running)
            assert tokens == [13 * 256] * 4
            assert service.proc.wait(30) == 0
            depth = await lag(redis, bus, Pool.VISION_ENCODER)
            assert (depth.lag, depth.pending) == (1, 0)  # the late job waits for the next worker

        run(body)
        context = parent.get_span_context()
        assert ("encode image", context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big")) \
            in collector.spans
    finally:
        service.stop()
        otlp.stop(0)
        delete_prefix(bus.prefix)
