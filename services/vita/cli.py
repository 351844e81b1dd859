"""The `vita` command line: model inspection, local generation, the services and their clients.

No command ends in a traceback: every failure is one line on stderr and one of the exit statuses in `EXIT_STATUSES`
(shown by `vita --help`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import grpc

from vita.errors import VitaError, one_line
from vita.usage import EXIT_USAGE, ArgumentParser, float_in, int_in

EXIT_OK, EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 3, 130
DEFAULT_PRESET = "mixtral-8x7b"  # `vita model-info` without --preset or --target
EXIT_STATUSES = f"""exit status:
  {EXIT_OK}    success; `vita down` with no stack up (nothing to stop) too
  {EXIT_FAILED}    the request failed where it ran: the server answered with an error status (printed as
       CODE: message) or reported error events in a Converse session, `vita up` could not start the stack
       or `vita down` stop it (a process still alive after SIGKILL), a service failed while serving (its
       engine process died), an operating-system error
  {EXIT_USAGE}    bad input: a wrong flag or value, a file that is missing or unreadable (`vita down`: the
       stack's state file), media that cannot be decoded, text that is not valid UTF-8, a prompt longer than
       the context, a model directory that does not load; `vita serve`: a service that cannot start (Redis
       unreachable, its port in use)
  {EXIT_INTERNAL}    an internal error (a bug): one line; set VITA_TRACEBACK=1 to print the traceback
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); `vita serve` takes Ctrl-C as SIGTERM: it drains and exits 0"""


def _model_info(args: argparse.Namespace) -> None:
    """A preset's parameter counts, or (--target) what a running orchestrator serves: Assistant/ModelMetadata."""
    if args.target is None:
        from vita.model.info import parameter_report

        if args.json:
            raise VitaError("--json prints a server's answer: give --target too")
        print(parameter_report(args.preset or DEFAULT_PRESET))
        return
    if args.preset is not None:
        raise VitaError("give --preset (a preset's parameter counts) or --target (what a running server serves), "
                        "not both")
    with _connect(args) as client:
        metadata = client.model_metadata()
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(metadata, preserving_proto_field_name=True, indent=2))
    else:
        print(_describe_model(metadata))


def _describe_model(m) -> str:
    """ModelMetadataResponse as a few lines of text (`vita model-info --target`)."""
    g, c = m.generate_limits, m.converse_limits
    rows = [
        ("context", f"{m.context_length} tokens, prompt at most {m.max_prompt_tokens}"),
        ("max_tokens", f"default {m.default_max_tokens}, at most {m.max_tokens_limit} (cut to the room the prompt "
                       "leaves)"),
        ("vocabulary", f"{m.vocab_size} tokens"),
        ("modalities", ", ".join(m.modalities)),
    ]
    if m.HasField("image"):
        i = m.image
        rows.append(("image", f"{i.tile_size}-pixel tiles of {i.tokens_per_tile} tokens, at most {i.max_tiles}"
                              f"{' + a thumbnail' if i.thumbnail else ''} ({i.max_tokens} tokens)"))
    if m.HasField("video"):
        rows.append(("video", f"{m.video.max_frames} frames at most, {m.video.tokens_per_frame} tokens each"))
    if m.HasField("audio"):
        rows.append(("audio", f"{m.audio.sample_rate_hz} Hz, {m.audio.tokens_per_second:g} tokens/s, the encoder "
                              f"takes at most {m.audio.max_seconds:g} s"))
    rows += [
        ("Generate limits", f"text {g.max_text_chars} chars; {g.max_images} images of at most {g.max_image_pixels} "
                            f"pixels; {g.max_audio_clips} audio clips of at most {g.max_audio_seconds:g} s; video "
                            f"{g.max_video_seconds:g} s or {g.max_video_frames} frames"),
        ("Converse limits", f"text {c.max_text_chars} chars; images of at most {c.max_image_pixels} pixels, "
                            f"{c.max_images} per turn"),
    ]
    preset = f", preset {m.preset}" if m.preset else ""
    lines = [f"model {m.name or '(unnamed)'}: {m.architecture}{preset}"]
    width = max(len(name) for name, _ in rows)
    return "\n".join(lines + [f"  {name:<{width}}  {value}" for name, value in rows])


def _init_tiny(args: argparse.Namespace) -> None:
    from vita.tiny import build_tiny_checkpoint, existing_tiny_checkpoint

    existing = not args.overwrite and existing_tiny_checkpoint(args.output) is not None
    path = build_tiny_checkpoint(args.output, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny model already in {path}: kept as it is (--overwrite writes it again, with --seed)" if existing
          else f"tiny model written to {path}")


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


