"""Converse through the process stack on the duplex fine-tuned tiny model: every decision comes from the model.

Speech is made with espeak-ng (the same recipe the fine-tune used); services are processes on 127.0.0.1 talking
over the real Redis; the client is the public gRPC API.
"""

import threading
import uuid

import numpy as np
import pytest
from converse_helpers import fast, scrape, stored, wait_until

from vita.client import ConverseSession, VitaClient, image_event, session_config, speech_events, text_event
from vita.llm.backends.torch.engine import EngineConfig
from vita.model.vita import read_model_config
from vita.orchestrator.prompts import judge_prefix_prompt
from vita.processing.tokenizer import VitaTokenizer
from vita.v1.assistant_pb2 import AudioChunk, ClientEvent, UtteranceJudged
from vita.v1.media_pb2 import Image, TimestampedFrame
from vita.v1.session_pb2 import SessionTurn

pytestmark = pytest.mark.slow
INVALID_ARGUMENT, NOT_FOUND = 3, 5


def test_text_turn_is_answered_and_recorded(client, redis, stack):
    with ConverseSession(client) as s:
        s.send(text_event("What is the capital of France?"))
        started = s.wait("answer_started")
        assert started.answer_started.state_token == "<3>"
        done = s.wait("completed", turn_id=started.turn_id)
        text = s.answer_text(started.turn_id)
        s.close()
    assert done.completed.usage.completion_tokens > 0
    turns = stored(redis, stack, s.session_id).turns
    assert [(t.role, t.content) for t in turns] == [(SessionTurn.USER, "What is the capital of France?"),
                                                   (SessionTurn.BOT, text)]
    assert not turns[1].interrupted


def test_spoken_query_about_an_image_is_judged_by_the_model_and_answered(client, redis, stack, query_clip,
                                                                          wide_png, trained_answer):
    with ConverseSession(client) as s:
        s.send(image_event(wide_png))
        s.send(*fast(query_clip))
        judged = s.wait("judged")
        assert judged.judged.outcome == UtteranceJudged.QUERY and judged.judged.state_token == "<1>"
        assert s.of("speech_started") and s.of("speech_ended")
        done = s.wait("completed", turn_id=judged.turn_id)
        text = s.answer_text(judged.turn_id)
        s.close()
    # The fine-tuned answer's opening, from the model (the image here is 3 tiles; training saw 1, so the rest drifts).
    assert text.startswith(trained_answer.split()[0])
    assert done.completed.usage.image_tokens > 0 and done.completed.usage.audio_tokens > 0
    user = stored(redis, stack, s.session_id).turns[0]
    assert user.state_token == "<1>" and [m.modality for m in user.media] == ["image", "audio"]


def test_speech_not_meant_for_the_assistant_and_noise_are_ignored(client, redis, stack, other_clip):
    rng = np.random.default_rng(0)
    noise = (0.05 * rng.standard_normal(16000)).astype(np.float32)
    with ConverseSession(client) as s:
        s.send(*fast(other_clip), *fast(noise))
        judged = s.wait("judged")
        s.close()
    assert judged.judged.outcome == UtteranceJudged.IGNORED and judged.judged.state_token != "<1>"
    assert not s.of("answer_started")
    assert all(e.judged.outcome == UtteranceJudged.IGNORED for e in s.of("judged"))
    assert len(stored(redis, stack, s.session_id).turns) == 0


