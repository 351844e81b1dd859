"""Continuous batching: every sequence gets exactly what it would get alone, whenever it joins the batch."""

import time

import pytest
import torch

from vita.errors import ContextLengthError, InvalidInputError
from vita.llm.backends.base import PromptInput
from vita.llm.backends.torch.engine import EngineConfig, EngineRequest, LLMEngine
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


def test_the_first_output_says_how_long_a_sequence_waited_for_its_slot(model):
    """TokenOutput.queued_s: from `add` to admission, on a sequence's first output only (Timings.queue_s)."""
    engine = LLMEngine(model, max_batch_size=1)
    params = SamplingParams(max_new_tokens=6, stop_token_ids=())
    for rid in ("first", "second", "dropped"):
        engine.add(EngineRequest(rid, params, input_ids=prompt(len(rid), 8)))
    added = time.perf_counter()
    outputs, first_done = [], None
    while engine.has_work():
        for out in engine.step():
            outputs.append(out)
            if out.request_id == "first" and out.finish_reason:
                first_done = time.perf_counter()
                engine.cancel("dropped")  # still waiting: it ends without a slot
    waited = {o.request_id: o.queued_s for o in outputs if o.queued_s is not None}
    assert sorted(o.request_id for o in outputs if o.queued_s is not None) == ["dropped", "first", "second"]
    assert all(o.queued_s is None for o in outputs if o.index > 0)  # the first output of each only
    # "first" took the one slot at once; the others were admitted (or dropped) only after it had finished.
    assert 0 <= waited["first"] < first_done - added < min(waited["second"], waited["dropped"])


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


# --- chunked prefill ------------------------------------------------------------------------------------------


def chunked(budget: int) -> EngineConfig:
    return EngineConfig(enable_chunked_prefill=True, max_num_batched_tokens=budget)


def test_chunked_prefill_gives_the_tokens_of_whole_prefill(model):
    params = SamplingParams(max_new_tokens=10, stop_token_ids=())
    lengths = [5, 40, 17, 90, 9, 64]
    reqs = lambda: {f"r{i}": EngineRequest(f"r{i}", params, input_ids=prompt(20 + i, n))  # noqa: E731
                    for i, n in enumerate(lengths)}
    arrivals = lambda r: {0: [r["r0"], r["r1"]], 2: [r["r2"], r["r3"]], 5: [r["r4"], r["r5"]]}  # noqa: E731
    whole = LLMEngine(model, max_batch_size=4, max_seq_len=128)
    got_whole = run(whole, arrivals(reqs()))
    engine = LLMEngine(model, max_batch_size=4, max_seq_len=128, config=chunked(8))
    got = run(engine, arrivals(reqs()))
    assert got == got_whole
    for rid, req in reqs().items():
        assert got[rid] == alone(model, req.input_ids, params), rid
    assert engine.stats.max_step_tokens <= 8 < whole.stats.max_step_tokens
    assert engine.stats.prefill_chunks >= sum(-(-n // 7) for n in lengths)  # at most 7 prompt tokens a step
    assert engine.stats.prefill_tokens == whole.stats.prefill_tokens == sum(lengths)
    assert sorted(engine.free_slots) == [0, 1, 2, 3] and not engine.running


def test_chunked_prefill_keeps_running_streams_decoding(model):
    engine = LLMEngine(model, max_batch_size=3, max_seq_len=256, config=chunked(16))
    stream = SamplingParams(max_new_tokens=200, ignore_eos=True)
    engine.add(EngineRequest("a", stream, input_ids=prompt(1, 6)))
    engine.add(EngineRequest("b", stream, input_ids=prompt(2, 6)))
    engine.step()
    engine.add(EngineRequest("long", SamplingParams(max_new_tokens=3), input_ids=prompt(3, 140)))
    steps = 0
    while engine.stats.tokens_by_request.get("long", 0) == 0:
        outs = engine.step()
        steps += 1
        assert {o.request_id for o in outs if o.token_id is not None} >= {"a", "b"}  # never stalled
    # One forward of 16 tokens a step: 2 decode tokens and 14 prompt tokens; the 10th chunk ends the prompt.
    assert steps == 10 and engine.stats.max_step_tokens == 16
    embeds = model.get_input_embeddings()(prompt(3, 140)).detach()
    params = SamplingParams(max_new_tokens=3)
    tokens = run(LLMEngine(model, max_batch_size=1, config=chunked(16)),
                 {0: [EngineRequest("e", params, inputs_embeds=embeds)]})
    assert tokens["e"] == alone(model, prompt(3, 140), params)


def test_budget_must_leave_room_for_a_prompt_chunk(model):
    with pytest.raises(InvalidInputError, match="max_num_batched_tokens"):
        LLMEngine(model, max_batch_size=8, config=chunked(8))


# --- prefix caching -------------------------------------------------------------------------------------------


def conversation_turns(engine: LLMEngine, turns: int, params: SamplingParams) -> list[list[int]]:
    """A growing history: each prompt is the last prompt, its answer and a new user turn (judge/generator shape)."""
    history = prompt(50, 21)
    answers = []
    for turn in range(turns):
        rid = f"t{turn}"
        engine.add(EngineRequest(rid, params, input_ids=history))
        answer = []
        while engine.has_work():
            answer += [o.token_id for o in engine.step() if o.token_id is not None]
        answers.append(answer)
        history = torch.cat((history, torch.tensor(answer), prompt(60 + turn, 11)))
    return answers


def test_prefix_caching_gives_the_same_tokens_and_skips_the_cached_prefix(model):
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(), ignore_eos=True)
    off = LLMEngine(model, max_batch_size=2)
    on = LLMEngine(model, max_batch_size=2, config=EngineConfig(enable_prefix_caching=True, block_size=4))
    assert conversation_turns(on, 6, params) == conversation_turns(off, 6, params)
    stats = on.prefix_cache_stats
    assert stats.hits > 0 and on.stats.prefill_tokens == off.stats.prefill_tokens - stats.hits
    # Each later turn finds its whole history (prompt + the answer fed back) cached up to the last full block.
    assert on.stats.prefill_tokens < off.stats.prefill_tokens / 2


def test_prefix_caching_with_chunked_prefill_and_a_small_pool(model):
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(), ignore_eos=True)
    off = LLMEngine(model, max_batch_size=2)
    config = EngineConfig(enable_prefix_caching=True, block_size=4, num_prefix_blocks=6,
                          enable_chunked_prefill=True, max_num_batched_tokens=7)
    on = LLMEngine(model, max_batch_size=2, config=config)
    assert conversation_turns(on, 5, params) == conversation_turns(off, 5, params)
    assert on.prefix_cache_stats.evicted_blocks > 0 and on.prefix_cache_stats.hits > 0
    assert len(on.prefix_cache) <= 6 and on.stats.max_step_tokens <= 7


