"""The MoE decoder against transformers' Mixtral, the KV cache against the cache-free forward, routing, sampling."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import load_benchmark
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

from vita.errors import CheckpointError, ContextLengthError, InvalidInputError
from vita.model.config import LLMConfig
from vita.model.generation import SamplingParams, sample_next_token, stream_generate
from vita.model.hf_names import llm_state_dict_from_hf, llm_state_dict_to_hf
from vita.model.llm import CacheBatch, MoECausalLM, select_experts

HF_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)


def hf_mixtral(rope_theta: float = 1e6, seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**HF_SHAPE, rope_theta=rope_theta)).eval()


def tiny_model(seed: int = 0, **overrides) -> MoECausalLM:
    torch.manual_seed(seed)
    config = LLMConfig(**{**HF_SHAPE, "max_position_embeddings": 64, **overrides})
    return MoECausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_model() -> MixtralForCausalLM:
    return hf_mixtral()


@pytest.fixture(scope="module")
def prompts() -> torch.Tensor:
    return torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))


# --- parity with transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [None, "20KB"])
def test_logits_match_transformers(hf_model, prompts, tmp_path, shard_size):
    if shard_size is None:
        hf_model.save_pretrained(tmp_path)
    else:
        hf_model.save_pretrained(tmp_path, max_shard_size=shard_size)
        assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    ours = MoECausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = hf_model(prompts).logits
    assert (ours(prompts).logits - expected).abs().max() < 1e-4


def test_greedy_generation_matches_transformers(hf_model, prompts, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = MoECausalLM.from_pretrained(tmp_path)
    expected = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False)
    got = ours.generate(prompts, max_new_tokens=32)
    assert got.shape == expected.shape == (2, prompts.shape[1] + 32)
    assert torch.equal(got, expected)


def test_batch_1_greedy_generation_matches_transformers(hf_model, prompts, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = MoECausalLM.from_pretrained(tmp_path)  # one row decodes through the single-token expert path
    prompt = prompts[:1]
    expected = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_new_tokens=32), expected)


def test_expert_weights_stay_input_major_through_loading_and_casting(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = MoECausalLM.from_pretrained(tmp_path)
    contiguous = {k: v.contiguous() for k, v in model.state_dict().items()}  # the (E, out, in) layout of a plain save
    model.load_state_dict(contiguous, assign=True)
    model = model.to(torch.bfloat16)
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        assert moe.w1.shape == (4, 96, 64) and moe.w2.shape == (4, 64, 96)
        assert all(w.mT.is_contiguous() for w in (moe.w1, moe.w2, moe.w3))
    assert all(torch.equal(v, contiguous[k].to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_hub_layout_has_per_expert_names_and_transformers_reads_our_save(hf_model, prompts, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys  # the published Mixtral layout
    MoECausalLM.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == keys
    reloaded = MixtralForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(prompts).logits, hf_model(prompts).logits)


def test_loads_the_fused_expert_layout_transformers5_can_write(hf_model, prompts, tmp_path):
    hf_model.save_pretrained(tmp_path, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        expected = hf_model(prompts).logits
    assert (MoECausalLM.from_pretrained(tmp_path)(prompts).logits - expected).abs().max() < 1e-4


def test_rope_theta_is_read_from_a_transformers5_config(prompts, tmp_path):
    hf = hf_mixtral(rope_theta=1e4)
    hf.save_pretrained(tmp_path)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())  # nested in rope_parameters
    ours = MoECausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 1e4
    with torch.no_grad():
        assert (ours(prompts).logits - hf(prompts).logits).abs().max() < 1e-4


def test_checkpoint_problems_are_checkpoint_errors(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.0\.block_sparse_moe\.w3: experts \[1\] are missing"):
        MoECausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        MoECausalLM.from_pretrained(tmp_path)


def test_state_dict_mapping_round_trips_and_passes_other_keys_through():
    sd = tiny_model().state_dict()
    sd["vision_tower.proj.weight"] = torch.ones(2)
    hf = llm_state_dict_to_hf(sd)
    assert "model.layers.0.block_sparse_moe.w1" not in hf
    assert torch.equal(hf["model.layers.0.block_sparse_moe.experts.2.w2.weight"], sd["model.layers.0.block_sparse_moe.w2"][2])
    assert torch.equal(hf["vision_tower.proj.weight"], sd["vision_tower.proj.weight"])
    back = llm_state_dict_from_hf(hf)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# --- KV cache ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def test_incremental_decode_matches_full_forward():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    cache = model.new_cache(1, 12)
    steps = [model(ids[:, :5], cache=cache, positions=torch.arange(5)[None]).logits]
    for pos in range(5, 12):
        steps.append(model(ids[:, pos : pos + 1], cache=cache, positions=torch.tensor([[pos]])).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


@torch.inference_mode()
def test_right_padded_prefill_then_ragged_batched_decode_matches_each_row_alone():
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 9, 6]
    rows = [torch.randint(0, 128, (n + 1,), generator=gen) for n in lengths]  # prompt + one decoded token
    padded = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        padded[i, :n] = row[:n]
    cache = model.new_cache(4, 16)
    slots = torch.tensor([3, 0, 2])  # not contiguous: reads go through the gather path
    prefill = model(padded, cache=cache, slots=slots, positions=torch.arange(max(lengths)).expand(3, -1)).logits
    decode = model(torch.stack([r[-1:] for r in rows]), cache=cache, slots=slots,
                   positions=torch.tensor(lengths)[:, None]).logits
    for i, (row, n) in enumerate(zip(rows, lengths)):
        alone = model(row[None]).logits[0]
        assert (prefill[i, :n] - alone[:n]).abs().max() < 1e-5
        assert (decode[i, 0] - alone[n]).abs().max() < 1e-5


@torch.inference_mode()
def test_fused_forward_of_decode_rows_and_prompt_chunks_matches_each_row_alone():
    """`forward_batches`: attention per batch, experts over all tokens at once; the same logits and cache writes."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 128, (n,), generator=gen) for n in (7, 5, 20)]
    cache = model.new_cache(3, 32)
    for slot, row in enumerate(rows[:2]):  # two sequences decoding: their prompts but the last token are cached
        model(row[None, :-1], cache=cache, slots=torch.tensor([slot]), positions=torch.arange(row.numel() - 1)[None])
    model(rows[2][None, :8], cache=cache, slots=torch.tensor([2]), positions=torch.arange(8)[None])  # a chunk done
    decode = CacheBatch(torch.tensor([[6], [4]]), torch.tensor([0, 1]), torch.stack([rows[0][-1:], rows[1][-1:]]))
    chunk = CacheBatch(torch.arange(8, 20)[None], torch.tensor([2]), inputs_embeds=model.get_input_embeddings()(
        rows[2][None, 8:]))
    decoded, chunked = model.forward_batches([decode, chunk], cache, logits_to_keep=1)
    assert decoded.shape == (2, 1, 128) and chunked.shape == (1, 1, 128)
    for i, row in enumerate(rows[:2]):
        assert (decoded[i, 0] - model(row[None]).logits[0, -1]).abs().max() < 1e-5
    assert (chunked[0, 0] - model(rows[2][None]).logits[0, -1]).abs().max() < 1e-5
    # The chunk's keys are in slot 2: one more token decodes as it would after a whole prefill.
    nxt = torch.tensor([[5]])
    after = model(nxt, cache=cache, slots=torch.tensor([2]), positions=torch.tensor([[20]])).logits[0, -1]
    assert (after - model(torch.cat((rows[2], nxt[0]))[None]).logits[0, -1]).abs().max() < 1e-5


