"""helm/vita against what a platform team checks before `helm install` on a production GPU cluster: probes that ask
what the services answer, labels, checksums that roll pods on changed credentials, scheduling per component, GPU
requests, the production example's exposure and authentication, NOTES, every switch on and every switch off, and
upgrades that leave immutable fields alone. Rendered offline with the Helm SDK, validated with kubernetes-validate."""

from __future__ import annotations

import re
import shlex

import helm_python as helm
import pytest

from tests.deploy import k8s
from tests.deploy.test_charts import KUBERNETES_VERSION, PRODUCTION, PROFILES, _check_crd, _validate
from vita.bus.streams import BusConfig, Pool
from vita.runtime.readiness import READINESS

WORKLOADS = ("Deployment", "StatefulSet", "InferenceService")
COMPONENT_KEYS = {"orchestrator": "orchestrator", "realtime": "realtime", "audio-encoder": "audioEncoder",
                  "vision-encoder": "visionEncoder", "llm-generator": "llmGenerator", "llm-monitor": "llmMonitor"}
GPU = {"requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1},
       "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
SPREAD = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}]
SCHEDULING = {"priorityClassName": "vita-serving", "topologySpreadConstraints": SPREAD,
              "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                  "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                      "matchLabels": {"app.kubernetes.io/part-of": "vita"}}}}]}}}

# Every optional feature on at once, and every one off.
ALL_ON = {
    "image": {"variant": "cuda"}, "imagePullSecrets": [{"name": "registry"}],
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/vita"}},
    "model": {"source": "pvc", "pvc": {"claimName": "models", "subPath": "model"}},
    "otlp": {"endpoint": "http://otel:4317", "resourceAttributes": {"deployment.environment": "prod"}},
    "auth": {"enabled": True, "tokens": ["t1"], "rateLimit": 5, "rateBurst": 10, "maxSessionsPerToken": 2},
    "tls": {"enabled": True, "secretName": "api-tls", "mutual": True, "realtimeClientSecretName": "gw-tls"},
    "secretEnv": {"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer x"},
    "orchestrator": {"service": {"type": "ClusterIP"}, **SCHEDULING},
    "realtime": {"apiTokens": {"existingSecret": "rt-tokens"}, **SCHEDULING},
    "audioEncoder": {"device": "cuda", "kserve": {"enabled": True}, "resources": GPU, **SCHEDULING},
    "visionEncoder": {"device": "cuda", "kserve": {"enabled": True}, "resources": GPU, **SCHEDULING},
    "llm": {"backend": "triton"},
    "llmGenerator": SCHEDULING, "llmMonitor": SCHEDULING,
    "triton": {"enabled": True, "modelRepository": {"source": "objectStorage", "objectStorage": {
        "uri": ":s3:bucket/repo", "existingSecret": "s3"}}, **SCHEDULING},
    "redis": {"mode": "external", "external": {"host": "redis.data", "username": "vita", "password": "p",
                                               "tls": True}},
    "autoscaling": {"mode": "prometheusAdapter"},
    "networkPolicy": {"orchestratorFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}],
                      "realtimeFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]},
}
ALL_OFF = {
    "serviceAccount": {"create": False},
    "realtime": {"enabled": False},
    **{key: {"autoscaling": {"enabled": False}} for key in
       ("orchestrator", "audioEncoder", "visionEncoder", "llmGenerator", "llmMonitor")},
    "redis": {"bundled": {"persistence": {"enabled": False}, "appendOnly": False}},
    "podDisruptionBudget": {"enabled": False}, "networkPolicy": {"enabled": False},
    "monitoring": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                   "grafanaDashboard": {"enabled": False}},
}
SWITCHES = {"all-on": ALL_ON, "all-off": ALL_OFF}


def _refused(values: dict) -> str:
    with helm.Chart.load(str(k8s.VITA_CHART)) as chart, pytest.raises(helm.HelmError) as e:
        chart.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE)
    return str(e.value)


def _template(docs: list[dict], kind: str, name: str) -> dict:
    doc = k8s.one(docs, kind, f"{k8s.RELEASE}-{name}")
    return doc["spec"]["predictor"] if kind == "InferenceService" else doc["spec"]["template"]


def _pod_annotations(docs: list[dict], kind: str, name: str) -> dict:
    template = _template(docs, kind, name)
    return template.get("annotations") if kind == "InferenceService" else template["metadata"].get("annotations")


