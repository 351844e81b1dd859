"""The orchestrator's client of the worker pools: encode media, judge an utterance, generate an answer.

Jobs go onto the Redis bus (`vita.bus.queue.submit`); results and tokens come back on the request's reply stream.
Generate and Converse both talk to the pools through `PoolClient`, so the job shapes, the waits (all from
`OrchestratorConfig`) and the JobError -> gRPC status map exist once.

Every generation job is leased (`vita.bus.lease`): the lease is taken before the job is queued and held until its
last event arrives or it is cancelled, so if this process dies, the workers stop its generations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from vita.bus.cancel import cancel
from vita.bus.codec import decode_entry
from vita.bus.lease import LeaseKeeper
from vita.bus.queue import lag, submit
from vita.bus.replies import Reply, ReplyTimeout, events
from vita.bus.streams import REPLY_TYPES, ROLE_POOLS, BusConfig, Pool
from vita.bus.trace import current_trace_context
from vita.errors import VitaError
from vita.model.generation import token_budget
from vita.orchestrator.config import OrchestratorConfig
from vita.orchestrator.prompts import Prompt
from vita.v1.assistant_pb2 import Completed, Timings
from vita.v1.bus_pb2 import EmbeddingRef, EncodeJob, GenerationEvent, GenerationJob, JobError, MediaItem
from vita.v1.media_pb2 import Audio, Image, SamplingParams, Video

_STATUS = {
    JobError.CANCELLED: grpc.StatusCode.CANCELLED,
    JobError.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    JobError.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    JobError.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    JobError.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    JobError.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}


def job_status(code: int) -> grpc.StatusCode:
    """The gRPC status a `JobError.Code` is reported with; INTERNAL for any other code."""
    return _STATUS.get(code, grpc.StatusCode.INTERNAL)


def queue_seconds(first_token_s: float, total_s: float, worker: Timings) -> float:
    """`Timings.queue_s` of a generation whose first token reached the orchestrator `first_token_s` after the
    request arrived (0: none did) and whose end `total_s` after: the moment the generator's engine admitted it.

    The worker's Timings (its finished event) count from when it took the job, on its own clock: `queue_s` until
    the engine admitted the sequence, `time_to_first_token_s` until its first token. Admission to first token
    (the prefill), taken from the orchestrator's first token, leaves encoding, the job's wait in its stream and its
    wait in the engine for a free slot; no two machines' clocks are compared.
    """
    if first_token_s > 0 and worker.time_to_first_token_s > 0:
        return max(0.0, first_token_s - max(0.0, worker.time_to_first_token_s - worker.queue_s))
    return max(0.0, total_s - max(0.0, worker.total_s - worker.queue_s))


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


class JobFailed(VitaError):
    """An encoder or llm job ended in a JobError; `code` is the gRPC status to tell the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def of(cls, error: JobError, what: str = "") -> JobFailed:
        return cls(job_status(error.code), f"{what}: {error.message}" if what else error.message)