def test_interruption_stops_the_generator_and_keeps_the_partial_answer(client, redis, stack, query_clip,
                                                                       trained_answer):
    gen_port = stack.service("llm-generator").metrics_port
    orchestrator = stack.service("orchestrator").metrics_port
    before = scrape(gen_port, "vita:generation_tokens_total", pool="llm:generator")
    computed_before = scrape(gen_port, "vita:engine_decode_tokens_total", pool="llm:generator")

    def prefills() -> float:  # history prefills the llm:generator pool did, one token each, once it judges
        return scrape(orchestrator, "vita:history_prefills_total", outcome="done", pool="llm:generator")

    prefills_before = prefills()
    with ConverseSession(client, session_config(max_tokens=400, ignore_eos=True)) as s:
        s.send(text_event("Tell me a long story."))
        first = s.wait("answer_started").turn_id
        s.wait("delta", turn_id=first)
        s.send(*fast(query_clip))  # cut in while the answer streams
        interrupted = s.wait("interrupted", turn_id=first)
        second = s.wait("answer_started", where=lambda e: e.turn_id != first)
        s.wait("completed", turn_id=second.turn_id)
        # The roles swapped, so the llm:generator pool judges next: it prefilled the history after the interrupted
        # answer and after the second one.
        wait_until(lambda: prefills() - prefills_before == 2, "the two history prefills")
        partial = s.answer_text(first)
        s.close()
    i = interrupted.interrupted
    # Tokens past tokens_sent were in flight (in the reply stream) when the relay stopped: dropped, not sent.
    assert 0 < i.tokens_sent <= i.tokens_generated < 400
    assert not s.of("completed", first)
    generated = scrape(gen_port, "vita:generation_tokens_total", pool="llm:generator") - before
    assert generated == i.tokens_generated + 2  # the generator's own count of what it produced, and the prefills'
    # A prefill's token comes from its prefill forward, not a decode step.
    # ... and of what its engine computed: the first token comes from the prefill, at most one more step ran.
    computed = scrape(gen_port, "vita:engine_decode_tokens_total", pool="llm:generator") - computed_before
    assert i.tokens_generated - 1 <= computed <= i.tokens_generated + 1 < 400
    turns = stored(redis, stack, s.session_id).turns
    assert [(t.role, t.interrupted) for t in turns] == [
        (SessionTurn.USER, False), (SessionTurn.BOT, True), (SessionTurn.USER, False), (SessionTurn.BOT, False)]
    assert turns[1].content == partial  # exactly what the client received
    assert turns[2].state_token == "<1>"
    # The roles swapped: the monitor pool answered the interrupting query.
    assert stored(redis, stack, s.session_id).generator_role != 0
    monitor_tokens = scrape(stack.service("llm-monitor").metrics_port, "vita:generation_tokens_total",
                            pool="llm:monitor")
    assert monitor_tokens >= turns[3].tokens


def test_after_an_answer_the_monitor_judges_the_next_speech_with_the_history_from_its_prefix_cache(
        client, redis, stack, query_clip, other_clip, duplex_model_dir):
    orchestrator, monitor = stack.service("orchestrator").metrics_port, stack.service("llm-monitor").metrics_port

    def prefills() -> float:
        return scrape(orchestrator, "vita:history_prefills_total", outcome="done", pool="llm:monitor")

    def hits() -> float:
        return scrape(monitor, "vita:prefix_cache_hits_total", pool="llm:monitor")

    config = session_config(max_tokens=40, ignore_eos=True, early_judge_ms=-1)  # one judgement per utterance
    config.config.preemptive_generation = False
    done = prefills()
    with ConverseSession(client, config) as s:
        s.send(*fast(query_clip))
        first = s.wait("judged")
        s.wait("completed", turn_id=first.turn_id)
        wait_until(lambda: prefills() > done, "the history prefill")
        turns = stored(redis, stack, s.session_id).turns
        before = hits()
        s.send(*fast(other_clip))
        s.wait("judged")
        s.close()
    # The judgement of the second utterance found the whole history, the 40-token answer included, in the monitor's
    # prefix cache (its full blocks): only the monitor's first judgement had seen the session, and without the prefill
    # its prompt's blocks end before the answer starts.
    prefix = judge_prefix_prompt(VitaTokenizer.from_file(duplex_model_dir), turns, system=None,
                                 context_len=read_model_config(duplex_model_dir).llm.max_position_embeddings)
    block = EngineConfig().block_size
    wait_until(lambda: hits() - before >= len(prefix.input_ids) // block * block, "the history's blocks hit")


def test_orchestrator_restart_and_a_second_replica_continue_the_session(client, redis, stack):
    with ConverseSession(client) as s:
        s.send(text_event("first question"))
        s.wait("completed")
        s.close()
    session_id = s.session_id
    stack.kill("orchestrator")
    replica = stack.add_replica("orchestrator")  # another replica serves the session meanwhile
    with VitaClient(f"127.0.0.1:{replica.grpc_port}", timeout_s=None) as other, \
            ConverseSession(other, session_config(session_id=session_id, resume=True)) as s2:
        assert s2.events[0].session_started.resumed and s2.events[0].session_started.history_turns == 2
        s2.send(text_event("second question"))
        s2.wait("completed")
        s2.close()
    stack.respawn("orchestrator")
    with ConverseSession(client, session_config(session_id=session_id, resume=True)) as s3:
        assert s3.events[0].session_started.history_turns == 4
        s3.send(text_event("third question"))
        s3.wait("completed")
        s3.close()
    turns = stored(redis, stack, session_id).turns
    assert [t.content for t in turns if t.role == SessionTurn.USER] == ["first question", "second question",
                                                                        "third question"]
    assert [t.turn_id for t in turns] == [1, 1, 2, 2, 3, 3]


def test_orchestrator_killed_mid_answer_the_resumed_session_keeps_a_consistent_history(client, redis, stack):
    with ConverseSession(client, session_config(max_tokens=400, ignore_eos=True)) as s:
        s.send(text_event("Tell me a long story."))
        s.wait("delta")
        stack.kill("orchestrator")
    stack.respawn("orchestrator")
    with ConverseSession(client, session_config(session_id=s.session_id, resume=True)) as s2:
        assert s2.events[0].session_started.history_turns == 2
        s2.send(text_event("and then?"))
        s2.wait("completed")
        s2.close()
    turns = stored(redis, stack, s.session_id).turns
    assert [t.role for t in turns] == [SessionTurn.USER, SessionTurn.BOT] * 2
    assert turns[1].content  # rebuilt from the generator's reply stream


def test_eight_concurrent_sessions_keep_their_own_histories(client, redis, stack):
    questions = [f"question number {k} about topic {k * 7}" for k in range(8)]
    solo = {}
    with ConverseSession(client) as s:
        s.send(text_event(questions[0]))
        solo[0] = s.answer_text(s.wait("completed").turn_id)
        s.close()
    results: dict[int, tuple[str, str]] = {}

    def one(k: int) -> None:
        with ConverseSession(client) as s:
            s.send(text_event(questions[k]))
            results[k] = (s.session_id, s.answer_text(s.wait("completed", timeout_s=120).turn_id))
            s.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(8))
    assert results[0][1] == solo[0]  # greedy: the same answer alone and in a batch of 8
    for k, (session_id, answer) in results.items():
        turns = stored(redis, stack, session_id).turns
        assert [t.content for t in turns] == [questions[k], answer]


