"""The audio and vision encoders as Triton Python-backend models, on a real tritonserver, over tritonclient gRPC.

The server is the nvidia-pytriton wheel's `tritonserver` serving `model_repository_cpu/{audio,vision}-encoder`
for the tiny model; every embedding is checked against the in-process path (processor, then the model's towers)
within ATOL. Media travel as UINT8 bytes, features as FP32: BYTES tensors cannot cross this stub under numpy 2
(services/vita/runtime/triton_python.py). This process must not import kserve (tritonclient's protobuf symbols).
"""

from __future__ import annotations

import io
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from PIL import Image, ImageDraw
from tritonclient.utils import InferenceServerException

from vita.llm.backends.triton.server import ENCODER_MODELS, TritonServer, write_cpu_repository
from vita.model.vita import VitaForCausalLM
from vita.processing.processor import VitaProcessor
from vita.processing.tokenizer import VitaTokenizer

# Same CPU, same code and thread count; Triton's batch (padding, one forward for several requests) is what differs.
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-encoders")
    repository = write_cpu_repository(root / "repository", tiny_model_dir, models=ENCODER_MODELS,
                                      torch_threads=torch.get_num_threads())
    with TritonServer(repository, root / "tritonserver.log") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.grpc_url) as client:
        yield client


class Reference:
    """The in-process path: the processor, then the model's towers (the whole model, as `vita generate` loads it)."""

    def __init__(self, model_dir: Path) -> None:
        self.model = VitaForCausalLM.from_pretrained(model_dir)
        self.processor = VitaProcessor(VitaTokenizer.from_file(model_dir), self.model.vita_config)

    @torch.inference_mode()
    def image_pixels(self, data: bytes) -> torch.Tensor:
        return self.processor(images=[data])[0].image_pixels

    @torch.inference_mode()
    def pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_tower(pixels).flatten(0, 1)

    @torch.inference_mode()
    def video(self, data: bytes) -> torch.Tensor:
        return self.pixels(self.processor(video=data)[0].video_pixels)

    @torch.inference_mode()
    def features(self, data: bytes) -> torch.Tensor:
        return self.processor(audio=[data])[0].audio_features[0]

    @torch.inference_mode()
    def audio(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.audio_tower.encode_features([features])[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> Reference:
    return Reference(tiny_model_dir)


def uint8(name: str, data: bytes) -> triton.InferInput:
    """One encoded file: [1, bytes]."""
    tensor = triton.InferInput(name, [1, len(data)], "UINT8")
    tensor.set_data_from_numpy(np.frombuffer(data, dtype=np.uint8)[None])
    return tensor


def fp32(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor


def embeddings(response: triton.InferResult) -> torch.Tensor:
    array = response.as_numpy("embeddings")
    assert array.shape[0] == 1 and array.dtype == np.float32
    return torch.from_numpy(array[0].copy())  # the response buffer is read-only


def png(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (30, 120, 200))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), fill=(250, 250, 20))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def refused(client, model: str, inputs: list[triton.InferInput], match: str) -> None:
    with pytest.raises(InferenceServerException, match=match) as error:
        client.infer(model, inputs)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT", error.value


def test_both_models_are_ready_with_their_tensors(client):
    for model, inputs in (("audio-encoder", {"audio": "UINT8", "features": "FP32"}),
                          ("vision-encoder", {"image": "UINT8", "video": "UINT8", "pixel_values": "FP32"})):
        assert client.is_model_ready(model)
        metadata = client.get_model_metadata(model, as_json=True)
        assert {t["name"]: t["datatype"] for t in metadata["inputs"]} == inputs
        assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("embeddings", "FP32")]
    assert not client.is_model_ready("tensorrt_llm")  # only the models asked for were written


