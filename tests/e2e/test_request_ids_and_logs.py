"""What a backend developer with a gRPC client of their own finds, against every service as its own process:

- `GenerateRequest.request_id` is only echoed: a reused id gets a fresh answer (it once replayed the earlier
  call's reply stream), and calls that share one run independently (they once failed INVALID_ARGUMENT "already in
  the engine", or hung 60 s and failed UNAVAILABLE);
- `Timings.queue_s` is the wait for the generator's engine (it was always 0);
- a client's mistakes (a bad request id, a deadline of 1 ms) are logged once at info, with no traceback, and
  the id cut to an excerpt (they were two ERROR entries with tracebacks per call, "Abort already called!",
  OpenTelemetry's "Failed to detach context"), while an error of the server's own is still logged at error, once.

The logs read are the services' own structured logs (one JSON object per line), in the stack's log directory.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import grpc
import pytest
import redis
from conftest import REDIS_URL, delete_prefix

from tests.service_process import running
from vita.stack import LocalStack, RedisServer, ServiceProcess, free_port
from vita.v1 import assistant_pb2_grpc
from vita.v1.assistant_pb2 import Completed, GenerateRequest, GenerateResponse
from vita.v1.media_pb2 import SamplingParams

MAX_BATCH = 2  # the generator's --max-batch: sequences decoded together, and jobs its worker takes at once


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    with LocalStack(model_dir=str(tiny_model_dir), prefix=f"ids{uuid.uuid4().hex[:8]}",
                    log_dir=str(tmp_path_factory.mktemp("logs")),
                    extra_args={"llm-generator": ["--max-batch", str(MAX_BATCH)]}) as running:
        yield running
    delete_prefix(running.prefix)


class Log:
    """The entries a service logged after this object was made."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.start = self.path.stat().st_size

    def lines(self) -> list[str]:
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace").splitlines()

    def entries(self) -> list[dict]:
        """Every line must be a JSON entry: a traceback printed raw (grpc's traceback.print_exc) is not one."""
        entries = []
        for line in self.lines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"{self.path.name}: a line that is not a log entry: {line[:300]}")
        return entries


def logs(stack: LocalStack) -> dict[str, Log]:
    return {s.name: Log(s.log_path) for s in stack.services}


async def call(stub, request: GenerateRequest, *, timeout: float = 120, cancel_after: int = 0
               ) -> tuple[list[GenerateResponse], Completed | None]:
    """The responses of one Generate call, and its Completed; with `cancel_after`, the call is cancelled after
    that many deltas (no Completed)."""
    responses = []
    stream = stub.Generate(request, timeout=timeout)
    async for response in stream:
        responses.append(response)
        if cancel_after and len(responses) == cancel_after:
            stream.cancel()
            return responses, None
    done = responses[-1].completed if responses and responses[-1].HasField("completed") else None
    return responses, done


def run(stack: LocalStack, body):
    async def main():
        async with grpc.aio.insecure_channel(stack.target) as channel:
            return await body(assistant_pb2_grpc.AssistantStub(channel))
    return asyncio.run(main())


def tokens(responses: list[GenerateResponse]) -> list[int]:
    return [t for r in responses if r.HasField("delta") for t in r.delta.token_ids]