# Entry points as "module:function(argv) -> exit status", imported only for the service that runs.
SERVICES = {
    "audio-encoder": "vita.encoders.__main__:audio_encoder",
    "vision-encoder": "vita.encoders.__main__:vision_encoder",
    "llm": "vita.llm.__main__:main",
    "orchestrator": "vita.orchestrator.__main__:main",
    "realtime": "vita.realtime.server:main",
}


def _serve(args: argparse.Namespace) -> None:
    import importlib

    module, function = SERVICES[args.service].split(":")
    sys.exit(getattr(importlib.import_module(module), function)(args.service_args))


def _stack_file():
    from vita.paths import vita_home

    return vita_home() / "stack.json"


def _up(args: argparse.Namespace) -> int | None:
    """Bad input (a stack already up, a --model that is not a model directory) is status 2 before anything starts;
    a stack that does not come up (a service exiting or unhealthy at start-up, no Redis) is status 1."""
    from vita.runtime.serve import check_model_dir
    from vita.stack import LocalStack, StackError, duplex_model_dir
    from vita.training.duplex import default_duplex_dir

    path = _stack_file()
    if (earlier := _load_stack(path)) is not None:
        if earlier.running():
            raise VitaError(f"a stack is already up (state in {path}); run `vita down` first")
        raise VitaError(f"{path} is the state of a stack none of whose services runs (it ended without `vita "
                        "down`); run `vita down` to clear it")
    if args.model is None and not default_duplex_dir().joinpath("config.json").is_file():
        print(f"model: the duplex fine-tune of the tiny model, trained now (first use: a few minutes on 2 CPU "
              f"cores), then cached in {default_duplex_dir()} ...", flush=True)
    model = str(check_model_dir(args.model).resolve()) if args.model else str(duplex_model_dir(progress=True))
    try:
        stack = LocalStack(model_dir=model, redis_url=args.redis, prefix=args.prefix, orchestrator_port=args.port,
                           metrics=True, realtime=True, realtime_port=args.realtime_port).start()
    except StackError as e:
        print(f"{args.command_name}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    stack.save(path)
    for s in stack.services:
        kind = "http" if s.health == "http" else "grpc"
        metrics = f"metrics http://127.0.0.1:{s.metrics_port}/metrics" if s.metrics_port else ""
        print(f"  {s.name:<15} pid {s.pid:<7} {kind} 127.0.0.1:{s.grpc_port}  {metrics}  log {s.log_path}")
    console = stack.realtime_url.replace("ws://", "http://").replace("/v1/realtime", "/")
    print(f"stack up, serving {model}: the API is at {stack.target}, the Realtime endpoint at {stack.realtime_url}; "
          f"`vita ask --text ...`, `vita converse` or the browser console at {console} to try it, `vita down` to stop")


def _load_stack(path):
    """The LocalStack `vita up` saved in `path`; None without one. A file that is not a stack's state is
    VitaError (status 2); other OSErrors (unreadable, a directory) are one line, status 2, from main."""
    from vita.stack import LocalStack

    try:
        return LocalStack.load(path)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, or not a stack's fields
        raise VitaError(f"cannot read the stack state in {path} ({type(e).__name__}: {e}): stop any of its "
                        "processes still running yourself, then remove it") from None


def _down(args: argparse.Namespace) -> int:
    """Stopping what is already stopped succeeds (as `docker compose down` does): no state file, or one whose
    processes have all exited, is status 0. A state file that cannot be read is status 2; a process still alive
    after SIGKILL is status 1, and the state file is kept so that `vita down` can be run again."""
    path = _stack_file()
    stack = _load_stack(path)
    if stack is None:
        print(f"no stack is up: nothing to stop (no state file {path})")
        if not args.purge:
            return EXIT_OK
        if args.prefix is None:
            raise VitaError("nothing purged: no state file says which keys were the stack's; give its --prefix "
                            "(and --redis if it was not the default)")
        return _purge(args, SimpleNamespace(prefix=args.prefix, redis_url=args.redis))
    # A Redis `vita up` started (none answered) is stopped with the stack; it kept no data, so --purge has
    # nothing left to delete there.
    own_redis = stack.redis_pid if stack.redis_alive() else 0
    purge = args.purge and not own_redis
    if not stack.running():
        stack.stop()  # the Redis it started, if that is all that is left
        path.unlink(missing_ok=True)
        print(f"no stack process was running (pids from {path}, now removed): nothing to stop"
              + (f" but the redis-server it started (pid {own_redis}), stopped" if own_redis else ""))
        return _purge(args, stack) if purge else EXIT_OK
    running = len(stack.running())
    left = stack.stop()
    if left:
        names = ", ".join(f"{s.name} (pid {s.pid})" for s in left)
        print(f"{args.command_name}: error: still running after SIGKILL: {names}; state kept in {path}",
              file=sys.stderr)
        return EXIT_FAILED
    path.unlink(missing_ok=True)
    print(f"stack stopped ({running} processes"
          + (f", and the redis-server it started, pid {own_redis}, with its keys" if own_redis else "")
          + f"; state {path} removed)")
    return _purge(args, stack) if purge else EXIT_OK


def _purge(args: argparse.Namespace, stack) -> int:
    """Deletes the stopped stack's keys (`vita down --purge`); a Redis that cannot do it is status 1."""
    import redis

    from vita.runtime.redis_client import redacted
    from vita.stack import delete_prefix

    try:
        delete_prefix(stack.prefix, stack.redis_url)
    except redis.RedisError as e:
        print(f"{args.command_name}: error: the stack's keys ({stack.prefix}:*) could not be deleted at "
              f"{redacted(stack.redis_url)}: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"deleted its keys in Redis ({stack.prefix}:*)")
    return EXIT_OK


def _connect(args: argparse.Namespace, **kwargs):
    from vita.client import VitaClient

    return VitaClient(args.target, token=args.token, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                      tls_key=args.tls_key, **kwargs)


def _add_connection_args(p: argparse.ArgumentParser, target: str | None = "127.0.0.1:50051",
                         target_help: str = "orchestrator address (default: %(default)s)") -> None:
    p.add_argument("--target", default=target, help=target_help)
    p.add_argument("--token", default=os.environ.get("VITA_API_TOKEN"),
                   help="bearer token for a server started with --api-tokens (env VITA_API_TOKEN)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (implied by --tls-ca / --tls-cert)")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) the server's must chain to")
    p.add_argument("--tls-cert", default=None, help="this client's certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", default=None, help="the --tls-cert's private key (PEM)")


def _decoded_here(images: Sequence[str], audio: Sequence[str], video: str | None = None) -> None:
    """Each image, audio and video file decoded before the call opens: a bad one is a usage error naming it
    (status 2), not a request the server refuses (status 1)."""
    from vita.processing.audio import load_audio
    from vita.processing.image import load_image
    from vita.processing.video import decode_video

    for path in images:
        load_image(path)
    for path in audio:
        load_audio(path)
    if video is not None:
        decode_video(video)


def _ask(args: argparse.Namespace) -> None:
    from vita.client import build_request
    from vita.v1.assistant_pb2 import Completed

    if not (args.text or args.image or args.video or args.audio):
        raise VitaError("nothing to ask: give --text, --image, --video or --audio")
    _decoded_here(args.image or [], args.audio or [], args.video)
    request = build_request(args.text or "", images=args.image or [], video=args.video, audio=args.audio or [],
                            max_tokens=args.max_tokens or 0, temperature=args.temperature)
    with _connect(args, timeout_s=args.timeout) as client:
        for response in client.generate(request):
            if response.HasField("delta"):
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
            else:
                c = response.completed
                reason = Completed.FinishReason.Name(c.finish_reason).lower()
                cut = {"length": " (cut at max_tokens: raise --max-tokens)",
                       "context_length": " (cut: the context is full)"}.get(reason, "")
                print(flush=True)  # the answer is a line of its own, on a terminal or in a pipe
                print(f"[{reason}{cut}; {c.usage.prompt_tokens} prompt tokens, {c.usage.completion_tokens} "
                      f"generated, first token {c.timings.time_to_first_token_s * 1000:.0f} ms, total "
                      f"{c.timings.total_s:.2f} s]", file=sys.stderr)


def _converse(args: argparse.Namespace) -> int:
    """Prints every server event; exit status 1 when the server reported an error event (a refused resume, an
    image it could not decode) although the session itself went on."""
    from vita.client import END, image_event, session_config, speech_events, text_event
    from vita.processing.audio import load_audio
    from vita.timeline import Timeline

    # Every file is read before the call opens: a bad one is a usage error, not a broken session.
    speech = [load_audio(path).numpy() for path in args.wav or []]
    _decoded_here(args.image or [], [])
    images = [image_event(image) for image in args.image or []]
    # The rest waits for the server's answer to the config: after a refused one (a resume of a session that is
    # gone) every event would be refused too, "before the session config" (a new user's try, 2026-12-06).
    configured, refused = threading.Event(), threading.Event()

    def events():
        yield session_config(session_id=args.session or "", resume=bool(args.session), max_tokens=args.max_tokens)
        configured.wait()
        if refused.is_set():
            return
        yield from images
        for samples in speech:
            yield from speech_events(samples, realtime=not args.fast)
        for text in args.text or []:
            yield text_event(text)
        yield END

    timeline, errors = Timeline(), 0
    with _connect(args, timeout_s=None) as client:
        try:
            for event in client.converse(events()):
                timeline.print(event)
                errors += event.HasField("error")
                if not configured.is_set() and event.HasField("error"):
                    refused.set()
                configured.set()
        finally:
            configured.set()  # the call ended (an error status, Ctrl-C) before any answer: the sender ends too
    if errors:
        print(f"vita converse: error: the server reported {errors} error event(s) (printed above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _eval(args: argparse.Namespace) -> None:
    from vita.eval.cli import run_eval

    run_eval(args)


def _eval_duplex(args: argparse.Namespace) -> None:
    from vita.eval.cli import run_duplex

    run_duplex(args)


def _train(args: argparse.Namespace) -> None:
    from vita.training.train import main

    main(args)


def _data(args: argparse.Namespace) -> None:
    from vita.training.data_cli import main

    main(args)


def _attribute_scale(attributes: tuple[str, ...]) -> Callable[[str], tuple[str, float]]:
    """An argparse `type` for `ATTRIBUTE=X` with X > 0 and ATTRIBUTE among `attributes`: anything else is a usage
    error, exit 2."""
    def parse(value: str) -> tuple[str, float]:
        name, sep, raw = value.partition("=")
        if not sep or name not in attributes:
            raise argparse.ArgumentTypeError(f"{value!r} is not ATTRIBUTE=X with ATTRIBUTE among "
                                             f"{', '.join(attributes)}")
        return name, float_in(0.0, math.inf, open_low=True)(raw)

    return parse


def _pretrain_vision(args: argparse.Namespace) -> None:
    import json

    from vita.telemetry.logging import configure_logging
    from vita.training.cpu import denormals_flushed
    from vita.training.vision_pretrain import VisionPretrainConfig, pretrain_vision_encoder

    configure_logging("training", level=os.environ.get("VITA_LOG_LEVEL", "info"))
    config = VisionPretrainConfig(preset=args.preset, seed=args.seed, data_seed=args.data_seed, pictures=args.pictures,
                                  steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                                  sincos_positions=args.position_init == "sincos", word_shift=args.word_shift,
                                  pooled=tuple(args.pooled), head_decay_scale=dict(args.head_decay_scale))
    with denormals_flushed():  # before torch's first parallel work: vita.training.cpu
        summary = pretrain_vision_encoder(config, args.output, progress=not args.no_progress,
                                          overwrite=args.overwrite)
    print(json.dumps(summary))


def _pretrain_audio(args: argparse.Namespace) -> None:
    import json

    from vita.telemetry.logging import configure_logging
    from vita.training.audio_pretrain import AudioPretrainConfig, pretrain_audio_encoder
    from vita.training.cpu import denormals_flushed

    configure_logging("training", level=os.environ.get("VITA_LOG_LEVEL", "info"))
    config = AudioPretrainConfig(preset=args.preset, seed=args.seed, data_seed=args.data_seed, clips=args.clips,
                                 steps=args.steps, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                                 speaker_head=args.speaker_head)
    with denormals_flushed():  # before torch's first parallel work: vita.training.cpu
        summary = pretrain_audio_encoder(config, args.output, progress=not args.no_progress,
                                          overwrite=args.overwrite)
    print(json.dumps(summary))


def _export(args: argparse.Namespace) -> None:
    from vita.training.export import export_model, verify_repository

    if args.verify:
        manifest = verify_repository(args.verify)
        print(f"{args.verify}: {len(manifest['files'])} files match {args.verify}/manifest.json")
        return
    if not args.checkpoint or not args.output:
        raise VitaError("give --checkpoint and --output (or --verify REPO)")
    path = export_model(args.checkpoint, args.output, max_shard_bytes=args.shard_bytes, overwrite=args.overwrite,
                        templates=args.templates)
    print(f"model repository written to {path}")


def _stand_in_arguments(p: argparse.ArgumentParser, tower: str, items: str, *, steps: int, batch_size: int, lr: float,
                        data_seed: int) -> None:
    """The flags `pretrain-vision` and `pretrain-audio` share; the defaults are their configs' (`make train-tiny`)."""
    p.add_argument("--output", required=True, help="directory to write (model.safetensors, config.json, metrics.jsonl)")
    p.add_argument("--preset", default="tiny-112", help=f"model preset whose {tower} encoder to train (default: %(default)s)")
    p.add_argument("--steps", type=int_in(1, _INT32), default=steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=batch_size, help=f"{items} per step (default: %(default)s)")
    p.add_argument("--lr", type=float_in(0.0, 1.0, open_low=True), default=lr,
                   help="peak AdamW learning rate, one-cycle schedule (default: %(default)s)")
    p.add_argument("--seed", type=int_in(0, _INT32), default=0, help="the encoder's initial weights (default: 0)")
    p.add_argument("--data-seed", type=int_in(0, _INT32), default=data_seed,
                   help=f"the {items}' seed, not the curriculum's (default: %(default)s)")
    p.add_argument("--threads", type=int_in(1, 1024), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="train again even if OUTPUT holds these settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _text(value: str) -> str:
    """Text flags: Python hands bytes that are not UTF-8 over as lone surrogates; refuse them by name."""
    try:
        value.encode()
    except UnicodeEncodeError as e:
        char = ord(value[e.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8 ({byte} at character {e.start}); pass UTF-8 text") from None
    return value


_INT32 = 2**31 - 1
_TOKENS = int_in(1, _INT32)
_TEMPERATURE = float_in(0.0, 100.0)


def _redis_url(value: str) -> str:
    """`vita.runtime.args.redis_url`, imported when a command with --redis parses (not for `vita --help`)."""
    from vita.runtime.args import redis_url

    return redis_url(value)


def _bus_prefix(value: str) -> str:
    from vita.runtime.args import bus_prefix

    return bus_prefix(value)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="vita",
        description="VITA-style omni-modal LLM: inspect models, generate locally, run the services.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from vita.model.config import PRESETS

    p = sub.add_parser("model-info", help="parameter counts of a preset, built on the meta device (no memory); "
                                          "with --target, what a running server serves",
                       description="Without --target: a preset's parameter counts, built on the meta device (no "
                                   "memory). With --target: ask a running orchestrator (Assistant/ModelMetadata) "
                                   "for the model it serves, its context length and max_tokens, the modalities it "
                                   "takes and the input limits it enforces.")
    p.add_argument("--preset", default=None,
                   help=f"preset name: {', '.join(PRESETS)} (default: {DEFAULT_PRESET}); not with --target")
    _add_connection_args(p, target=None, target_help="orchestrator address to ask (e.g. 127.0.0.1:50051)")
    p.add_argument("--json", action="store_true", help="with --target: print the answer as JSON (proto field names)")
    p.set_defaults(func=_model_info)

    p = sub.add_parser("init-tiny", help="write a tiny random-weight model + tokenizer directory for local runs")
    p.add_argument("--output", default=None, help="directory (default: $VITA_HOME/models/tiny)")
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_init_tiny)

    p = sub.add_parser("generate", help="one multimodal generation in this process, streamed to stdout",
                       description="Run one request through the model in-process and stream the answer. "
                                   "Media go before the text; the text is taken as typed (`<image>` or `<1>` in "
                                   "it are just characters).")
    p.add_argument("--model", default=None,
                   help="model directory (ours or a Hugging Face Mixtral one); default: the tiny model, "
                        "created on first use")
    p.add_argument("--text", type=_text, help="the question or instruction (UTF-8)")
    p.add_argument("--image", action="append", help="image file (repeatable); tiled dynamically")
    p.add_argument("--video", help="video file; sampled by the video rule, one tile per frame")
    p.add_argument("--audio", action="append", help="audio file (WAV, FLAC, MP3, Ogg, AAC/M4A, ...; repeatable): "
                   "a spoken question")
    p.add_argument("--system", type=_text, help="system prompt override")
    p.add_argument("--max-tokens", type=_TOKENS, default=64)
    p.add_argument("--temperature", type=_TEMPERATURE, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, open_low=True), default=1.0)
    p.add_argument("--top-k", type=int_in(0, _INT32), default=0)
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=None)
    p.add_argument("--threads", type=int_in(1, 1024), default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="run one service (audio-encoder, vision-encoder, llm, orchestrator, realtime)",
                       description="Run one service process; `vita serve SERVICE --help` lists its options.")
    p.add_argument("service", choices=sorted(SERVICES))
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="options of the service")
    p.set_defaults(func=_serve)

    p = sub.add_parser("up", help="start Redis (if needed) and every service locally, in the background")
    p.add_argument("--model", default=None, help="model directory (default: the tiny model fine-tuned for duplex "
                   "sessions, as `make demo` serves it; trained on first use, a few minutes, then cached in "
                   "$VITA_HOME/models)")
    p.add_argument("--redis", type=_redis_url, default="redis://127.0.0.1:6379/0",
                   help="the Redis of the bus (default: %(default)s; started there if none answers and it is on "
                        "this machine)")
    p.add_argument("--prefix", type=_bus_prefix, default="vita",
                   help="Redis key prefix of this stack's streams and sessions (default: %(default)s)")
    p.add_argument("--port", type=int_in(1, 65535), default=50051, help="the orchestrator's (public API) port")
    p.add_argument("--realtime-port", type=int_in(1, 65535), default=8080,
                   help="the OpenAI-Realtime WebSocket endpoint's port")
    p.set_defaults(func=_up)

    p = sub.add_parser("down", help="stop the stack `vita up` started (nothing up: says so, status 0)",
                       description="Stop the stack `vita up` started: SIGTERM to every service (they drain), "
                                   "SIGKILL after 15 s, then remove its state file ($VITA_HOME/stack.json). With "
                                   "nothing up (no state file, or none of its processes alive) it says so and "
                                   "exits 0, so it can be run any number of times. Exit status 1: a process still "
                                   "alive after SIGKILL (the state file is kept); 2: a state file that cannot be "
                                   "read.")
    p.add_argument("--purge", action="store_true",
                   help="also delete the stack's keys in Redis (its --prefix: job streams, which keep no expiry, "
                        "sessions, replies); without it they stay for the next `vita up` on the same prefix")
    p.add_argument("--prefix", type=_bus_prefix, help="with --purge and no stack up (its state file gone after an earlier `vita "
                                    "down`): the prefix whose keys to delete")
    p.add_argument("--redis", type=_redis_url, default="redis://127.0.0.1:6379/0",
                   help="with --prefix: the Redis holding them (default: %(default)s)")
    p.set_defaults(func=_down)

    p = sub.add_parser("ask", help="send one request to a running stack and stream the answer")
    _add_connection_args(p)
    p.add_argument("--text", type=_text, help="the question or instruction (UTF-8)")
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument("--video", help="video file")
    p.add_argument("--audio", action="append", help="audio file (WAV, FLAC, MP3, Ogg, AAC/M4A, ...; repeatable)")
    p.add_argument("--max-tokens", type=_TOKENS, default=None,
                   help="cap on the answer's tokens (default: the server's default_max_tokens, which `vita "
                        "model-info --target` shows)")
    p.add_argument("--temperature", type=_TEMPERATURE, default=0.0)
    p.add_argument("--timeout", type=float_in(0.0, math.inf, open_low=True), default=120.0,
                   help="seconds to wait for the whole answer before giving up (default: %(default)s)")
    p.set_defaults(func=_ask)

    p = sub.add_parser("converse", help="a duplex voice session with a running stack: stream WAV files as a "
                                        "microphone would and print the event timeline",
                       description="Open a Converse session, attach images, stream each WAV in real time (then "
                                   "0.8 s of silence), send the text messages, and print every server event with "
                                   "its time since the session started.")
    _add_connection_args(p)
    p.add_argument("--wav", action="append", help="speech to stream (repeatable; any rate, resampled)")
    p.add_argument("--image", action="append", help="image for the next answered turn (repeatable)")
    p.add_argument("--text", action="append", type=_text, help="a typed message, sent after the speech (repeatable)")
    p.add_argument("--session", help="resume this session id instead of starting a new one")
    p.add_argument("--max-tokens", type=int_in(0, _INT32), default=0, help="per answer (0: the server default)")
    p.add_argument("--fast", action="store_true", help="send audio as fast as possible, not in real time")
    p.set_defaults(func=_converse)

    from vita.eval.registry import NAMES

    p = sub.add_parser("eval", help="score a model on the curriculum's held-out split or a benchmark's local copy, "
                                    "or a live stack's turn-taking (duplex)",
                       description="Read a benchmark in its published layout (docs/training.md, 'Evaluation'), "
                                   "answer every question greedily in-process and print the metrics; or (duplex) "
                                   "stream synthetic dialogues through Converse sessions and score the turn-taking.")
    benchmarks = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name in NAMES:
        b = benchmarks.add_parser(name, help=f"{name}: a local copy in its published layout")
        b.add_argument("--model", default=None, help="model directory (default: the tiny model)")
        b.add_argument("--data", required=True, help="the benchmark's local copy (file or directory)")
        b.add_argument("--limit", type=int_in(1, _INT32), default=None,
                       help="only the first N questions (curriculum: N per manifest)")
        b.add_argument("--output", default=None, help="write metrics and every answer to this JSON file")
        b.add_argument("--max-tokens", type=_TOKENS, default=None, help="cap on each answer's length")
        b.add_argument("--threads", type=int_in(1, 1024), default=None, help="torch CPU threads")
        b.set_defaults(func=_eval)
    from vita.eval.duplex import CATEGORIES

    b = benchmarks.add_parser(
        "duplex", help="turn-taking of a live Converse session (pauses, interruptions, talk not for it)",
        description="Full-Duplex-Bench-style evaluation: synthetic espeak-ng dialogues streamed in real time "
                    "through fresh Converse sessions; pause takeover rate, interruption takeover rate and "
                    "latencies, no-response rates for talk to someone else and background speech. Prints a "
                    "markdown table (docs/serving.md, 'Duplex evaluation').")
    b.add_argument("--target", default=None, help="orchestrator address of a running stack (default: start a "
                                                  "local stack on --model)")
    b.add_argument("--model", default=None, help="model directory for the local stack (default: the duplex-tuned "
                                                 "tiny model, `make duplex-model`)")
    b.add_argument("--redis", type=_redis_url, default="redis://127.0.0.1:6379/0",
                   help="Redis of the local stack (default: %(default)s)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 dialogues per category (the test suite's run)")
    size.add_argument("--per-category", type=int_in(1, 100), default=10, help="dialogues per category (10)")
    b.add_argument("--category", action="append", choices=CATEGORIES, help="only these categories (repeatable)")
    b.add_argument("--compare-off", action="store_true",
                   help="run every dialogue also with the end-of-turn judgement and the barge-in rule off (side by "
                        "side, twice the time)")
    b.add_argument("--output", default=None, help="write the metrics and every dialogue's outcome to this JSON file")
    b.add_argument("--markdown", default=None, help="also write the table to this file")
    b.set_defaults(func=_eval_duplex)

    p = sub.add_parser("train", help="run one training stage (also under torchrun)",
                       description="Train one stage from a config in training/configs/; under torchrun every "
                                   "process runs this command (torchrun --nproc-per-node N -m vita.cli train ...).")
    from vita.training.train import add_arguments

    add_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("data", help="turn a public corpus (LLaVA, WenetSpeech, GigaSpeech, WavCaps) into a JSONL "
                       "manifest; check manifests before a run",
                       description="`convert`: a corpus file in its published layout -> a JSONL manifest a stage "
                                   "config lists under data.manifests (docs/training.md, 'Data'). `check`: every "
                                   "line read and every medium decoded once, as a stage will; bad data is one line "
                                   "naming the file and line (exit 2).")
    from vita.training.data_cli import add_arguments as add_data_arguments

    add_data_arguments(p)
    p.set_defaults(func=_data)

    p = sub.add_parser("pretrain-vision", help="tiny runs: train the vision encoder on rendered pictures, the "
                       "stand-in for a pretrained InternViT (stage 2 vision loads it: init.vision_encoder)",
                       description="Renders pictures as the synthetic curriculum draws them (its own seed; written "
                                   "words twice as often, each moved by a few pixels) and trains the preset's vision "
                                   "encoder to tell each picture's colour, shape and position from every token and "
                                   "its count and word from the tokens' mean; writes the encoder in InternViT's "
                                   "names, with its held-out accuracy per attribute (probe.json). An output "
                                   "directory that already holds the same settings is reused.")
    p.add_argument("--pictures", type=int_in(1, 10**7), default=36000,
                   help="pictures rendered once and drawn from (default: %(default)s)")
    p.add_argument("--position-init", choices=("sincos", "random"), default="sincos",
                   help="the position embedding's start: 2-D sin-cos codes (MAE's) or random normal (InternViT's "
                        "own init) (default: %(default)s)")
    p.add_argument("--word-shift", type=int_in(0, 56), default=7,
                   help="move each drawn word picture by up to this many pixels each way, 0 for none "
                        "(default: %(default)s)")
    attributes = ("colour", "shape", "count", "word", "column", "row")  # vision_pretrain.CLASSIFIED (a test checks)
    p.add_argument("--pooled", nargs="+", choices=attributes, default=["count", "word"], metavar="ATTRIBUTE",
                   help="attributes classified from the tokens' mean instead of from every token "
                        f"({', '.join(attributes)}; default: count word)")
    p.add_argument("--head-decay-scale", nargs="+", type=_attribute_scale(attributes), default=[],
                   metavar="ATTRIBUTE=X",
                   help="multiply the weight decay of these attributes' heads by X > 0 (e.g. colour=3 shape=3): a "
                        "larger decay keeps an attribute louder in the tokens once it is learnt (default: none)")
    _stand_in_arguments(p, "vision", "pictures", steps=4400, batch_size=32, lr=3e-3, data_seed=1_000_003)
    p.set_defaults(func=_pretrain_vision)

    p = sub.add_parser("pretrain-audio", help="tiny runs: train the audio encoder to spot the words it hears, the "
                       "stand-in for an ASR-pretrained encoder (stage 2 audio loads it: init.audio_encoder)",
                       description="Speaks sentences with the synthetic curriculum's voices (espeak-ng, its own seed; "
                                   "never the curriculum's chatter) and trains the preset's audio encoder to tell, "
                                   "from every frame, which words the utterance holds, what it asks and its "
                                   "language; writes the encoder in WeNet's names with its global CMVN, and its "
                                   "held-out scores (probe.json). An output directory that already holds the same "
                                   "settings is reused.")
    p.add_argument("--clips", type=int_in(1, 10**7), default=2400,
                   help="utterances recorded once and drawn from (default: %(default)s)")
    p.add_argument("--speaker-head", action=argparse.BooleanOptionalAction, default=True,
                   help="a fourth head: whether the voice is one of the curriculum's query voices or another's, so "
                        "the frames keep who speaks (docs/training.md, 'Who speaks'; default: on, the recipe; "
                        "--no-speaker-head trains the three heads of the recipe before)")
    _stand_in_arguments(p, "audio", "clips", steps=700, batch_size=16, lr=2e-3, data_seed=2_000_003)
    p.set_defaults(func=_pretrain_audio)

    p = sub.add_parser("export", help="write the model repository the serving stack loads from a checkpoint")
    p.add_argument("--checkpoint", help="a stage's output_dir, its final/, or a checkpoint directory")
    p.add_argument("--output", help="the model repository directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory that `vita export` "
                   "wrote (never one holding the checkpoint, nor another directory)")
    p.add_argument("--shard-bytes", type=int_in(1, 2**62), default=5 * 10**9, help="largest safetensors shard (bytes)")
    p.add_argument("--templates", default=None, help="Triton model configs to copy (default: model_repository/)")
    p.add_argument("--verify", metavar="REPO", help="only check REPO's files against its manifest")
    p.set_defaults(func=_export)

    _set_epilog(sub, "exit status: 0 success, 1 the request failed where it ran, 2 bad input, 3 internal error, "
                     "130 interrupted (details: vita --help)")
    return parser


def _set_epilog(sub: argparse._SubParsersAction, epilog: str) -> None:
    """Every subcommand's help ends with the exit statuses, nested ones too (`vita eval curriculum --help`)."""
    for command in sub.choices.values():
        command.epilog = epilog
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _set_epilog(action, epilog)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns its exit status (see EXIT_STATUSES). Usage errors exit from argparse with 2."""
    command = "vita"

    def fail(status: int, message: object) -> int:
        print(f"{command}: error: {one_line(message)}", file=sys.stderr)
        return status

    try:
        args = build_parser().parse_args(argv)
        command = args.command_name  # `vita eval mme`, not `vita eval`
        status = args.func(args)  # None, or a status of its own (vita converse: errors reported in-band)
    except VitaError as e:
        return fail(EXIT_USAGE, e)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        return fail(EXIT_USAGE, f"{e.strerror}: {e.filename}" if e.filename else e)
    except grpc.RpcError as e:
        return fail(EXIT_FAILED, f"{e.code().name}: {e.details()}")
    except BrokenPipeError:  # the reader went away (`vita generate ... | head -1`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as e:
        return fail(EXIT_FAILED, e)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line, the traceback only on request
        if os.environ.get("VITA_TRACEBACK"):
            traceback.print_exc()
        return fail(EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e} (set VITA_TRACEBACK=1 for the "
                                   "traceback)")
    return EXIT_OK if status is None else status


if __name__ == "__main__":
    sys.exit(main())
