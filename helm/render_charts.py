"""Render the Helm charts offline, as `helm template` does: the Helm v4 SDK (helm-python-sdk), no cluster, no `helm`
binary, no network. `make helm-template` runs this script; tests/deploy renders through `sources` too, so what a
user inspects is what the tests check.

    python helm/render_charts.py [--chart NAME] [--values FILE ...] [--out DIR] [--release NAME] [--namespace NS]

writes DIR/<chart>.yaml for each chart under helm/ (or only --chart): every manifest `helm install` would apply
(NOTES.txt left out), each under a `# Source: <chart>/templates/<file>` line, as `helm template` prints them.
Several --values files merge as `helm -f` does (maps key by key, the later file wins). Exit status 1 with one line
on stderr when a chart does not render (values.schema.json rejects a value, a template fails) or a values file
cannot be read; 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

HELM_DIR = Path(__file__).resolve().parent
CHARTS = {chart.parent.name: chart.parent for chart in sorted(HELM_DIR.glob("*/Chart.yaml"))}
# The release names the README installs them under (`helm install vita helm/vita -n vita`, `vita-train`).
RELEASES = {"vita": "vita", "vita-training": "vita-train"}
NAMESPACE = "vita"
OUT = ".artifacts/helm-template"


class RenderError(Exception):
    """A chart did not render; the message names it."""


def deep_merge(base: dict, overlay: dict) -> dict:
    """Helm's coalescing of values files: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_file(path: str | Path) -> dict:
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: not a map of values (a YAML {type(values).__name__})")
    return values


def sources(chart: str | Path, values: dict[str, Any] | None = None, *, release: str,
            namespace: str) -> dict[str, str]:
    """Template path -> rendered text, sorted by path, for every template `helm install` would apply (NOTES.txt
    left out); offline: `lookup` finds nothing. Raises helm_python.HelmError (HelmValuesError: the schema)."""
    with helm.Chart.load(chart) as c:
        out = c.render(values or {}, name=release, namespace=namespace, is_install=True)
    return {source: text for source, text in sorted(out.items()) if not source.endswith("NOTES.txt")}


def manifests(rendered: dict[str, str]) -> list[dict]:
    """The manifests in `sources`' output, parsed (empty documents left out)."""
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


_DOCUMENT_START = re.compile(r"^---[ \t]*$", re.MULTILINE)


def _has_content(document: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in document.splitlines())


def template_text(rendered: dict[str, str]) -> str:
    """`helm template`'s output: each non-empty document under `---` and `# Source: <template path>`."""
    parts = []
    for source, text in rendered.items():
        for document in _DOCUMENT_START.split(text):
            if _has_content(document):
                parts.append(f"---\n# Source: {source}\n{document.strip(chr(10))}\n")
    return "".join(parts)


def write(out: str | Path, charts: list[str] | None = None, values_files: list[str] | None = None, *,
          release: str | None = None, namespace: str = NAMESPACE) -> dict[Path, int]:
    """Renders each chart (all by default) with the merged values files and writes OUT/<chart>.yaml. Every chart
    renders before any file is written. Returns each file written with its number of manifests."""
    values: dict = {}
    for path in values_files or []:
        values = deep_merge(values, values_file(path))
    rendered = {}
    for name in charts or CHARTS:
        try:
            rendered[name] = sources(CHARTS[name], values, release=release or RELEASES.get(name, name),
                                     namespace=namespace)
        except helm.HelmError as e:
            raise RenderError(f"helm/{name} does not render: {e}") from e
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, chart_sources in rendered.items():
        path = out / f"{name}.yaml"
        path.write_text(template_text(chart_sources))
        written[path] = len(manifests(chart_sources))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render_charts", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chart", action="append", choices=sorted(CHARTS),
                        help="a chart under helm/ (repeatable; default: every chart)")
    parser.add_argument("--values", action="append", default=[], metavar="FILE",
                        help="a values file, as `helm -f` (repeatable; needs exactly one --chart)")
    parser.add_argument("--out", default=OUT, help=f"directory for <chart>.yaml (default {OUT})")
    parser.add_argument("--release", default=None, help="release name (default: vita, and vita-train for "
                                                        "vita-training, as the README installs them)")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"release namespace (default {NAMESPACE})")
    args = parser.parse_args(argv)
    charts = list(dict.fromkeys(args.chart or CHARTS))
    if args.values and len(charts) != 1:
        parser.error("--values is one chart's values: name that chart with --chart "
                     f"({' or '.join(f'--chart {c}' for c in CHARTS)}; make helm-template CHART=NAME VALUES=FILE)")
    try:
        written = write(args.out, charts, args.values, release=args.release, namespace=args.namespace)
    except (RenderError, OSError, ValueError, yaml.YAMLError) as e:
        message = " ".join(str(e).split())
        print(f"render_charts: error: {message}", file=sys.stderr)
        return 1
    for path, count in written.items():
        print(f"{path}: {count} manifests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