@torch.inference_mode()
def test_inputs_embeds_path_equals_input_ids_path():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=embeds).logits, model(ids).logits)
    positions = torch.arange(7).expand(2, -1)
    a = model(ids, cache=model.new_cache(2, 8), positions=positions).logits
    b = model(inputs_embeds=embeds, cache=model.new_cache(2, 8), positions=positions).logits
    assert torch.equal(a, b)
    params = SamplingParams(max_new_tokens=5)
    assert list(stream_generate(model, ids[0], params=params)) == list(stream_generate(model, inputs_embeds=embeds[0], params=params))


def test_context_overflow_raises_context_length_error():
    model = tiny_model()  # max_position_embeddings 64
    with pytest.raises(ContextLengthError, match="position 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_cache(1, 8)
    with pytest.raises(ContextLengthError, match="KV cache 8"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache, positions=torch.tensor([[8]]))
    with pytest.raises(ContextLengthError, match="65 tokens"):
        next(stream_generate(model, torch.zeros(65, dtype=torch.long), params=SamplingParams()))
    # generation stops when the context is full: the last token is sampled at position 63, never fed back
    assert model.generate(torch.zeros(1, 62, dtype=torch.long), max_new_tokens=10, ignore_eos=True).shape == (1, 65)


def test_bad_forward_inputs_raise_invalid_input_error():
    model = tiny_model()
    cache = model.new_cache(2, 8)
    with pytest.raises(InvalidInputError, match="token ids must be in"):
        model(torch.tensor([[128]]))
    with pytest.raises(InvalidInputError, match=r"positions \(batch, seq\) are required"):
        model(torch.tensor([[1]]), cache=cache)
    with pytest.raises(InvalidInputError, match=r"slots must be distinct and in \[0, 2\), got \[2\]"):
        model(torch.tensor([[1]]), cache=cache, slots=torch.tensor([2]), positions=torch.tensor([[0]]))
    with pytest.raises(InvalidInputError, match=r"got \[1, 1\]"):
        model(torch.tensor([[1], [2]]), cache=cache, slots=torch.tensor([1, 1]), positions=torch.tensor([[0], [0]]))


@torch.inference_mode()
def test_bfloat16_runs_close_to_float32():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))
    reference = model(ids).logits
    model = model.to(torch.bfloat16)
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()
    assert model.generate(ids, max_new_tokens=4).shape == (1, 13)