class PoolClient:
    """Submits jobs to the encoder and llm pools and follows their reply streams.

    Every call may raise `Backpressure` (a pool's backlog is full: RESOURCE_EXHAUSTED), `ReplyTimeout` (no worker
    answered within the configured wait: UNAVAILABLE) and `JobFailed` (a worker refused or failed the job).
    """

    def __init__(self, redis: Redis, bus: BusConfig, config: OrchestratorConfig, context_len: int) -> None:
        self.redis, self.bus, self.config, self.context_len = redis, bus, config, context_len
        self.leases = LeaseKeeper(redis, bus)

    async def encode(self, request_id: str, *, images: Sequence[Image] = (), video: Video | None = None,
                     audio: Sequence[Audio] = (), deadline_ms: int = 0) -> dict[str, EmbeddingRef]:
        """The encoders' output by modality ("image", "video", "audio"; only those given).

        At most one job per modality, so an encoder batches the items of one job in one forward; all are submitted
        before any is awaited, and they answer on the reply stream of `request_id`.
        """
        wanted = {
            "image": (Pool.VISION_ENCODER, EncodeJob.IMAGE, [MediaItem(image=i) for i in images]),
            "video": (Pool.VISION_ENCODER, EncodeJob.VIDEO, [MediaItem(video=video)] if video is not None else []),
            "audio": (Pool.AUDIO_ENCODER, EncodeJob.AUDIO, [MediaItem(audio=a) for a in audio]),
        }
        reply_stream = self.bus.reply(request_id)
        trace_context = current_trace_context()
        names: dict[str, str] = {}
        for name, (pool, kind, items) in wanted.items():
            if items:
                job = EncodeJob(job_id=f"{request_id}.{name}", request_id=request_id, reply_stream=reply_stream,
                                kind=kind, items=items, deadline_unix_ms=deadline_ms, trace_context=trace_context,
                                model_fingerprint=self.config.model_fingerprint)
                names[job.job_id] = name
                await submit(self.redis, self.bus, pool, job)
        refs: dict[str, EmbeddingRef] = {}
        if not names:
            return refs
        try:
            async for result in events(self.redis, reply_stream, self.config.encode_timeout_s):
                name = names.get(getattr(result, "job_id", ""))  # the stream may also carry a generator's events
                if name is None:
                    continue
                if result.WhichOneof("outcome") == "error":
                    raise JobFailed.of(result.error, name)
                refs[name] = result.embedding
                if len(refs) == len(names):
                    break
        except ReplyTimeout as e:
            silent = {wanted[name][0] for name in names.values() if name not in refs}
            raise ReplyTimeout(f"{e}; {await self.pools_state(sorted(silent))}") from None
        return refs

    async def generate(self, request_id: str, role: GenerationJob.Role, prompt: Prompt, sampling: SamplingParams,
                       *, deadline_ms: int = 0) -> GenerationJob:
        """Queue `prompt` on the llm pool of `role`; returns the job (its tokens come on `job.reply_stream`, see
        `tokens`). Its lease is held until `tokens` yields its last event or `cancel` is called.

        `max_tokens` is the sampling's (or `default_max_tokens`), cut to the context left after the prompt.
        """
        requested = self.requested_tokens(sampling)
        job = GenerationJob(
            request_id=request_id, role=role, reply_stream=self.bus.reply(request_id),
            prompt_token_ids=prompt.input_ids, embeddings=prompt.placements, sampling=sampling,
            max_tokens=token_budget(requested, len(prompt.input_ids), self.context_len),
            deadline_unix_ms=deadline_ms, trace_context=current_trace_context(),
            model_fingerprint=self.config.model_fingerprint)
        await self._submit_leased(job)
        return job

    async def _submit_leased(self, job: GenerationJob) -> None:
        job.leased = await self.leases.acquire(job.request_id)  # before the job exists: a worker finds it set
        try:
            await submit(self.redis, self.bus, ROLE_POOLS[job.role], job)
        except BaseException:
            self.leases.release(job.request_id)
            raise

    def requested_tokens(self, sampling: SamplingParams) -> int:
        return sampling.max_tokens or self.config.default_max_tokens

    def finish_reason(self, job: GenerationJob, finished: Completed) -> Completed.FinishReason:
        """The generator's finish reason, with LENGTH told apart: CONTEXT_LENGTH when the context, not the
        requested max_tokens, ended the answer (the budget was cut to fit it, or the engine's sequence filled)."""
        reason = finished.finish_reason
        if reason == Completed.LENGTH and (job.max_tokens < self.requested_tokens(job.sampling)
                                           or finished.usage.completion_tokens < job.max_tokens):
            return Completed.CONTEXT_LENGTH
        return reason

    async def tokens(self, reply_stream: str) -> AsyncIterator[Reply]:
        """A generation's events in order; ReplyTimeout after `token_timeout_s` without one. Its last event (finished
        or error) releases the generation's lease."""
        async for event in events(self.redis, reply_stream, self.config.token_timeout_s):
            if isinstance(event, GenerationEvent) and event.WhichOneof("event") in ("finished", "error"):
                self.leases.release(event.request_id)
            yield event

    async def judge(self, request_id: str, role: GenerationJob.Role, prompt: Prompt) -> int | None:
        """The one token (greedy) the pool of `role` picks after `prompt`; None if it finished without one."""
        job = GenerationJob(
            request_id=request_id, role=role, reply_stream=self.bus.reply(request_id),
            prompt_token_ids=prompt.input_ids, embeddings=prompt.placements,
            sampling=SamplingParams(temperature=0.0), max_tokens=1, trace_context=current_trace_context(),
            model_fingerprint=self.config.model_fingerprint)
        await self._submit_leased(job)
        token = None
        try:
            async for event in events(self.redis, job.reply_stream, self.config.judge_timeout_s):
                kind = event.WhichOneof("event")
                if kind == "delta" and event.delta.token_ids and token is None:
                    token = event.delta.token_ids[0]
                elif kind == "error":
                    raise JobFailed.of(event.error)
                elif kind == "finished":
                    break
        except ReplyTimeout as e:
            raise ReplyTimeout(f"{e}; {await self.pools_state([ROLE_POOLS[role]])}") from None
        finally:
            self.leases.release(request_id)
        return token

    async def prefill(self, request_id: str, role: GenerationJob.Role, prompt: Prompt) -> None:
        """Have the pool of `role` compute `prompt` into its prefix cache: a one-token job whose token is thrown
        away (how vLLM's disaggregated-prefill proxy has its prefill instance fill the KV cache: `max_tokens=1`).
        Raises as `judge` does."""
        await self.judge(request_id, role, prompt)

    async def pools_state(self, pools: Sequence[Pool]) -> str:
        """Why a pool may not have answered, for a timeout's message: its jobs waiting and in progress. Jobs waiting
        with none in progress mean no worker is taking them (none runs, or all died); jobs in progress, a worker
        that is slow or stuck on them (or died holding them, until `reclaim_idle_ms` hands them to another)."""
        parts = []
        for pool in pools:
            try:
                depth = await lag(self.redis, self.bus, pool)
            except (RedisError, OSError) as e:
                parts.append(f"the {pool} pool's backlog is unknown ({type(e).__name__})")
                continue
            hint = " (no worker is taking its jobs: is one running?)" if depth.lag and not depth.pending else ""
            parts.append(f"the {pool} pool has {_jobs(depth.lag)} waiting and {depth.pending} in progress{hint}")
        return "; ".join(parts)

    async def cancel(self, request_id: str) -> None:
        """Stop the workers' compute for `request_id` (queued or running); idempotent. Its lease is released
        first, so even a cancel that Redis refused leaves nothing renewed for nobody."""
        self.leases.release(request_id)
        await cancel(self.redis, self.bus, request_id)

    async def stopped(self, request_id: str) -> int:
        """After `cancel`: the generator's own word that the sequence stopped, as its token count.

        -1 if it reported an error or said nothing within `stop_wait_s`.
        """
        try:
            async for event in events(self.redis, self.bus.reply(request_id), self.config.stop_wait_s):
                kind = event.WhichOneof("event")
                if kind == "finished":
                    return event.finished.usage.completion_tokens
                if kind == "error":
                    return -1
        except ReplyTimeout:
            pass
        return -1

    async def replay(self, request_id: str) -> list[Reply]:
        """Everything on the reply stream of `request_id` so far (it outlives the orchestrator that asked)."""
        return [decode_entry(fields, REPLY_TYPES) for _, fields in await self.redis.xrange(self.bus.reply(request_id))]
