"""The torch backend with its engine core in a process of its own (`--engine-process`, the llm service's default):
the same tokens as the engine in a thread, the engine's errors raised to the caller, cancels applied in the child,
and a dead engine core leaves its jobs to another worker over real Redis."""

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest
import torch
from conftest import abandon_at, delete_prefix
from redis.asyncio import Redis
from test_llm_worker import collect, job, tokens_of

from vita.bus.queue import submit
from vita.bus.replies import events
from vita.bus.streams import BusConfig, Pool
from vita.errors import ContextLengthError, InvalidInputError, VitaError
from vita.llm.__main__ import engine_config, parse_args
from vita.llm.backends.base import BackendRequest, EngineDeadError, PromptInput
from vita.llm.backends.torch.backend import TorchBackend, TorchProcessBackend
from vita.llm.worker import LLMWorker, WorkerConfig
from vita.model.generation import SamplingParams, stream_generate
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import VitaTokenizer

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return VitaForCausalLM.from_pretrained(tiny_model_dir, towers=False)


def ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed))


def backend_for(model_dir, max_batch_size=4) -> TorchProcessBackend:
    return TorchProcessBackend(model_dir, max_batch_size=max_batch_size, max_seq_len=256, threads=1,
                               engine_config=engine_config(parse_args([])))


async def tokens(backend, request) -> list[int]:
    return [o.token_id async for o in backend.generate(request)]


def test_same_tokens_as_in_process_and_the_engines_errors(model, tiny_model_dir):
    hidden = model.config.hidden_size
    table = torch.randn(3, hidden, generator=torch.Generator().manual_seed(9))
    params = SamplingParams(max_new_tokens=12)
    requests = [BackendRequest(f"r{i}", PromptInput(ids(i, 6 + 3 * i)), params) for i in range(3)]
    requests.append(BackendRequest("mm", PromptInput(ids(7, 10), torch.tensor([2, 3, 4]), table), params))

    async def main():
        backend = backend_for(tiny_model_dir)
        await backend.start()
        try:
            results = await asyncio.gather(*(tokens(backend, r) for r in requests))
            errors = []
            for bad in (PromptInput(torch.tensor([], dtype=torch.long)), PromptInput(ids(1, 300))):
                with pytest.raises(InvalidInputError) as e:
                    await tokens(backend, BackendRequest("bad", bad, params))
                errors.append(e.value)
            # The rejected requests left nothing behind: the same id is served next.
            again = await tokens(backend, BackendRequest("bad", PromptInput(ids(0, 6)), params))
            return results, errors, again
        finally:
            await backend.close()

    results, errors, again = asyncio.run(main())
    for request, got in zip(requests[:3], results[:3]):
        assert got == list(stream_generate(model, request.prompt.input_ids, params=params))
    embeds = model.get_input_embeddings()(ids(7, 10)).detach().clone()
    embeds[torch.tensor([2, 3, 4])] = table
    assert results[3] == list(stream_generate(model, inputs_embeds=embeds, params=params))
    assert "empty" in str(errors[0])
    assert isinstance(errors[1], ContextLengthError) and "300 tokens" in str(errors[1])
    assert again == results[0]


def test_abandoned_stream_is_cancelled_in_the_child(tiny_model_dir):
    async def main():
        backend = backend_for(tiny_model_dir, max_batch_size=2)
        await backend.start()
        try:
            await abandon_at(backend.generate(BackendRequest("long", PromptInput(ids(2, 9)), SamplingParams(
                max_new_tokens=240, ignore_eos=True))), 3)
            async with asyncio.timeout(30):  # the child drops it at its next step and reports an empty batch
                while backend.snapshot.num_running:
                    await asyncio.sleep(0.01)
            # Both slots are free: two more sequences run at once.
            both = await asyncio.gather(*(tokens(backend, BackendRequest(f"n{i}", PromptInput(ids(i, 5)),
                                                                         SamplingParams(max_new_tokens=4)))
                                          for i in range(2)))
            return backend.snapshot, both
        finally:
            await backend.close()

    snapshot, both = asyncio.run(main())
    assert snapshot.num_running == 0 and snapshot.decode_tokens < 240
    assert [len(t) for t in both] == [4, 4]


