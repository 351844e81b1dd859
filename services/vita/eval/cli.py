"""`vita eval BENCHMARK --model DIR --data PATH`: load, answer, score, print, and optionally write JSON;
`vita eval duplex`: the turn-taking evaluation of a live stack (`vita.eval.duplex`)."""

from __future__ import annotations

import argparse
import sys

from vita.eval import registry
from vita.eval.answer import PipelineAnswerer
from vita.eval.core import ask, load_items


def run_eval(args: argparse.Namespace) -> None:
    benchmark = registry.get(args.benchmark)
    progress = sys.stderr.isatty()
    # Bad data, undecodable media included, fails here, before the model loads.
    items = load_items(benchmark, args.data, args.limit, progress=progress)
    answerer = PipelineAnswerer.load(args.model, threads=args.threads, max_new_tokens=args.max_tokens)
    result = ask(benchmark, items, str(args.data), answerer, progress=progress)
    print(f"{benchmark.name}: {len(result.items)} questions in {result.seconds:.1f} s")
    for name, value in result.metrics.items():
        if not isinstance(value, dict):
            print(f"  {name:<40} {value:.4f}" if isinstance(value, float) else f"  {name:<40} {value}")
    if args.output:
        print(f"results written to {result.write(args.output)}")


def run_duplex(args: argparse.Namespace) -> None:
    """Against `--target`, or a local stack started (and stopped) here on the duplex-tuned tiny model."""
    from pathlib import Path

    from vita.errors import InvalidInputError
    from vita.eval.duplex import CATEGORIES, evaluate, local_prefix, markdown

    per_category = 2 if args.quick else args.per_category
    categories = tuple(dict.fromkeys(args.category or CATEGORIES))
    progress = sys.stderr.isatty()
    variants = ("default", "off") if args.compare_off else ("default",)
    if args.target:
        result = evaluate(args.target, per_category, categories=categories, variants=variants, progress=progress)
    else:
        from vita.stack import LocalStack
        from vita.training.duplex import default_duplex_dir

        model = Path(args.model) if args.model else default_duplex_dir()
        if not model.joinpath("config.json").is_file():
            raise InvalidInputError(f"{model}: no model here (build the duplex-tuned tiny model with "
                                    "`make duplex-model`, or pass --model DIR or --target HOST:PORT)")
        with LocalStack(model_dir=str(model), redis_url=args.redis, prefix=local_prefix()) as stack:
            result = evaluate(stack.target, per_category, categories=categories, variants=variants,
                              progress=progress)
    table = markdown(result.metrics)
    print(f"duplex: {len(result.outcomes)} dialogues in {result.seconds:.1f} s\n")
    print(table, end="")
    if args.output:
        print(f"results written to {result.write(args.output)}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table, encoding="utf-8")