@pytest.mark.parametrize("bad, code", [
    ("audio_first", INVALID_ARGUMENT), ("unknown_session", NOT_FOUND), ("bad_rate", INVALID_ARGUMENT),
])
def test_bad_config_or_early_audio_is_refused_then_a_good_config_works(client, bad, code):
    import queue

    outbox: queue.Queue = queue.Queue()
    call = client.stub.Converse(iter(outbox.get, None))
    first = {
        "audio_first": ClientEvent(audio=AudioChunk(pcm16=b"\0\0" * 160)),
        "unknown_session": session_config(session_id=f"nope-{uuid.uuid4().hex}", resume=True),
        "bad_rate": session_config(rate=5000),
    }[bad]
    outbox.put(first)
    events = iter(call)
    error = next(events)
    assert error.WhichOneof("event") == "error" and error.error.code == code and error.error.message
    outbox.put(session_config())
    assert next(events).WhichOneof("event") == "session_started"
    outbox.put(text_event("still there?"))
    kinds = []
    for event in events:
        kinds.append(event.WhichOneof("event"))
        if kinds[-1] == "completed":
            break
    outbox.put(None)
    call.cancel()
    assert kinds[0] == "answer_started" and "delta" in kinds


def test_bad_frame_bytes_and_odd_audio_do_not_break_the_session(client):
    with ConverseSession(client) as s:
        s.send(ClientEvent(frame=TimestampedFrame(timestamp_s=0.0, image=Image(data=b"not a jpeg"))))
        assert "camera frame" in s.wait("error").error.message
        s.send(ClientEvent(image=Image(data=b"\x89PNG\r\n\x1a\n garbage")))
        assert s.wait("error").error.code == INVALID_ARGUMENT
        s.send(ClientEvent(audio=AudioChunk(pcm16=b"\x01")))  # half a sample: refused whole, as Generate's PCM16
        assert "even number of bytes" in s.wait("error").error.message
        s.send(text_event("are you fine?"))
        s.wait("completed")
        s.close()


