"""TritonBackend against the torch-backed Triton-protocol server, over real gRPC on 127.0.0.1.

The server is a test double for Triton + TensorRT-LLM (see torch_server.py); the backend reaches it only
through tritonclient, so what passes here is what tritonclient puts on the wire.
"""

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from vita.errors import InvalidInputError, VitaError
from vita.llm.backends.base import BackendRequest, PromptInput
from vita.llm.backends.triton.backend import BackendError, TritonBackend
from vita.llm.backends.triton.torch_server import TritonTorchServer
from vita.model.config import LLMConfig
from vita.model.generation import SamplingParams, stream_generate
from vita.model.llm import MoECausalLM

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
VOCAB, HIDDEN, EOS = 96, 64, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return MoECausalLM(LLMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256)).eval()


def ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


LONG = ids(2, 9)  # this model answers it without eos until the context is full: a generation to cancel


def serve(model, test, *, end_id: int = EOS):
    """Runs `test(server, backend, url)` against a fresh server and a started backend."""
    async def main():
        server = TritonTorchServer(model, REPOSITORY)
        url = f"127.0.0.1:{await server.start()}"
        backend = TritonBackend(url, vocab_size=VOCAB, end_id=end_id)
        await backend.start()
        try:
            return await test(server, backend, url)
        finally:
            await backend.close()
            await server.stop()

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


async def stopped_sequence(engine, request_id: str) -> int:
    """Tokens computed for `request_id` once its sequence has left the engine and more steps could run."""
    for _ in range(200):
        if request_id not in engine.running:
            break
        await asyncio.sleep(0.01)
    computed = engine.stats.tokens_by_request[request_id]
    await asyncio.sleep(0.1)
    assert request_id not in engine.running
    return computed


def test_server_answers_tritonclient_health_metadata_and_config(model):
    async def test(server, backend, url):
        client = grpcclient.InferenceServerClient(url)
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("tensorrt_llm")
            assert not await client.is_model_ready("ensemble")
            config = (await client.get_model_config("tensorrt_llm")).config
            metadata = await client.get_model_metadata("tensorrt_llm")
            with pytest.raises(InferenceServerException, match="unknown model"):
                await client.get_model_config("ensemble")
            with pytest.raises(InferenceServerException) as unimplemented:
                await client.get_model_repository_index()
            return config, metadata, unimplemented.value.status()
        finally:
            await client.close()

    config, metadata, unimplemented = serve(model, test)
    text = (REPOSITORY / "tensorrt_llm" / "config.pbtxt").read_text()
    assert config == text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == "tensorrtllm" and config.model_transaction_policy.decoupled
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs["input_ids"] == ("INT32", [-1, -1])
    assert inputs["prompt_embedding_table"] == ("FP16", [-1, -1, -1])
    assert unimplemented == "StatusCode.UNIMPLEMENTED"


def test_concurrent_greedy_requests_with_and_without_slots_match_stream_generate(model):
    params = SamplingParams(max_new_tokens=12)
    slots = torch.tensor([2, 3, 4])
    table = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(9))
    requests = [BackendRequest(f"r{i}", PromptInput(ids(i, 5 + 2 * i)), params) for i in range(3)]
    requests.append(BackendRequest("mm", PromptInput(ids(7, 9), slots, table), params))

    async def test(server, backend, url):
        return await asyncio.gather(*(collect(backend, r) for r in requests))

    results = serve(model, test)
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


def test_stop_tokens_end_id_and_length_end_as_tensorrt_llm_reports_them(model):
    prompt = ids(3, 6)
    reference = list(stream_generate(model, prompt, params=SamplingParams(max_new_tokens=12)))
    at = next(i for i in range(2, len(reference)) if reference[i] not in reference[:i])
    stop = reference[at]
    assert stop != EOS

    async def test(server, backend, url):
        by_stop_token = await collect(backend, BackendRequest("s", PromptInput(prompt), SamplingParams(
            max_new_tokens=12, stop_token_ids=[stop])))
        by_length = await collect(backend, BackendRequest("l", PromptInput(prompt), SamplingParams(
            max_new_tokens=2)))
        return by_stop_token, by_length

    by_stop_token, by_length = serve(model, test)
    assert [o.token_id for o in by_stop_token] == reference[: at + 1]  # stop words stay in the output
    assert by_stop_token[-1].finish_reason == "stop"
    assert [(o.token_id, o.finish_reason) for o in by_length] == [(reference[0], None),
                                                                   (reference[1], "length")]

    async def test_end_id(server, backend, url):
        return await collect(backend, BackendRequest("e", PromptInput(prompt), SamplingParams(
            max_new_tokens=12)))

    by_end_id = serve(model, test_end_id, end_id=stop)  # TensorRT-LLM leaves end_id out: a token-less end
    assert [o.token_id for o in by_end_id] == [*reference[:at], None]
    assert by_end_id[-1].finish_reason == "stop" and by_end_id[-1].index == at


