"""The chart's own processes, run here: its Redis and every vita container started with exactly the rendered
command, args and env (hosts mapped to 127.0.0.1, ports to free ones, volumes to local directories), a Converse
session through the orchestrator, a Realtime session through the gateway, and a real Prometheus scraping them: every query the dashboard, the alert rules
and the autoscaling triggers use returns data.

One release per module (it takes a minute to start on 2 cores); the tests share it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest
import redis
import websockets

from tests.deploy import k8s, localrun, promql
from tests.deploy.localrun import LocalRelease
from vita.bus.streams import BusConfig, Pool
from vita.client import ConverseSession, VitaClient, session_config, speech_events, text_event
from vita.runtime.ports import free_port
from vita.v1.assistant_pb2 import GenerateRequest

pytestmark = pytest.mark.slow

# Production-like, on this machine: the model from a "PVC" (the duplex fine-tuned tiny model), the bundled Redis
# with its generated password, KEDA triggers, the audio encoder as a KServe InferenceService, one CPU thread each.
LOCAL_VALUES = {
    "model": {"source": "pvc", "pvc": {"claimName": "vita-model"}},
    "audioEncoder": {"kserve": {"enabled": True}, "threads": 1},
    "visionEncoder": {"threads": 1},
    "llmGenerator": {"threads": 1},
    "llmMonitor": {"threads": 1},
}


@pytest.fixture(scope="module")
def release(duplex_model_dir, tmp_path_factory):
    """The first container's first port is one another program listens on, as when a port picked free is taken
    before the process binds it (a CI run saw it): the release starts again on fresh ports."""
    docs = k8s.render(k8s.VITA_CHART, LOCAL_VALUES)
    with socket.socket() as taken, pytest.MonkeyPatch.context() as patch:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        picks = iter([free_port(), taken.getsockname()[1]])  # Redis's port, then the first container's
        patch.setattr(localrun, "free_port", lambda: next(picks, None) or free_port())
        running = LocalRelease(docs, tmp_path_factory.mktemp("release"), volumes={"model": duplex_model_dir}).start()
        running.taken_port = taken.getsockname()[1]
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(release, tmp_path_factory):
    """Scrapes each process like the chart's ServiceMonitor: job = the Service, plus namespace, pod, component."""
    targets = []
    for p in release.processes:
        if "metrics" not in p.ports:
            continue  # the Realtime gateway exports no metrics (the ServiceMonitor finds no `metrics` port on it)
        service = f"{k8s.RELEASE}-{p.name}"
        targets.append({"job": service, "address": f"127.0.0.1:{p.ports['metrics']}",
                        "labels": {"namespace": k8s.NAMESPACE, "pod": f"{p.name}-0", "service": service,
                                   "component": p.labels["app.kubernetes.io/component"]}})
    prom = promql.Prometheus.start(tmp_path_factory.mktemp("prometheus"), targets, free_port())
    yield prom
    prom.stop()


def traffic(target: str, image, speech) -> dict:
    """A Generate with an image, a bad Generate, and a Converse answer interrupted by a spoken question."""
    with VitaClient(target, timeout_s=None) as client:
        _, completed = client.ask("What is in the picture?", images=[image], max_tokens=8)
        with pytest.raises(grpc.RpcError) as bad:
            list(client.generate(GenerateRequest()))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with ConverseSession(client, session_config(max_tokens=300, ignore_eos=True)) as s:
            s.send(text_event("Tell me a long story."))
            first = s.wait("answer_started").turn_id
            s.wait("delta", turn_id=first)
            s.send(*speech_events(speech, realtime=False, chunk_ms=100))
            interrupted = s.wait("interrupted", turn_id=first, timeout_s=120)
            second = s.wait("answer_started", where=lambda e: e.turn_id != first, timeout_s=120)
            s.wait("completed", turn_id=second.turn_id, timeout_s=120)
            s.close()
    return {"completed": completed, "interrupted": interrupted, "events": s.events}


