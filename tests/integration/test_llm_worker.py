"""The llm worker over real Redis: jobs in, token events out, embeddings read from the bus, cancellation."""

import asyncio
import json
import time
import uuid

import pytest
import torch
from conftest import delete_prefix
from redis.asyncio import Redis

from vita.bus.cancel import cancel
from vita.bus.embeddings import write_embedding
from vita.bus.lease import LeaseKeeper, check_every_s, renew_every_s
from vita.bus.queue import Consumer, submit
from vita.bus.replies import events
from vita.bus.streams import ROLE_POOLS, BusConfig, Pool
from vita.errors import CheckpointError
from vita.llm.__main__ import engine_config, load_backend, parse_args
from vita.llm.backends.torch.backend import TorchBackend
from vita.llm.worker import LLMWorker, WorkerConfig, prompt_from_job
from vita.model.audio import AudioTower
from vita.model.checkpoint import INDEX_FILE
from vita.model.generation import SamplingParams, stream_generate
from vita.model.vision import VisionTower
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import VitaTokenizer
from vita.telemetry.metrics import Metrics
from vita.v1.assistant_pb2 import Completed
from vita.v1.bus_pb2 import EmbeddingPlacement, EmbeddingRef, GenerationJob, JobError
from vita.v1.media_pb2 import SamplingParams as SamplingProto

TOWERS = ("vision_tower.", "audio_tower.")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return VitaForCausalLM.from_pretrained(tiny_model_dir), VitaTokenizer.from_file(tiny_model_dir)


@pytest.fixture(scope="module")
def worker_model(tiny_model_dir):
    """The model `vita serve llm` runs: what its entry point loads for the torch backend."""
    return load_backend(parse_args(["--model", str(tiny_model_dir), "--no-engine-process"]), tiny_model_dir,
                        Metrics()).model


@pytest.fixture(scope="module", params=["whole model", "worker model"])
def served_model(request, model_and_tokenizer):
    """The model behind the worker: the whole VITA model, or the language model alone as the service loads it."""
    return model_and_tokenizer[0] if request.param == "whole model" else request.getfixturevalue("worker_model")


async def with_worker(model, tokenizer, body, role=GenerationJob.GENERATOR, *, lease_ttl_s=5.0, metrics=None,
                      url="redis://127.0.0.1:6379/0"):
    redis = Redis.from_url(url)
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}", lease_ttl_s=lease_ttl_s)
    # The engine as the worker's CLI configures it by default (chunked prefill, prefix caching).
    backend = TorchBackend(model, max_batch_size=4, engine_config=engine_config(parse_args([])))
    await backend.start()
    worker = LLMWorker(redis, bus, backend, tokenizer, WorkerConfig(role=role, max_concurrency=4), metrics)
    task = asyncio.create_task(worker.run())
    try:
        return await body(redis, bus, backend)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await backend.close()
        delete_prefix(bus.prefix, url)
        await redis.aclose()


def job(bus, rid, ids, max_tokens=8, role=GenerationJob.GENERATOR, placements=()):
    return GenerationJob(request_id=rid, role=role, reply_stream=bus.reply(rid), prompt_token_ids=ids,
                         embeddings=list(placements), sampling=SamplingProto(), max_tokens=max_tokens)


async def collect(redis, bus, rid):
    out = []
    async for event in events(redis, bus.reply(rid), timeout_s=30):
        out.append(event)
        if event.WhichOneof("event") in ("finished", "error"):
            return out


def tokens_of(evts):
    return [t for e in evts if e.WhichOneof("event") == "delta" for t in e.delta.token_ids]


def test_concurrent_jobs_with_embeddings_match_in_process(model_and_tokenizer, served_model):
    model, tok = model_and_tokenizer
    prompts = [tok.encode(f"user:question number {i}", add_bos=True) for i in range(3)]
    table = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    async def body(redis, bus, backend):
        ref = await write_embedding(redis, bus, "img-1", table, [5])
        placement = EmbeddingPlacement(embedding=ref, spans=[EmbeddingPlacement.Span(start=2, length=3),
                                                             EmbeddingPlacement.Span(start=7, length=2)])
        jobs = [job(bus, f"r{i}", p) for i, p in enumerate(prompts)]
        jobs.append(job(bus, "mm", prompts[0] + [5] * 6, placements=[placement]))
        for j in jobs:
            await submit(redis, bus, Pool.LLM_GENERATOR, j)
        return await asyncio.gather(*(collect(redis, bus, j.request_id) for j in jobs))

    results = asyncio.run(with_worker(served_model, tok, body))
    params = SamplingParams(max_new_tokens=8)
    for ids, evts in zip(prompts, results[:3]):
        assert tokens_of(evts) == list(stream_generate(model, torch.tensor(ids), params=params))
        done = evts[-1].finished
        assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == len(tokens_of(evts))
        assert "".join(e.delta.text for e in evts if e.WhichOneof("event") == "delta") == \
            tok.decode([t for t in tokens_of(evts) if t != tok.eos_id])
    mm_ids = torch.tensor(prompts[0] + [5] * 6)
    embeds = model.get_input_embeddings()(mm_ids).detach().clone()
    embeds[torch.tensor([2, 3, 4, 7, 8])] = table
    assert tokens_of(results[3]) == list(stream_generate(model, inputs_embeds=embeds, params=params))


