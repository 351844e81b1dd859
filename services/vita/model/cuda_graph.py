"""Decode steps replayed from a CUDA graph: one launch per token instead of one per kernel.

At batch 1 a Mixtral-width decode step is hundreds of small kernels; launched one by one from Python the GPU waits
on the host between them (issue 12's profile: 61 ms of wall time per step for 39 ms of kernels). Captured once into
a CUDA graph (`torch.cuda.CUDAGraph`, the pattern of vLLM's `CUDAGraphRunner` and gpt-fast's "reduce-overhead"), a
step is one `replay()`. Capture requires a step with static shapes and no host sync: `MoECausalLM.decode_step`,
whose expert dispatch reads the weights in place (`MoEFeedForward.grouped_mm`, bf16 on the GPU).

A graph is fixed to its tensors' addresses: it reads its inputs from buffers of its own (copied into before each
replay), writes the KV cache it was captured with, and returns the same logits buffer every time, overwritten by
the next replay. One decoder serves one (rows, kv_len) shape of one cache; a scheduler holds one per batch-size
bucket and context bucket (`LLMEngine` with `EngineConfig.cuda_graphs`).

    decoder = CUDAGraphDecoder(model, cache, batch_size=8)  # rows 0..7 of `cache`, over their whole length
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
    """One decode step of `batch_size` rows of `cache`, over keys [0, kv_len), one graph replay on CUDA (eager
    elsewhere).

    `scratch_slot` None: the rows are 0..B-1, read as a view (generate, the benchmark). An int: the rows are an
    input of every call (`slots`), read by index, and `scratch_slot` is a row the caller never gives a sequence:
    the warm-up writes there, and a scheduler pads a batch to the captured size with it.
    `kv_len` (default: the whole row) is part of the graph's shape: every step attends over all of it, masked by
    position, so size it to the sequences served (gpt-fast sizes the cache; a scheduler buckets it).
    `warmup` eager steps run before the capture, on a side stream as `torch.cuda.graphs` asks, so that lazy
    initialisation (cuBLAS workspaces) is not captured; without a scratch row they write position kv_len - 1 of
    each row, which no query reads before its own step has written it again.
    `pool` (`torch.cuda.graph_pool_handle()`): a memory pool shared with the other decoders of one scheduler, as vLLM
    shares one across its captures; safe because one step's logits are read before another graph replays.
    """

    def __init__(self, model: MoECausalLM, cache: KVCache, batch_size: int, *, kv_len: int | None = None,
                 scratch_slot: int | None = None, warmup: int = 2, pool: tuple | None = None) -> None:
        rows = cache.max_batch_size
        if not 1 <= batch_size <= rows:
            raise InvalidInputError(f"batch_size must be in [1, {rows}] (the cache's rows), got {batch_size}")
        limit = min(cache.max_seq_len, model.config.max_position_embeddings)
        kv_len = limit if kv_len is None else kv_len
        if not 1 <= kv_len <= limit:
            raise InvalidInputError(f"kv_len must be in [1, {limit}] (the cache's and the model's context), got {kv_len}")
        if scratch_slot is not None and not 0 <= scratch_slot < rows:
            raise InvalidInputError(f"scratch_slot must be a row of the cache, [0, {rows}), got {scratch_slot}")
        config = model.config
        if (cache.k.device.type == "cuda" and cache.k.dtype != torch.bfloat16
                and batch_size * config.num_experts_per_tok > config.num_local_experts):
            raise InvalidInputError(f"a CUDA graph of {batch_size} rows needs bf16 weights: in {cache.k.dtype} the "
                                    "experts of that many tokens are dispatched with a host sync (MoEFeedForward)")
        self.model, self.cache, self.batch_size, self.kv_len = model, cache, batch_size, kv_len
        device = cache.k.device
        # The step's inputs: graph replays read these buffers, so calls copy into them.
        self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.positions = torch.full((batch_size,), kv_len - 1, dtype=torch.long, device=device)
        self.slots = None if scratch_slot is None else torch.full((batch_size,), scratch_slot, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if device.type == "cuda":
            self._capture(warmup, pool)

    @torch.inference_mode()
    def _capture(self, warmup: int, pool: tuple | None) -> None:
        stream = torch.cuda.Stream(device=self.cache.k.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._step()

    def _step(self) -> Tensor:
        return self.model.decode_step(self.input_ids, self.positions, self.cache, self.kv_len, slots=self.slots)

    @torch.inference_mode()
    def __call__(self, input_ids: Tensor, positions: Tensor, slots: Tensor | None = None) -> Tensor:
        """input_ids, positions (and slots, with a scratch row) (B,) on the cache's device -> logits (B, vocab).
        Positions must be < `kv_len` and slots distinct but for the scratch row (not checked: a check would be a
        host sync). On CUDA the result is the graph's own buffer: read it (sample the next token) before the next
        call."""
        if (slots is None) != (self.slots is None):
            raise InvalidInputError("pass slots exactly when the decoder was made with a scratch_slot")
        self.input_ids.copy_(input_ids)
        self.positions.copy_(positions)
        if slots is not None:
            self.slots.copy_(slots)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
