"""TritonBackend against a real Triton Inference Server, over real gRPC on 127.0.0.1.

The server is the `tritonserver` of the nvidia-pytriton wheel (`make setup` installs it), started as a process
on free ports and serving `model_repository_cpu`: TensorRT-LLM's `tensorrt_llm` model, with its tensors, on
Triton's Python backend and the torch engine (services/vita/llm/backends/triton/python_model.py). The backend
reaches it only through tritonclient, and what the model does is read from Triton's metrics port.
"""

import asyncio
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcclient
from google.protobuf import text_format
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from vita.errors import InvalidInputError, VitaError
from vita.llm.backends.base import BackendRequest, PromptInput
from vita.llm.backends.triton.backend import BackendError, TritonBackend
from vita.llm.backends.triton.server import TritonServer, write_cpu_repository
from vita.model.config import LLMConfig
from vita.model.generation import SamplingParams, stream_generate
from vita.model.llm import MoECausalLM

GPU_CONFIG = Path(__file__).resolve().parents[2] / "model_repository" / "tensorrt_llm" / "config.pbtxt"
VOCAB, HIDDEN, EOS = 96, 64, 2
MODEL = "tensorrt_llm"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return MoECausalLM(LLMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """One tritonserver for the module; every test reads its counters as differences."""
    root = tmp_path_factory.mktemp("triton")
    model.save_pretrained(root / "model")
    repository = write_cpu_repository(root / "repository", root / "model", max_batch_size=8, models=[MODEL],
                                      torch_threads=torch.get_num_threads())  # the same numerics as here
    with TritonServer(repository, root / "tritonserver.log") as server:
        yield server


def ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


LONG = ids(2, 9)  # this model answers it without eos until the context is full: a generation to cancel


def serve(server, test, *, end_id: int = EOS):
    """Runs `test(backend)` with a started backend on the server."""
    async def main():
        backend = TritonBackend(server.grpc_url, vocab_size=VOCAB, end_id=end_id)
        await backend.start()
        try:
            return await test(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


async def collect(backend, request):
    return [o async for o in backend.generate(request)]


def expected_outputs(model, prompt=None, embeds=None, *, params: SamplingParams,
                     end_id: int = EOS) -> tuple[list[int | None], str]:
    """stream_generate's tokens as TritonBackend yields them: without end_id, which TensorRT-LLM drops."""
    tokens = list(stream_generate(model, prompt, inputs_embeds=embeds, params=params))
    if tokens[-1] == end_id:
        return [*tokens[:-1], None], "stop"
    return tokens, "stop" if tokens[-1] in params.stop_token_ids else "length"


def metrics(server) -> dict[tuple[str, str], float]:
    """Triton's metrics for the model, by (family, failure reason or "")."""
    values = {}
    for family in text_string_to_metric_families(server.metrics()):
        for sample in family.samples:
            if sample.labels.get("model") == MODEL and sample.name.removesuffix("_total") == family.name:
                values[family.name, sample.labels.get("reason", sample.labels.get("code", ""))] = sample.value
    return values


async def metrics_when(server, done, timeout_s: float = 60.0) -> dict[tuple[str, str], float]:
    """The metrics once `done(metrics)` holds: the model sends its counters when its engine goes idle."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done(values := await asyncio.to_thread(metrics, server)):
        assert loop.time() < deadline, f"the metrics never reached the expected state: {values}"
        await asyncio.sleep(0.05)
    return values


def idle(before: dict, *, cancelled: int = 0):
    """The engine has no sequence left, and `cancelled` more were cancelled than in `before`."""
    def done(values):
        return (values.get(("vita:num_requests_running", ""), -1) == 0
                and values.get(("vita:num_requests_waiting", ""), -1) == 0
                and values[("vita:requests_cancelled", "")] == before[("vita:requests_cancelled", "")] + cancelled)
    return done


def generated(values) -> float:
    return values[("vita:generation_tokens", "")]


def test_the_server_answers_health_metadata_and_config_over_grpc_and_http(server):
    async def test(backend):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready(MODEL)
            assert not await client.is_model_ready("ensemble")
            config = (await client.get_model_config(MODEL)).config
            metadata = await client.get_model_metadata(MODEL)
            with pytest.raises(InferenceServerException, match="unknown model"):
                await client.get_model_config("ensemble")
            index = await client.get_model_repository_index()
            return config, metadata, index
        finally:
            await client.close()

    config, metadata, index = serve(server, test)
    gpu = text_format.Parse(GPU_CONFIG.read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert list(config.input) == list(gpu.input) and list(config.output) == list(gpu.output)
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs["input_ids"] == ("INT32", [-1, -1])
    assert inputs["prompt_embedding_table"] == ("FP16", [-1, -1, -1])
    assert [(m.name, m.state) for m in index.models] == [(MODEL, "READY")]
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        with urllib.request.urlopen(server.http_url + path, timeout=5) as response:
            assert response.status == 200


def test_concurrent_greedy_requests_with_and_without_slots_match_stream_generate(model, server):
    params = SamplingParams(max_new_tokens=12)
    slots = torch.tensor([2, 3, 4])
    table = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(9))
    requests = [BackendRequest(f"r{i}", PromptInput(ids(i, 5 + 2 * i)), params) for i in range(3)]
    requests.append(BackendRequest("mm", PromptInput(ids(7, 9), slots, table), params))

    async def test(backend):
        return await asyncio.gather(*(collect(backend, r) for r in requests))

    results = serve(server, test)
    embeds = model.get_input_embeddings()(ids(7, 9)).detach().clone()
    embeds[slots] = table.half().float()  # the prompt table travels as FP16
    expected = [expected_outputs(model, r.prompt.input_ids, params=params) for r in requests[:3]]
    expected.append(expected_outputs(model, embeds=embeds, params=params))
    assert {finish for _, finish in expected} == {"stop", "length"}  # both endings are exercised
    for request, outputs, (tokens, finish) in zip(requests, results, expected, strict=True):
        assert [o.token_id for o in outputs] == tokens
        assert [o.index for o in outputs] == list(range(len(tokens)))
        assert {o.request_id for o in outputs} == {request.request_id}
        assert [o.finish_reason for o in outputs] == [None] * (len(tokens) - 1) + [finish]


def test_stop_tokens_end_id_and_length_end_as_tensorrt_llm_reports_them(model, server):
    prompt = ids(3, 6)
    reference = list(stream_generate(model, prompt, params=SamplingParams(max_new_tokens=12)))
    at = next(i for i in range(2, len(reference)) if reference[i] not in reference[:i])
    stop = reference[at]
    assert stop != EOS

    async def test(backend):
        by_stop_token = await collect(backend, BackendRequest("s", PromptInput(prompt), SamplingParams(
            max_new_tokens=12, stop_token_ids=[stop])))
        by_length = await collect(backend, BackendRequest("l", PromptInput(prompt), SamplingParams(
            max_new_tokens=2)))
        return by_stop_token, by_length

    by_stop_token, by_length = serve(server, test)
    assert [o.token_id for o in by_stop_token] == reference[: at + 1]  # stop words stay in the output
    assert by_stop_token[-1].finish_reason == "stop"
    assert [(o.token_id, o.finish_reason) for o in by_length] == [(reference[0], None),
                                                                   (reference[1], "length")]

    async def test_end_id(backend):
        return await collect(backend, BackendRequest("e", PromptInput(prompt), SamplingParams(
            max_new_tokens=12)))

    by_end_id = serve(server, test_end_id, end_id=stop)  # TensorRT-LLM leaves end_id out: a token-less end
    assert [o.token_id for o in by_end_id] == [*reference[:at], None]
    assert by_end_id[-1].finish_reason == "stop" and by_end_id[-1].index == at


def test_seeded_sampling_parameters_reach_the_engine(model, server):
    # 0.75 and 0.875 are exact in FP32, so the server samples with exactly these values
    params = SamplingParams(max_new_tokens=10, temperature=0.75, top_k=20, top_p=0.875, seed=7)

    async def test(backend):
        return await collect(backend, BackendRequest("s", PromptInput(ids(4, 7)), params))

    outputs = serve(server, test)
    tokens, _ = expected_outputs(model, ids(4, 7), params=params)
    greedy, _ = expected_outputs(model, ids(4, 7), params=SamplingParams(max_new_tokens=10))
    assert [o.token_id for o in outputs] == tokens != greedy


async def stops_generating(server, backend, before: dict, *, cancelled: int = 1) -> tuple[dict, dict]:
    """The metrics once the engine is idle with the cancellation counted, and after one more 5-token request:
    that it adds exactly 5 generated tokens shows that the cancelled sequence computes nothing any more."""
    stopped = await metrics_when(server, idle(before, cancelled=cancelled))
    await collect(backend, BackendRequest("after", PromptInput(ids(5, 4)), SamplingParams(
        max_new_tokens=5, ignore_eos=True)))
    after = await metrics_when(server, lambda v: idle(stopped)(v) and generated(v) >= generated(stopped) + 5)
    return stopped, after


def test_stop_request_cancels_the_engine_sequence(server):
    async def test(backend):
        before = await asyncio.to_thread(metrics, server)
        outputs = []
        async for output in backend.generate(BackendRequest("long", PromptInput(LONG), SamplingParams(
                max_new_tokens=200))):
            outputs.append(output)
            if output.index == 3:
                await backend.cancel("long")
        return before, outputs, *await stops_generating(server, backend, before)

    before, outputs, stopped, after = serve(server, test)
    assert outputs[-1].finish_reason == "cancelled" and outputs[-1].token_id is None
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert 4 <= generated(stopped) - generated(before) < 200  # the cancel found the sequence still running
    assert generated(after) == generated(stopped) + 5


def test_abandoning_the_stream_cancels_the_engine_sequence(server):
    async def test(backend):
        before = await asyncio.to_thread(metrics, server)
        stream = backend.generate(BackendRequest("long", PromptInput(LONG), SamplingParams(
            max_new_tokens=200)))
        async for output in stream:
            if output.index == 3:
                break
        await stream.aclose()
        return before, *await stops_generating(server, backend, before)

    before, stopped, after = serve(server, test)
    assert 4 <= generated(stopped) - generated(before) < 200
    assert generated(after) == generated(stopped) + 5


def test_a_passed_deadline_ends_the_call_and_cancels_the_engine_sequence(server):
    async def test(backend):
        before = await asyncio.to_thread(metrics, server)
        outputs = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as deadline:
                async for output in backend.generate(BackendRequest("late", PromptInput(LONG), SamplingParams(
                        max_new_tokens=200))):
                    outputs.append(output)
                    deadline.reschedule(asyncio.get_running_loop().time())  # passes while it generates
        return before, outputs, *await stops_generating(server, backend, before)

    before, outputs, stopped, after = serve(server, test)
    assert len(outputs) == 1 and outputs[0].finish_reason is None
    assert generated(stopped) - generated(before) < 200
    assert generated(after) == generated(stopped) + 5


def tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


async def raw_stream(url: str, inputs: list[grpcclient.InferInput]) -> list:
    """One request built as TensorRT-LLM's own client builds it, straight through tritonclient."""
    client = grpcclient.InferenceServerClient(url)

    async def requests():
        yield {"model_name": MODEL, "inputs": inputs, "request_id": "raw"}

    try:
        responses = client.stream_infer(requests())
        return [(None if r is None else r.as_numpy("output_ids"), e) async for r, e in responses]
    finally:
        await client.close()


def test_bad_requests_fail_with_a_clear_message_and_the_server_keeps_serving(model, server):
    prompt = ids(5, 4)
    lengths = [tensor("input_lengths", np.array([[4]], np.int32)),
               tensor("request_output_len", np.array([[5]], np.int32))]
    too_wide = PromptInput(ids(2, 8), torch.tensor([1, 2]), torch.zeros(2, HIDDEN + 1))
    bad = {
        "long": BackendRequest("long", PromptInput(ids(2, 300)), SamplingParams(max_new_tokens=4)),
        "table": BackendRequest("table", too_wide, SamplingParams(max_new_tokens=4)),
        "vocab": BackendRequest("vocab", PromptInput(torch.tensor([5, VOCAB + 1, 7])), SamplingParams()),
    }

    tokens = [t for t in expected_outputs(model, prompt, params=SamplingParams(max_new_tokens=5))[0]
              if t is not None]  # the ok request's and the non-streaming request's

    async def test(backend):
        before = await asyncio.to_thread(metrics, server)
        missing = await raw_stream(server.grpc_url, lengths)
        input_ids = tensor("input_ids", prompt.to(torch.int32).numpy()[None])
        non_streaming = await raw_stream(server.grpc_url, [input_ids, *lengths])
        errors = {}
        for name, request in bad.items():
            with pytest.raises(VitaError) as error:
                await collect(backend, request)
            errors[name] = error.value
        ok = await collect(backend, BackendRequest("ok", PromptInput(prompt), SamplingParams(
            max_new_tokens=5)))
        after = await metrics_when(server, lambda v: idle(before)(v)
                                   and generated(v) >= generated(before) + 2 * len(tokens))
        return before, missing, non_streaming, errors, ok, after

    before, missing, non_streaming, errors, ok, after = serve(server, test)
    [(result, error)] = missing  # Triton's own check against config.pbtxt
    assert result is None and "missing required input(s) ['input_ids']" in error.message()
    assert type(errors["long"]) is BackendError and "prompt has 300 tokens" in str(errors["long"])
    assert type(errors["table"]) is BackendError and "hidden size is 64" in str(errors["table"])
    assert type(errors["vocab"]) is InvalidInputError and "prompt_embedding_table" in str(errors["vocab"])
    tokens, finish = expected_outputs(model, prompt, params=SamplingParams(max_new_tokens=5))
    assert [o.token_id for o in ok] == tokens and ok[-1].finish_reason == finish
    [(output_ids, error)] = non_streaming  # streaming false: all tokens in one final response
    assert error is None
    assert output_ids[0, 0].tolist() == [t for t in tokens if t is not None]

    def delta(name, reason=""):
        return after[(name, reason)] - before[(name, reason)]

    # Triton counts the four requests that reached the model as successes: for a decoupled Python model its
    # statistics cover execute(), which succeeds when it hands a request back with an error; and it counts the
    # one it rejected against config.pbtxt nowhere. The model counts its refusals itself.
    assert delta("nv_inference_request_success") == 4
    assert sum(delta("nv_inference_request_failure", r) for r in ("OTHER", "CANCELED", "BACKEND", "REJECTED")) == 0
    assert delta("vita:request_failure", "INVALID_ARGUMENT") == 2 and delta("vita:request_failure", "INTERNAL") == 0


def test_tritons_metrics_count_requests_and_the_models_counters_count_tokens(server):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)  # exactly 6 tokens each

    async def test(backend):
        before = await asyncio.to_thread(metrics, server)
        await asyncio.gather(*(collect(backend, BackendRequest(f"m{i}", PromptInput(ids(i, 3 + i)), params))
                               for i in range(3)))
        after = await metrics_when(server, lambda v: idle(before)(v)
                                   and generated(v) >= generated(before) + 18)
        return before, after

    before, after = serve(server, test)

    def delta(name, reason=""):
        return after[(name, reason)] - before[(name, reason)]

    assert delta("nv_inference_request_success") == 3
    assert delta("nv_inference_count") == 3
    assert delta("nv_inference_request_failure", "BACKEND") == 0
    assert delta("vita:generation_tokens") == 18
    assert delta("vita:prompt_tokens") == 3 + 4 + 5
    assert delta("vita:engine_decode_tokens") == 15  # each sequence's first token comes from its prefill
    assert after[("nv_inference_pending_request_count", "")] == 0


def test_an_unreachable_server_is_a_backend_error():
    async def main():
        backend = TritonBackend("127.0.0.1:1", vocab_size=VOCAB, end_id=EOS)
        await backend.start()
        try:
            with pytest.raises(BackendError, match=r"127\.0\.0\.1:1"):
                await collect(backend, BackendRequest("r", PromptInput(ids(0, 4)), SamplingParams()))
        finally:
            await backend.close()

    asyncio.run(main())
