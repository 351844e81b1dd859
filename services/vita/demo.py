"""`make demo`: the local service stack on the tiny model, and one-shot requests through its public API.

Starts Redis if none answers, every service as a process on 127.0.0.1 (audio encoder, vision encoder, generator
and monitor LLM pools, orchestrator), waits for their health checks, sends requests made on the spot (an image that
tiles into two 448 tiles plus a thumbnail with a 3 s spoken question from espeak-ng; a short video with a text
question), prints the streamed answers with their timings, then runs two scripted `Converse` sessions, printed as
event timelines: a spoken question about an image, speech not meant for the assistant (ignored) and a typed
question; then a long answer interrupted by a new spoken question, a hang-up mid-answer and a resume. Speech is
streamed in real time, as a microphone would. The interruption is scripted against the answer's own events, not
the clock: the answer has no end of sequence and may fill the context, and the question starts after its first
token, so it is cut however fast or slow the machine is.

The stack serves the tiny model fine-tuned for the duplex decisions (vita/training/duplex.py, a few minutes on 2 CPU
cores on first use, then cached): whether speech is a query is the model's own state token. Beyond the fine-tuned
answer its words are noise; what the demo shows is the pipeline and its timings. `--in-process` runs one request through the model
in this process instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vita.processing.audio import load_audio, write_wav


def make_image(path: Path) -> Path:
    """896x448: the 2:1 grid wins, so two tiles plus a thumbnail."""
    img = Image.new("RGB", (896, 448), (235, 235, 220))
    draw = ImageDraw.Draw(img)
    draw.rectangle((80, 100, 330, 350), fill=(200, 30, 30))
    draw.ellipse((560, 100, 810, 350), fill=(30, 60, 200))
    img.save(path)
    return path


def make_speech(path: Path, text: str, seconds: float = 3.0) -> Path:
    """espeak-ng speech, padded or cut to exactly `seconds` at 16 kHz (PCM16 WAV)."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: run `make setup` (it installs it with apt-get)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(raw), text], check=True)
    wave = load_audio(raw.read_bytes()).numpy()
    n = int(seconds * 16000)
    wave = np.pad(wave, (0, max(0, n - wave.size)))[:n]
    write_wav(path, wave)
    return path


def make_video(path: Path, seconds: float = 1.5, fps: int = 10) -> Path:
    """A square sliding across the frame; 1.5 s is sampled at 4 fps into 6 frames."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 224, 160, "yuv420p"
        for i in range(int(seconds * fps)):
            img = Image.new("RGB", (224, 160), (20, 20, 20))
            x = 10 + i * 12
            ImageDraw.Draw(img).rectangle((x, 60, x + 40, 100), fill=(240, 200, 0))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main(argv: list[str] | None = None) -> int:
    import grpc

    from vita.errors import VitaError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--model", default=None, help="model directory (default: the tiny model, built on first use)")
    parser.add_argument("--in-process", action="store_true", help="no services: one request in this process")
    args = parser.parse_args(argv)
    try:
        return in_process(args) if args.in_process else through_stack(args)
    except (VitaError, TimeoutError, EOFError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, VitaError) else 1
    except grpc.RpcError as e:
        print(f"demo: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def duplex_model() -> str:
    """The tiny model after the duplex fine-tune (vita.training.duplex), built once and cached."""
    from vita.stack import duplex_model_dir

    print("duplex fine-tune of the tiny model (a few minutes the first time, then cached) ...", flush=True)
    return str(duplex_model_dir(progress=True))


def _forget(prefix: str, url: str) -> None:
    """The stopped stack's keys: a demo leaves nothing in Redis (a Redis gone with the demo: nothing to delete)."""
    import redis

    from vita.stack import delete_prefix

    with contextlib.suppress(redis.RedisError):
        delete_prefix(prefix, url)


def through_stack(args: argparse.Namespace) -> int:
    from vita.client import VitaClient, build_request
    from vita.stack import LocalStack

    model = args.model or duplex_model()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vita-demo-") as tmp, contextlib.ExitStack() as after_stop, \
            LocalStack(model_dir=model, prefix=f"demo{os.getpid()}", log_dir=tmp) as stack:
        after_stop.callback(_forget, stack.prefix, stack.redis_url)  # once the services are gone
        print(f"stack up in {time.perf_counter() - t0:.1f} s:")
        for s in stack.services:
            print(f"  {s.name:<15} pid {s.pid:<7} grpc 127.0.0.1:{s.grpc_port}")
        tmp = Path(tmp)
        requests = {
            "image + spoken question": build_request(
                images=[make_image(tmp / "shapes.png")],
                audio=[make_speech(tmp / "question.wav", "What colour is the square in the picture?")],
                max_tokens=args.max_tokens),
            "video + text question": build_request(
                "Which way does the yellow square move?", video=make_video(tmp / "clip.mp4"),
                max_tokens=args.max_tokens),
        }
        with VitaClient(stack.target) as client:
            for title, request in requests.items():
                print(f"\n{title}:")
                start = time.perf_counter()
                for response in client.generate(request):
                    ms = (time.perf_counter() - start) * 1000
                    if response.HasField("delta"):
                        print(f"  {ms:8.1f} ms  {response.delta.text!r}")
                    else:
                        c = response.completed
                        u = c.usage
                        print(f"  prompt {u.prompt_tokens} tokens (image {u.image_tokens}, video {u.video_tokens}, "
                              f"audio {u.audio_tokens}); encode {c.timings.encode_s * 1000:.0f} ms, "
                              f"first token {c.timings.time_to_first_token_s * 1000:.0f} ms, "
                              f"{u.completion_tokens} tokens in {c.timings.total_s * 1000:.0f} ms")
            converse(client, tmp)
    print("\nstack stopped")
    return 0