def test_a_bad_model_directory_is_a_one_line_start_error(tmp_path):
    async def main():
        await TorchProcessBackend(tmp_path / "missing").start()

    with pytest.raises(VitaError) as e:
        asyncio.run(main())
    assert str(e.value).startswith("the engine core could not start:") and "\n" not in str(e.value)


def test_a_dead_engine_core_leaves_its_job_to_another_worker(model, tiny_model_dir):
    """SIGKILL the engine core mid-answer: the worker stops with EngineDeadError, publishes no error and leaves the
    job unacknowledged; a second worker reclaims it and the client reads the whole answer once."""
    tok = VitaTokenizer.from_file(tiny_model_dir)
    prompt = tok.encode("user:describe the picture", add_bos=True)
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}", reclaim_idle_ms=300)

    async def main():
        redis = Redis.from_url(REDIS_URL)
        dying = backend_for(tiny_model_dir)
        await dying.start()
        first = LLMWorker(redis, bus, dying, tok, WorkerConfig(max_concurrency=4))
        run = asyncio.create_task(first.run())
        try:
            await submit(redis, bus, Pool.LLM_GENERATOR, job(bus, "r1", prompt, max_tokens=64))
            reading = asyncio.create_task(collect(redis, bus, "r1"))
            async with asyncio.timeout(30):
                while not dying.snapshot or not dying.snapshot.decode_tokens:
                    await asyncio.sleep(0.01)
            os.kill(dying.core.process.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(run, 30)
            pending = await redis.xpending(bus.jobs(Pool.LLM_GENERATOR), Pool.LLM_GENERATOR.group)
            with pytest.raises(EngineDeadError):  # a dead backend refuses at once
                await tokens(dying, BackendRequest("r2", PromptInput(ids(0, 5)), SamplingParams()))
            thread = TorchBackend(model, max_batch_size=4, engine_config=engine_config(parse_args([])))
            await thread.start()
            second = LLMWorker(redis, bus, thread, tok, WorkerConfig(max_concurrency=4))
            rescue = asyncio.create_task(second.run())
            try:
                return pending, await asyncio.wait_for(reading, 60)
            finally:
                second.stop()
                await asyncio.wait_for(rescue, 30)
                await thread.close()
        finally:
            await dying.close()
            delete_prefix(bus.prefix, REDIS_URL)
            await redis.aclose()

    pending, events = asyncio.run(main())
    assert pending["pending"] == 1
    assert [e.WhichOneof("event") for e in events].count("error") == 0
    assert events[-1].WhichOneof("event") == "finished"
    expected = list(stream_generate(model, torch.tensor(prompt), params=SamplingParams(max_new_tokens=64)))
    assert tokens_of(events) == expected


def test_the_engine_core_exits_with_its_parent(tiny_model_dir, tmp_path):
    """A SIGKILLed service leaves no engine core behind (on a GPU it would hold the memory): the child reads EOF."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, sys\n"
        "from vita.llm.backends.torch.backend import TorchProcessBackend\n"
        "async def main():\n"
        f"    backend = TorchProcessBackend({str(tiny_model_dir)!r}, threads=1)\n"
        "    await backend.start()\n"
        "    print(backend.core.process.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(30)
        deadline = asyncio.run(_wait_gone(child))
    finally:
        parent.kill()
    assert deadline, f"engine core {child} outlived its parent"


async def _wait_gone(pid: int) -> bool:
    """True once `pid` is gone or a zombie (its parent died, so init reaps it), within 30 s."""
    async with asyncio.timeout(30):
        while True:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
            except FileNotFoundError:
                return True
            await asyncio.sleep(0.05)


def test_the_service_exits_1_when_its_idle_engine_core_dies(tiny_model_dir):
    """`vita serve llm` (the engine core is its default): the core killed while no job runs stops the worker at
    once, and the process exits with status 1 and one line on stderr, so that Kubernetes restarts it."""
    import subprocess
    import sys

    prefix = f"test:{uuid.uuid4().hex[:12]}"
    service = subprocess.Popen([sys.executable, "-m", "vita.llm", "--model", str(tiny_model_dir), "--threads", "1",
                                "--prefix", prefix, "--redis", REDIS_URL], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        for line in service.stderr:  # JSON log lines; "serving" once the engine core answered
            if '"serving"' in line:
                break
        children = [int(c) for t in os.listdir(f"/proc/{service.pid}/task")
                    for c in Path(f"/proc/{service.pid}/task/{t}/children").read_text().split()]
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        status = service.wait(60)
        rest = service.stderr.read().strip().splitlines()
    finally:
        service.kill()
        delete_prefix(prefix, REDIS_URL)
    assert status == 1
    assert rest[-1].startswith("vita serve llm: error: the engine core process exited (status -9)")


def test_a_stop_signalled_to_the_whole_process_group_is_an_ordinary_drain(tiny_model_dir):
    """An operator's try: `timeout 25 vita serve llm` (and `vita down`, and systemd) SIGTERM the service's whole
    process group. The engine core died of it at once: `engine core died` at error, the generation in flight cut
    off, exit status 1. It ignores the signal now, as it does Ctrl-C: the service drains, its generation in flight
    ends on the engine, and it exits 0 with no error logged."""
    import contextlib
    import json
    import subprocess
    import sys

    tok = VitaTokenizer.from_file(tiny_model_dir)
    prompt = tok.encode("user:describe the picture", add_bos=True)
    bus = BusConfig(prefix=f"test:{uuid.uuid4().hex[:12]}")
    service = subprocess.Popen([sys.executable, "-m", "vita.llm", "--model", str(tiny_model_dir), "--threads", "1",
                                "--prefix", bus.prefix, "--redis", REDIS_URL], stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    async def answer_across_the_stop() -> tuple[list, int | None]:
        """The answer's events, and how many of them were read when the group was signalled (at the first token)."""
        redis = Redis.from_url(REDIS_URL)
        seen, signalled_at = [], None
        try:
            await submit(redis, bus, Pool.LLM_GENERATOR, job(bus, "r1", prompt, max_tokens=200))
            async for event in events(redis, bus.reply("r1"), timeout_s=30):
                seen.append(event)
                if signalled_at is None and event.WhichOneof("event") == "delta":
                    os.killpg(service.pid, signal.SIGTERM)
                    signalled_at = len(seen)
                if event.WhichOneof("event") in ("finished", "error"):
                    return seen, signalled_at
        finally:
            await redis.aclose()
        return seen, signalled_at

    try:
        for line in service.stderr:
            if '"serving"' in line:
                break
        seen, signalled_at = asyncio.run(answer_across_the_stop())
        status = service.wait(60)
        logged = [json.loads(line) for line in service.stderr.read().splitlines() if line.startswith("{")]
        pending = asyncio.run(_pending(bus))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGKILL)
        delete_prefix(bus.prefix, REDIS_URL)
    assert signalled_at is not None and signalled_at < len(seen), "the answer ended before the stop"
    assert seen[-1].WhichOneof("event") == "finished"
    assert status == 0
    assert [e["msg"] for e in logged if e["level"] in ("error", "warning")] == []
    assert pending == 0  # answered and acknowledged, not left for another worker


async def _pending(bus: BusConfig) -> int:
    redis = Redis.from_url(REDIS_URL)
    try:
        return (await redis.xpending(bus.jobs(Pool.LLM_GENERATOR), Pool.LLM_GENERATOR.group))["pending"]
    finally:
        await redis.aclose()
