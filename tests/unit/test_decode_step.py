"""The sync-free decode step a CUDA graph captures (issue 12): same values as `forward`, no host sync, and the
decoder that replays it gives `generate`'s greedy tokens. CI has no GPU: on CPU the decoder runs the step eagerly,
and a fullgraph trace stands in for the capture (a host sync is a graph break there, as it is an error in a
CUDA-graph capture)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import Unsupported, UserError

from vita.model.config import LLMConfig
from vita.model.cuda_graph import CUDAGraphDecoder
from vita.model.llm import MoECausalLM

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def tiny_model(seed: int = 0) -> MoECausalLM:
    torch.manual_seed(seed)
    return MoECausalLM(LLMConfig(**SHAPE)).eval()


def prefilled(model: MoECausalLM, lengths: list[int], rows: list[int] | None = None, max_seq_len: int = 32):
    """A cache whose row rows[b] (default b) holds prompt b, of lengths[b] tokens (the same prompts whatever the
    rows); returns it and the tokens that follow the prompts."""
    cache = model.new_cache(len(lengths), max_seq_len)
    gen = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths):
        ids = torch.randint(0, 128, (1, n), generator=gen)
        row = b if rows is None else rows[b]
        model(ids, cache=cache, slots=torch.tensor([row]), positions=torch.arange(n)[None])
    return cache, torch.randint(0, 128, (len(lengths),), generator=gen)


@torch.inference_mode()
@pytest.mark.parametrize("slots", [None, [2, 0, 1]])
def test_decode_step_gives_forwards_logits_for_ragged_rows(slots):
    model = tiny_model()
    lengths = [5, 9, 3]
    positions = torch.tensor(lengths)  # each row's next position
    # The same prompts in two caches: one decoded by forward, one by decode_step (over the whole row, kv_len 32).
    reference, tokens = prefilled(model, lengths)
    cache, _ = prefilled(model, lengths, rows=slots)
    expected = model(tokens[:, None], cache=reference, positions=positions[:, None]).logits[:, -1]
    got = model.decode_step(tokens, positions, cache, kv_len=32,
                            slots=None if slots is None else torch.tensor(slots))
    assert (got - expected).abs().max() < 1e-5
    # and it wrote the new keys where forward did
    for b, row in enumerate(range(3) if slots is None else slots):
        assert torch.allclose(cache.k[:, row, lengths[b]], reference.k[:, b, lengths[b]], atol=1e-5)


def test_decode_step_traces_without_a_graph_break_and_forward_does_not():
    """A host sync (`.tolist()`, `int(tensor)`) cannot be captured in a CUDA graph; dynamo's fullgraph mode refuses
    the same thing on CPU. `forward` validates its positions and slots on the host, so it breaks: the check can
    fail. bf16, the GPU path's dtype: the traced experts take `grouped_mm`, whose kernels are bf16 only."""
    model = tiny_model().to(torch.bfloat16)
    positions = torch.tensor([4, 6])
    cache, tokens = prefilled(model, [4, 6])
    with torch.inference_mode():
        eager = model.decode_step(tokens, positions, cache, kv_len=32).float()
    cache, _ = prefilled(model, [4, 6])
    torch._dynamo.reset()
    traced = torch.compile(model.decode_step, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        got = traced(tokens, positions, cache, 32).float()
    assert (got - eager).abs().max() < 0.05 * eager.abs().max()  # bf16: the dispatches sum in other orders

    def with_checks(ids, pos):
        return model(ids[:, None], cache=cache, positions=pos[:, None]).logits

    torch._dynamo.reset()
    with pytest.raises((Unsupported, UserError), match=r"data-dependent|[Gg]raph break"), torch.inference_mode():
        torch.compile(with_checks, backend="eager", fullgraph=True, dynamic=False)(tokens, positions)
    torch._dynamo.reset()


@torch.inference_mode()
def test_the_graph_decoder_gives_generates_greedy_tokens():
    model = tiny_model(seed=3)
    prompts = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    new = 12
    expected = model.generate(prompts, max_new_tokens=new, ignore_eos=True)[:, 7:]
    cache = model.new_cache(2, 7 + new - 1)
    logits = model(prompts, cache=cache, positions=torch.arange(7).expand(2, 7)).logits[:, -1]
    decoder = CUDAGraphDecoder(model, cache, batch_size=2)
    assert decoder.graph is None  # CPU: nothing captured, the step runs eagerly
    tokens = [logits.argmax(-1)]
    for step in range(new - 1):
        tokens.append(decoder(tokens[-1], torch.full((2,), 7 + step)).argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), expected)


def test_the_graph_decoder_refuses_more_rows_than_the_cache_has():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 2\]"):
        CUDAGraphDecoder(model, model.new_cache(2, 8), batch_size=3)


@torch.no_grad()
def test_in_place_grouped_dispatch_with_an_expert_nobody_chose():
    """The group ends come from an index_add (no sync); an expert with no pairs must give an empty group."""
    moe = tiny_model().model.layers[0].block_sparse_moe
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7))
    weights, _ = moe.route(x)
    experts = torch.tensor([[0, 1], [1, 3], [0, 3], [3, 1], [0, 1]])  # expert 2 unused
    assert (moe.grouped_mm(x, weights, experts) - moe.grouped(x, weights, experts)).abs().max() < 1e-5