@pytest.fixture(scope="module")
def session(release, prometheus, wide_png, query_clip):
    """The scripted traffic, twice: Prometheus' rate() needs a series scraped before it grows, and most series
    appear only with their first observation. Between the rounds, wait until Prometheus has them all."""
    target = f"127.0.0.1:{release.process('orchestrator').ports['grpc']}"
    traffic(target, wide_png, query_clip)
    names = sorted({n for _, e in promql.dashboard_queries() for n in re.findall(r"vita:[a-z0-9_]+", e)}
                   - set(promql.GPU_ONLY_METRICS))
    wait_for_data(prometheus, [(n, f"count({n})") for n in names], finite=False)
    return traffic(target, wide_png, query_clip)


def wait_for_data(prom: promql.Prometheus, exprs: list[tuple[str, str]], timeout_s: float = 90.0,
                  finite: bool = True) -> dict[str, list[dict]]:
    """Polls until every expression has a series (with a finite value), or fails naming the ones without."""
    deadline = time.monotonic() + timeout_s
    missing = exprs
    while True:
        results = {expr: prom.query(expr) for _, expr in missing}
        missing = [(what, expr) for what, expr in missing
                   if not any(not finite or math.isfinite(float(r["value"][1])) for r in results[expr])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, "no data for:\n" + "\n".join(f"  {what}: {expr}" for what, expr in missing)
    return results


def test_a_converse_session_runs_through_the_rendered_services(session):
    assert session["completed"].usage.image_tokens > 0 and session["completed"].usage.completion_tokens > 0
    i = session["interrupted"].interrupted
    assert 0 < i.tokens_sent <= i.tokens_generated < 300
    judged = [e for e in session["events"] if e.WhichOneof("event") == "judged"]
    assert judged and judged[0].judged.state_token == "<1>"


def test_a_port_taken_before_its_process_binds_it_starts_the_release_again_on_fresh_ports(release):
    assert release.attempts == 2
    assert release.taken_port not in {port for p in release.processes for port in p.ports.values()}


def test_a_realtime_session_runs_through_the_rendered_gateway(release):
    """The gateway, started with its rendered args (its --orchestrator, the orchestrator's Service, mapped here):
    session.created, then a text turn answered in text through the orchestrator behind it."""
    url = f"ws://127.0.0.1:{release.process('realtime').ports['http']}/v1/realtime?model=vita"

    async def next_event(ws, kind: str) -> dict:
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 120))
            assert event["type"] != "error", event
            if event["type"] == kind:
                return event

    async def main():
        async with websockets.connect(url) as ws:
            created = await next_event(ws, "session.created")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 8}}))
            await next_event(ws, "session.updated")
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}}))
            await ws.send(json.dumps({"type": "response.create"}))
            done = await next_event(ws, "response.done")
            return created, done

    created, done = asyncio.run(main())
    assert created["session"]["type"] == "realtime" and created["session"]["id"].startswith("sess_")
    # max_output_tokens 8 cuts the tiny model's answer: OpenAI's status for that is incomplete
    assert done["response"]["status"] in ("completed", "incomplete") and done["response"]["usage"]["output_tokens"] > 0
    assert done["response"]["output"][0]["content"][0]["text"]


def test_the_helm_test_pod_passes_against_the_running_release(release):
    """`helm test`'s Pod, its rendered command and env (the Services' addresses mapped to the local processes):
    the orchestrator's `readiness` is SERVING (it reaches the rendered Redis) and the gateway's /readyz answers 200."""
    pod = k8s.one(release.docs, "Pod", f"{k8s.RELEASE}-test")
    (container,) = pod["spec"]["containers"]
    release._map_service_ports()  # the gateway's Service too (it started after the others were mapped)
    env = {e["name"]: release._local(e["value"]) for e in container["env"]}
    assert "svc" not in env["VITA_TEST_ORCHESTRATOR"] + env["VITA_TEST_REALTIME"]  # both mapped to local ports
    assert container["command"][0] == "python"
    env["VITA_TEST_TIMEOUT_S"] = "60"  # the release is up (the fixture waited): no need for the full 120 s
    out = subprocess.run([sys.executable, *container["command"][1:]], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [line.rsplit(": ", 1)[1] for line in out.stdout.splitlines()] == ["SERVING", "HTTP 200"]


def test_the_processes_run_the_rendered_pools_and_redis_needs_the_rendered_password(release):
    secrets = k8s.secret_values(release.docs)
    password = secrets[f"{k8s.RELEASE}-redis-auth", "redis-password"]
    assert len(password) >= 16
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=release.redis_port).ping()
    client = redis.Redis(port=release.redis_port, password=password)
    bus = BusConfig(prefix=k8s.flag(release.process("orchestrator").argv, "--prefix"))
    for pool in Pool:
        groups = client.xinfo_groups(bus.jobs(pool))
        assert [g["name"].decode() for g in groups] == [pool.group]
        assert groups[0]["consumers"] >= 1  # a worker of the pool joined
    client.close()


