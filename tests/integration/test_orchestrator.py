"""`Assistant.Generate` over real gRPC on 127.0.0.1 and real Redis, with a real llm worker (text requests)."""

import asyncio
import gc
import time
import uuid
from collections import Counter

import grpc
import pytest
from conftest import delete_prefix
from redis.asyncio import Redis

from vita.bus.streams import BusConfig
from vita.client import image_event, session_config, text_event
from vita.inference import GenerationRequest, VitaPipeline
from vita.llm.backends.torch.backend import TorchBackend
from vita.llm.worker import LLMWorker, WorkerConfig
from vita.model.generation import SamplingParams
from vita.orchestrator import converse
from vita.orchestrator.service import AssistantService, OrchestratorConfig
from vita.runtime.server import GrpcService, ServiceServer
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import ClientEvent, Completed, EndOfInput, GenerateRequest
from vita.v1.media_pb2 import Image
from vita.v1.media_pb2 import SamplingParams as SamplingProto


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir):
    return VitaPipeline.load(tiny_model_dir)


async def run_stack(pipeline, body, *, worker=True, backlog_limit=1000, config=None, max_batch=8):
    """Orchestrator + llm worker in this event loop; everything talks over loopback gRPC and Redis. The worker
    takes 8 jobs at once; the engine decodes `max_batch` of them together (the others wait there for a slot)."""
    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}", backlog_limits=dict.fromkeys(
        BusConfig().backlog_limits, backlog_limit))
    service = AssistantService(redis, bus, pipeline.model.vita_config, pipeline.tokenizer, config)
    server = ServiceServer([GrpcService("vita.v1.Assistant",
                                        lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))])
    await server.start()
    backend = TorchBackend(pipeline.model, max_batch_size=max_batch)
    await backend.start()
    llm = LLMWorker(redis, bus, backend, pipeline.tokenizer, WorkerConfig(max_concurrency=8))
    task = asyncio.create_task(llm.run()) if worker else None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        return await body(assistant_pb2_grpc.AssistantStub(channel), backend)
    finally:
        await channel.close()
        llm.stop()
        if task:
            await asyncio.wait_for(task, 30)
        await backend.close()
        await server.drain()
        delete_prefix(bus.prefix)
        await redis.aclose()


async def answer(stub, text, max_tokens=10):
    tokens, done = [], None
    async for r in stub.Generate(GenerateRequest(text=text, sampling=SamplingProto(max_tokens=max_tokens))):
        if r.HasField("delta"):
            tokens += list(r.delta.token_ids)
        else:
            done = r.completed
    return tokens, done


def in_process(pipeline, text, max_tokens=10):
    events = list(pipeline.stream(GenerationRequest(text=text, sampling=SamplingParams(max_new_tokens=max_tokens))))
    return [t for e in events for t in e.token_ids], events[-1].usage


def test_eight_concurrent_requests_each_get_their_own_answer(pipeline):
    texts = [f"Question {i}: what colour is the {w}?" for i, w in enumerate(["sky", "sun", "sea", "leaf", "rose", "snow", "coal", "gold"])]

    async def body(stub, backend):
        return await asyncio.gather(*(answer(stub, t) for t in texts))

    results = asyncio.run(run_stack(pipeline, body))
    for text, (tokens, done) in zip(texts, results):
        expected, usage = in_process(pipeline, text)
        assert tokens[: len(expected)] == expected
        assert done.usage.prompt_tokens == usage.prompt_tokens
        assert done.finish_reason in (Completed.STOP, Completed.LENGTH)
        assert done.timings.time_to_first_token_s > 0


def test_queue_s_is_the_wait_for_a_slot_in_the_engine(pipeline):
    """Six calls at once on an engine of two slots: four wait in the engine, and their Timings.queue_s says so
    (it was always 0); what follows admission (the prefill) is short for all of them."""
    async def body(stub, backend):
        async def one(i):
            request = GenerateRequest(text=f"Count to ten, take {i}.",
                                      sampling=SamplingProto(max_tokens=16, ignore_eos=True))
            return [r async for r in stub.Generate(request)][-1].completed.timings
        return await asyncio.gather(*(one(i) for i in range(6)))

    timings = sorted(asyncio.run(run_stack(pipeline, body, max_batch=2)), key=lambda t: t.time_to_first_token_s)
    for t in timings:
        assert t.encode_s <= t.queue_s <= t.time_to_first_token_s <= t.total_s, t
    prefill = [t.time_to_first_token_s - t.queue_s for t in timings]
    waited = timings[2:]  # the four that found both slots taken
    assert min(t.queue_s for t in waited) > max(prefill), (timings, prefill)
    assert min(t.queue_s for t in waited) > max(t.queue_s for t in timings[:2]), timings


