"""Readiness follows the bus (vita/runtime/readiness.py): a real orchestrator process on a private redis-server
reports `readiness` (and `vita.v1.Assistant`) NOT_SERVING while Redis is down and SERVING once it is back, while
`""` (the process: what a liveness probe asks) stays SERVING throughout; `vita:bus_up` and the log say the same,
and the Realtime gateway in front of it answers /readyz 503 meanwhile.
Each step waits for the status it expects (a Health.Watch stream), never for a fixed time."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.service_process import running
from vita.runtime.ports import free_port
from vita.runtime.readiness import READINESS
from vita.stack import RedisServer, ServiceProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_status(stub: health_pb2_grpc.HealthStub, service: str, wanted: int, timeout_s: float = 60) -> None:
    """Returns once `service` reports `wanted` (a Health.Watch stream: every change is pushed)."""
    seen = []
    try:
        for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s):
            seen.append(reply.status)
            if reply.status == wanted:
                return
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    pytest.fail(f"{service!r} never reported {health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)} "
                f"in {timeout_s:g} s (saw {seen})")


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_readyz(port: int, status: int, timeout_s: float = 60) -> str:
    """The Realtime gateway's /readyz once it answers `status` (it caches the orchestrator's answer for 2 s)."""
    deadline = time.monotonic() + timeout_s
    while (answer := readyz(port))[0] != status:
        assert time.monotonic() < deadline, f"/readyz still {answer} after {timeout_s:g} s"
        time.sleep(0.2)
    return answer[1]


def bus_up(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vita:bus_up "))


@pytest.mark.timeout(300)
def test_readiness_follows_redis_and_liveness_does_not(tiny_model_dir, tmp_path):
    with RedisServer(str(tmp_path / "redis")) as server:
        port, metrics_port = free_port(), free_port()
        log = tmp_path / "orchestrator.log"
        service = ServiceProcess("orchestrator", [
            sys.executable, "-m", "vita.orchestrator", "--model", str(tiny_model_dir), "--redis", server.url,
            "--prefix", f"test:{uuid.uuid4().hex[:12]}", "--grpc-port", str(port), "--plain-logs",
            "--metrics-port", str(metrics_port), "--redis-outage-s", "2"], port, str(log))
        gateway_port = free_port()
        gateway = ServiceProcess("realtime", [
            sys.executable, "-m", "vita.realtime", "--orchestrator", f"127.0.0.1:{port}", "--port", str(gateway_port)],
            gateway_port, str(tmp_path / "realtime.log"), health="http")
        with running(service, gateway), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert [status(stub, s) for s in ("", READINESS, "vita.v1.Assistant")] == [SERVING] * 3
            assert bus_up(metrics_port) == 1

            server.kill()
            wait_status(stub, READINESS, NOT_SERVING)
            assert status(stub, "vita.v1.Assistant") == NOT_SERVING
            assert status(stub, "") == SERVING  # the process is fine: no liveness restart for an outage of Redis
            assert bus_up(metrics_port) == 0
            assert "bus unreachable: not ready" in log.read_text()
            # The Realtime gateway in front of it takes no sessions either (its readiness asks the orchestrator's).
            assert "NOT_SERVING" in wait_readyz(gateway_port, 503)

            server.start()  # the same port, as a restarted Redis pod behind its Service
            wait_status(stub, READINESS, SERVING)
            assert [status(stub, s) for s in ("", "vita.v1.Assistant")] == [SERVING] * 2
            assert bus_up(metrics_port) == 1
            assert "bus reachable again: ready" in log.read_text()
            wait_readyz(gateway_port, 200)


def test_a_drain_keeps_taking_calls_for_its_delay_after_reporting_not_serving():
    """SIGTERM's drain with --drain-delay-s: NOT_SERVING at once (load balancers stop sending), but a client that
    has not heard yet still gets answers (a new connection, a new call) until the delay ends."""
    import asyncio

    from vita.runtime.server import GrpcService, ServiceServer

    async def scenario() -> tuple[int, int]:
        server = ServiceServer([GrpcService("vita.v1.Assistant", lambda s: None)], drain_delay_s=600)
        await server.start()
        drain = asyncio.get_running_loop().create_task(server.drain())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
                    if reply.status == NOT_SERVING:
                        break
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as late:  # a client that has not heard
                stub = health_pb2_grpc.HealthStub(late)
                answers = [(await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=30)).status
                           for s in ("", READINESS)]
            return drain.done(), answers
        finally:
            drain.cancel()
            await server.server.stop(0)

    done, answers = asyncio.run(scenario())
    assert not done and answers == [NOT_SERVING, NOT_SERVING]
