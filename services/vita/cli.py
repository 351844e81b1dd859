"""The `vita` command line: model inspection, local generation and (later) the services."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vita.errors import VitaError


def _model_info(args: argparse.Namespace) -> None:
    from vita.model.info import parameter_report

    print(parameter_report(args.preset))


def _init_tiny(args: argparse.Namespace) -> None:
    from vita.model.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(args.output, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny model written to {path}")


def _generate(args: argparse.Namespace) -> None:
    from vita.inference import GenerationRequest, VitaPipeline
    from vita.model.generation import SamplingParams

    pipeline = VitaPipeline.load(args.model, threads=args.threads)
    request = GenerationRequest(
        text=args.text or "",
        images=list(args.image or []),
        video=args.video,
        audio=list(args.audio or []),
        system_prompt=args.system,
        sampling=SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed),
    )
    result = None
    for event in pipeline.stream(request):
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event
    sys.stdout.write("\n")
    if result is not None and result.usage is not None:
        u = result.usage
        print(f"[prompt {u.prompt_tokens} tokens ({u.media_summary}), {u.completion_tokens} generated, "
              f"first token {u.time_to_first_token_s * 1000:.0f} ms, "
              f"{u.decode_tokens_per_s:.1f} tokens/s, finish: {u.finish_reason}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vita",
        description="VITA-style omni-modal LLM: inspect models, generate locally, run the services.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("model-info", help="parameter counts of a preset, built on the meta device (no memory)")
    p.add_argument("--preset", default="mixtral-8x7b", help="preset name: mixtral-8x7b or tiny")
    p.set_defaults(func=_model_info)

    p = sub.add_parser("init-tiny", help="write a tiny random-weight model + tokenizer directory for local runs")
    p.add_argument("--output", default=None, help="directory (default: $VITA_HOME/models/tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_init_tiny)

    p = sub.add_parser("generate", help="one multimodal generation in this process, streamed to stdout",
                       description="Run one request through the model in-process and stream the answer. "
                                   "Placeholders are added for media the text does not mention.")
    p.add_argument("--model", default=None,
                   help="model directory (ours or a Hugging Face Mixtral one); default: the tiny model, "
                        "created on first use")
    p.add_argument("--text", help="the question or instruction")
    p.add_argument("--image", action="append", help="image file (repeatable); tiled dynamically")
    p.add_argument("--video", help="video file; sampled by the video rule, one tile per frame")
    p.add_argument("--audio", action="append", help="audio file (wav; repeatable): a spoken question")
    p.add_argument("--system", help="system prompt override")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VitaError as e:
        print(f"vita {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"vita {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
