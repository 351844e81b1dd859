"""Fuzzing the encoders' KServe v2 gRPC port (vita/encoders/kserve.py) with hypothesis: ModelInfer with arbitrary
tensors (names, datatypes, shapes, contents, raw contents, parameters), the metadata, readiness and repository RPCs
with arbitrary names, and arbitrary bytes on the wire for every method.

The services are real processes (a vision and an audio encoder, tests/encoder_services.py), called through
tritonclient's copy of the v2 protocol (this process must not import kserve). Every answer must be a proper status -
never UNKNOWN or INTERNAL - the server must stay up, and a valid request must succeed afterwards. Example counts
come from the hypothesis profile (tests/conftest.py: `ci`, derandomized).
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.encoder_services import encoder_services

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two service processes start first
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_S = 60.0  # a deadline on every fuzzed call: DEADLINE_EXCEEDED is a proper answer, a hang is not
MODELS = ("vision-encoder", "audio-encoder")
SERVICE = "/inference.GRPCInferenceService/"
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
           "RepositoryModelLoad", "RepositoryModelUnload")


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def ports(tiny_model_dir, tmp_path_factory):
    with encoder_services(tiny_model_dir, tmp_path_factory.mktemp("kserve-logs")) as running:
        yield {"vision-encoder": running.vision.kserve_port, "audio-encoder": running.audio.kserve_port}


@pytest.fixture(scope="module")
def channels(ports):
    opened = {model: grpc.insecure_channel(f"127.0.0.1:{port}") for model, port in ports.items()}
    yield opened
    for channel in opened.values():
        channel.close()


def answered(call, *args) -> object | None:
    """The response, or None after a proper error status; fails on a bare UNKNOWN or INTERNAL."""
    try:
        return call(*args, timeout=CALL_S)
    except grpc.RpcError as e:
        assert e.code() not in BAD, (e.code(), e.details(), args)
        return None


def valid_requests_succeed(ports) -> None:
    """The servers are live, both models ready, and a real image and real audio samples are encoded."""
    with triton.InferenceServerClient(f"127.0.0.1:{ports['vision-encoder']}") as client:
        assert client.is_server_live() and client.is_model_ready("vision-encoder")
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([_png()], dtype=np.object_))
        assert client.infer("vision-encoder", [image]).as_numpy("item_tokens")[0] > 0
    with triton.InferenceServerClient(f"127.0.0.1:{ports['audio-encoder']}") as client:
        assert client.is_server_live() and client.is_model_ready("audio-encoder")
        samples = triton.InferInput("audio", [16000], "FP32")
        samples.set_data_from_numpy((np.sin(np.arange(16000) / 5) * 0.3).astype(np.float32))
        response = client.infer("audio-encoder", [samples], parameters={"sample_rate": 16000})
        assert response.as_numpy("item_tokens")[0] > 0


# ------------------------------------------------------------------------------------------------------------------
# Strategies

_names = st.one_of(st.sampled_from(["image", "video", "audio", "features", "pixel_values"]),
                   st.sampled_from(["", "embeddings"]), st.text(max_size=12))
_datatypes = st.one_of(st.sampled_from(["BYTES", "UINT8", "FP32", "FP16", "BF16", "FP64", "INT8", "INT16", "INT32",
                                        "INT64", "UINT16", "UINT32", "UINT64", "BOOL"]), st.text(max_size=6))
# The `contents` field each datatype's elements go in (KServe v2); FP16 has none.
_FIELDS = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
           "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
           "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
           "UINT64": "uint64_contents"}
_ITEMSIZE = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4,
             "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}
_elements = {
    "bytes_contents": st.one_of(st.binary(max_size=48), st.just(_png())),
    "bool_contents": st.booleans(),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "int_contents": st.one_of(st.integers(-128, 255), st.integers(-(1 << 31), (1 << 31) - 1)),
    "int64_contents": st.integers(-(1 << 63), (1 << 63) - 1),
    "uint_contents": st.one_of(st.integers(0, 255), st.integers(0, (1 << 32) - 1)),
    "uint64_contents": st.integers(0, (1 << 64) - 1),
}
_parameter = st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()),
    st.builds(pb.InferParameter, int64_param=st.one_of(st.sampled_from([0, 8000, 16000, 48000, -1]),
                                                       st.integers(-(1 << 63), (1 << 63) - 1))),
    st.builds(pb.InferParameter, string_param=st.one_of(st.just("16000"), st.text(max_size=10))),
    st.builds(pb.InferParameter, double_param=st.floats()),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, (1 << 64) - 1)),
)
_parameters = st.dictionaries(st.one_of(st.sampled_from(["sample_rate", "binary_data_size", "content_type"]),
                                        st.text(max_size=8)), _parameter, max_size=2)


def _bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES as raw contents: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


@st.composite
def _tensor(draw, raw: bool) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    """Mostly coherent (the datatype's contents field, a shape that fits the element count), so most requests get
    past the protocol's own checks to the encoder; now and then anything."""
    datatype = draw(_datatypes)
    coherent = draw(st.integers(0, 4)) > 0
    tensor = pb.ModelInferRequest.InferInputTensor(name=draw(_names), datatype=datatype,
                                                   parameters=draw(_parameters))
    payload = None
    if raw:
        if datatype == "BYTES":
            items = draw(st.lists(_elements["bytes_contents"], max_size=3))
            count, payload = len(items), _bytes_tensor(items)
            if not coherent:  # a length prefix that lies, or cut short
                payload = draw(st.one_of(st.binary(max_size=16), st.just(payload[:-1]),
                                         st.just(b"\xff\xff\xff\x7f" + payload)))
        else:
            count = draw(st.integers(0, 64))
            payload = draw(st.binary(min_size=count * _ITEMSIZE.get(datatype, 1),
                                     max_size=count * _ITEMSIZE.get(datatype, 1) + (not coherent)))
    else:
        field = _FIELDS.get(datatype) if coherent else None
        field = field or draw(st.sampled_from(sorted(_elements)))
        values = draw(st.lists(_elements[field], max_size=64 if field != "bytes_contents" else 3))
        count = len(values)
        if values or draw(st.booleans()):
            getattr(tensor.contents, field).extend(values)
    shapes = [[count], [1, count], [count, 1]] if coherent else []
    tensor.shape.extend(draw(st.sampled_from(shapes)) if shapes and draw(st.booleans()) else draw(st.lists(
        st.one_of(st.integers(-3, 8), st.sampled_from([16000, 1 << 31, 1 << 62, -(1 << 62)])), max_size=4)))
    return tensor, payload


@st.composite
def infer_requests(draw, model: str) -> pb.ModelInferRequest:
    """Requests for `model` (mostly; else another name), with tensors in `contents` or in `raw_input_contents`
    (now and then both, or counts that do not match)."""
    raw = draw(st.booleans())
    tensors = draw(st.lists(_tensor(raw), max_size=3))
    request = pb.ModelInferRequest(
        model_name=model if draw(st.integers(0, 5)) else draw(st.one_of(st.sampled_from(MODELS), st.text(max_size=12))),
        model_version=draw(st.one_of(st.just(""), st.text(max_size=4))), id=draw(st.text(max_size=8)),
        parameters=draw(_parameters), inputs=[tensor for tensor, _ in tensors],
        outputs=draw(st.lists(st.builds(pb.ModelInferRequest.InferRequestedOutputTensor,
                                        name=st.one_of(st.sampled_from(["embeddings", "item_tokens"]),
                                                       st.text(max_size=8))), max_size=2)))
    if raw:
        request.raw_input_contents.extend(payload for _, payload in tensors)
        if not draw(st.integers(0, 5)):
            request.raw_input_contents.append(b"\0" * 4)  # one more than there are inputs
    return request


# ------------------------------------------------------------------------------------------------------------------
# The fuzz tests


@given(data=st.data(), model=st.sampled_from(MODELS))
def test_model_infer_answers_any_request_with_a_proper_status(channels, data, model):
    request = data.draw(infer_requests(model))
    answered(service_pb2_grpc.GRPCInferenceServiceStub(channels[model]).ModelInfer, request)


@given(model=st.sampled_from(MODELS), name=st.one_of(st.sampled_from(MODELS), st.text(max_size=16)),
       version=st.text(max_size=4))
def test_metadata_and_readiness_answer_any_name_with_a_proper_status(channels, model, name, version):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channels[model])
    answered(stub.ServerLive, pb.ServerLiveRequest())
    answered(stub.ServerReady, pb.ServerReadyRequest())
    answered(stub.ServerMetadata, pb.ServerMetadataRequest())
    answered(stub.ModelReady, pb.ModelReadyRequest(name=name, version=version))
    answered(stub.ModelMetadata, pb.ModelMetadataRequest(name=name, version=version))


