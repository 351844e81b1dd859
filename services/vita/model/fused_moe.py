"""A Triton MoE kernel for the few tokens of a decode step: each (token, expert) pair reads its expert's rows in
place, and only those, as one matrix-vector product per weight matrix.

Why: at batch 1 a decode step is bound by reading weights (Mixtral-8x7B width: 13 GB a step, most of it experts).
`F.grouped_mm` reads the routed experts in place but is a GEMM tiled for many rows: with one or two rows per expert
most of each tile is padding and too few thread blocks stream at once (issue 12's profile: 38% of the HBM bound with
CUDA graphs). Here each program computes a block of one pair's outputs from contiguous weight rows, and the grid
(pairs x output blocks) puts every SM to work streaming. The same design as vLLM's `fused_moe` Triton kernel for
small batches (vllm/model_executor/layers/fused_moe), without its token sorting: for a handful of tokens an expert
shared by two tokens is read twice, which costs less than the sort.

Two launches per layer: gate and up projections fused with SiLU (`silu(x W1^T) * (x W3^T)`, (pairs, I)), then the
down projection ((pairs, H), fp32); the top-k mix is a batched product in torch. No host sync, so a CUDA graph
captures it. Accumulation is fp32 whatever the weights' dtype.

Runs where Triton compiles (CUDA), or anywhere under Triton's interpreter (`TRITON_INTERPRET=1`, set before this
module's first use), which is how CI tests it against the eager experts on CPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

BLOCK_N = 64  # outputs per program
BLOCK_K = 64  # inputs per loop step (a (BLOCK_K, BLOCK_N) weight tile)


@functools.cache
def _kernel():
    """The jitted kernel, built on first use (Triton is imported only where the fused path runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def routed_gemv(a_ptr, w_ptr, w3_ptr, out_ptr, expert_ptr, K, N, stride_a, stride_we, stride_wk, stride_wn,
                    stride_out, ROWS_PER_A: tl.constexpr, GLU: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        # out[p, n] = sum_k a[p // ROWS_PER_A, k] * W[e_p, k, n]; with GLU, silu(that) * the same with W3.
        pair = tl.program_id(0)
        block = tl.program_id(1)
        expert = tl.load(expert_ptr + pair).to(tl.int64)
        row = pair // ROWS_PER_A
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask_n = offs_n < N
        w_base = expert * stride_we + offs_n[None, :] * stride_wn  # (1, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            mask_k = offs_k < K
            a = tl.load(a_ptr + row * stride_a + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # (BLOCK_K,)
            offs = w_base + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
            mask = mask_k[:, None] & mask_n[None, :]
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(a[:, None] * w, axis=0)
            if GLU:
                w3 = tl.load(w3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc3 += tl.sum(a[:, None] * w3, axis=0)
        if GLU:
            acc = acc * tl.sigmoid(acc) * acc3  # SiLU(gate) * up
        tl.store(out_ptr + pair * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    return routed_gemv


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supported(x: Tensor) -> bool:
    """Whether `fused_moe` can run on `x`'s device: CUDA with Triton installed, or Triton's interpreter."""
    return (x.is_cuda or interpreting()) and triton_available()


def fused_moe(x: Tensor, weights: Tensor, experts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Top-k SwiGLU experts for a few tokens, reading only the routed experts' weights, in place.

    x (N, H); weights (N, k) the routing weights (summing to 1 per token) and experts (N, k) their expert ids;
    w1, w3 (E, H, I) and w2 (E, I, H) as `x @ w` takes them (`MoEFeedForward`'s parameters' `.mT`: views, any
    strides; contiguous along the last dimension reads fastest). Returns (N, H) in x's dtype.
    Raises ValueError when the shapes do not agree.
    """
    N, H = x.shape
    k = experts.shape[1]
    E, _, inter = w1.shape
    if w1.shape != (E, H, inter) or w3.shape != w1.shape or w2.shape != (E, inter, H):
        raise ValueError(f"expert weights {tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)} do not fit "
                         f"x {tuple(x.shape)}: w1 and w3 (E, H, I), w2 (E, I, H) expected")
    if w3.stride() != w1.stride():
        raise ValueError("w1 and w3 must have the same strides (they share the kernel's offsets)")
    kernel = _kernel()
    x = x.contiguous()
    ids = experts.reshape(-1).contiguous()  # (N * k,): pair p is token p // k's choice p % k
    pairs = ids.numel()
    h = torch.empty(pairs, inter, device=x.device, dtype=x.dtype)  # (N * k, I)
    kernel[(pairs, -(-inter // BLOCK_N))](
        x, w1, w3, h, ids, H, inter, x.stride(0), *w1.stride(), h.stride(0),
        ROWS_PER_A=k, GLU=True, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    out = torch.empty(pairs, H, device=x.device, dtype=torch.float32)  # (N * k, H)
    kernel[(pairs, -(-H // BLOCK_N))](
        h, w2, w2, out, ids, inter, H, h.stride(0), *w2.stride(), out.stride(0),
        ROWS_PER_A=1, GLU=False, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)
    mixed = torch.bmm(weights.to(torch.float32).unsqueeze(1), out.view(N, k, H))  # (N, 1, H)
    return mixed.squeeze(1).to(x.dtype)