# The waits below are for events that must come; their timeouts only stop a demo that hangs.
HANG_S = 600.0


def converse(client, tmp: Path) -> None:
    """The scripted duplex sessions, printed as timelines."""
    from vita.client import ConverseSession, image_event, session_config, speech_events, text_event
    from vita.timeline import Timeline
    from vita.training.speech import espeak

    say = {name: espeak(text, voice) for name, (text, voice) in {
        "question": ("what is in this picture", "query"),
        "aside": ("honey did you feed the cat", "en-high"),
        "story": ("tell me a short story", "query"),
        "interrupt": ("what colour is the square", "query"),
    }.items()}

    print("\nConverse session (speech streamed in real time; times since the session opened):")
    timeline = Timeline(max_answer_chars=160)
    with ConverseSession(client, on_event=timeline.print) as s:
        timeline.note("image attached, then a spoken question")
        s.send(image_event(make_image(tmp / "converse.png")))
        s.stream(speech_events(say["question"]))
        s.wait("completed", timeout_s=HANG_S)
        timeline.note("someone talks to somebody else")
        s.stream(speech_events(say["aside"]))
        s.wait("judged", timeout_s=HANG_S)
        timeline.note("a typed question")
        s.send(text_event("Which shape is red?"))
        s.wait("completed", timeout_s=HANG_S)
        s.close()

    print("\nInterruption (answers without an end of sequence, up to the whole context, so the spoken question "
          "always cuts one):")
    timeline = Timeline(max_answer_chars=160)
    long_answers = session_config(max_tokens=1 << 20, ignore_eos=True)  # cut to the room the context leaves
    with ConverseSession(client, long_answers, on_event=timeline.print) as s:
        timeline.note("a spoken question")
        s.stream(speech_events(say["story"]))
        story = s.wait("answer_started", timeout_s=HANG_S).turn_id
        s.wait("delta", turn_id=story, timeout_s=HANG_S)
        timeline.note("a new spoken question while the answer streams")
        s.stream(speech_events(say["interrupt"]))
        s.wait("interrupted", turn_id=story, timeout_s=HANG_S)
        answer = s.wait("answer_started", where=lambda e: e.turn_id != story, timeout_s=HANG_S).turn_id
        s.wait("delta", turn_id=answer, timeout_s=HANG_S)
        timeline.note("the caller hangs up mid-answer")
        s.cancel()
    timeline.note("and calls again: the session resumes with both answers kept as interrupted")
    with ConverseSession(client, session_config(session_id=s.session_id, resume=True),
                         on_event=timeline.print) as again:
        again.close()


def weights_note(model_dir: str | Path) -> str:
    """What the demo says about a model directory's weights: trained ones carry the `training.json` that `vita train`
    / `vita export` and the duplex fine-tune write (the stage and steps when it names them); without one the weights
    are the tiny preset's seeded random ones, whose words are noise."""
    record = Path(model_dir) / "training.json"
    if not record.is_file():
        return "random weights: the words are noise"
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        info = {}
    if isinstance(info, dict) and "stage" in info and "steps" in info:
        return f"trained: stage {info['stage']} ({info.get('name', '')}), {info['steps']} steps, training.json"
    return "trained: training.json"


def in_process(args: argparse.Namespace) -> int:
    from vita.inference import GenerationRequest, VitaPipeline
    from vita.model.generation import SamplingParams

    t0 = time.perf_counter()
    pipeline = VitaPipeline.load(args.model)
    print(f"model loaded from {pipeline.model_dir} in {time.perf_counter() - t0:.2f} s "
          f"({pipeline.parameter_count / 1e6:.1f}M parameters, {weights_note(pipeline.model_dir)})")
    with tempfile.TemporaryDirectory(prefix="vita-demo-") as tmp:
        tmp = Path(tmp)
        request = GenerationRequest(
            text="Look at the picture and the clip, then answer the spoken question. Which shape moves?",
            images=[make_image(tmp / "shapes.png")],
            video=make_video(tmp / "clip.mp4"),
            audio=[make_speech(tmp / "question.wav", "What colour is the square in the picture?")],
            sampling=SamplingParams(max_new_tokens=args.max_tokens),
        )
        start = time.perf_counter()
        print("streaming:")
        for event in pipeline.stream(request):
            ms = (time.perf_counter() - start) * 1000
            if event.token_ids:
                print(f"  {ms:8.1f} ms  token {event.token_ids[0]:>5}  {event.text!r}")
            if event.usage is not None:
                u = event.usage
                print(f"prompt: {u.prompt_tokens} tokens ({u.media_summary})")
                print(f"time to first token {u.time_to_first_token_s * 1000:.0f} ms, {u.completion_tokens} tokens, "
                      f"{u.decode_tokens_per_s:.1f} tokens/s decode, finish: {u.finish_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