@given(model=st.sampled_from(MODELS), method=st.sampled_from(METHODS), data=st.binary(max_size=96))
def test_every_method_refuses_bytes_that_are_not_a_request(channels, model, method, data):
    call = channels[model].unary_unary(SERVICE + method, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
    answered(call, data)


_T, _C = pb.ModelInferRequest.InferInputTensor, pb.InferTensorContents
_SAMPLE_RATE = {"sample_rate": pb.InferParameter(int64_param=16000)}


@pytest.mark.parametrize("model, request_", [
    # What the fuzzing found (each was a bare INTERNAL): a BYTES length prefix past the end, a cut-off prefix ...
    ("vision-encoder", pb.ModelInferRequest(inputs=[_T(name="image", datatype="BYTES", shape=[1])],
                                            raw_input_contents=[b"\xff\xff\xff\x7fabc"])),
    ("vision-encoder", pb.ModelInferRequest(inputs=[_T(name="image", datatype="BYTES", shape=[1])],
                                            raw_input_contents=[b"\x01"])),
    # ... a value out of its datatype's range ...
    ("audio-encoder", pb.ModelInferRequest(inputs=[_T(name="audio", datatype="INT8", shape=[1],
                                                      contents=_C(int_contents=[1000]))])),
    ("vision-encoder", pb.ModelInferRequest(inputs=[_T(name="image", datatype="UINT8", shape=[1],
                                                       contents=_C(uint_contents=[1 << 31]))])),
    # ... FP32 audio with no samples, and files where numbers belong.
    ("audio-encoder", pb.ModelInferRequest(parameters=_SAMPLE_RATE, inputs=[_T(name="audio", datatype="FP32",
                                                                               shape=[0])], raw_input_contents=[b""])),
    ("audio-encoder", pb.ModelInferRequest(inputs=[_T(name="features", datatype="BYTES", shape=[1, 1],
                                                      contents=_C(bytes_contents=[b"x"]))])),
    ("vision-encoder", pb.ModelInferRequest(inputs=[_T(name="pixel_values", datatype="BYTES", shape=[1],
                                                       contents=_C(bytes_contents=[b"x"]))])),
], ids=["bytes-prefix-past-the-end", "bytes-prefix-cut", "int8-out-of-range", "uint8-out-of-range",
        "fp32-audio-empty", "bytes-features", "bytes-pixels"])
def test_tensors_that_do_not_decode_are_invalid_argument(channels, model, request_):
    request_.model_name = model
    with pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channels[model]).ModelInfer(request_, timeout=CALL_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()


def test_the_model_repository_cannot_be_changed_from_outside(channels, ports):
    """Each port serves its one encoder: loading or unloading a model (the v2 repository extension) is refused,
    so no client can take the model away from the others."""
    for model, channel in channels.items():
        for method in ("RepositoryModelLoad", "RepositoryModelUnload"):
            call = channel.unary_unary(SERVICE + method, request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)
            for name in (model, "other-model"):
                # kserve's request message has the model name as field 1, as ModelReadyRequest has its name
                with pytest.raises(grpc.RpcError) as refused:
                    call(pb.ModelReadyRequest(name=name).SerializeToString(), timeout=CALL_S)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    valid_requests_succeed(ports)


def test_the_encoders_answer_after_the_fuzzing(ports):
    valid_requests_succeed(ports)
