"""helm/vita for day-2 operations: the `helm test` Pod (what it asks, that it passes a ready release and fails a
not-ready one, that every NetworkPolicy admits it, with TLS too), the bundled Redis password from an existing Secret
(renders without a cluster that stay the same, the services, Redis and KEDA reading one Secret), resources on every
container (Triton's init containers too) and a schema for every `resources` value. Rendered offline with the Helm
SDK, validated with kubernetes-validate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import helm_python as helm
import pytest
import redis
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy import k8s
from tests.deploy.test_charts import KUBERNETES_VERSION, PROFILES, _validate
from tests.deploy.test_platform_review import SWITCHES, WORKLOADS, _notes
from vita.runtime.ports import free_port
from vita.runtime.readiness import READINESS

ALL_PROFILES = {**PROFILES, **SWITCHES}
TEST_POD = f"{k8s.RELEASE}-test"


def _lint_clean(values: dict) -> None:
    report = helm.lint(str(k8s.VITA_CHART), values, strict=True, namespace=k8s.NAMESPACE,
                       kube_version=f"v{KUBERNETES_VERSION}.0")
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])


def _schema_error(values: dict, chart=k8s.VITA_CHART) -> str:
    with helm.Chart.load(str(chart)) as c, pytest.raises(helm.HelmValuesError) as e:
        c.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE)
    return str(e.value)


# --- the `helm test` Pod ---------------------------------------------------------------------------------------------

def _test_pod(docs: list[dict]) -> tuple[dict, dict]:
    pod = k8s.one(docs, "Pod", TEST_POD)
    (container,) = pod["spec"]["containers"]
    return pod, container


@pytest.mark.parametrize("profile", sorted(ALL_PROFILES))
def test_the_helm_test_pod_follows_the_charts_pod_conventions(profile):
    values = ALL_PROFILES[profile]
    docs = k8s.render(k8s.VITA_CHART, values)
    pod, container = _test_pod(docs)
    _validate([pod])
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"].split(",")
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"].split(",")
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    workload = k8s.one(docs, "Deployment", f"{k8s.RELEASE}-orchestrator")
    like = k8s.pod_spec(workload)
    for key in ("serviceAccountName", "securityContext", "imagePullSecrets"):
        assert spec.get(key) == like.get(key), key
    vita = like["containers"][0]
    assert container["image"] == vita["image"] and container["imagePullPolicy"] == vita["imagePullPolicy"]
    assert container["securityContext"] == vita["securityContext"]  # non-root, read-only root filesystem
    assert container["command"][:2] == ["python", "-c"]  # the image's Python, no other image to pull
    compile(container["command"][2], "helm-test", "exec")
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    for key, value in {"app.kubernetes.io/instance": k8s.RELEASE, "app.kubernetes.io/component": "test"}.items():
        assert pod["metadata"]["labels"][key] == value


def test_the_helm_test_pod_can_be_switched_off():
    docs = k8s.render(k8s.VITA_CHART, {"tests": {"enabled": False}, "tls": {
        "enabled": True, "secretName": "api-tls"}, "networkPolicy": {"orchestratorFrom": [{"ipBlock": {
            "cidr": "10.0.0.0/8"}}], "realtimeFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}})
    assert not k8s.named(docs, "Pod") and not k8s.named(docs, "Service", f"{k8s.RELEASE}-orchestrator-health")
    assert "component: test" not in yaml.safe_dump_all(k8s.named(docs, "NetworkPolicy"))
    assert "helm test" not in _notes({"tests": {"enabled": False}})
    assert f"helm test {k8s.RELEASE} -n {k8s.NAMESPACE}" in _notes({})
    values = yaml.safe_load((k8s.VITA_CHART / "values.yaml").read_text())
    assert values["tests"]["enabled"] is True
    assert "/tests/enabled" in _schema_error({"tests": {"enabled": "no"}})


def _service_target(docs: list[dict], address: str) -> tuple[dict, dict, int]:
    """`<service>.<namespace>.svc:<port>` -> (workload, container, container port) the Service sends it to."""
    host, port = address.rsplit(":", 1)
    name, namespace, svc = host.split(".")
    assert (namespace, svc) == (k8s.NAMESPACE, "svc")
    service = k8s.one(docs, "Service", name)
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    selector = service["spec"]["selector"]
    (workload,) = [d for d in docs if d["kind"] in WORKLOADS and selector.items() <= k8s.pod_labels(d).items()]
    (container,) = k8s.pod_spec(workload)["containers"]
    return workload, container, k8s.port_number(container, service_port["targetPort"])


@pytest.mark.parametrize("profile", sorted(ALL_PROFILES))
def test_the_helm_test_pod_asks_the_port_that_serves_plaintext_health(profile):
    """The orchestrator's API port speaks TLS with tls.enabled: then the plaintext --health-port, through its own
    ClusterIP Service. The gateway's /readyz on the port --port serves."""
    docs = k8s.render(k8s.VITA_CHART, ALL_PROFILES[profile])
    _, container = _test_pod(docs)
    env = {e["name"]: e["value"] for e in container["env"]}
    workload, api, port = _service_target(docs, env["VITA_TEST_ORCHESTRATOR"])
    assert k8s.component(workload) == "orchestrator"
    args = api["args"]
    plaintext = int(k8s.flag(args, "--health-port") or k8s.flag(args, "--grpc-port"))
    assert port == plaintext and ("--tls-cert" in args) == (k8s.flag(args, "--health-port") is not None)
    assert api["readinessProbe"]["grpc"] == {"port": port, "service": READINESS}  # what the probe asks
    realtime = [d for d in docs if d["kind"] == "Deployment" and k8s.component(d) == "realtime"]
    if not realtime:
        assert "VITA_TEST_REALTIME" not in env
        return
    url = env["VITA_TEST_REALTIME"]
    assert url.startswith("http://") and url.endswith("/readyz")
    workload, gateway, port = _service_target(docs, url.removeprefix("http://").removesuffix("/readyz"))
    assert k8s.component(workload) == "realtime" and port == int(k8s.flag(gateway["args"], "--port"))
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _admits(policy: dict, labels: dict, port: str) -> bool:
    """Whether an ingress rule of the policy admits a pod of this release's namespace with `labels` on `port`."""
    for rule in policy["spec"]["ingress"]:
        if not any(p["port"] == port for p in rule["ports"]):
            continue
        if not rule.get("from"):
            return True
        for peer in rule["from"]:
            if set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= labels.items():
                return True
    return False