def test_audio_file_and_features_match_the_in_process_tower(client, reference, speech_wav):
    data = speech_wav.read_bytes()
    features = reference.features(data)
    expected = reference.audio(features)
    torch.testing.assert_close(embeddings(client.infer("audio-encoder", [uint8("audio", data)])), expected,
                               atol=ATOL, rtol=0)
    got = embeddings(client.infer("audio-encoder", [fp32("features", features.numpy()[None])]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_image_video_and_pixels_match_the_in_process_tower(client, reference, wide_png, short_mp4):
    pixels = reference.image_pixels(wide_png.read_bytes())
    expected = reference.pixels(pixels)
    assert expected.shape[0] == 768  # two tiles and the thumbnail, 256 tokens each
    got = embeddings(client.infer("vision-encoder", [uint8("image", wide_png.read_bytes())]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    got = embeddings(client.infer("vision-encoder", [fp32("pixel_values", pixels.numpy()[None])]))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    got = embeddings(client.infer("vision-encoder", [uint8("video", short_mp4.read_bytes())]))
    torch.testing.assert_close(got, reference.video(short_mp4.read_bytes()), atol=ATOL, rtol=0)


def test_concurrent_requests_of_any_size_each_get_their_own_embeddings(server, client, reference):
    """Triton hands the model the requests waiting together (ragged); a corrupt one fails alone among them."""
    images = [png(300, 300), png(900, 300), b"\x89PNG\r\n\x1a\n not an image", png(64, 64)]
    with futures.ThreadPoolExecutor(len(images)) as pool:
        calls = [pool.submit(client.infer, "vision-encoder", [uint8("image", data)]) for data in images]
        for k, (data, call) in enumerate(zip(images, calls)):
            if k == 2:
                with pytest.raises(InferenceServerException, match="image 0: ") as error:
                    call.result()
                assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            else:
                torch.testing.assert_close(embeddings(call.result()), reference.pixels(reference.image_pixels(data)),
                                           atol=ATOL, rtol=0)


def test_bad_input_gets_invalid_argument_with_a_clear_message(client, reference, speech_wav):
    refused(client, "vision-encoder", [], "request has 0 inputs")  # Triton's own check
    both = [uint8("image", png(64, 64)), uint8("video", b"\x00" * 16)]
    refused(client, "vision-encoder", both, r"send exactly one of the inputs \['image', 'video', 'pixel_values'\]; "
                                            r"got \['image', 'video'\]")
    two = triton.InferInput("image", [2, 4], "UINT8")
    two.set_data_from_numpy(np.zeros((2, 4), np.uint8))
    refused(client, "vision-encoder", [two], r"one item per request \(batch size 1\); got shape \[2, 4\]")
    refused(client, "vision-encoder", [fp32("pixel_values", np.zeros((1, 1, 3, 32, 32)))],
            r"pixel tiles must have shape \(N, 3, 448, 448\); got \(1, 3, 32, 32\)")
    refused(client, "audio-encoder", [uint8("audio", b"RIFF....WAVEfmt nonsense")], "audio 0: ")
    bins = reference.model.vita_config.audio.num_mel_bins
    refused(client, "audio-encoder", [fp32("features", np.zeros((1, 10, bins + 1)))],
            rf"filterbank features must have shape \(N, {bins}\)")
    nan = np.full((1, 10, bins), np.nan, np.float32)
    refused(client, "audio-encoder", [fp32("features", nan)], "filterbank features contain NaN or Inf")
    # BYTES never reaches the model: Triton checks the datatype against config.pbtxt.
    as_bytes = triton.InferInput("audio", [1, 1], "BYTES")
    as_bytes.set_data_from_numpy(np.array([[speech_wav.read_bytes()]], dtype=np.object_))
    refused(client, "audio-encoder", [as_bytes], "input 'audio' data-type is 'BYTES', but model "
                                                 "'audio-encoder' expects 'UINT8'")
    # and the model still serves
    assert embeddings(client.infer("audio-encoder", [uint8("audio", speech_wav.read_bytes())])).shape[0] > 0
