"""`vita serve orchestrator`: the public `vita.v1.Assistant` API; stateless, run as many replicas as needed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vita.model.config import VitaConfig
from vita.model.fingerprint import model_fingerprint
from vita.orchestrator.limits import InputLimits, served_audio_limit
from vita.orchestrator.service import AssistantService, OrchestratorConfig
from vita.processing.vad import VADConfig
from vita.runtime.args import add_common_args
from vita.runtime.serve import Context, Service, run_service
from vita.runtime.server import GrpcService
from vita.usage import ArgumentParser
from vita.v1 import assistant_pb2_grpc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="vita serve orchestrator",
                                description="The public gRPC API: fans requests out to the encoder and LLM pools "
                                            "over Redis streams and streams answers back.")
    p.add_argument("--model", default=None, help="model directory: only config.json and the tokenizer are read "
                   "(default: the tiny model)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="when a request sets no max_tokens")
    p.add_argument("--encode-timeout", type=float, default=60.0, help="seconds to wait for the encoders")
    p.add_argument("--token-timeout", type=float, default=60.0,
                   help="seconds without a token before the request fails UNAVAILABLE (> reclaim time)")
    vad = VADConfig()
    p.add_argument("--end-silence-ms", type=int, default=vad.end_silence_ms,
                   help="Converse: silence that ends speech that sounds finished")
    p.add_argument("--incomplete-silence-ms", type=int, default=vad.incomplete_silence_ms,
                   help="Converse: silence that ends speech that sounds unfinished (a hesitation mid-sentence); "
                        "not above --end-silence-ms: no end-of-turn judgement")
    p.add_argument("--complete-silence-ms", type=int, default=vad.complete_silence_ms,
                   help="Converse: silence that ends speech judged finished (a final pitch fall); 0: "
                        "--end-silence-ms for all speech")
    p.add_argument("--preemptive-generation", action=argparse.BooleanOptionalAction, default=True,
                   help="Converse: start the answer when the speech pauses, release it when the turn ends "
                        "(sessions may set their own)")
    p.add_argument("--prefill-monitor-history", action=argparse.BooleanOptionalAction, default=True,
                   help="Converse: after each answer, have the monitor pool prefill the session's history into its "
                        "prefix cache, so that judging the next speech computes only the speech (needs the llm "
                        "workers' --enable-prefix-caching)")
    p.add_argument("--barge-in-max-ms", type=int, default=vad.barge_in_max_ms,
                   help="Converse: speech up to this long during an answer stops it even when not judged a query "
                        "(-1 or 0: the rule off; a session's VadParams.barge_in_max_ms overrides it, -1 off there "
                        "too) (default: %(default)s)")
    p.add_argument("--judge-timeout", type=float, default=30.0,
                   help="Converse: seconds to wait for the monitor pool's judgement of an utterance")
    d = InputLimits()
    g = p.add_argument_group("input limits (INVALID_ARGUMENT beyond them; docs/serving.md)")
    g.add_argument("--max-text-chars", type=int, default=d.max_text_chars,
                   help="characters of a request's text, its system prompt, or one Converse text message")
    g.add_argument("--max-images", type=int, default=d.max_images, help="images in one Generate request")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="width x height of any image or video frame")
    g.add_argument("--max-audio-clips", type=int, default=d.max_audio_clips, help="audio inputs in one request")
    g.add_argument("--max-audio-seconds", type=float, default=None,
                   help="length of each audio input (default: the longest clip the model's audio encoder takes, "
                        f"{d.max_audio_s:g} s for the presets; only a lower value may be given)")
    g.add_argument("--max-video-seconds", type=float, default=d.max_video_s,
                   help="a video file's duration, or the span of a frame sequence")
    g.add_argument("--max-video-frames", type=int, default=d.max_video_frames, help="frames in a frame sequence")
    add_common_args(p)
    return p.parse_args(argv)


def input_limits(args: argparse.Namespace, model: VitaConfig | None = None) -> InputLimits:
    """The `--max-*` flags; with the served model's config, `--max-audio-seconds` defaults to (and may not exceed)
    the longest clip its audio encoder takes (`served_audio_limit`)."""
    max_audio_s = served_audio_limit(args.max_audio_seconds, model.audio if model is not None else None)
    return InputLimits(max_text_chars=args.max_text_chars, max_images=args.max_images,
                       max_image_pixels=args.max_image_pixels, max_audio_clips=args.max_audio_clips,
                       max_audio_s=max_audio_s, max_video_s=args.max_video_seconds,
                       max_video_frames=args.max_video_frames)


def vad_defaults(args: argparse.Namespace) -> VADConfig:
    """The Converse VAD defaults of the flags; `--barge-in-max-ms` -1 (as a session's VadParams) or 0: the rule off."""
    return VADConfig(end_silence_ms=args.end_silence_ms, incomplete_silence_ms=args.incomplete_silence_ms,
                     complete_silence_ms=args.complete_silence_ms, barge_in_max_ms=max(0, args.barge_in_max_ms))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    input_limits(args)  # a bad value fails here, before anything starts

    async def build(ctx: Context) -> Service:
        from vita.model.vita import read_model_config
        from vita.processing.tokenizer import VitaTokenizer

        model = read_model_config(ctx.model_dir)
        service = AssistantService(
            ctx.redis, ctx.bus, model, VitaTokenizer.from_file(ctx.model_dir),
            OrchestratorConfig(default_max_tokens=args.default_max_tokens, encode_timeout_s=args.encode_timeout,
                               token_timeout_s=args.token_timeout, judge_timeout_s=args.judge_timeout,
                               limits=input_limits(args, model), preemptive_generation=args.preemptive_generation,
                               prefill_monitor_history=args.prefill_monitor_history,
                               vad=vad_defaults(args), model_dir=str(ctx.model_dir),
                               model_fingerprint=model_fingerprint(ctx.model_dir)), ctx.metrics)
        return Service(grpc=[GrpcService("vita.v1.Assistant",
                                         lambda s: assistant_pb2_grpc.add_AssistantServicer_to_server(service, s))])

    # VAD and resampling only: ops this small lose time to a second thread.
    return run_service("orchestrator", args, build, threads=1)


if __name__ == "__main__":
    sys.exit(main())