@pytest.mark.parametrize("profile", sorted(SWITCHES))
def test_every_switch_on_and_every_switch_off_render_lint_and_validate(profile):
    values = SWITCHES[profile]
    report = helm.lint(str(k8s.VITA_CHART), values, strict=True, namespace=k8s.NAMESPACE,
                       kube_version=f"v{KUBERNETES_VERSION}.0")
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    docs = k8s.render(k8s.VITA_CHART, values)
    _validate(docs)
    for doc in docs:
        if doc["kind"] in k8s.CRD_KINDS:
            _check_crd(doc)
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            spec = k8s.pod_spec(doc)
            assert spec["automountServiceAccountToken"] is False
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in spec["containers"]:
                assert container["resources"].get("requests"), f"{doc['metadata']['name']}: no requests"
                assert container["resources"]["limits"].get("memory"), f"{doc['metadata']['name']}: no memory limit"
    if profile == "all-off":
        assert not {d["kind"] for d in docs} & (k8s.CRD_KINDS | {"HorizontalPodAutoscaler", "NetworkPolicy",
                                                                "PodDisruptionBudget", "ServiceAccount"})
        for doc in docs:
            if doc["kind"] in WORKLOADS:
                assert k8s.pod_spec(doc).get("serviceAccountName", "default") == "default"


@pytest.mark.parametrize("profile", sorted(PROFILES) + sorted(SWITCHES))
def test_readiness_asks_the_health_service_that_follows_redis(profile):
    """runtime/server.py: "" is the process (SERVING while it runs), `readiness` also follows the bus. A readiness
    probe on "" keeps a replica whose Redis is gone in the Service's endpoints; liveness on `readiness` would restart
    every pod of the release during a Redis outage."""
    docs = k8s.render(k8s.VITA_CHART, {**PROFILES, **SWITCHES}[profile])
    checked = 0
    for doc, container in k8s.vita_containers(docs):
        if k8s.component(doc) == "realtime":  # HTTP: /readyz follows the orchestrator's `readiness`
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            continue
        assert container["readinessProbe"]["grpc"].get("service") == READINESS
        assert "service" not in container["livenessProbe"]["grpc"]
        assert "service" not in container["startupProbe"]["grpc"]
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("profile", sorted(PROFILES) + sorted(SWITCHES))
def test_every_object_carries_the_release_labels(profile):
    """`kubectl get ... -l app.kubernetes.io/instance=<release>` finds every object of the release."""
    docs = k8s.render(k8s.VITA_CHART, {**PROFILES, **SWITCHES}[profile])
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        for key, value in {"app.kubernetes.io/name": "vita", "app.kubernetes.io/instance": k8s.RELEASE,
                           "app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/part-of": "vita"}.items():
            assert labels.get(key) == value, f"{doc['kind']}/{doc['metadata']['name']}: {key}={labels.get(key)}"
        if doc["kind"] in ("Deployment", "StatefulSet"):  # the selector is part of the pod's labels
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()


def test_a_new_bundled_redis_password_restarts_redis_with_the_services():
    """The services roll on the Secret's checksum and connect with the new password: Redis, which takes its
    password from the same Secret as an environment variable, must restart too, or every new pod is refused."""
    before = k8s.render(k8s.VITA_CHART, {"redis": {"bundled": {"password": "first-password"}}})
    after = k8s.render(k8s.VITA_CHART, {"redis": {"bundled": {"password": "second-password"}}})
    for kind, name in [("StatefulSet", "redis"), ("Deployment", "orchestrator"), ("Deployment", "llm-generator")]:
        assert _pod_annotations(before, kind, name) != _pod_annotations(after, kind, name), name
    # A new API token rolls the API, not the bus.
    tokens = k8s.render(k8s.VITA_CHART, {"redis": {"bundled": {"password": "first-password"}},
                                         "auth": {"enabled": True, "tokens": ["new-token"]}})
    assert _pod_annotations(before, "StatefulSet", "redis") == _pod_annotations(tokens, "StatefulSet", "redis")


