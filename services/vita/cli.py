"""The `vita` command line: model inspection, local generation and (later) the services."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

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


SERVICES = {
    "audio-encoder": "vita.audio_encoder.__main__",
    "vision-encoder": "vita.vision_encoder.__main__",
    "llm": "vita.llm.__main__",
    "orchestrator": "vita.orchestrator.__main__",
}


def _serve(args: argparse.Namespace) -> None:
    import importlib

    sys.exit(importlib.import_module(SERVICES[args.service]).main(args.service_args))


def _stack_file():
    from vita.model.tiny import vita_home

    return vita_home() / "stack.json"


def _up(args: argparse.Namespace) -> None:
    from vita.model.tiny import build_tiny_checkpoint
    from vita.stack import LocalStack

    path = _stack_file()
    if path.exists():
        raise VitaError(f"a stack is already up (state in {path}); run `vita down` first")
    model = args.model or str(build_tiny_checkpoint())
    stack = LocalStack(model_dir=model, redis_url=args.redis, orchestrator_port=args.port).start()
    stack.save(path)
    for s in stack.services:
        print(f"  {s.name:<15} pid {s.pid:<7} grpc 127.0.0.1:{s.grpc_port}  log {s.log_path}")
    print(f"stack up: the API is at {stack.target}; `vita ask --text ...` to try it, `vita down` to stop")


def _down(args: argparse.Namespace) -> None:
    from vita.stack import LocalStack

    path = _stack_file()
    if not path.exists():
        raise VitaError("no stack is up (nothing to stop)")
    LocalStack.load(path).stop()
    path.unlink()
    print("stack stopped")


def _ask(args: argparse.Namespace) -> None:
    from vita.client import VitaClient, build_request

    request = build_request(args.text or "", images=args.image or [], video=args.video, audio=args.audio or [],
                            max_tokens=args.max_tokens, temperature=args.temperature)
    with VitaClient(args.target) as client:
        for response in client.generate(request):
            if response.HasField("delta"):
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
            else:
                c = response.completed
                print(f"\n[{c.usage.prompt_tokens} prompt tokens, {c.usage.completion_tokens} generated, first "
                      f"token {c.timings.time_to_first_token_s * 1000:.0f} ms, total {c.timings.total_s:.2f} s]",
                      file=sys.stderr)


def _converse(args: argparse.Namespace) -> None:
    from vita.client import END, VitaClient, image_event, session_config, speech_events, text_event
    from vita.processing.audio import load_audio
    from vita.timeline import Timeline

    speech = [load_audio(path).numpy() for path in args.wav or []]

    def events():
        yield session_config(session_id=args.session or "", resume=bool(args.session), max_tokens=args.max_tokens)
        for image in args.image or []:
            yield image_event(image)
        for samples in speech:
            yield from speech_events(samples, realtime=not args.fast)
        for text in args.text or []:
            yield text_event(text)
        yield END

    timeline = Timeline()
    with VitaClient(args.target, timeout_s=None) as client:
        for event in client.converse(events()):
            timeline.print(event)


def _eval(args: argparse.Namespace) -> None:
    from vita.eval.cli import run_eval

    run_eval(args)


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

    p = sub.add_parser("serve", help="run one service (audio-encoder, vision-encoder, llm, orchestrator)",
                       description="Run one service process; `vita serve SERVICE --help` lists its options.")
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="options of the service")
    p.set_defaults(func=_serve)

    p = sub.add_parser("up", help="start Redis (if needed) and every service locally, in the background")
    p.add_argument("--model", default=None, help="model directory (default: the tiny model)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--port", type=int, default=50051, help="the orchestrator's (public API) port")
    p.set_defaults(func=_up)

    p = sub.add_parser("down", help="stop the stack `vita up` started")
    p.set_defaults(func=_down)

    p = sub.add_parser("ask", help="send one request to a running stack and stream the answer")
    p.add_argument("--target", default="127.0.0.1:50051", help="orchestrator address")
    p.add_argument("--text")
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument("--video", help="video file")
    p.add_argument("--audio", action="append", help="WAV file (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=_ask)

    p = sub.add_parser("converse", help="a duplex voice session with a running stack: stream WAV files as a "
                                        "microphone would and print the event timeline",
                       description="Open a Converse session, attach images, stream each WAV in real time (then "
                                   "0.8 s of silence), send the text messages, and print every server event with "
                                   "its time since the session started.")
    p.add_argument("--target", default="127.0.0.1:50051", help="orchestrator address")
    p.add_argument("--wav", action="append", help="speech to stream (repeatable; any rate, resampled)")
    p.add_argument("--image", action="append", help="image for the next answered turn (repeatable)")
    p.add_argument("--text", action="append", help="a typed message, sent after the speech (repeatable)")
    p.add_argument("--session", help="resume this session id instead of starting a new one")
    p.add_argument("--max-tokens", type=int, default=0, help="per answer (0: the server default)")
    p.add_argument("--fast", action="store_true", help="send audio as fast as possible, not in real time")
    p.set_defaults(func=_converse)

    from vita.eval.registry import NAMES

    p = sub.add_parser("eval", help="score a model on the curriculum's held-out split or a benchmark's local copy",
                       description="Read a benchmark in its published layout (docs/training.md, 'Evaluation'), "
                                   "answer every question greedily in-process and print the metrics.")
    p.add_argument("benchmark", choices=NAMES)
    p.add_argument("--model", default=None, help="model directory (default: the tiny model)")
    p.add_argument("--data", required=True, help="the benchmark's local copy (file or directory)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (curriculum: N per manifest)")
    p.add_argument("--output", default=None, help="write metrics and every answer to this JSON file")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on each answer's length")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_eval)
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
    except grpc.RpcError as e:
        print(f"vita {args.command}: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