def long(request_id: str, max_tokens: int, text: str = "Write a long poem") -> GenerateRequest:
    return GenerateRequest(request_id=request_id, text=text,
                           sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


# ----------------------------------------------------------------------------------------------------------------
# request_id is only echoed


def test_a_reused_request_id_gets_a_fresh_answer(stack):
    async def body(stub):
        first = await call(stub, GenerateRequest(request_id="order-42", text="What is two plus two?",
                                                 sampling=SamplingParams(max_tokens=3)))
        second = await call(stub, long("order-42", 30))
        cancelled = await call(stub, long("retry-7", 400), cancel_after=2)
        retried = await call(stub, long("retry-7", 5, "Say something short"))
        return first, second, cancelled, retried

    (_, first), (responses, second), _, (retried_responses, retried) = run(stack, body)
    assert first is not None and first.usage.completion_tokens <= 3
    # Not the first call's answer again: its own 30 tokens, to the end.
    assert second is not None and second.finish_reason == Completed.LENGTH
    assert second.usage.completion_tokens == len(tokens(responses)) == 30
    assert {r.request_id for r in responses} == {"order-42"}  # still echoed, unchanged
    # A retry after a cancel is answered, not given the cancelled stream back.
    assert retried is not None and retried.finish_reason == Completed.LENGTH
    assert retried.usage.completion_tokens == len(tokens(retried_responses)) == 5
    assert {r.request_id for r in retried_responses} == {"retry-7"}
    # Nothing on the bus is keyed by a caller's id: each call's keys carry the server's own id for it.
    with redis.Redis.from_url(REDIS_URL) as client:
        for request_id in ("order-42", "retry-7"):
            assert not list(client.scan_iter(match=f"{stack.prefix}:*{{{request_id}}}*")), request_id
            assert len(list(client.scan_iter(match=f"{stack.prefix}:reply:{{{request_id}.gen.*}}"))) == 2


def test_calls_sharing_a_request_id_run_independently(stack):
    async def body(stub):
        together = await asyncio.gather(call(stub, long("dup-1", 6, "Tell me about the sea")),
                                        call(stub, long("dup-1", 9, "Tell me about the sky")))
        running = asyncio.create_task(call(stub, long("dup-2", 40)))
        await asyncio.sleep(0.3)
        meanwhile = await call(stub, long("dup-2", 4, "And a short one"), timeout=30)
        return together, meanwhile, await running

    together, meanwhile, running = run(stack, body)
    for (responses, done), want in zip(together, (6, 9), strict=True):
        assert done is not None and done.usage.completion_tokens == len(tokens(responses)) == want
        assert {r.request_id for r in responses} == {"dup-1"}
    for (responses, done), want in ((meanwhile, 4), (running, 40)):
        assert done is not None and done.usage.completion_tokens == len(tokens(responses)) == want
        assert {r.request_id for r in responses} == {"dup-2"}


# ----------------------------------------------------------------------------------------------------------------
# Timings.queue_s


def test_queue_s_is_the_wait_for_the_generator(stack):
    """Three times --max-batch calls at once: the later ones wait for a slot, and queue_s says how long."""
    n = 3 * MAX_BATCH

    async def body(stub):
        return await asyncio.gather(*(call(stub, long(f"q{i}", 24, f"Count to ten, take {i}.")) for i in range(n)))

    timings = sorted((done.timings for _, done in run(stack, body)), key=lambda t: t.time_to_first_token_s)
    for t in timings:
        assert t.encode_s <= t.queue_s <= t.time_to_first_token_s <= t.total_s, t
    prefill = [t.time_to_first_token_s - t.queue_s for t in timings]
    waited = timings[MAX_BATCH:]  # these found every slot taken
    assert min(t.queue_s for t in waited) > max(t.queue_s for t in timings[:MAX_BATCH]), timings
    assert min(t.queue_s for t in waited) > max(prefill), (timings, prefill)
    # The first token follows admission by about one prefill, wherever in the queue a call was.
    later = [t for t in timings if t.queue_s > 0.5 * timings[-1].queue_s]
    assert all(t.time_to_first_token_s - t.queue_s < 0.5 * t.queue_s for t in later), timings


# ----------------------------------------------------------------------------------------------------------------
# Logs


def test_client_mistakes_are_logged_once_at_info_without_a_traceback(stack):
    before = logs(stack)
    bad_ids = ["bad id\n", "x" * 1000]

    async def body(stub):
        codes = []
        for request_id in bad_ids:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(stub, GenerateRequest(request_id=request_id, text="hi"))
            codes.append(err.value.code())
        for timeout in (0.001, 0.001, 0.005, 0.02, 0.05, 0.1, 0.2) * 2:  # past at once, in the queue, mid-answer
            try:
                await call(stub, long(f"late-{uuid.uuid4().hex[:6]}", 200), timeout=timeout)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
        await call(stub, long("walks-away", 200), cancel_after=2)
        await asyncio.sleep(1.0)  # cancels and deadlines reach the workers; abandoned calls are collected
        _, done = await call(stub, GenerateRequest(text="Still there?", sampling=SamplingParams(max_tokens=2)))
        return codes, done

    codes, done = run(stack, body)
    assert codes[:2] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert set(codes[2:]) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}, codes
    assert done is not None
    entries = {name: log.entries() for name, log in before.items()}
    for name, logged in entries.items():
        loud = [e for e in logged if e["level"] not in ("debug", "info") or "exc" in e]
        assert not loud, (name, loud)
    orchestrator = entries["orchestrator"]
    for request_id in bad_ids:  # once each, at info, the id escaped and cut
        refused = [e for e in orchestrator if e["msg"].startswith("request ended INVALID_ARGUMENT: request_id")
                   and e["request_id"].startswith(request_id[:20].replace("\n", "\\n"))]
        assert len(refused) == 1, orchestrator
        assert "\n" not in refused[0]["msg"] and len(refused[0]["request_id"]) < 200
    assert all(len(line) < 1000 for line in before["orchestrator"].lines())
    assert not any("x" * 200 in json.dumps(e) for e in orchestrator)