def test_changed_api_tokens_roll_both_entry_points():
    """Both read the token file once at start-up (runtime/access.py load_tokens): a revoked token must stop working
    on the Realtime gateway as on the API."""
    base = {"redis": {"bundled": {"password": "p"}}, "auth": {"enabled": True}}
    one = k8s.render(k8s.VITA_CHART, k8s.deep_merge(base, {"auth": {"tokens": ["old-token"]}}))
    two = k8s.render(k8s.VITA_CHART, k8s.deep_merge(base, {"auth": {"tokens": ["new-token"]}}))
    for name in ("orchestrator", "realtime"):
        assert _pod_annotations(one, "Deployment", name) != _pod_annotations(two, "Deployment", name), name
    same = k8s.render(k8s.VITA_CHART, k8s.deep_merge(base, {"auth": {"tokens": ["old-token"]}}))
    assert _pod_annotations(one, "Deployment", "realtime") == _pod_annotations(same, "Deployment", "realtime")


def test_kserve_predictors_roll_on_changed_secrets_too():
    base = {"redis": {"bundled": {"password": "p"}}, "audioEncoder": {"kserve": {"enabled": True}}}
    one = k8s.render(k8s.VITA_CHART, k8s.deep_merge(base, {"secretEnv": {"OTEL_EXPORTER_OTLP_HEADERS": "a=1"}}))
    two = k8s.render(k8s.VITA_CHART, k8s.deep_merge(base, {"secretEnv": {"OTEL_EXPORTER_OTLP_HEADERS": "a=2"}}))
    first, second = (_pod_annotations(d, "InferenceService", "audio-encoder") for d in (one, two))
    assert first and second and first != second
    assert first == _pod_annotations(one, "Deployment", "orchestrator")  # the same checksum as the Deployments'


def test_scheduling_per_component_reaches_every_pod():
    values = {key: SCHEDULING for key in COMPONENT_KEYS.values()}
    values["redis"] = {"bundled": SCHEDULING}
    values["triton"] = {"enabled": True, "modelRepository": {"pvc": {"claimName": "repo"}}, **SCHEDULING}
    values["llm"] = {"backend": "triton"}
    values["visionEncoder"] = {**SCHEDULING, "kserve": {"enabled": True}}
    docs = k8s.render(k8s.VITA_CHART, values)
    _validate(docs)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert {k8s.component(d) for d in workloads} == set(COMPONENT_KEYS) | {"redis", "triton"}
    for doc in workloads:
        spec = k8s.pod_spec(doc)
        assert spec["priorityClassName"] == "vita-serving", k8s.component(doc)
        assert spec["affinity"] == SCHEDULING["affinity"], k8s.component(doc)
        (spread,) = spec["topologySpreadConstraints"]
        # without a labelSelector of its own: the component's selector labels, so it spreads this component's pods
        selector = k8s.pod_labels(doc) if doc["kind"] == "InferenceService" else doc["spec"]["selector"]["matchLabels"]
        assert spread["labelSelector"]["matchLabels"] == {k: v for k, v in selector.items()
                                                          if k.startswith("app.kubernetes.io/")
                                                          and k != "app.kubernetes.io/version"
                                                          and k != "app.kubernetes.io/managed-by"
                                                          and k != "app.kubernetes.io/part-of"}
        assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    own = {"maxSkew": 2, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
           "labelSelector": {"matchLabels": {"tier": "gpu"}}}
    docs = k8s.render(k8s.VITA_CHART, {"llmGenerator": {"topologySpreadConstraints": [own]}})
    assert k8s.pod_spec(k8s.one(docs, "Deployment", f"{k8s.RELEASE}-llm-generator"))["topologySpreadConstraints"] == [own]


def test_the_bundled_redis_takes_the_affinity_its_schema_accepts():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["data"]}]}]}}}
    docs = k8s.render(k8s.VITA_CHART, {"redis": {"bundled": {"affinity": affinity}}})
    assert k8s.pod_spec(k8s.one(docs, "StatefulSet", f"{k8s.RELEASE}-redis"))["affinity"] == affinity


@pytest.mark.parametrize("values, message", [
    ({"orchestrator": {"priorityClass": "high"}}, "priorityClass"),
    ({"llmGenerator": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "exists"}]}},
     "/llmGenerator/tolerations/0/operator"),
    ({"triton": {"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "ScheduleAnyway"}]}},
     "/triton/topologySpreadConstraints/0"),
    ({"redis": {"bundled": {"affinity": {"nodeAfinity": {}}}}}, "nodeAfinity"),
    ({"realtime": {"priorityClassName": 5}}, "/realtime/priorityClassName"),
])
def test_the_schema_names_bad_scheduling_values(values, message):
    with helm.Chart.load(str(k8s.VITA_CHART)) as chart, pytest.raises(helm.HelmValuesError) as e:
        chart.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE)
    assert message in str(e.value)