# --- MoE dispatch ------------------------------------------------------------------------------------------


@torch.no_grad()
def test_gather_and_grouped_dispatch_agree_with_a_naive_reference():
    moe = tiny_model().model.layers[0].block_sparse_moe
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(6))
    weights, experts = moe.route(x)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):  # the Mixtral definition, one token at a time
        probs = F.softmax(moe.gate.weight @ x[t], dim=-1)
        top = probs.topk(2)
        for p, e in zip(top.values / top.values.sum(), top.indices):
            expected[t] += p * (F.silu(moe.w1[e] @ x[t]) * (moe.w3[e] @ x[t])) @ moe.w2[e].T
    assert torch.allclose(weights.sum(-1), torch.ones(7))
    assert (moe.grouped(x, weights, experts) - expected).abs().max() < 1e-5
    assert (moe.grouped_mm(x, weights, experts) - expected).abs().max() < 1e-5
    assert (moe.gathered(x, weights, experts) - expected).abs().max() < 1e-5
    assert (moe(x) - expected).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("top_k", [2, 3])
def test_single_token_dispatch_agrees_with_the_grouped_one(top_k):
    moe = tiny_model(num_experts_per_tok=top_k).model.layers[0].block_sparse_moe
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(10))
    weights, experts = moe.route(x)
    grouped = moe.grouped(x, weights, experts)
    if top_k == 3:  # unevenly spaced choices, such as [0, 1, 3], take select_experts' copying branch
        assert any(set(row) in ({0, 1, 3}, {0, 2, 3}) for row in experts.tolist())
    for t in range(x.shape[0]):
        single = moe.single(x[t : t + 1], weights[t : t + 1], experts[t : t + 1])
        assert (single - grouped[t]).abs().max() < 1e-5


def test_select_experts_is_a_view_for_evenly_spaced_ids_and_a_copy_otherwise():
    w = torch.arange(5 * 6.0).view(5, 2, 3)
    for ids in ([1], [0, 3], [0, 2, 4]):
        picked = select_experts(w, ids)
        assert torch.equal(picked, w[ids])
        assert picked.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()  # shares w's memory
    uneven = select_experts(w, [0, 1, 3])
    assert torch.equal(uneven, w[[0, 1, 3]])
    assert uneven.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()


def test_grouped_dispatch_is_differentiable():
    moe = tiny_model().model.layers[0].block_sparse_moe
    moe(torch.randn(5, 64, generator=torch.Generator().manual_seed(9))).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (moe.gate.weight, moe.w1, moe.w2, moe.w3))