def test_shared_system_prompt_is_computed_once(model):
    system = prompt(70, 32)
    params = SamplingParams(max_new_tokens=4)
    engine = LLMEngine(model, max_batch_size=4, config=EngineConfig(enable_prefix_caching=True, block_size=8))
    users = [torch.cat((system, prompt(80 + i, 5 + i))) for i in range(3)]
    got = run(engine, {0: [EngineRequest("first", params, input_ids=users[0])],
                       2: [EngineRequest(f"u{i}", params, input_ids=u) for i, u in enumerate(users[1:])]})
    assert engine.prefix_cache_stats.hits == 2 * 32  # the later two found the system prompt's 4 blocks
    assert got["first"] == alone(model, users[0], params)
    for i, u in enumerate(users[1:]):
        assert got[f"u{i}"] == alone(model, u, params)


def test_prefix_cache_never_shares_blocks_of_different_images(model):
    """Same ids (placeholders) at the same place, different image rows: only the text before the image is shared."""
    ids = torch.cat((prompt(90, 16), torch.full((24,), 2), prompt(91, 8)))
    embed = model.get_input_embeddings()

    def with_image(seed: int) -> torch.Tensor:
        rows = embed(ids).detach().clone()
        rows[16:40] = torch.randn(24, 64, generator=torch.Generator().manual_seed(seed))
        return rows

    params = SamplingParams(max_new_tokens=5, stop_token_ids=(), ignore_eos=True)
    engine = LLMEngine(model, max_batch_size=1, config=EngineConfig(enable_prefix_caching=True, block_size=8))
    got = {}
    for rid, seed in (("cat", 1), ("dog", 2), ("cat-again", 1)):
        rows = with_image(seed)
        got[rid] = run(engine, {0: [EngineRequest(rid, params, inputs_embeds=rows)]})[rid]
        assert got[rid] == list(stream_generate(model, inputs_embeds=rows, params=params)), rid
    stats = engine.prefix_cache_stats
    # "dog" reuses the 2 text blocks before the image, not the cat's image blocks; "cat-again" reuses all 5 full
    # blocks of its 48-token prompt (the last one is recomputed for its logits: 47 // 8 = 5 blocks).
    assert stats.hits == (2 + 5) * 8
    assert got["cat"] == got["cat-again"]