@pytest.fixture(scope="module")
def refused_orchestrator(tiny_model_dir, tmp_path_factory):
    """An orchestrator whose Redis user may not touch the bus's keys (a deployment's mistake, not a client's):
    a redis-server of its own, whose `vita` user is confined to another deployment's keys."""
    directory = tmp_path_factory.mktemp("refused")
    acl = directory / "users.acl"
    acl.write_text("user default off\nuser vita on >bus-secret resetkeys ~other:* resetchannels &other:* +@all\n")
    server = RedisServer(str(directory), args=("--aclfile", str(acl)))
    server.probe = lambda: redis.Redis(port=server.port, username="vita", password="bus-secret").ping()
    server.start()
    port = free_port()
    service = ServiceProcess("orchestrator", [
        sys.executable, "-m", "vita.orchestrator", "--model", str(tiny_model_dir), "--redis",
        f"redis://vita:bus-secret@127.0.0.1:{server.port}/0", "--prefix", "refused", "--grpc-port", str(port)],
        port, str(directory / "orchestrator.log"))
    try:
        with running(service):
            yield service
    finally:
        server.stop()


def test_a_server_error_is_logged_once_at_error(refused_orchestrator):
    log = Log(refused_orchestrator.log_path)

    async def body():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{refused_orchestrator.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(assistant_pb2_grpc.AssistantStub(channel), GenerateRequest(request_id="mine", text="hi"))
            return err.value

    err = asyncio.run(body())
    assert err.code() == grpc.StatusCode.INTERNAL and "the bus refused the orchestrator's Redis user" in err.details()
    errors = [e for e in log.entries() if e["level"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["code"] == "INTERNAL" and errors[0]["request_id"] == "mine"
    assert "the bus refused the orchestrator's Redis user" in errors[0]["msg"]



def test_the_serving_line_names_the_bus_without_its_password(refused_orchestrator):
    """An operator's try (2026-12-04): a hand-started worker's log did not say which bus (Redis, prefix) it had
    joined. The "serving" line does, the password masked."""
    text = Path(refused_orchestrator.log_path).read_text()
    serving = [e for e in map(json.loads, text.splitlines()) if e.get("msg") == "serving"]
    assert len(serving) == 1
    assert serving[0]["redis"].startswith("redis://vita:***@127.0.0.1:") and serving[0]["prefix"] == "refused"
    assert "bus-secret" not in text
