"""The async torch backend: streams from the engine thread; abandoning the stream cancels the compute."""

import asyncio

import pytest
import torch
from conftest import abandon_at

from vita.llm.backends.base import BackendRequest, PromptInput
from vita.llm.backends.torch.backend import TorchBackend
from vita.model.config import LLMConfig
from vita.model.generation import SamplingParams, stream_generate
from vita.model.llm import MoECausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return MoECausalLM(LLMConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()


def ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed))


async def collect(backend, request):
    return [o async for o in backend.generate(request)]


def test_concurrent_streams_with_slot_embeddings(model):
    async def main():
        backend = TorchBackend(model, max_batch_size=4)
        await backend.start()
        try:
            params = SamplingParams(max_new_tokens=10)
            slots = torch.tensor([2, 3, 4])
            table = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
            requests = [BackendRequest(f"r{i}", PromptInput(ids(i, 6 + i)), params) for i in range(3)]
            requests.append(BackendRequest("mm", PromptInput(ids(7, 8), slots, table), params))
            return await asyncio.gather(*(collect(backend, r) for r in requests))
        finally:
            await backend.close()

    results = asyncio.run(main())
    for i, outs in enumerate(results[:3]):
        assert [o.token_id for o in outs] == list(stream_generate(model, ids(i, 6 + i), params=SamplingParams(
            max_new_tokens=10)))
        assert outs[-1].finish_reason in ("stop", "length")
    embeds = model.get_input_embeddings()(ids(7, 8)).detach().clone()
    embeds[torch.tensor([2, 3, 4])] = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    expected = list(stream_generate(model, inputs_embeds=embeds, params=SamplingParams(max_new_tokens=10)))
    assert [o.token_id for o in results[3]] == expected


def test_abandoning_the_stream_cancels_the_sequence(model):
    async def main():
        backend = TorchBackend(model, max_batch_size=2)
        await backend.start()
        try:
            # This prompt runs to the full context on this model: it cannot end by itself before the cancel.
            await abandon_at(backend.generate(BackendRequest("long", PromptInput(ids(2, 9)), SamplingParams(
                max_new_tokens=200))), 3)
            for _ in range(100):  # the engine thread applies the cancel at its next step
                if "long" not in backend.engine.running:
                    break
                await asyncio.sleep(0.01)
            computed = backend.engine.stats.tokens_by_request["long"]
            await asyncio.sleep(0.1)
            return backend.engine, computed
        finally:
            await backend.close()

    engine, computed = asyncio.run(main())
    assert "long" not in engine.running and len(engine.free_slots) == 2
    assert engine.stats.cancelled == 1
    assert engine.stats.tokens_by_request["long"] == computed < 200
