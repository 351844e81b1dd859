"""The Triton MoE kernel for decode steps (vita/model/fused_moe.py, issue 12) against the eager experts. CI has no
GPU: the kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which executes the same kernel code on CPU
tensors (tests/conftest.py sets it); the speed is measured only on a GPU (benchmarks/llm_decode_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from vita.model import fused_moe
from vita.model.config import LLMConfig
from vita.model.llm import MoECausalLM

# Widths that are not multiples of the kernel's blocks, so the masked edges are exercised.
SHAPE = dict(vocab_size=128, hidden_size=80, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


@pytest.fixture
def interpreter():
    """Off CUDA, Triton's interpreter: tests/conftest.py chose it before triton was imported."""
    if not torch.cuda.is_available():
        assert fused_moe.interpreting(), "TRITON_INTERPRET=1 must be set before triton is imported"


def model(seed: int = 0) -> MoECausalLM:
    torch.manual_seed(seed)
    return MoECausalLM(LLMConfig(**SHAPE)).eval()


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_the_kernel_gives_the_eager_experts_output(interpreter, dtype, tolerance, tokens):
    moe = model().model.layers[0].block_sparse_moe
    x = torch.randn(tokens, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(tokens))
    weights, experts = moe.route(x)
    if tokens > 1:  # two tokens on the same expert: its rows are read for each
        experts[1] = experts[0]
    expected = moe.gathered(x, weights, experts)  # fp32, a copy of each token's experts
    w1, w2, w3 = (w.mT.to(dtype) for w in (moe.w1, moe.w2, moe.w3))  # input-major views, as the model keeps them
    got = fused_moe.fused_moe(x.to(dtype), weights.to(dtype), experts, w1, w3, w2)
    assert got.dtype == dtype and got.shape == expected.shape
    assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()


@torch.no_grad()
def test_the_kernel_follows_strides_of_any_layout(interpreter):
    """Weights loaded output-major (a checkpoint's own layout) give the same result as input-major ones."""
    moe = model().model.layers[0].block_sparse_moe
    x = torch.randn(2, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(5))
    weights, experts = moe.route(x)
    in_place = fused_moe.fused_moe(x, weights, experts, moe.w1.mT, moe.w3.mT, moe.w2.mT)
    output_major = [w.contiguous().mT for w in (moe.w1, moe.w3, moe.w2)]  # (E, out, in) memory, viewed (E, in, out)
    assert not output_major[0].is_contiguous()
    assert torch.allclose(fused_moe.fused_moe(x, weights, experts, *output_major), in_place, atol=1e-6)


@torch.inference_mode()
def test_decode_with_the_kernel_gives_the_same_greedy_tokens(interpreter):
    """Prefill (12 tokens) takes the eager path, each decode step (2 rows) the kernel: the tokens of `generate`
    are those of the eager model."""
    prompts = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    reference = model(seed=3)
    expected = reference.generate(prompts, max_new_tokens=6, ignore_eos=True)
    fused = model(seed=3)
    fused.use_fused_moe(max_tokens=8)
    calls = []
    original = fused_moe.fused_moe

    def counted(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    fused_moe.fused_moe = counted
    try:
        got = fused.generate(prompts, max_new_tokens=6, ignore_eos=True)
    finally:
        fused_moe.fused_moe = original
    assert torch.equal(got, expected)
    assert calls and set(calls) == {2}  # decode steps only: 2 rows, never the 24-token prefill


def test_the_kernel_is_not_used_off_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_moe.supported(torch.zeros(1))


def test_mismatched_weights_are_refused():
    moe = model().model.layers[0].block_sparse_moe
    x = torch.randn(1, SHAPE["hidden_size"])
    weights, experts = moe.route(x)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe.fused_moe(x, weights, experts, moe.w1.mT, moe.w3.mT, moe.w1.mT)