def test_every_dashboard_query_returns_data(session, prometheus):
    queries = [(t, e) for t, e in promql.dashboard_queries() if not any(m in e for m in promql.GPU_ONLY_METRICS)]
    gpu_only = [(t, e) for t, e in promql.dashboard_queries() if any(m in e for m in promql.GPU_ONLY_METRICS)]
    assert {t for t, _ in gpu_only} == {"GPU memory"}  # the only panel allowed to stay empty on a CPU machine
    for _, expr in gpu_only:
        assert prometheus.query(expr) == []  # valid PromQL, no data here: no process used CUDA
    wait_for_data(prometheus, queries)
    for variable, metric, label in promql.dashboard_variable_queries():
        assert prometheus.label_values(label, metric), f"variable {variable}: no {label} values on {metric}"


def test_every_alert_expression_selects_live_series_and_prometheus_loaded_the_rules(session, prometheus):
    rules = promql.alert_rules()
    wait_for_data(prometheus, [(r["alert"], promql.as_bool_comparisons(r["expr"])) for r in rules])
    loaded = {r["name"]: r for r in prometheus.rules()}
    assert set(loaded) == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    # Healthy stack: the paging alerts are quiet.
    firing = {name for name, r in loaded.items() if r["state"] == "firing"}
    assert not firing & {"VitaNoHealthyGenerator", "VitaNoHealthyMonitor", "VitaComponentDown", "VitaBusUnreachable"}


def test_autoscaling_triggers_have_data(session, release, prometheus):
    docs = release.docs
    # KEDA (the chart's default): each ScaledObject's redis-streams trigger reads its stream's consumer group.
    secrets = k8s.secret_values(docs)
    client = redis.Redis(port=release.redis_port, password=secrets[f"{k8s.RELEASE}-redis-auth", "redis-password"])
    scaled = k8s.named(docs, "ScaledObject")
    assert len(scaled) == 4
    for obj in scaled:
        for trigger in obj["spec"]["triggers"]:
            meta = trigger["metadata"]
            group = {g["name"].decode(): g for g in client.xinfo_groups(meta["stream"])}[meta["consumerGroup"]]
            if "lagCount" in meta:
                assert group["lag"] is not None  # Redis 7 computes the lag KEDA's lag trigger reads
            else:
                assert client.xpending(meta["stream"], meta["consumerGroup"])["pending"] >= 0
    client.close()
    # prometheusAdapter: the queries prometheus-adapter runs for the HPAs the chart renders in that mode.
    hpa_docs = k8s.render(k8s.VITA_CHART, k8s.deep_merge(LOCAL_VALUES, {"autoscaling": {"mode": "prometheusAdapter"}}))
    queries = []
    for hpa in k8s.named(hpa_docs, "HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "External":
                selector = metric["external"]["metric"]["selector"]["matchLabels"]
                queries += [(f"{hpa['metadata']['name']} {name}", q) for name, q in
                            promql.adapter_queries({metric["external"]["metric"]["name"]: selector})
                            if name == metric["external"]["metric"]["name"]]
            elif metric["type"] == "Pods":
                queries += [(f"{hpa['metadata']['name']} {name}", q) for name, q in promql.adapter_queries({})
                            if name == metric["pods"]["metric"]["name"]]
    assert len(queries) == 2 * 4 + 1  # lag and pending per pool, sessions per orchestrator pod
    results = wait_for_data(prometheus, queries)
    for (what, query) in queries:
        if "vita_stream" in what:
            assert len(results[query]) == 1, f"{what}: one value per pool, got {results[query]}"