def test_prefix_cache_keys_encoder_rows_by_their_item_digest_and_caches_the_answer_after_them(model):
    """Prompts from the bus carry each encoder row's identity (`PromptInput.slot_identity`: its item's digest and row),
    which the cache hashes instead of the rows: the same blocks are shared as when hashing rows, and a next turn (the
    prompt, the answer fed back, a new user turn) finds the answer's blocks too."""
    ids = torch.cat((prompt(90, 16), torch.full((24,), 2), prompt(91, 8)))
    where = torch.arange(16, 40)

    def image(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randn(24, 64, generator=torch.Generator().manual_seed(seed))
        identity = torch.stack((torch.full((24,), seed), torch.full((24,), -seed), torch.arange(24)), dim=1)
        return rows, identity

    params = SamplingParams(max_new_tokens=12, stop_token_ids=(), ignore_eos=True)
    engine = LLMEngine(model, max_batch_size=1, config=EngineConfig(enable_prefix_caching=True, block_size=8))

    def ask(rid: str, input_ids: torch.Tensor, seed: int) -> list[int]:
        rows, identity = image(seed)
        request = EngineRequest.from_prompt(model, rid, PromptInput(input_ids, where, rows, identity), params)
        assert request.identity.shape == (input_ids.numel(), 4) and LLMEngine._identity(request) is request.identity
        got = run(engine, {0: [request]})[rid]
        assert got == list(stream_generate(model, inputs_embeds=request.inputs_embeds, params=params)), rid
        return got

    cat = ask("cat", ids, 1)
    ask("dog", ids, 2)
    assert engine.prefix_cache_stats.hits == 2 * 8  # the text blocks before the image, not the cat's image blocks
    hits = engine.prefix_cache_stats.hits
    ask("cat, next turn", torch.cat((ids, torch.tensor(cat), prompt(92, 10))), 1)
    # 48 prompt tokens and the 11 answer tokens fed back were in the row: 7 full blocks, the answer's included.
    assert engine.prefix_cache_stats.hits - hits == 7 * 8


# --- CUDA graphs (run eagerly here: the padded, bucketed static step the graphs capture) --------------------------


@pytest.mark.parametrize("config", [
    EngineConfig(cuda_graphs=True, min_graph_kv_len=16, cudagraph_capture_sizes=(3,)),  # every batch padded to 3
    EngineConfig(cuda_graphs=True, min_graph_kv_len=16, enable_chunked_prefill=True, max_num_batched_tokens=12),
    EngineConfig(cuda_graphs=True, min_graph_kv_len=16, enable_prefix_caching=True, block_size=4,
                 cudagraph_capture_sizes=(2, 3)),
], ids=["whole-prefill", "chunked", "prefix-capture-sizes"])
def test_graph_decode_gives_the_eager_engines_tokens(model, config):
    """Staggered arrivals through 3 slots: batches of 1-3 rows padded to the capture sizes, contexts crossing the
    16 -> 32 -> 64 buckets; the same tokens as the eager engine, and the scratch row is never a sequence's."""
    params = SamplingParams(max_new_tokens=14, stop_token_ids=())
    reqs = lambda: {f"r{i}": EngineRequest(f"r{i}", params, input_ids=prompt(70 + i, 3 + 9 * i))  # noqa: E731
                    for i in range(5)}
    arrivals = lambda r: {0: [r["r0"], r["r1"]], 4: [r["r2"]], 6: [r["r3"], r["r4"]]}  # noqa: E731
    eager = LLMEngine(model, max_batch_size=3, max_seq_len=96)
    graphed = LLMEngine(model, max_batch_size=3, max_seq_len=96, config=config)
    assert not eager.cuda_graphs and graphed.cuda_graphs  # CPU: off unless asked for
    assert graphed.cache.max_batch_size == 4 and graphed.max_batch_size == 3  # one scratch row
    assert run(graphed, arrivals(reqs())) == run(eager, arrivals(reqs()))
    sizes = {size for size, _ in graphed._graphs}
    assert {kv for _, kv in graphed._graphs} >= {16, 32, 64}
    assert sizes == set(config.cudagraph_capture_sizes or (1, 2, 3))
    assert sorted(graphed.free_slots) == [0, 1, 2]


def test_graph_capture_sizes_default_to_vllms_list(model):
    engine = LLMEngine(model, max_batch_size=20, max_seq_len=32, config=EngineConfig(cuda_graphs=True))
    assert engine._graph_sizes == (1, 2, 4, 8, 16, 20)