def test_a_job_s_prompt_names_each_encoder_row_by_its_blob_digest_and_row():
    digest = bytes(range(16))
    refs = [EmbeddingRef(key="a", shape=[3, 4], digest=digest), EmbeddingRef(key="b", shape=[2, 4], digest=digest[::-1])]
    placements = [EmbeddingPlacement(embedding=refs[0], spans=[EmbeddingPlacement.Span(start=5, length=3)]),
                  EmbeddingPlacement(embedding=refs[1], spans=[EmbeddingPlacement.Span(start=1, length=2)])]
    generation = GenerationJob(request_id="r", prompt_token_ids=list(range(3, 12)), embeddings=placements)
    prompt = prompt_from_job(generation, [torch.zeros(3, 4), torch.ones(2, 4)])
    assert prompt.slot_positions.tolist() == [1, 2, 5, 6, 7]  # prompt order: blob b's rows come first
    high, low = (int.from_bytes(digest[i:i + 8], "little", signed=True) for i in (0, 8))
    high_b, low_b = (int.from_bytes(digest[::-1][i:i + 8], "little", signed=True) for i in (0, 8))
    assert prompt.slot_identity.tolist() == [[high_b, low_b, 0], [high_b, low_b, 1],
                                             [high, low, 0], [high, low, 1], [high, low, 2]]
    # A reference without a digest (a writer before it existed): no identity, the engine hashes the rows.
    generation.embeddings[1].embedding.ClearField("digest")
    assert prompt_from_job(generation, [torch.zeros(3, 4), torch.ones(2, 4)]).slot_identity is None


def test_monitor_pool_is_separate(model_and_tokenizer):
    model, tok = model_and_tokenizer

    async def body(redis, bus, backend):
        await submit(redis, bus, Pool.LLM_MONITOR, job(bus, "m1", tok.encode("hi", add_bos=True),
                                                          role=GenerationJob.MONITOR, max_tokens=2))
        return await collect(redis, bus, "m1")

    evts = asyncio.run(with_worker(model, tok, body, role=GenerationJob.MONITOR))
    assert evts[-1].WhichOneof("event") == "finished"


def test_cancel_stops_the_compute(model_and_tokenizer):
    model, tok = model_and_tokenizer

    async def body(redis, bus, backend):
        await submit(redis, bus, Pool.LLM_GENERATOR, job(bus, "long", tok.encode("tell me", add_bos=True),
                                                            max_tokens=3000))
        seen = []
        async for event in events(redis, bus.reply("long"), timeout_s=30):
            seen.append(event)
            if len(seen) == 5:
                await cancel(redis, bus, "long")
            if event.WhichOneof("event") in ("finished", "error"):
                break
        at_finish = backend.engine.stats.tokens_by_request["long"]
        for _ in range(100):  # the engine thread drops the sequence at the start of its next step
            if "long" not in backend.engine.running:
                break
            await asyncio.sleep(0.01)
        stopped = backend.engine.stats.tokens_by_request["long"]
        await asyncio.sleep(0.3)
        return seen, at_finish, stopped, backend.engine.stats.tokens_by_request["long"], backend.engine

    seen, at_finish, stopped, later, engine = asyncio.run(with_worker(model, tok, body))
    assert seen[-1].finished.finish_reason == Completed.CANCELLED
    assert stopped == at_finish  # the worker reports the end only once the engine dropped the sequence
    assert seen[-1].finished.usage.completion_tokens == stopped
    assert later == stopped < 3000 and "long" not in engine.running


