"""Decode steps replayed from a CUDA graph: one launch per token instead of one per kernel.

At batch 1 a Mixtral-width decode step is hundreds of small kernels; launched one by one from Python the GPU waits
on the host between them (issue 12's profile: 61 ms of wall time per step for 39 ms of kernels). Captured once into
a CUDA graph (`torch.cuda.CUDAGraph`, the pattern of vLLM's `CUDAGraphRunner` and gpt-fast's "reduce-overhead"), a
step is one `replay()`. Capture requires a step with static shapes and no host sync: `MoECausalLM.decode_step`,
whose expert dispatch reads the weights in place (`MoEFeedForward.grouped_mm`, bf16 on the GPU).

A graph is fixed to its tensors' addresses: it reads its inputs from buffers of its own (copied into before each
replay), writes the KV cache it was captured with, and returns the same logits buffer every time, overwritten by
the next replay. One decoder serves one (batch size, cache) pair; a scheduler would hold one per batch-size bucket.

    decoder = CUDAGraphDecoder(model, cache, batch_size=8)  # rows 0..7 of `cache`
    logits = decoder(tokens, positions)                      # (8, vocab), valid until the next call

Off CUDA there is nothing to capture: the decoder calls `decode_step` directly (the same values), which is what the
CPU tests check, together with a trace of `decode_step` that must hold no graph break (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vita.errors import InvalidInputError
from vita.model.llm import KVCache, MoECausalLM


class CUDAGraphDecoder:
    """Greedy/sampled decode of rows 0..B-1 of `cache`, each step one graph replay on CUDA (eager elsewhere).

    Every step attends over the whole cache row (kv_len = cache.max_seq_len: a graph needs one shape), masked by
    position, so size the cache to the sequences it serves, as gpt-fast does. `warmup` eager steps run before the
    capture (on a side stream, as `torch.cuda.graphs` asks) so that lazy initialisation (cuBLAS workspaces,
    autotuning) is not captured; they write the last cache position of each row, which no query reads until its
    own step has written it again.
    """

    def __init__(self, model: MoECausalLM, cache: KVCache, batch_size: int, *, warmup: int = 2) -> None:
        if not 1 <= batch_size <= cache.max_batch_size:
            raise InvalidInputError(f"batch_size must be in [1, {cache.max_batch_size}] (the cache's rows), "
                                    f"got {batch_size}")
        config = model.config
        if (cache.k.device.type == "cuda" and cache.k.dtype != torch.bfloat16
                and batch_size * config.num_experts_per_tok > config.num_local_experts):
            raise InvalidInputError(f"a CUDA graph of {batch_size} rows needs bf16 weights: in {cache.k.dtype} the "
                                    "experts of that many tokens are dispatched with a host sync (MoEFeedForward)")
        self.model, self.cache, self.batch_size = model, cache, batch_size
        self.kv_len = min(cache.max_seq_len, model.config.max_position_embeddings)
        device = cache.k.device
        # The step's inputs: graph replays read these buffers, so calls copy into them.
        self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.full((batch_size,), self.kv_len - 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if device.type == "cuda":
            self._capture(warmup)

    @torch.inference_mode()
    def _capture(self, warmup: int) -> None:
        stream = torch.cuda.Stream(device=self.cache.k.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> Tensor:
        return self.model.decode_step(self.input_ids, self.positions, self.cache, self.kv_len)

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """input_ids, positions (B,) on the cache's device -> logits (B, vocab). Positions must be < `kv_len`
        (not checked: a check would be a host sync). On CUDA the result is the graph's own buffer: read it (sample
        the next token) before the next call."""
        self.input_ids.copy_(input_ids)
        self.positions.copy_(positions)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