RESTRICTED = {"orchestratorFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}}}],
              "realtimeFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}
TLS = {"enabled": True, "secretName": "api-tls", "mutual": True, "realtimeClientSecretName": "gw-tls"}


@pytest.mark.parametrize("values", [
    {}, {"networkPolicy": RESTRICTED}, {"tls": TLS}, {"tls": TLS, "networkPolicy": RESTRICTED},
    {"realtime": {"enabled": False}, "networkPolicy": RESTRICTED}], ids=[
    "open", "restricted", "tls", "tls+restricted", "no-gateway+restricted"])
def test_every_network_policy_admits_the_helm_test_pod_to_what_it_asks(values):
    docs = k8s.render(k8s.VITA_CHART, values)
    _validate(docs)
    _lint_clean(values)
    pod, container = _test_pod(docs)
    labels = pod["metadata"]["labels"]
    env = {e["name"]: e["value"] for e in container["env"]}
    targets = [env["VITA_TEST_ORCHESTRATOR"]]
    if "VITA_TEST_REALTIME" in env:
        targets.append(env["VITA_TEST_REALTIME"].removeprefix("http://").removesuffix("/readyz"))
    for address in targets:
        workload, container, port = _service_target(docs, address)
        port_name = next(p["name"] for p in container["ports"] if p["containerPort"] == port)
        policies = [p for p in k8s.named(docs, "NetworkPolicy")
                    if p["spec"]["podSelector"]["matchLabels"].items() <= k8s.pod_labels(workload).items()]
        assert policies and all(_admits(p, labels, port_name) for p in policies), (address, port_name)
        other = {**labels, "app.kubernetes.io/component": "someone-else"}
        if values.get("networkPolicy") or port_name == "health":  # and only the test Pod, where it is restricted
            assert not any(_admits(p, other, port_name) for p in policies), (address, port_name)


class _ReadyzHandler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ok\n" if code == 200 else b"not ready\n")

    def log_message(self, *args):
        pass


@contextmanager
def _stub_release(readiness: health_pb2.HealthCheckResponse.ServingStatus, readyz: int) -> Iterator[tuple[str, str]]:
    """A grpc.health.v1 server whose `readiness` answers `readiness`, and an HTTP server whose /readyz answers
    `readyz`: (orchestrator address, gateway /readyz URL)."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(READINESS, readiness)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    handler = type("Handler", (_ReadyzHandler,), {"status": readyz})
    http = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http.server_port}/readyz"
    finally:
        http.shutdown()
        server.stop(None)


def _run_helm_test(container: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    rendered = {e["name"]: e["value"] for e in container["env"]}
    argv = [sys.executable if container["command"][0] == "python" else container["command"][0],
            *container["command"][1:]]
    return subprocess.run(argv, env={**os.environ, **rendered, **env}, capture_output=True, text=True, timeout=60)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("readiness, readyz, gateway, failure", [
    (SERVING, 200, True, None),
    (SERVING, 200, False, None),
    (NOT_SERVING, 200, True, "readiness at 127.0.0.1:{orchestrator}: NOT_SERVING (want SERVING)"),
    (SERVING, 503, True, "realtime {realtime}: HTTPError: HTTP Error 503"),
    (None, 200, False, "readiness at 127.0.0.1:{orchestrator}: UNAVAILABLE"),
], ids=["ready", "ready-without-gateway", "redis-unreachable", "gateway-not-ready", "no-orchestrator"])
def test_the_helm_test_script_passes_a_ready_release_and_fails_a_not_ready_one(readiness, readyz, gateway, failure):
    """The Pod's own `python -c` script and env, its addresses pointed at local stand-ins: exit 0 and a line per
    check when ready; otherwise exit 1 naming the check and its last answer once tests.timeoutSeconds ran out."""
    values = {"realtime": {"enabled": gateway}}
    _, container = _test_pod(k8s.render(k8s.VITA_CHART, values))
    with _stub_release(readiness or SERVING, readyz) as (orchestrator, realtime):
        if readiness is None:  # nothing listens there
            orchestrator = f"127.0.0.1:{free_port()}"
        env = {"VITA_TEST_ORCHESTRATOR": orchestrator, "VITA_TEST_TIMEOUT_S": "1"}
        if gateway:
            env["VITA_TEST_REALTIME"] = realtime
        else:
            assert not any(e["name"] == "VITA_TEST_REALTIME" for e in container["env"])
        started = time.monotonic()
        out = _run_helm_test(container, env)
    if failure is None:
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == f"orchestrator readiness at {orchestrator}: SERVING"
        assert lines[1:] == ([f"realtime {realtime}: HTTP 200"] if gateway else [])
    else:
        assert out.returncode == 1 and time.monotonic() - started < 30
        expected = failure.format(orchestrator=orchestrator.rsplit(":", 1)[1], realtime=realtime)
        assert expected in out.stderr, out.stderr


def test_the_helm_test_script_waits_for_a_release_still_starting():
    _, container = _test_pod(k8s.render(k8s.VITA_CHART, {"realtime": {"enabled": False}}))
    servicer = health.HealthServicer()
    servicer.set(READINESS, NOT_SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        timer = threading.Timer(3, servicer.set, (READINESS, SERVING))  # Redis answers 3 s after `helm test`
        timer.start()
        out = _run_helm_test(container, {"VITA_TEST_ORCHESTRATOR": f"127.0.0.1:{port}", "VITA_TEST_TIMEOUT_S": "30"})
        timer.join()
    finally:
        server.stop(None)
    assert out.returncode == 0 and out.stdout.endswith(": SERVING\n"), out.stderr


def test_the_docs_and_readme_run_helm_test():
    assert "helm test vita -n vita" in (k8s.ROOT / "docs" / "deployment.md").read_text()
    readme = (k8s.ROOT / "README.md").read_text()
    install = readme.index("helm install vita helm/vita -n vita -f my-production.yaml")
    assert "helm test vita -n vita" in readme[install:install + 400]


# --- the bundled Redis password from an existing Secret ------------------------------------------------------------

EXISTING = {"redis": {"bundled": {"existingSecret": "vita-redis-password", "existingSecretPasswordKey": "password"}}}
PASSWORD = "Zq3-from.the_Secret~1"  # what the user's Secret holds (URL-safe)


def _env(docs: list[dict], container: dict, secrets: dict) -> dict[str, str]:
    fields = {"metadata.name": "pod-0", "metadata.namespace": k8s.NAMESPACE}
    return k8s.container_env(container, {**k8s.secret_values(docs), **secrets}, fields)


def test_renders_without_a_cluster_stay_the_same_with_an_existing_redis_secret():
    """Argo CD / `helm template` render without `lookup`: a generated password changes each render and rolls every
    pod; with redis.bundled.existingSecret nothing is generated, so two renders are the same."""
    assert k8s.render(k8s.VITA_CHART, {}) != k8s.render(k8s.VITA_CHART, {})  # why the option exists
    docs = k8s.render(k8s.VITA_CHART, EXISTING)
    assert docs == k8s.render(k8s.VITA_CHART, EXISTING)
    assert not [s for s in k8s.named(docs, "Secret") if "redis" in s["metadata"]["name"]]
    _validate(docs)
    _lint_clean(EXISTING)
    assert "/redis/bundled/existingSecretPasswordKey" in _schema_error(
        k8s.deep_merge(EXISTING, {"redis": {"bundled": {"existingSecretPasswordKey": ""}}}))


def test_the_services_redis_and_keda_read_the_existing_secret(monkeypatch):
    docs = k8s.render(k8s.VITA_CHART, EXISTING)
    secrets = {("vita-redis-password", "password"): PASSWORD}
    url = f"redis://:{PASSWORD}@{k8s.RELEASE}-redis.{k8s.NAMESPACE}.svc:6379/0"
    seen = 0
    for doc, container in k8s.vita_containers(docs):
        if k8s.component(doc) == "realtime":
            continue
        env = _env(docs, container, secrets)
        assert env["VITA_REDIS_URL"] == url and env["REDIS_PASSWORD"] == PASSWORD
        with monkeypatch.context() as patched:  # the container's environment, as the service reads it
            for name, value in env.items():
                patched.setenv(name, value)
            _, args = k8s.parse_service_argv(container["args"])
        assert args.redis == url
        seen += 1
    assert seen == 5
    redis_sts = k8s.one(docs, "StatefulSet", f"{k8s.RELEASE}-redis")
    (server,) = k8s.pod_spec(redis_sts)["containers"]
    env = _env(docs, server, secrets)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == PASSWORD
    args = [k8s.expand(a, env) for a in server["args"]]
    assert k8s.flag(args, "--requirepass") == PASSWORD
    # KEDA: passwordFromEnv names a variable of the scale target's container, which reads the same Secret.
    workloads = {k8s.component(d): c for d, c in k8s.vita_containers(docs)}
    scaled = k8s.named(docs, "ScaledObject")
    assert len(scaled) == 4
    for obj in scaled:
        container = workloads[k8s.component(obj)]
        assert obj["spec"]["scaleTargetRef"]["envSourceContainerName"] == container["name"]
        for trigger in obj["spec"]["triggers"]:
            assert trigger["metadata"]["address"] == f"{k8s.RELEASE}-redis.{k8s.NAMESPACE}.svc:6379"
            var = next(e for e in container["env"] if e["name"] == trigger["metadata"]["passwordFromEnv"])
            assert var["valueFrom"]["secretKeyRef"] == {"name": "vita-redis-password", "key": "password"}
            assert "usernameFromEnv" not in trigger["metadata"]


@pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")
def test_redis_started_as_rendered_takes_the_url_the_services_build(tmp_path):
    """redis-server with the StatefulSet's args and env, and the services' VITA_REDIS_URL (host mapped here): one
    Secret, so they agree; without the password Redis refuses."""
    docs = k8s.render(k8s.VITA_CHART, EXISTING)
    secrets = {("vita-redis-password", "password"): PASSWORD}
    (server,) = k8s.pod_spec(k8s.one(docs, "StatefulSet", f"{k8s.RELEASE}-redis"))["containers"]
    env = _env(docs, server, secrets)
    assert env["REDIS_PASSWORD"] == PASSWORD  # the user's Secret, not a generated password
    args = [k8s.expand(a, env) for a in server["args"]]
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    proc = subprocess.Popen([shutil.which("redis-server"), *args, "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, container = next((d, c) for d, c in k8s.vita_containers(docs) if k8s.component(d) == "orchestrator")
        url = _env(docs, container, secrets)["VITA_REDIS_URL"].replace(
            f"{k8s.RELEASE}-redis.{k8s.NAMESPACE}.svc:6379", f"127.0.0.1:{port}")
        assert f":{PASSWORD}@127.0.0.1:" in url
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping() is True
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _pod_annotations(docs: list[dict], kind: str, name: str) -> dict:
    return k8s.one(docs, kind, f"{k8s.RELEASE}-{name}")["spec"]["template"]["metadata"]["annotations"]


def test_the_checksums_still_roll_redis_and_the_services_on_what_helm_sees():
    """With an existing Secret the chart never reads the password: the checksums stay the same render after render
    (no pod rolls on a `helm upgrade` that changed nothing), and another Secret or key rolls Redis with its clients
    (their env names it). A new password inside the same Secret is invisible to Helm (documented)."""
    one, two = k8s.render(k8s.VITA_CHART, EXISTING), k8s.render(k8s.VITA_CHART, EXISTING)
    other = k8s.render(k8s.VITA_CHART, k8s.deep_merge(EXISTING, {"redis": {"bundled": {"existingSecret": "rotated"}}}))
    key = k8s.render(k8s.VITA_CHART, k8s.deep_merge(EXISTING, {"redis": {"bundled": {
        "existingSecretPasswordKey": "new-password"}}}))
    for kind, name in [("StatefulSet", "redis"), ("Deployment", "orchestrator"), ("Deployment", "llm-generator")]:
        assert _pod_annotations(one, kind, name) == _pod_annotations(two, kind, name), name
        for changed in (other, key):
            template = k8s.one(changed, kind, f"{k8s.RELEASE}-{name}")["spec"]["template"]
            assert template != k8s.one(one, kind, f"{k8s.RELEASE}-{name}")["spec"]["template"], name
    assert _pod_annotations(one, "StatefulSet", "redis") != _pod_annotations(other, "StatefulSet", "redis")
    for doc in ("docs/deployment.md", "helm/vita/values.yaml"):
        text = " ".join((k8s.ROOT / doc).read_text().split())
        assert "existingSecret" in text and "rollout restart" in text, doc


# --- resources everywhere --------------------------------------------------------------------------------------------

TRITON_OBJECT_STORAGE = {"llm": {"backend": "triton"}, "triton": {"enabled": True, "modelRepository": {
    "source": "objectStorage", "objectStorage": {"uri": ":s3:bucket/repo", "existingSecret": "s3"}}}}


@pytest.mark.parametrize("profile", [*sorted(ALL_PROFILES), "triton-object-storage"])
def test_every_container_and_init_container_sets_requests_and_a_memory_limit(profile):
    """A namespace with a ResourceQuota on requests.* / limits.memory refuses a pod one of whose containers, init
    containers included, sets none (and the helm test Pod is a pod too)."""
    values = TRITON_OBJECT_STORAGE if profile == "triton-object-storage" else ALL_PROFILES[profile]
    docs = k8s.render(k8s.VITA_CHART, values)
    pods = [(d, k8s.pod_spec(d)) for d in docs if d["kind"] in WORKLOADS] + [(d, d["spec"]) for d in k8s.named(docs, "Pod")]
    for doc, spec in pods:
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{doc['metadata']['name']}/{container['name']}"
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests") or {}), where
            assert (resources.get("limits") or {}).get("memory"), where


def test_tritons_init_container_resources_come_from_values():
    fetch = {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}
    prepare = {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}
    values = k8s.deep_merge(TRITON_OBJECT_STORAGE, {"triton": {"initResources": {"fetch": fetch, "prepare": prepare}}})
    docs = k8s.render(k8s.VITA_CHART, values)
    _validate(docs)
    _lint_clean(values)
    triton = k8s.one(docs, "Deployment", f"{k8s.RELEASE}-triton")
    init = {c["name"]: c["resources"] for c in k8s.pod_spec(triton)["initContainers"]}
    assert init == {"fetch-model-repository": fetch, "prepare-model-repository": prepare}


@pytest.mark.parametrize("values, message", [
    ({"orchestrator": {"resources": {"limit": {"memory": "2Gi"}}}}, "at '/orchestrator/resources': additional properties 'limit'"),
    ({"realtime": {"resources": {"request": {"cpu": "1"}}}}, "at '/realtime/resources': additional properties 'request'"),
    ({"llmGenerator": {"resources": {"limits": {"memroy": "8Gi"}}}}, "at '/llmGenerator/resources/limits': additional properties 'memroy'"),
    ({"triton": {"resources": {"limits": {"gpu": 1}}}}, "at '/triton/resources/limits': additional properties 'gpu'"),
    ({"audioEncoder": {"resources": {"requests": {"cpu": "1 core"}}}}, "at '/audioEncoder/resources/requests/cpu'"),
    ({"visionEncoder": {"resources": {"limits": {"memory": True}}}}, "at '/visionEncoder/resources/limits/memory'"),
    ({"llmMonitor": {"resources": {"requests": {"memory": "-1Gi"}}}}, "at '/llmMonitor/resources/requests/memory'"),
    ({"redis": {"bundled": {"resources": {"limits": {"memory": "2GB"}}}}}, "at '/redis/bundled/resources/limits/memory'"),
    ({"triton": {"initResources": {"fetch": {"limit": {"memory": "1Gi"}}}}}, "at '/triton/initResources/fetch'"),
    ({"triton": {"initResources": {"preapre": {}}}}, "at '/triton/initResources': additional properties 'preapre'"),
    ({"tests": {"resources": {"limits": {"memory": []}}}}, "at '/tests/resources/limits/memory'"),
    ({"orchestrator": {"resources": {"claims": [{"nmae": "gpu"}]}}}, "at '/orchestrator/resources/claims/0'"),
])
def test_the_schema_refuses_bad_resources_naming_the_path(values, message):
    assert message in _schema_error(values)


def test_the_schema_accepts_the_resources_kubernetes_accepts():
    good = {"requests": {"cpu": 0.5, "memory": "1.5Gi", "ephemeral-storage": "10G", "hugepages-2Mi": "64Mi",
                         "nvidia.com/gpu": 1, "example.com/foo": "1e3"},
            "limits": {"cpu": "1500m", "memory": 4294967296, "hugepages-2Mi": "64Mi", "nvidia.com/gpu": 1,
                       "example.com/foo": "1e3"},
            "claims": [{"name": "gpu"}]}
    values = {"image": {"variant": "cuda"}, "orchestrator": {"resources": good},
              "redis": {"bundled": {"resources": {"limits": {"memory": None}}}}}  # null removes a default
    docs = k8s.render(k8s.VITA_CHART, values)
    (container,) = k8s.pod_spec(k8s.one(docs, "Deployment", f"{k8s.RELEASE}-orchestrator"))["containers"]
    assert container["resources"]["limits"]["cpu"] == "1500m" and container["resources"]["claims"] == [{"name": "gpu"}]


def test_the_training_charts_resources_have_the_same_schema():
    message = _schema_error({"resources": {"limits": {"memroy": "8Gi"}}}, chart=k8s.TRAINING_CHART)
    assert "at '/resources/limits': additional properties 'memroy'" in message


def test_the_test_pod_takes_its_scheduling_values():
    """On a cluster whose nodes are all tainted, the hook Pod needs a toleration like every other pod."""
    tolerations = [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]
    values = {"tests": {"tolerations": tolerations, "nodeSelector": {"pool": "system"}, "priorityClassName": "low"}}
    pod = k8s.one(k8s.render(k8s.VITA_CHART, values), "Pod", f"{k8s.RELEASE}-test")["spec"]
    assert (pod["tolerations"], pod["nodeSelector"], pod["priorityClassName"]) == (tolerations, {"pool": "system"},
                                                                                  "low")
    assert not {"tolerations", "nodeSelector", "priorityClassName"} & set(
        k8s.one(k8s.render(k8s.VITA_CHART, {}), "Pod", f"{k8s.RELEASE}-test")["spec"])