@pytest.mark.parametrize("values, message", [
    ({"image": {"variant": "cuda"}, "audioEncoder": {"device": "cuda"}},
     "audioEncoder.device is cuda but audioEncoder.resources.limits has no nvidia.com/gpu"),
    ({"llmGenerator": {"device": "cuda:0", "resources": GPU}},
     "llmGenerator.device is cuda:0 but image.variant is cpu"),
    ({"image": {"variant": "cuda"}, "visionEncoder": {"device": "cuda", "resources": {
        "requests": {"nvidia.com/gpu": 1}, "limits": {"memory": "1Gi", "nvidia.com/gpu": 2}}}},
     "visionEncoder.resources: requests and limits of nvidia.com/gpu differ (1, 2)"),
    ({"llm": {"backend": "triton"}, "triton": {"enabled": True, "modelRepository": {"pvc": {"claimName": "r"}},
                                               "resources": {"requests": {"nvidia.com/gpu": None},
                                                             "limits": {"nvidia.com/gpu": None}}}},  # null: removed
     "triton.resources.limits has no nvidia.com/gpu"),
])
def test_gpu_pods_without_a_gpu_or_the_cuda_image_fail_the_render(values, message):
    assert message in _refused(values)


def test_gpu_pools_render_with_a_gpu_and_the_cuda_image():
    docs = k8s.render(k8s.VITA_CHART, {"image": {"variant": "cuda"}, "llmGenerator": {"device": "cuda", "resources": GPU}})
    (container,) = k8s.pod_spec(k8s.one(docs, "Deployment", f"{k8s.RELEASE}-llm-generator"))["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["image"].endswith("-cuda")
    # an explicit tag is the user's own image: the variant no longer names it
    k8s.render(k8s.VITA_CHART, {"image": {"tag": "custom-cuda"}, "llmGenerator": {"device": "cuda", "resources": GPU}})
    # with Triton the llm workers run no model: their device is not used, so not checked
    k8s.render(k8s.VITA_CHART, {"llm": {"backend": "triton"}, "llmMonitor": {"device": "cuda"}, "triton": {
        "enabled": True, "modelRepository": {"pvc": {"claimName": "r"}}}})


@pytest.mark.parametrize("profile", sorted(PROFILES) + sorted(SWITCHES))
def test_services_exposed_outside_the_cluster_are_not_closed_by_their_network_policy(profile):
    """A LoadBalancer or NodePort Service's traffic arrives from client or node addresses: a policy that admits only
    pod or namespace selectors on that port drops it (production.yaml did this to the API)."""
    docs = k8s.render(k8s.VITA_CHART, {**PROFILES, **SWITCHES}[profile])
    pods = {k8s.component(d): k8s.pod_labels(d) for d in docs if d["kind"] in WORKLOADS}
    for service in k8s.named(docs, "Service"):
        if service["spec"].get("type", "ClusterIP") not in ("LoadBalancer", "NodePort"):
            continue
        labels = next(lab for lab in pods.values() if service["spec"]["selector"].items() <= lab.items())
        for policy in k8s.named(docs, "NetworkPolicy"):
            if not policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items():
                continue
            for port in service["spec"]["ports"]:
                rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == port["targetPort"] for p in r["ports"])]
                assert any(not r.get("from") or any("ipBlock" in peer for peer in r["from"]) for r in rules), \
                    f"{profile}: {service['metadata']['name']} is a {service['spec']['type']} its policy closes"


def test_the_production_example_authenticates_both_entry_points():
    docs = k8s.render(k8s.VITA_CHART, PRODUCTION)
    args = {k8s.component(d): c["args"] for d, c in k8s.vita_containers(docs)}
    api, gateway = k8s.flag(args["orchestrator"], "--api-tokens"), k8s.flag(args["realtime"], "--api-tokens")
    assert api and gateway
    secrets = {k8s.component(d): {v["secret"]["secretName"] for v in k8s.pod_spec(d)["volumes"]
                                  if v["name"] == "api-tokens"} for d in docs if d["kind"] == "Deployment"}
    assert secrets["orchestrator"] == secrets["realtime"] == {"vita-realtime-tokens"}  # the README creates it
    readme = (k8s.ROOT / "README.md").read_text()
    assert "create secret generic vita-realtime-tokens --from-file=tokens=" in readme


