"""`vita eval BENCHMARK --model DIR --data PATH`: load, answer, score, print, and optionally write JSON."""

from __future__ import annotations

import argparse
import sys

from vita.eval import registry
from vita.eval.answer import PipelineAnswerer
from vita.eval.core import ask, load_items


def run_eval(args: argparse.Namespace) -> None:
    benchmark = registry.get(args.benchmark)
    items = load_items(benchmark, args.data, args.limit)  # bad data fails here, before the model loads
    answerer = PipelineAnswerer.load(args.model, threads=args.threads, max_new_tokens=args.max_tokens)
    result = ask(benchmark, items, str(args.data), answerer, progress=sys.stderr.isatty())
    print(f"{benchmark.name}: {len(result.items)} questions in {result.seconds:.1f} s")
    for name, value in result.metrics.items():
        if not isinstance(value, dict):
            print(f"  {name:<40} {value:.4f}" if isinstance(value, float) else f"  {name:<40} {value}")
    if args.output:
        print(f"results written to {result.write(args.output)}")