def test_training_on_cpu_takes_the_unpadded_dispatch_with_the_padded_ones_gradients(monkeypatch):
    moe = tiny_model().model.layers[0].block_sparse_moe
    gen = torch.Generator().manual_seed(11)
    u = F.normalize(torch.randn(64, generator=gen), dim=0)
    x = torch.randn(40, 64, generator=gen) + 4 * u  # every token shares a direction the router reads
    with torch.no_grad():  # one expert routed far more than the rest, as trained routers are; one gets nothing
        moe.gate.weight[0] += 2 * u
        moe.gate.weight[1] -= 4 * u
    loads = torch.bincount(moe.route(x)[1].flatten(), minlength=moe.num_experts)
    assert loads.max() >= 1.5 * loads.float().mean() and loads.min() == 0
    grads = {}
    for path in ("grouped", "grouped_mm"):
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        weights, experts = moe.route(xx)
        out = getattr(moe, path)(xx, weights, experts)
        out.square().sum().backward()
        grads[path] = [out.detach(), xx.grad] + [p.grad.clone() for p in (moe.gate.weight, moe.w1, moe.w2, moe.w3)]
    for padded, unpadded in zip(grads["grouped"], grads["grouped_mm"]):
        assert (padded - unpadded).abs().max() <= 1e-5 * padded.abs().max()
    monkeypatch.setattr(moe, "grouped", lambda *a: pytest.fail("training on CPU padded the experts' batches"))
    moe(x.clone().requires_grad_())  # the unpadded path, no failure
    with torch.no_grad(), pytest.raises(pytest.fail.Exception):
        moe(x)  # inference keeps the padded bmm


# --- sampling and generation -------------------------------------------------------------------------------


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 128, generator=torch.Generator().manual_seed(7))
    greedy = sample_next_token(logits, SamplingParams())
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=1.0, top_k=1), gen), greedy)
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=1.0, top_p=1e-6), gen), greedy)


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    prompt = torch.tensor([5, 6, 7])

    def run(seed: int) -> list[int]:
        return list(stream_generate(model, prompt, params=SamplingParams(max_new_tokens=16, temperature=1.0,
                                                                         top_k=50, top_p=0.9, seed=seed)))

    assert run(1) == run(1)
    assert run(1) != run(2)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(temperature=-1.0),
                                 dict(temperature=float("nan")), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(seed=-3), dict(stop_token_ids=[-1]), dict(stop_token_ids="2")])
def test_bad_sampling_params_raise_invalid_input_error(bad):
    field = next(iter(bad))
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams(**bad)


@torch.inference_mode()
def test_stream_generate_yields_greedy_tokens_and_stops_after_a_stop_id():
    model = tiny_model()
    prompt = torch.tensor([[9, 8, 7, 6]])
    greedy = model.generate(prompt, max_new_tokens=12)[0, 4:].tolist()
    assert list(stream_generate(model, prompt, params=SamplingParams(max_new_tokens=12))) == greedy
    assert model.config.eos_token_id not in greedy[:6]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=[greedy[5]])
    assert list(stream_generate(model, prompt, params=params)) == greedy[: greedy.index(greedy[5]) + 1]


@torch.inference_mode()
def test_generate_pads_finished_rows_with_eos_and_stops_when_all_finish():
    model = tiny_model()
    prompts = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(8))
    free = model.generate(prompts, max_new_tokens=10, ignore_eos=True)
    a, b = int(free[0, 6]), int(free[1, 7])  # row 0 ends at its 2nd new token, row 1 at its 3rd
    assert a not in free[1, 5:8] and b not in free[0, 5:7]
    out = model.generate(prompts, max_new_tokens=10, eos_token_id=[a, b])
    assert out[0].tolist() == [*free[0, :7].tolist(), a]
    assert torch.equal(out[1], free[1, :8])


def test_the_moe_training_benchmark_compares_both_dispatches_on_the_same_skewed_routing(capsys):
    """benchmarks/moe_training.py at tiny size: a row per (skew, tokens), the two dispatches agreeing."""
    bench = load_benchmark("moe_training")
    assert bench.main(["--no-write", "--tokens", "64", "--skews", "1", "6", "--repeats", "1", "--threads", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 ")]
    assert len(rows) == 2
    even, skewed = (float(r[1]) for r in rows)
    assert even < 1.6 < skewed  # the busiest expert's load over the mean, as drawn
    assert all(float(r[-1]) < 1e-4 for r in rows)  # outputs and gradients of the two dispatches