def test_converse_keys_its_jobs_by_ids_of_its_own_that_fit_any_session_id(pipeline):
    """A session id may be as long as any id (128 characters); the ids of its jobs were that plus a suffix, past
    the limit, so no turn of such a session could be answered. Each answer's id is new, however the session id
    is reused."""
    session_id = "s" * 128

    async def body(stub, backend):
        answered = asyncio.Queue()

        async def requests():
            yield session_config(session_id=session_id, max_tokens=3)
            for turn in range(2):
                yield text_event(f"Question {turn}.")
                await answered.get()
            yield ClientEvent(end=EndOfInput())

        events = []
        async for event in stub.Converse(requests(), timeout=60):
            events.append(event)
            if event.HasField("completed") or event.HasField("error"):  # the turn is over either way
                answered.put_nowait(None)
        return events, set(backend.engine.stats.tokens_by_request)

    events, engine_ids = asyncio.run(run_stack(pipeline, body))
    assert [e.WhichOneof("event") for e in events if e.HasField("error")] == [], [e.error for e in events]
    assert sum(e.HasField("completed") for e in events) == 2
    assert len(engine_ids) == 2 and all(len(i) <= 128 and i.startswith("s" * 64) for i in engine_ids)


@pytest.mark.parametrize(("request_", "message"), [
    (GenerateRequest(), "the request is empty"),
    (GenerateRequest(text="word " * 5000), "fit the model's context"),
    (GenerateRequest(text="hi", request_id="bad id with spaces"), "request_id"),
])
def test_bad_requests_are_invalid_argument(pipeline, request_, message):
    async def body(stub, backend):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request_):
                pass
        # The service stays usable for the next client.
        _, done = await answer(stub, "still there?", max_tokens=2)
        return err.value, done

    err, done = asyncio.run(run_stack(pipeline, body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert done is not None


def test_backpressure_is_resource_exhausted(pipeline):
    async def body(stub, backend):
        first = stub.Generate(GenerateRequest(text="first"))  # no worker: it stays queued
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(GenerateRequest(text="second")):
                pass
        first.cancel()
        return err.value

    err = asyncio.run(run_stack(pipeline, body, worker=False, backlog_limit=1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "llm:generator" in err.details()


def test_client_cancellation_stops_generation(pipeline):
    async def body(stub, backend):
        call = stub.Generate(GenerateRequest(request_id="cancel-me", text="talk for a long time",
                                             sampling=SamplingProto(max_tokens=3000)))
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 3:
                call.cancel()
                break
        # The engine knows the call by the orchestrator's own id for it, which starts with the caller's.
        [rid] = [r for r in backend.engine.stats.tokens_by_request if r.startswith("cancel-me.")]
        for _ in range(200):
            if rid not in backend.engine.running:
                break
            await asyncio.sleep(0.01)
        stopped = backend.engine.stats.tokens_by_request.get(rid, 0)
        await asyncio.sleep(0.3)
        return rid, stopped, backend.engine.stats.tokens_by_request.get(rid, 0), backend.engine

    rid, stopped, later, engine = asyncio.run(run_stack(pipeline, body))
    assert rid not in engine.running
    assert later == stopped < 3000


def test_one_trace_across_grpc_and_redis_hops(pipeline):
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from vita.telemetry.tracing import configure_tracing

    exporter = InMemorySpanExporter()
    provider = configure_tracing("test", exporter=exporter)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another test installed the global tracer provider first")
    client_tracer = trace.get_tracer("client")

    async def body(stub, backend):
        from opentelemetry import propagate

        with client_tracer.start_as_current_span("client call") as span:
            metadata: dict[str, str] = {}
            propagate.inject(metadata)
            async for _ in stub.Generate(GenerateRequest(text="trace me", sampling=SamplingProto(max_tokens=3)),
                                         metadata=tuple(metadata.items())):
                pass
            return span.get_span_context().trace_id

    trace_id = asyncio.run(run_stack(pipeline, body))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"client call", "Generate", "generate llm:generator"} <= set(spans)
    assert {s.context.trace_id for s in spans.values()} == {trace_id}
    assert spans["generate llm:generator"].parent.span_id == spans["Generate"].context.span_id


def test_encode_timeout_reaches_generate_and_converse(pipeline, wide_png):
    """Converse once got a copy of two settings only, so `--encode-timeout` never reached it. No encoder runs
    here: both calls must give up after the configured wait and say so."""
    async def body(stub, backend):
        async def requests():
            yield session_config()
            yield image_event(wide_png)
            yield text_event("What is in the picture?")  # its image goes to the vision pool, where nobody listens
            yield ClientEvent(end=EndOfInput())

        events = [e async for e in stub.Converse(requests())]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(GenerateRequest(text="What is it?", images=[Image(data=wide_png.read_bytes())])):
                pass
        return events, err.value

    events, err = asyncio.run(run_stack(pipeline, body, config=OrchestratorConfig(encode_timeout_s=0.4)))
    errors = [e.error for e in events if e.HasField("error")]
    assert [e.code for e in errors] == [grpc.StatusCode.UNAVAILABLE.value[0]], events
    # What the timeout says of the pool: its job waits and nobody takes it (no encoder runs).
    waiting = "the vision-encoder pool has 1 job waiting and 0 in progress (no worker is taking its jobs"
    assert "within 0.4 s" in errors[0].message and waiting in errors[0].message
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "within 0.4 s" in err.details()
    assert "the vision-encoder pool has 2 jobs waiting and 0 in progress" in err.details()


def test_a_judgement_that_times_out_says_the_monitor_pool_holds_the_job_in_progress(redis_prefix):
    """A monitor that took the judge job and went silent (stuck, or dead before `reclaim_idle_ms`): the timeout
    names the pool and the job in progress there, not only the reply stream it waited on."""
    from vita.bus.queue import Consumer
    from vita.bus.replies import ReplyTimeout
    from vita.bus.streams import Pool
    from vita.orchestrator.pools import PoolClient
    from vita.orchestrator.prompts import Prompt
    from vita.v1.bus_pb2 import GenerationJob

    async def main():
        redis = Redis.from_url("redis://127.0.0.1:6379/0")
        bus = BusConfig(prefix=redis_prefix)
        pools = PoolClient(redis, bus, OrchestratorConfig(judge_timeout_s=0.5), context_len=256)
        silent = Consumer(redis, bus, Pool.LLM_MONITOR)
        judging = asyncio.create_task(pools.judge("s.judge.1", GenerationJob.MONITOR, Prompt([1, 2, 3], [], [])))
        while not await silent.read(block_ms=100):  # the monitor takes the job, then never answers
            pass
        try:
            with pytest.raises(ReplyTimeout) as err:
                await judging
        finally:
            await redis.aclose()
        return str(err.value)

    message = asyncio.run(main())
    assert "within 0.5 s; the llm:monitor pool has 0 jobs waiting and 1 in progress" in message
    assert "no worker is taking" not in message


def test_converse_calls_leave_nothing_behind(pipeline):
    """The soak's leak check in one process: once its sessions have ended, a round of concurrent Converse calls
    leaves no ConverseCall, cleanup task or asyncio task behind, so a second round ends where the first did.

    With the garbage collector off: an ended call must be freed by reference counting alone. (gRPC keeps each
    RPC's state in a cycle that only a full collection frees; a callback there that held the call strongly kept
    every ended call, its VAD buffers and tasks with it, alive until then.)
    """
    async def session(stub, k):
        """Two typed turns, each sent once the previous answer completed (an interrupted answer would swap the
        roles, and only a generator-role worker runs here)."""
        answered = asyncio.Queue()

        async def requests():
            yield session_config(max_tokens=4)
            for turn in range(2):
                yield text_event(f"Client {k}, question {turn}.")
                await answered.get()
            yield ClientEvent(end=EndOfInput())

        completed = 0
        async for event in stub.Converse(requests()):
            if event.HasField("completed"):
                completed += 1
                answered.put_nowait(None)
        return completed

    def calls_alive() -> int:
        return sum(type(o) is converse.ConverseCall for o in gc.get_objects())  # no collection: gc is off

    # Tasks that end on their own after the client saw its last event: the llm worker's jobs (each acknowledges
    # after publishing its completion) and gRPC's per-RPC tasks (its aio server finishes an RPC after the handler's
    # last message went out). A leaked call keeps its RPC task alive, so the wait below times out naming it.
    transient = ("LLMWorker._handle", "_handle_exceptions", "_schedule_rpc_coro")

    def still_ending() -> Counter:
        return Counter(q for t in asyncio.all_tasks() if (q := t.get_coro().__qualname__) in transient)

    async def settled() -> Counter:
        """Tasks by coroutine once every call's cleanup has run, its objects are gone and the tasks that end on
        their own have ended (polled: gRPC ends its own tasks)."""
        start = time.monotonic()
        while converse._CLEANUPS or calls_alive() or still_ending():
            assert time.monotonic() - start < 60, (f"{len(converse._CLEANUPS)} cleanups, {calls_alive()} calls, "
                                                   f"tasks still running: {dict(still_ending())}")
            await asyncio.sleep(0.01)
        return Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks())

    async def body(stub, backend):
        counts = []
        for _ in range(2):
            assert await asyncio.gather(*(session(stub, k) for k in range(6))) == [2] * 6
            counts.append(await settled())
        return counts

    gc.collect()
    gc.disable()
    try:
        first, second = asyncio.run(run_stack(pipeline, body))
    finally:
        gc.enable()
    assert second == first