def test_seeded_sampling_parameters_reach_the_engine(model):
    # 0.75 and 0.875 are exact in FP32, so the server samples with exactly these values
    params = SamplingParams(max_new_tokens=10, temperature=0.75, top_k=20, top_p=0.875, seed=7)

    async def test(server, backend, url):
        return await collect(backend, BackendRequest("s", PromptInput(ids(4, 7)), params))

    outputs = serve(model, test)
    tokens, _ = expected_outputs(model, ids(4, 7), params=params)
    greedy, _ = expected_outputs(model, ids(4, 7), params=SamplingParams(max_new_tokens=10))
    assert [o.token_id for o in outputs] == tokens != greedy


def test_stop_request_cancels_the_engine_sequence(model):
    async def test(server, backend, url):
        outputs = []
        async for output in backend.generate(BackendRequest("long", PromptInput(LONG), SamplingParams(
                max_new_tokens=200))):
            outputs.append(output)
            if output.index == 3:
                await backend.cancel("long")
        return outputs, await stopped_sequence(server.engine, "long"), server.engine

    outputs, computed, engine = serve(model, test)
    assert outputs[-1].finish_reason == "cancelled" and outputs[-1].token_id is None
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert engine.stats.cancelled == 1  # the cancel found the sequence still running
    assert engine.stats.tokens_by_request["long"] == computed < 200
    assert len(engine.free_slots) == engine.max_batch_size


def test_abandoning_the_stream_cancels_the_engine_sequence(model):
    async def test(server, backend, url):
        stream = backend.generate(BackendRequest("long", PromptInput(LONG), SamplingParams(
            max_new_tokens=200)))
        async for output in stream:
            if output.index == 3:
                break
        await stream.aclose()
        return await stopped_sequence(server.engine, "long"), server.engine

    computed, engine = serve(model, test)
    assert engine.stats.cancelled == 1
    assert engine.stats.tokens_by_request["long"] == computed < 200
    assert len(engine.free_slots) == engine.max_batch_size


def tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


async def raw_stream(url: str, inputs: list[grpcclient.InferInput]) -> list:
    """One request built as TensorRT-LLM's own client builds it, straight through tritonclient."""
    client = grpcclient.InferenceServerClient(url)

    async def requests():
        yield {"model_name": "tensorrt_llm", "inputs": inputs, "request_id": "raw"}

    try:
        responses = client.stream_infer(requests())
        return [(None if r is None else r.as_numpy("output_ids"), e) async for r, e in responses]
    finally:
        await client.close()


def test_bad_requests_fail_with_the_servers_message_and_the_server_keeps_serving(model):
    prompt = ids(5, 4)
    lengths = [tensor("input_lengths", np.array([[4]], np.int32)),
               tensor("request_output_len", np.array([[5]], np.int32))]
    too_wide = PromptInput(ids(2, 8), torch.tensor([1, 2]), torch.zeros(2, HIDDEN + 1))
    bad = {
        "long": BackendRequest("long", PromptInput(ids(2, 300)), SamplingParams(max_new_tokens=4)),
        "table": BackendRequest("table", too_wide, SamplingParams(max_new_tokens=4)),
        "vocab": BackendRequest("vocab", PromptInput(torch.tensor([5, VOCAB + 1, 7])), SamplingParams()),
    }

    async def test(server, backend, url):
        missing = await raw_stream(url, lengths)
        input_ids = tensor("input_ids", prompt.to(torch.int32).numpy()[None])
        non_streaming = await raw_stream(url, [input_ids, *lengths])
        errors = {}
        for name, request in bad.items():
            with pytest.raises(VitaError) as error:
                await collect(backend, request)
            errors[name] = error.value
        ok = await collect(backend, BackendRequest("ok", PromptInput(prompt), SamplingParams(
            max_new_tokens=5)))
        return missing, non_streaming, errors, ok

    missing, non_streaming, errors, ok = serve(model, test)
    [(result, error)] = missing
    assert result is None and "missing required input(s) ['input_ids']" in error.message()
    assert type(errors["long"]) is BackendError and "prompt has 300 tokens" in str(errors["long"])
    assert type(errors["table"]) is BackendError and "hidden size is 64" in str(errors["table"])
    assert type(errors["vocab"]) is InvalidInputError and "prompt_embedding_table" in str(errors["vocab"])
    tokens, finish = expected_outputs(model, prompt, params=SamplingParams(max_new_tokens=5))
    assert [o.token_id for o in ok] == tokens and ok[-1].finish_reason == finish
    [(output_ids, error)] = non_streaming  # streaming false: all tokens in one final response; no end_id sent
    assert error is None
    assert output_ids[0, 0].tolist() == list(stream_generate(model, prompt, params=SamplingParams(
        max_new_tokens=5)))


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