def test_camera_frames_join_the_next_turn_as_video(client, redis, stack):
    import io

    from PIL import Image as PILImage

    def png(shade: int) -> bytes:
        out = io.BytesIO()
        PILImage.new("RGB", (64, 48), (shade, shade, 0)).save(out, format="PNG")
        return out.getvalue()

    with ConverseSession(client) as s:
        for k in range(6):  # 1.5 s of camera at 4 fps: every frame is sampled
            s.send(ClientEvent(frame=TimestampedFrame(timestamp_s=0.25 * k, image=Image(data=png(40 * k)))))
        s.send(text_event("What changes in the video?"))
        done = s.wait("completed")
        s.send(text_event("And now?"))  # the frames were taken by the first turn
        again = s.wait("completed", where=lambda e: e.turn_id != done.turn_id)
        s.close()
    assert done.completed.usage.video_tokens == 6 * 256
    assert again.completed.usage.video_tokens == 6 * 256  # the video is in the history, not in the new turn
    turns = stored(redis, stack, s.session_id).turns
    # The stored text is what the user typed; the template places the turn's media by id.
    assert [m.modality for m in turns[0].media] == ["video"] and turns[0].content == "What changes in the video?"
    assert not turns[2].media and turns[2].content == "And now?"


def test_vita_converse_cli_streams_a_wav_and_prints_the_timeline(stack, query_clip, tmp_path):
    import subprocess
    import sys

    from vita.processing.audio import write_wav

    wav = write_wav(tmp_path / "q.wav", query_clip)
    out = subprocess.run([sys.executable, "-m", "vita.cli", "converse", "--target", stack.target, "--wav", str(wav),
                          "--fast", "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "judged query ('<1>')" in out.stdout and "answer completed (length): 8 tokens" in out.stdout


def test_vita_converse_cli_exits_1_when_the_server_reports_an_error_event(stack, tmp_path):
    """Converse reports a refused resume in-band (the stream goes on); the CLI still ends with status 1 and says
    so in one line on stderr, not 0 as if the session had worked (found by a new user's try, 2026-12-03)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vita.cli", "converse", "--target", stack.target, "--session",
                          f"nope-{uuid.uuid4().hex}", "--text", "hi"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert f"error {NOT_FOUND}:" in out.stdout and "does not exist" in out.stdout
    # The text is not sent after the refused resume: one error, not a second "text before the session config"
    # (a new user's try, 2026-12-06).
    assert out.stdout.count(" error ") == 1 and "before the session config" not in out.stdout, out.stdout
    assert out.stderr.strip() == "vita converse: error: the server reported 1 error event(s) (printed above)"
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_client_controls_update_cancel_truncate_and_cut(client, redis, stack, query_clip):
    """What the Realtime gateway drives: a later SessionConfig, CancelAnswer, TruncateAnswer, CutSpeech."""
    from vita.v1.assistant_pb2 import CancelAnswer, CutSpeech, TruncateAnswer
    from vita.v1.bus_pb2 import GenerationJob

    with ConverseSession(client, session_config(max_tokens=400, ignore_eos=True)) as s:
        s.send(session_config(session_id=f"other-{uuid.uuid4().hex}"))  # not this session: refused
        assert s.wait("error").error.code == INVALID_ARGUMENT
        s.send(session_config(max_tokens=400, ignore_eos=True, system_prompt="Be brief."))
        s.send(text_event("Tell me a long story."))
        first = s.wait("answer_started").turn_id
        s.wait("delta", turn_id=first)
        s.send(ClientEvent(cancel=CancelAnswer(turn_id=first + 5)))  # another turn: nothing happens
        s.send(ClientEvent(cancel=CancelAnswer(turn_id=first)))
        stopped = s.wait("interrupted", turn_id=first).interrupted
        partial = s.answer_text(first)
        cut = partial[: len(partial) // 2]
        s.send(ClientEvent(truncate=TruncateAnswer(turn_id=first, content=partial + "x")))
        assert "prefix" in s.wait("error").error.message
        s.send(ClientEvent(truncate=TruncateAnswer(turn_id=first, content=cut)))
        truncated = s.wait("truncated", turn_id=first).truncated
        # Speech with no silence after it: CutSpeech ends it now, and it is judged.
        s.send(*speech_events(query_clip, realtime=False, chunk_ms=100, trailing_silence_s=0.0))
        s.wait("speech_started")
        s.send(ClientEvent(cut=CutSpeech()))
        s.wait("speech_ended")
        judged = s.wait("judged")
        s.close()
    assert stopped.usage.prompt_tokens > 0 and stopped.usage.completion_tokens == stopped.tokens_generated
    assert len(s.of("interrupted")) == 1  # the cancel of another turn did nothing
    assert truncated.content == cut
    assert judged.judged.outcome == UtteranceJudged.QUERY
    state = stored(redis, stack, s.session_id)
    assert state.config.system_prompt == "Be brief."
    assert state.turns[1].content == cut and state.turns[1].interrupted
    assert state.generator_role == GenerationJob.GENERATOR  # a cancel swaps no roles (nothing waits to be answered)
