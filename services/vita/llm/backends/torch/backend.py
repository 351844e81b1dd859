"""The embedded PyTorch backend: the continuous-batching engine in a thread, streamed to asyncio callers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch

from vita.llm.backends.base import BackendRequest, PromptInput, TokenOutput
from vita.llm.backends.torch.engine import EngineConfig, EngineLoop, EngineRequest, LLMEngine
from vita.model.llm import MoECausalLM
from vita.telemetry.metrics import Metrics


class TorchBackend:
    """One engine per process; a caller that stops iterating (client gone, deadline) cancels its sequence."""

    def __init__(self, model: MoECausalLM, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 metrics: Metrics | None = None, pool: str = "llm:generator",
                 engine_config: EngineConfig | None = None) -> None:
        self.model = model
        self.engine = LLMEngine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, config=engine_config)
        self.metrics = metrics
        self.pool = pool
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._decode_tokens_seen = 0
        self._prefix_seen = (0, 0)  # (queries, hits) already counted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine_loop = EngineLoop(self.engine, self._on_output, on_step=self._on_step)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._engine_loop.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._engine_loop.stop)

    def embed(self, prompt: PromptInput) -> torch.Tensor | None:
        """(L, H) embeddings with the slot rows replaced, or None when the prompt is ids only."""
        if prompt.slot_positions is None or prompt.slot_positions.numel() == 0:
            return None
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(prompt.input_ids).clone()
            embeds[prompt.slot_positions] = prompt.slot_embeddings.to(embeds.dtype)
        return embeds

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]:
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[request.request_id] = queue
        embeds = self.embed(request.prompt)
        finished = False
        try:
            self._engine_loop.submit(EngineRequest(
                request.request_id, request.params,
                input_ids=request.prompt.input_ids if embeds is None else None, inputs_embeds=embeds,
            ))
            while not finished:
                output = await queue.get()
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self._engine_loop.cancel(request.request_id)
            self._queues.pop(request.request_id, None)

    async def cancel(self, request_id: str) -> None:
        self._engine_loop.cancel(request_id)

    def _on_output(self, output: TokenOutput) -> None:
        """Engine thread -> event loop; outputs of sequences nobody listens to any more are dropped."""
        queue = self._queues.get(output.request_id)
        if queue is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(queue.put_nowait, output)

    def _on_step(self, engine: LLMEngine, seconds: float) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.num_requests_running.labels(self.pool).set(engine.num_running)
        m.engine_decode_tokens.labels(self.pool).inc(engine.stats.decode_tokens - self._decode_tokens_seen)
        self._decode_tokens_seen = engine.stats.decode_tokens
        if (prefix := engine.prefix_cache_stats) is not None:
            queries, hits = self._prefix_seen
            m.prefix_cache_queries.labels(self.pool).inc(prefix.queries - queries)
            m.prefix_cache_hits.labels(self.pool).inc(prefix.hits - hits)
            self._prefix_seen = (prefix.queries, prefix.hits)
        m.num_requests_waiting.labels(self.pool).set(engine.num_waiting)
        if engine.num_running:
            m.batch_size.labels(self.pool).observe(engine.num_running)