def _notes(values: dict) -> str:
    with helm.Chart.load(str(k8s.VITA_CHART)) as chart:
        out = chart.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def test_notes_name_the_pools_streams_and_a_vita_ask_that_works_with_auth_and_tls():
    from vita import cli

    notes = _notes({})
    streams = dict(re.findall(r"^  ([\w-]+): stream (\S+), group", notes, re.M))
    bus = BusConfig(prefix="vita")
    assert streams == {"audio-encoder": bus.jobs(Pool.AUDIO_ENCODER), "vision-encoder": bus.jobs(Pool.VISION_ENCODER),
                       "llm-generator": bus.jobs(Pool.LLM_GENERATOR), "llm-monitor": bus.jobs(Pool.LLM_MONITOR)}
    notes = _notes(PROFILES["auth+tls"])
    (line,) = [line for line in notes.splitlines() if line.strip().startswith("vita ask")]
    args = cli.build_parser().parse_args(shlex.split(line.strip())[1:])
    assert args.tls_ca and args.tls_cert and args.tls_key and args.target == "127.0.0.1:50051"
    assert "export VITA_API_TOKEN=" in notes and f"{k8s.RELEASE}-api-tokens" in notes
    assert "--tls" not in _notes({})


# Fields Kubernetes refuses to change on an existing object: `helm upgrade` with another value must keep them.
IMMUTABLE = {"Deployment": ["spec.selector"], "StatefulSet": ["spec.selector", "spec.serviceName",
                                                              "spec.volumeClaimTemplates"],
             "PodDisruptionBudget": [], "Service": ["spec.clusterIP"]}


def _get(doc: dict, path: str):
    for part in path.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


@pytest.mark.parametrize("change", [
    {"image": {"tag": "0.2.0-cpu"}}, {"orchestrator": {"replicas": 5, "autoscaling": {"enabled": False}}},
    {"llmGenerator": {"maxBatch": 16, "resources": {"requests": {"cpu": "4"}}}}, {"auth": {"enabled": True, "tokens": ["t"]}},
    {"redis": {"bundled": {"password": "changed", "resources": {"limits": {"memory": "4Gi"}}}}},
    {"networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
    {"audioEncoder": {**SCHEDULING}}, {"logging": {"level": "debug"}, "otlp": {"endpoint": "http://otel:4317"}},
])
def test_an_upgrade_with_changed_values_keeps_immutable_fields(change):
    before = {(d["kind"], d["metadata"]["name"]): d for d in k8s.render(k8s.VITA_CHART, {})}
    after = {(d["kind"], d["metadata"]["name"]): d for d in k8s.render(k8s.VITA_CHART, change)}
    for key in before.keys() & after.keys():
        for path in IMMUTABLE.get(key[0], []):
            assert _get(before[key], path) == _get(after[key], path), f"{key}: {path} changes"


def test_the_orchestrator_drains_after_its_endpoint_removal_has_spread():
    """--drain-delay-s from orchestrator.drainDelaySeconds: NOT_SERVING first, calls still taken for the delay,
    then the 10 s grace (vita.runtime.server.GRACE_S), all within the pod's terminationGracePeriodSeconds; the
    schema refuses a delay that would not fit."""
    from vita.runtime.server import GRACE_S

    for values, delay in (({}, "5"), ({"orchestrator": {"drainDelaySeconds": 12}}, "12")):
        spec = k8s.pod_spec(k8s.one(k8s.render(k8s.VITA_CHART, values), "Deployment", f"{k8s.RELEASE}-orchestrator"))
        args = spec["containers"][0]["args"]
        assert args[args.index("--drain-delay-s") + 1] == delay
        assert float(delay) + GRACE_S < spec["terminationGracePeriodSeconds"]
    with helm.Chart.load(str(k8s.VITA_CHART)) as chart, pytest.raises(helm.HelmValuesError) as e:
        chart.render({"orchestrator": {"drainDelaySeconds": 25}}, name=k8s.RELEASE, namespace=k8s.NAMESPACE)
    assert "/orchestrator/drainDelaySeconds" in str(e.value)
