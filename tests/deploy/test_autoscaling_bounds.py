"""helm/vita refuses autoscaling bounds that Kubernetes would only reject at apply time (a new user's try,
2026-12-04: minReplicas 10 with maxReplicas 2 rendered a ScaledObject the cluster refuses)."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.deploy import k8s


@pytest.mark.parametrize(("values", "message"), [
    ({"llmMonitor": {"autoscaling": {"minReplicas": 10, "maxReplicas": 2}}},
     "llmMonitor.autoscaling: minReplicas (10) is more than maxReplicas (2)"),
    ({"autoscaling": {"mode": "prometheusAdapter"}, "audioEncoder": {"autoscaling": {"minReplicas": 3, "maxReplicas": 1}}},
     "audioEncoder.autoscaling: minReplicas (3) is more than maxReplicas (1)"),
    ({"realtime": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 4}}},
     "realtime.autoscaling: minReplicas (5) is more than maxReplicas (4)"),
])
def test_min_replicas_above_max_fail_the_render_with_the_key(values, message):
    with helm.Chart.load(str(k8s.VITA_CHART)) as chart, pytest.raises(Exception, match=re.escape(message)):
        chart.render(values, name=k8s.RELEASE, namespace=k8s.NAMESPACE)


def test_equal_bounds_render():
    docs = k8s.render(k8s.VITA_CHART, {"llmMonitor": {"autoscaling": {"minReplicas": 2, "maxReplicas": 2}}})
    scaled = [d for d in docs if d["kind"] == "ScaledObject" and d["metadata"]["name"].endswith("llm-monitor")]
    assert scaled and scaled[0]["spec"]["minReplicaCount"] == scaled[0]["spec"]["maxReplicaCount"] == 2
