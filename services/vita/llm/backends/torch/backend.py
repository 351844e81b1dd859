"""The embedded PyTorch backend: the continuous-batching engine streamed to asyncio callers, either in a thread of
this process (`TorchBackend`) or in a process of its own (`TorchProcessBackend`, vLLM V1's engine-core split)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from vita.errors import VitaError
from vita.llm.backends.base import BackendRequest, EngineDeadError, TokenOutput
from vita.llm.backends.torch.engine import EngineConfig, EngineLoop, EngineRequest, EngineSnapshot, LLMEngine
from vita.llm.backends.torch.engine_core import EngineCoreProcess, EngineCoreSpec
from vita.model.llm import MoECausalLM
from vita.telemetry.metrics import Metrics


class _StreamingBackend:
    """What both torch backends share: a queue per request fed by the engine's outputs, and the engine metrics.
    A caller that stops iterating (client gone, deadline) cancels its sequence."""

    def __init__(self, metrics: Metrics | None, pool: str) -> None:
        self.metrics = metrics
        self.pool = pool
        self._queues: dict[str, asyncio.Queue[TokenOutput | VitaError]] = {}
        self._decode_tokens_seen = 0
        self._prefix_seen = (0, 0)  # (queries, hits) already counted
        self._loop: asyncio.AbstractEventLoop | None = None

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]:
        queue: asyncio.Queue[TokenOutput | VitaError] = asyncio.Queue()
        self._queues[request.request_id] = queue
        finished = False
        try:
            self._submit(request)
            while not finished:
                output = await queue.get()
                if isinstance(output, VitaError):
                    finished = True  # rejected, or the engine is gone: nothing to cancel
                    raise output
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self._cancel(request.request_id)
            self._queues.pop(request.request_id, None)

    async def cancel(self, request_id: str) -> None:
        self._cancel(request_id)

    async def wait_dead(self) -> EngineDeadError:
        await asyncio.Event().wait()  # the engine thread lives as long as this process
        raise AssertionError("unreachable")

    def _submit(self, request: BackendRequest) -> None:
        raise NotImplementedError

    def _cancel(self, request_id: str) -> None:
        raise NotImplementedError

    def _deliver(self, output: TokenOutput | VitaError, request_id: str) -> None:
        """On the event loop: outputs of sequences nobody listens to any more are dropped."""
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(output)

    def _record(self, snapshot: EngineSnapshot) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.num_requests_running.labels(self.pool).set(snapshot.num_running)
        m.engine_decode_tokens.labels(self.pool).inc(snapshot.decode_tokens - self._decode_tokens_seen)
        self._decode_tokens_seen = snapshot.decode_tokens
        if snapshot.prefix_queries is not None:
            queries, hits = self._prefix_seen
            m.prefix_cache_queries.labels(self.pool).inc(snapshot.prefix_queries - queries)
            m.prefix_cache_hits.labels(self.pool).inc(snapshot.prefix_hits - hits)
            self._prefix_seen = (snapshot.prefix_queries, snapshot.prefix_hits)
        m.num_requests_waiting.labels(self.pool).set(snapshot.num_waiting)
        if snapshot.num_running:
            m.batch_size.labels(self.pool).observe(snapshot.num_running)


class TorchBackend(_StreamingBackend):
    """One engine per process, stepping in a thread beside the event loop."""

    def __init__(self, model: MoECausalLM, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 metrics: Metrics | None = None, pool: str = "llm:generator",
                 engine_config: EngineConfig | None = None) -> None:
        super().__init__(metrics, pool)
        self.model = model
        self.engine = LLMEngine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len, config=engine_config)
        self._engine_loop = EngineLoop(self.engine, self._on_output, on_step=self._on_step)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._engine_loop.start()

    async def close(self) -> None:
        await asyncio.to_thread(self._engine_loop.stop)

    def _submit(self, request: BackendRequest) -> None:
        self._engine_loop.submit(EngineRequest.from_prompt(self.model, request.request_id, request.prompt,
                                                           request.params))

    def _cancel(self, request_id: str) -> None:
        self._engine_loop.cancel(request_id)

    def _on_output(self, output: TokenOutput) -> None:  # engine thread -> event loop
        if output.request_id in self._queues and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, output, output.request_id)

    def _on_step(self, engine: LLMEngine, seconds: float) -> None:
        if self.metrics is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._record, EngineSnapshot.of(engine))


class TorchProcessBackend(_StreamingBackend):
    """The engine core in a child process that loads the model from `model_dir` itself (`engine_core`): the
    service's event loop never holds the GIL the forward needs. Requests the engine refuses raise the engine's
    VitaError from `generate`, as in `TorchBackend`; if the child dies, every stream and every later `generate`
    raises `EngineDeadError` and `on_dead` is called (the llm worker stops, so the pod restarts)."""

    def __init__(self, model_dir: str | Path, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 metrics: Metrics | None = None, pool: str = "llm:generator",
                 engine_config: EngineConfig | None = None, threads: int | None = None, device: str = "auto",
                 dtype: str = "auto") -> None:
        super().__init__(metrics, pool)
        spec = EngineCoreSpec(str(model_dir), max_batch_size, max_seq_len, engine_config, threads, device, dtype)
        self.core = EngineCoreProcess(spec, self._on_step, self._deliver_error, self._on_dead)
        self.dead = asyncio.Event()
        self.snapshot: EngineSnapshot | None = None  # the engine after its latest step

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.core.start()

    async def close(self) -> None:
        await self.core.stop()

    async def wait_dead(self) -> EngineDeadError:
        await self.dead.wait()
        return self.core.dead

    def _submit(self, request: BackendRequest) -> None:
        self.core.submit(request)

    def _cancel(self, request_id: str) -> None:
        self.core.cancel(request_id)

    def _on_step(self, outputs: list[TokenOutput], snapshot: EngineSnapshot) -> None:
        for output in outputs:
            self._deliver(output, output.request_id)
        self.snapshot = snapshot
        self._record(snapshot)

    def _deliver_error(self, request_id: str, error: VitaError) -> None:
        self._deliver(error, request_id)

    def _on_dead(self, error: EngineDeadError) -> None:
        for request_id in list(self._queues):
            self._deliver(error, request_id)
        self.dead.set()
