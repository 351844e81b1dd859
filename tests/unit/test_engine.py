"""Continuous batching: every sequence gets exactly what it would get alone, whenever it joins the batch."""

import pytest
import torch

from vita.errors import ContextLengthError, InvalidInputError
from vita.llm.backends.torch.engine import EngineRequest, LLMEngine
from vita.model.config import LLMConfig
from vita.model.generation import SamplingParams, stream_generate
from vita.model.llm import MoECausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LLMConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return MoECausalLM(config).eval()


def prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed))


def run(engine: LLMEngine, arrivals: dict[int, list[EngineRequest]]) -> dict[str, list[int]]:
    """Step the engine, adding requests at the given step numbers; returns each request's tokens."""
    tokens: dict[str, list[int]] = {}
    step = 0
    while step in arrivals or engine.has_work() or any(k > step for k in arrivals):
        for request in arrivals.get(step, []):
            engine.add(request)
        for out in engine.step():
            if out.token_id is not None:
                tokens.setdefault(out.request_id, []).append(out.token_id)
        step += 1
    return tokens


def alone(model, ids, params) -> list[int]:
    return list(stream_generate(model, ids, params=params))


def test_staggered_arrivals_match_running_alone(model):
    engine = LLMEngine(model, max_batch_size=4, max_seq_len=128)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=())
    reqs = {f"r{i}": EngineRequest(f"r{i}", params, input_ids=prompt(i, 5 + 7 * i)) for i in range(6)}
    # Six sequences through four slots: two wait for a slot, others join mid-generation.
    arrivals = {0: [reqs["r0"], reqs["r1"]], 3: [reqs["r2"]], 4: [reqs["r3"], reqs["r4"], reqs["r5"]]}
    got = run(engine, arrivals)
    for rid, req in reqs.items():
        assert got[rid] == alone(model, req.input_ids, params), rid
    assert sorted(engine.free_slots) == [0, 1, 2, 3] and not engine.running


def test_embeddings_prompt_equals_ids_prompt(model):
    ids = prompt(7, 9)
    embeds = model.get_input_embeddings()(ids).detach()
    params = SamplingParams(max_new_tokens=6)
    got = run(LLMEngine(model, max_batch_size=2), {0: [EngineRequest("e", params, inputs_embeds=embeds),
                                                       EngineRequest("i", params, input_ids=ids)]})
    assert got["e"] == got["i"] == alone(model, ids, params)


def test_seeded_sampling_is_per_request(model):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    ids = prompt(3, 6)
    batch = run(LLMEngine(model, max_batch_size=3), {0: [
        EngineRequest("a", params, input_ids=ids),
        EngineRequest("g", SamplingParams(max_new_tokens=8), input_ids=prompt(4, 11)),
    ]})
    solo = run(LLMEngine(model, max_batch_size=3), {0: [EngineRequest("a", params, input_ids=ids)]})
    assert batch["a"] == solo["a"]


def test_cancellation_stops_compute_and_frees_the_slot(model):
    engine = LLMEngine(model, max_batch_size=2)
    long = SamplingParams(max_new_tokens=200)
    engine.add(EngineRequest("long", long, input_ids=prompt(1, 8)))
    engine.add(EngineRequest("other", long, input_ids=prompt(2, 8)))
    for _ in range(5):
        engine.step()
    computed = engine.stats.tokens_by_request["long"]
    engine.cancel("long")
    outs = engine.step()
    assert any(o.request_id == "long" and o.finish_reason == "cancelled" for o in outs)
    assert not any(o.request_id == "long" and o.token_id is not None for o in outs)
    for _ in range(3):
        engine.step()
    assert engine.stats.tokens_by_request["long"] == computed  # no forward ran for it after the cancel
    assert engine.stats.tokens_by_request["other"] > computed
    assert "long" not in engine.running and len(engine.free_slots) == 1
    # The freed slot is reused by the next request straight away.
    engine.add(EngineRequest("next", SamplingParams(max_new_tokens=2), input_ids=prompt(3, 4)))
    assert any(o.request_id == "next" for o in engine.step())


def test_short_request_does_not_wait_behind_long_generation(model):
    engine = LLMEngine(model, max_batch_size=2)
    engine.add(EngineRequest("answer", SamplingParams(max_new_tokens=150), input_ids=prompt(5, 20)))
    for _ in range(10):
        engine.step()
    engine.add(EngineRequest("judge", SamplingParams(max_new_tokens=2), input_ids=prompt(6, 30)))
    finished_at = None
    for step in range(1, 5):
        if any(o.request_id == "judge" and o.finish_reason for o in engine.step()):
            finished_at = step
            break
    assert finished_at == 1  # prefill + one decode in the very next step, while "answer" keeps going
    assert "answer" in engine.running


def test_bad_requests(model):
    engine = LLMEngine(model, max_batch_size=1, max_seq_len=16)
    with pytest.raises(ContextLengthError, match="context is 16"):
        engine.add(EngineRequest("x", SamplingParams(), input_ids=prompt(1, 16)))
    with pytest.raises(InvalidInputError, match="empty"):
        engine.add(EngineRequest("x", SamplingParams(), input_ids=torch.zeros(0, dtype=torch.long)))
    engine.add(EngineRequest("x", SamplingParams(max_new_tokens=100), input_ids=prompt(1, 10)))
    with pytest.raises(InvalidInputError, match="already"):
        engine.add(EngineRequest("x", SamplingParams(), input_ids=prompt(1, 3)))
    # The context bound ends a sequence with "length" rather than failing it.
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finish_reason == "length" and len(outs) == 16 - 10 + 1  # the last token is never fed back
