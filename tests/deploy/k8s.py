"""Rendering the charts offline and reading what they would run: manifests, containers, argv, env, ports.

Kept free of test fixtures so that the chart tests and the local-stack tests read manifests the same way.
"""

from __future__ import annotations

import argparse
import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

# The renderer `make helm-template` runs (helm/render_charts.py): one way to render, for users and tests.
from helm import render_charts
from helm.render_charts import deep_merge as deep_merge
from helm.render_charts import values_file as values_file

ROOT = Path(__file__).resolve().parents[2]
VITA_CHART = ROOT / "helm" / "vita"
TRAINING_CHART = ROOT / "helm" / "vita-training"
RELEASE, NAMESPACE = "vita", "vita-test"

# The kinds a cluster only knows once an operator installed their CRDs (checked structurally, see test_charts).
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule", "InferenceService", "TrainJob"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "InferenceService", "TrainJob"}


def render(chart: Path, values: dict | None = None) -> list[dict]:
    """Every manifest `helm install` would apply (NOTES.txt left out), parsed; offline, no cluster."""
    return render_charts.manifests(render_charts.sources(chart, values, release=RELEASE, namespace=NAMESPACE))


def named(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = named(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    """The pod spec of a workload (an InferenceService predictor inlines its pod spec)."""
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "InferenceService":
        return doc["spec"]["predictor"]
    raise ValueError(f"{kind} has no pod spec here")


def pod_labels(doc: dict) -> dict:
    if doc["kind"] == "InferenceService":
        return {**doc["metadata"].get("labels", {}), **doc["spec"]["predictor"].get("labels", {})}
    return doc["spec"]["template"]["metadata"].get("labels", {})


def vita_containers(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, container) for every container that runs the `vita` command."""
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "InferenceService"):
            continue
        for container in pod_spec(doc)["containers"]:
            if container.get("command") == ["vita"]:
                yield doc, container


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def flag(args: list[str], name: str) -> str | None:
    """The value after `name` in an argv (None when absent)."""
    return args[args.index(name) + 1] if name in args else None


class _Parsed(BaseException):  # not an Exception: nothing between the parser and the test may swallow it
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def parse_service_argv(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Parses `vita serve SERVICE FLAGS...` (argv after `vita`) with the `vita` CLI and then the service's own
    parser, wherever the service keeps it: the first parser named `vita serve ...` to finish parsing stops the
    service before it does anything. Raises AssertionError with argparse's message on a bad flag."""
    from vita import cli

    top = cli.build_parser().parse_args(argv)
    assert top.command == "serve", f"not a `vita serve` command: {argv}"
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        if self.prog.startswith("vita serve"):
            raise _Parsed(parsed)
        return parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            cli.main(argv)
        except _Parsed as done:
            return top.service, done.namespace
        except SystemExit as e:
            raise AssertionError(f"`vita {' '.join(argv)}` does not parse (exit {e.code})") from None
    raise AssertionError(f"`vita {' '.join(argv)}` never reached its service's argument parser")


def secret_values(docs: list[dict]) -> dict[tuple[str, str], str]:
    """(secret name, key) -> value, from the Secrets the chart renders."""
    out = {}
    for secret in named(docs, "Secret"):
        name = secret["metadata"]["name"]
        for key, value in (secret.get("stringData") or {}).items():
            out[name, key] = value
        for key, value in (secret.get("data") or {}).items():
            out[name, key] = base64.b64decode(value).decode()
    return out


_VAR = re.compile(r"\$\((\w+)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args (unknown variables stay as written)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(container: dict, secrets: dict[tuple[str, str], str], fields: dict[str, str],
                  *, external_secrets: bool = False) -> dict[str, str]:
    """The environment the kubelet would give the container, in order, with $(VAR) expanded. With
    `external_secrets`, references to Secrets the chart does not render (an existingSecret) are left out."""
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        name = ref["secretRef"]["name"]
        env.update({key: value for (secret, key), value in secrets.items() if secret == name})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if (ref["name"], ref["key"]) in secrets:
                env[item["name"]] = secrets[ref["name"], ref["key"]]
            else:
                rendered = any(name == ref["name"] for name, _ in secrets)
                assert ref.get("optional") or (external_secrets and not rendered), \
                    f"{item['name']}: secret {ref['name']}/{ref['key']} is not rendered"
        elif "fieldRef" in source:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            raise AssertionError(f"unsupported env source {source}")
    return env


def port_number(container: dict, name_or_number: Any) -> int:
    """A named container port (or a number) as a number."""
    if isinstance(name_or_number, int):
        return name_or_number
    for port in container.get("ports", []):
        if port["name"] == name_or_number:
            return port["containerPort"]
    raise AssertionError(f"container {container['name']} has no port named {name_or_number!r}")