def test_cancel_stops_the_engine_and_counts_its_tokens_however_far_the_worker_lags(model_and_tokenizer):
    """A busy event loop relays tokens slower than the engine computes them: the tokens pile up between the two.
    The cancel must still stop the engine, and the usage must be what the engine computed, not what was relayed."""
    model, tok = model_and_tokenizer

    async def body(redis, bus, backend):
        async def busy_loop():  # every turn of the event loop takes 3 ms more; the engine thread is not slowed
            while True:
                time.sleep(0.003)
                await asyncio.sleep(0)

        await submit(redis, bus, Pool.LLM_GENERATOR, job(bus, "long", tok.encode("tell me", add_bos=True),
                                                            max_tokens=3000))
        replies = events(redis, bus.reply("long"), timeout_s=30)
        seen = [await anext(replies)]
        hog = asyncio.create_task(busy_loop())
        try:
            relayed = lambda: backend.engine.stats.tokens_by_request.get("long", 0)  # noqa: E731
            while relayed() < len(seen) + 20:  # wait for a backlog of tokens the worker has not relayed
                seen.append(await anext(replies))
            await cancel(redis, bus, "long")
            async for event in replies:
                seen.append(event)
                if event.WhichOneof("event") in ("finished", "error"):
                    break
        finally:
            hog.cancel()
        return seen, backend.engine

    seen, engine = asyncio.run(with_worker(model, tok, body))
    done = seen[-1].finished
    computed = engine.stats.tokens_by_request["long"]
    assert done.finish_reason == Completed.CANCELLED and "long" not in engine.running
    assert done.usage.completion_tokens == computed < 3000  # every token the engine made, relayed or not
    assert len(tokens_of(seen)) < computed  # the backlog was dropped, not relayed after the cancel


@pytest.mark.parametrize("role", [GenerationJob.GENERATOR, GenerationJob.MONITOR], ids=["generator", "monitor"])
def test_a_generation_whose_owner_is_gone_stops_when_its_lease_expires(model_and_tokenizer, role):
    """The owner stops renewing and sends no cancel, as a killed orchestrator does: the running job ends CANCELLED
    long before max_tokens and is counted orphaned; a queued job whose lease is gone is skipped without compute."""
    model, tok = model_and_tokenizer
    metrics = Metrics()
    pool = ROLE_POOLS[role]

    async def body(redis, bus, backend):
        keeper = LeaseKeeper(redis, bus)
        running = job(bus, "running", tok.encode("tell me", add_bos=True), max_tokens=3000, role=role)
        running.leased = await keeper.acquire("running")
        await submit(redis, bus, pool, running)
        seen = []
        async for event in events(redis, bus.reply("running"), timeout_s=60):
            seen.append(event)
            if len(seen) == 3:
                keeper.release("running")  # the owner died
            if event.WhichOneof("event") in ("finished", "error"):
                break
        queued = job(bus, "queued", tok.encode("hello", add_bos=True), max_tokens=3000, role=role)
        queued.leased = True  # its owner died before the job was read: no lease left
        await submit(redis, bus, pool, queued)
        return seen, await collect(redis, bus, "queued"), backend.engine

    seen, queued, engine = asyncio.run(with_worker(model, tok, body, role, lease_ttl_s=1.0, metrics=metrics))
    done = seen[-1].finished
    assert done.finish_reason == Completed.CANCELLED and done.usage.completion_tokens < 3000
    assert "running" not in engine.running
    assert [e.WhichOneof("event") for e in queued] == ["finished"]
    assert queued[0].finished.finish_reason == Completed.CANCELLED
    assert "queued" not in engine.stats.tokens_by_request  # never reached the engine
    assert metrics.orphaned.labels(pool.value)._value.get() == 2
    assert metrics.cancelled.labels(pool.value)._value.get() == 1  # the sequence stopped; the queued job never ran


def test_a_job_taken_over_from_a_dead_worker_is_answered_and_counted(model_and_tokenizer):
    """A consumer took the job and died without acknowledging it: the worker takes it over after reclaim_idle_ms,
    answers it and counts it in vita:jobs_reclaimed_total of its pool (an operator's try: nothing told)."""
    model, tok = model_and_tokenizer
    metrics = Metrics()
    pool = Pool.LLM_GENERATOR

    async def main():
        redis = Redis.from_url("redis://127.0.0.1:6379/0")
        bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}", reclaim_idle_ms=200)
        backend = TorchBackend(model, max_batch_size=4, engine_config=engine_config(parse_args([])))
        try:
            await submit(redis, bus, pool, job(bus, "r1", tok.encode("hello", add_bos=True), max_tokens=4))
            await Consumer(redis, bus, pool).read(block_ms=None)  # and dies with it
            await backend.start()
            worker = LLMWorker(redis, bus, backend, tok, WorkerConfig(max_concurrency=4), metrics)
            assert metrics.registry.get_sample_value("vita:jobs_reclaimed_total", {"pool": pool.value}) == 0
            task = asyncio.create_task(worker.run())
            try:
                return await collect(redis, bus, "r1")
            finally:
                worker.stop()
                await asyncio.wait_for(task, 30)
        finally:
            await backend.close()
            delete_prefix(bus.prefix)
            await redis.aclose()

    answer = asyncio.run(main())
    assert answer[-1].WhichOneof("event") == "finished"
    assert metrics.jobs_reclaimed.labels(pool.value)._value.get() == 1


