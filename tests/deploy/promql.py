"""The PromQL the charts ship (dashboard, alert rules, prometheus-adapter rules) and a real Prometheus to run it."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.deploy.k8s import VITA_CHART

DASHBOARD = VITA_CHART / "files" / "dashboards" / "vita-serving.json"
ALERTS = VITA_CHART / "files" / "alerts.yaml"
ADAPTER_RULES = VITA_CHART / "files" / "prometheus-adapter-rules.yaml"

# Grafana's variables as an "All" selection would expand them, and the rate window a 1 s scrape needs.
GRAFANA_VARIABLES = {"$namespace": ".*", "$pool": ".+", "$__rate_interval": "5m"}
# Panels that only have data where GPUs are present (documented as such in the dashboard).
GPU_ONLY_METRICS = ("vita:gpu_memory_allocated_bytes", "vita:gpu_memory_reserved_bytes", "nv_gpu_memory_used_bytes")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every PromQL target, variables expanded."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def dashboard_variable_queries() -> list[tuple[str, str, str]]:
    """(variable, metric, label) of every `label_values(metric, label)` template variable."""
    out = []
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\S+), (\w+)\)", var["query"]["query"])
            assert m, f"variable {var['name']}: unexpected query {var['query']}"
            out.append((var["name"], m.group(1), m.group(2)))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool)")


def as_bool_comparisons(expr: str) -> str:
    """`a > 10` -> `a > bool 10`: the expression keeps every series it watches whether or not it would fire, so
    "returns data" shows that the series exist. Comparisons inside label matchers ({...}) and strings are kept."""
    out, depth, quote = [], 0, ""
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
            out.append(c)
        elif c == "{":
            depth += 1
            out.append(c)
        elif c == "}":
            depth -= 1
            out.append(c)
        elif depth == 0 and (m := _COMPARISON.match(expr, i)) and expr[i - 1] not in "=!~<>":
            out.append(m.group(1) + " bool")
            i += len(m.group(1))
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def adapter_queries(selectors: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """(metric the HPA asks for, the query prometheus-adapter would run) for every adapter rule, with the label
    matchers the chart's HPAs select (`selectors`: external metric name -> matchLabels)."""
    rules = yaml.safe_load(ADAPTER_RULES.read_text())
    out = []
    for kind in ("custom", "external"):
        for rule in rules[kind]:
            series = re.findall(r"vita:[a-z_]+(?:\((?:[a-z_|]+)\))?", rule["seriesQuery"])
            names = []
            for s in series:
                if "(" in s:
                    stem, alternatives = s[:-1].split("(")
                    names += [stem + a for a in alternatives.split("|")]
                else:
                    names.append(s)
            pattern = re.compile(rule["name"]["matches"])
            for series_name in names:
                metric = pattern.sub(rule["name"]["as"].replace("${1}", r"\1"), series_name)
                matchers = [f'{k}="{v}"' for k, v in selectors.get(metric, {}).items()]
                query = (rule["metricsQuery"].replace("<<.Series>>", series_name)
                         .replace("<<.LabelMatchers>>", ",".join(matchers))
                         .replace("<<.GroupBy>>", "namespace" if kind == "external" else "namespace, pod"))
                out.append((metric, query))
    return out


@dataclass
class Prometheus:
    port: int
    proc: subprocess.Popen

    @classmethod
    def start(cls, work: Path, targets: list[dict], port: int) -> Prometheus:
        """`targets`: [{"job": ..., "address": "127.0.0.1:N", "labels": {...}}], scraped every second."""
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": t["job"], "static_configs": [{"targets": [t["address"]],
                                                                           "labels": t["labels"]}]}
                               for t in targets],
        }
        path = work / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        log = (work / "prometheus.log").open("wb")
        proc = subprocess.Popen(["prometheus", f"--config.file={path}", f"--storage.tsdb.path={work / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        prom = cls(port, proc)
        deadline = time.monotonic() + 60
        while not prom.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not start:\n{(work / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        return prom

    def _get(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict]:
        """The instant vector of `expr` now; raises AssertionError with Prometheus' message on a bad query."""
        try:
            body = self._get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{expr}: {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})["data"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets")["data"]["activeTargets"]

    def rules(self) -> list[dict]:
        return [r for g in self._get("/api/v1/rules")["data"]["groups"] for r in g["rules"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