def test_leases_cost_redis_calls_per_second_not_per_token(model_and_tokenizer, tmp_path):
    """No Redis call per token for a lease: the owner renews on its clock, the worker reads leases with its cancel
    keys on its clock. Counted on a private redis-server, where nothing else runs: the SETs and EXISTSes of a long
    leased generation are bounded by its duration over those periods, whatever its token count."""
    from vita.stack import RedisServer

    model, tok = model_and_tokenizer
    with RedisServer(str(tmp_path / "redis")) as server:
        async def body(redis, bus, backend):
            keeper = LeaseKeeper(redis, bus)
            leased = job(bus, "long", tok.encode("tell me", add_bos=True), max_tokens=1000)
            await redis.config_resetstat()
            start = time.perf_counter()
            leased.leased = await keeper.acquire("long")
            await submit(redis, bus, Pool.LLM_GENERATOR, leased)
            evts = await collect(redis, bus, "long")
            keeper.release("long")
            seconds = time.perf_counter() - start
            stats = await redis.info("commandstats")
            return evts, seconds, {c: stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("set", "exists")}

        evts, seconds, calls = asyncio.run(with_worker(model, tok, body, lease_ttl_s=1.0, url=server.url))
    bus = BusConfig(lease_ttl_s=1.0)
    tokens = len(tokens_of(evts))
    bound = (seconds / renew_every_s(bus) + 2) + 2 * (seconds / check_every_s(bus) + 2)  # SETs + EXISTS pairs
    print(f"{tokens} tokens in {seconds:.1f} s: {calls['set']} SET, {calls['exists']} EXISTS (bound {bound:.0f})")
    assert tokens == 1000 and calls["set"] + calls["exists"] <= bound


def test_bad_job_gets_an_error_and_the_worker_goes_on(model_and_tokenizer):
    model, tok = model_and_tokenizer

    async def body(redis, bus, backend):
        ref = await write_embedding(redis, bus, "x", torch.zeros(4, model.config.hidden_size), [4])
        bad = job(bus, "bad", [1, 5, 5], placements=[EmbeddingPlacement(
            embedding=ref, spans=[EmbeddingPlacement.Span(start=1, length=4)])])
        await submit(redis, bus, Pool.LLM_GENERATOR, bad)
        await submit(redis, bus, Pool.LLM_GENERATOR, job(bus, "good", tok.encode("hi", add_bos=True)))
        return await collect(redis, bus, "bad"), await collect(redis, bus, "good")

    bad, good = asyncio.run(with_worker(model, tok, body))
    assert bad[-1].error.code == JobError.INVALID_ARGUMENT and "4 rows" in bad[-1].error.message
    assert good[-1].WhichOneof("event") == "finished"


def test_the_worker_loads_the_language_model_alone(model_and_tokenizer, worker_model):
    """An LLM pod never holds the towers the encoder pools run: same LLM weights, no tower parameter."""
    model, _ = model_and_tokenizer
    whole = dict(model.named_parameters())
    llm = {name: p for name, p in whole.items() if not name.startswith(TOWERS)}
    assert len(llm) < len(whole)  # the checkpoint has towers to leave out
    assert worker_model.vision_tower is None and worker_model.audio_tower is None
    assert not any(isinstance(m, (VisionTower, AudioTower)) for m in worker_model.modules())
    loaded = dict(worker_model.named_parameters())
    assert loaded.keys() == llm.keys()
    assert sum(p.numel() for p in loaded.values()) == sum(p.numel() for p in llm.values())
    assert all(torch.equal(loaded[name], p) for name, p in llm.items())


def test_the_towers_tensors_are_never_read(model_and_tokenizer, tmp_path):
    """Shards holding only tower tensors are not even opened: corrupt them and the LLM still loads."""
    model, _ = model_and_tokenizer
    model.save_pretrained(tmp_path, max_shard_bytes=1 << 20)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    tower_only = [shard for shard, names in shards.items() if all(n.startswith(TOWERS) for n in names)]
    assert tower_only and len(tower_only) < len(shards)
    for shard in tower_only:
        (tmp_path / shard).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        VitaForCausalLM.from_pretrained(tmp_path)
    llm = VitaForCausalLM.from_pretrained(tmp_path, towers=False)
    ids = torch.tensor([1, 5, 9, 13])
    params = SamplingParams(max_new_tokens=6)
    assert list(stream_generate(llm, ids, params=params)) == list(stream_generate(model, ids, params=params))
