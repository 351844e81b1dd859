"""Converse sessions tried as users of voice agents do: hanging up at once, resuming twice, typing while speaking,
a mic that goes quiet mid-word, and the limits a session runs into. Each was a fault; each is tested here through
the process stack on the duplex fine-tuned tiny model, waiting on events, not on the clock.
"""

import io
import threading
import time

import numpy as np
import pytest
from converse_helpers import fast, scrape, stored, wait_until
from PIL import Image as PILImage

from vita.bus.codec import decode_entry
from vita.bus.streams import BusConfig, Pool
from vita.client import ConverseSession, image_event, session_config, speech_events, text_event
from vita.orchestrator.prompts import answer_prompt, user_turn
from vita.processing.prompt import StateToken
from vita.processing.tokenizer import VitaTokenizer
from vita.v1.assistant_pb2 import ClientEvent, Completed, PlaybackState, UtteranceJudged
from vita.v1.bus_pb2 import GenerationEvent, GenerationJob
from vita.v1.media_pb2 import Image, TimestampedFrame
from vita.v1.session_pb2 import SessionTurn

pytestmark = pytest.mark.slow
RESOURCE_EXHAUSTED, ABORTED = 8, 10
CONTEXT = 4096  # the tiny model's max_position_embeddings
HANG_S = 600  # every wait is for an event that must come; this only stops a hang (a 4k-token prefill on 2 busy
#              cores takes a minute)


def voiced(wave: np.ndarray) -> np.ndarray:
    """espeak-ng's clip without the silence it writes around the speech."""
    loud = np.flatnonzero(np.abs(wave) > 0.02)
    return wave[loud[0] : loud[-1] + 1]


def jobs_of(redis, stack, session_id: str) -> list[GenerationJob]:
    """Every answer job a session's calls submitted, from both llm pools' streams (they keep acknowledged jobs)."""
    bus = BusConfig(prefix=stack.prefix)
    jobs = []
    for pool in (Pool.LLM_GENERATOR, Pool.LLM_MONITOR):
        for _, fields in redis.xrange(bus.jobs(pool)):
            job = decode_entry(fields, [GenerationJob])
            if job.request_id.startswith(f"{session_id}.t"):
                jobs.append(job)
    return jobs


def last_event(redis, stream: str) -> GenerationEvent:
    """The generator's final event on a reply stream, waited for with XREAD BLOCK (1 s at a time: under the
    client's socket timeout)."""
    after, deadline = "0-0", time.monotonic() + HANG_S
    while True:
        reply = redis.xread({stream: after}, count=64, block=1000)
        assert reply or time.monotonic() < deadline, f"no event on {stream} for {HANG_S} s"
        for entry_id, fields in reply[0][1] if reply else []:
            after = entry_id
            event = decode_entry(fields, [GenerationEvent])
            if event.WhichOneof("event") in ("finished", "error"):
                return event


def png(size: int = 32, shade: int = 0) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (size, size), (shade, 100, 200)).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Hanging up


def test_a_call_closed_right_after_a_question_leaves_no_generation_running(client, redis, stack):
    """Closing at every moment around the question: before it is read, while it is judged, while its job is
    queued and while the session write is in flight. Each time the generator must stop, and the history must
    never hold the answer as complete."""
    gen_port = stack.service("llm-generator").metrics_port
    orch_port = stack.service("orchestrator").metrics_port
    decode_before = scrape(gen_port, "vita:engine_decode_tokens_total", pool="llm:generator")
    max_tokens = 1500
    sessions = []
    for trial in range(60):
        s = ConverseSession(client, session_config(max_tokens=max_tokens, ignore_eos=True))
        s.send(text_event(f"Tell me a long story, number {trial}."))
        if trial % 3 == 2:  # surely submitted: hang up as the answer starts
            s.wait("answer_started", timeout_s=HANG_S)
        else:  # 0 to 39 ms after the question: the moments the call ends in vary with the trial
            time.sleep(trial % 40 / 1000)
        s.cancel()
        sessions.append(s.session_id)
    # Every call's cleanup has run once the orchestrator counts no open call.
    wait_until(lambda: scrape(orch_port, "vita:converse_active_sessions") == 0, "all calls cleaned up", HANG_S)

    jobs = {sid: jobs_of(redis, stack, sid) for sid in sessions}
    assert sum(len(j) for j in jobs.values()) > 0, "no trial got as far as the generator: the test tested nothing"
    completion = []
    for sid, session_jobs in jobs.items():
        for job in session_jobs:
            end = last_event(redis, job.reply_stream)
            assert end.finished.finish_reason == Completed.CANCELLED, (sid, end)
            assert end.finished.usage.completion_tokens < max_tokens
            completion.append(end.finished.usage.completion_tokens)
        state = stored(redis, stack, sid)
        assert not state.HasField("active")
        bots = [t for t in state.turns if t.role == SessionTurn.BOT]
        assert all(t.interrupted for t in bots), (sid, state.turns)
        assert len(bots) == sum(t.role == SessionTurn.USER for t in state.turns)  # every question has its turn
    # The engine stopped: nothing runs, and it computed exactly the tokens the jobs reported (the first of each
    # comes from the prefill).
    assert scrape(gen_port, "vita:num_requests_running", pool="llm:generator") == 0
    decoded = scrape(gen_port, "vita:engine_decode_tokens_total", pool="llm:generator") - decode_before
    assert decoded == sum(max(0, c - 1) for c in completion)


# ---------------------------------------------------------------------------------------------------------------
# One owner per session


def test_two_connections_resuming_one_session_get_one_owner(client, redis, stack):
    """Two resumes at once: the later one owns the session, the other is told (ABORTED) and its call ends. A third
    resume while the owner's answer streams takes over again: the answer is cut and kept, the owner's call ends.
    Turn ids stay unique and in order, and questions and answers alternate in the history."""
    long_answers = session_config(max_tokens=3000, ignore_eos=True)  # the session's; resumes keep it
    with ConverseSession(client, long_answers) as s:
        s.send(text_event("first question"))
        s.wait("delta", timeout_s=HANG_S)
    sid = s.session_id  # hung up mid-answer
    resume = session_config(session_id=sid, resume=True)

    calls: list[ConverseSession] = []
    barrier = threading.Barrier(2)

    def connect():
        barrier.wait()
        calls.append(ConverseSession(client, resume))

    threads = [threading.Thread(target=connect) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, call in enumerate(calls):
        call.send(text_event(f"question from connection {k}"))

    outcomes = {k: call.wait(("error", "answer_started"), timeout_s=HANG_S) for k, call in enumerate(calls)}
    losers = [k for k, e in outcomes.items() if e.WhichOneof("event") == "error"]
    winners = [k for k, e in outcomes.items() if e.WhichOneof("event") == "answer_started"]
    assert len(losers) == 1 and len(winners) == 1, outcomes
    loser, winner = calls[losers[0]], calls[winners[0]]
    assert outcomes[losers[0]].error.code == ABORTED
    with pytest.raises(EOFError):
        loser.wait("session_started", timeout_s=HANG_S)  # the call ended
    turn = outcomes[winners[0]].turn_id
    winner.wait("delta", turn_id=turn, timeout_s=HANG_S)

    with ConverseSession(client, resume) as third:
        assert winner.wait("error", timeout_s=HANG_S).error.code == ABORTED
        with pytest.raises(EOFError):
            winner.wait("session_started", timeout_s=HANG_S)
        third.send(text_event("and a third question"))
        last = third.wait("answer_started", timeout_s=HANG_S).turn_id
        third.wait("delta", turn_id=last, timeout_s=HANG_S)
    loser.cancel()
    winner.cancel()

    wait_until(lambda: len(stored(redis, stack, sid).turns) == 6, "the third call's answer recorded", HANG_S)
    state = stored(redis, stack, sid)
    turns = state.turns
    ids = [t.turn_id for t in turns]
    assert [t.role for t in turns] == [SessionTurn.USER, SessionTurn.BOT] * 3
    assert ids[::2] == ids[1::2] and ids[::2] == sorted(set(ids[::2]))  # a question and its answer share one id
    assert turn in ids and last in ids
    assert [t.content for t in turns if t.role == SessionTurn.USER] == [
        "first question", f"question from connection {winners[0]}", "and a third question"]
    assert all(t.interrupted for t in turns if t.role == SessionTurn.BOT) and not state.HasField("active")


# ---------------------------------------------------------------------------------------------------------------
# Turn ids


def test_a_query_judged_early_is_answered_under_its_judged_turn_id_while_the_client_types(client, query_clip):
    """The user speaks while the last answer still plays (judged early, a query), and types before the speech
    ends: the typed question is answered first, and the speech's answer carries the turn id its judgement named.

    The answer has finished streaming and the client says it still plays it (PlaybackState), so the monitor judges
    the speech against a history that does not change with how far generation got: an answer still streaming
    would put as many of its tokens in the judge prompt as the generator had made by then, a different prompt on
    a busy machine than on an idle one, and the tiny model's early judgement with it."""
    stop_speaking = threading.Event()
    clip = voiced(query_clip)

    def speak():  # real time, the same question over and over until told to stop: the speech stays open
        while not stop_speaking.is_set():
            for event in speech_events(clip, realtime=True, chunk_ms=20, trailing_silence_s=0.0):
                if stop_speaking.is_set():
                    break
                yield event
        yield from speech_events(np.zeros(0, np.float32), realtime=True, chunk_ms=20, trailing_silence_s=1.0)

    with ConverseSession(client, session_config(max_tokens=24, ignore_eos=True)) as s:
        s.send(text_event("Tell me a long story."))
        story = s.wait("answer_started", timeout_s=HANG_S).turn_id
        s.wait("completed", turn_id=story, timeout_s=HANG_S)
        s.send(ClientEvent(playback=PlaybackState(playing=True)))
        s.stream(speak())
        judged = s.wait("judged", timeout_s=HANG_S)
        assert judged.judged.early and judged.judged.outcome == UtteranceJudged.QUERY
        s.send(text_event("And what about the weather?"))
        typed = s.wait("answer_started", where=lambda e: e.answer_started.state_token == "<3>"
                       and e.turn_id != story, timeout_s=HANG_S)
        assert s.of("speech_started") and not s.of("speech_ended")  # typed while still speaking
        stop_speaking.set()
        spoken = s.wait("answer_started", where=lambda e: e.answer_started.state_token == "<1>", timeout_s=HANG_S)
        s.wait("delta", turn_id=spoken.turn_id, timeout_s=HANG_S)
    assert spoken.turn_id == judged.turn_id
    assert len({story, typed.turn_id, judged.turn_id}) == 3


# ---------------------------------------------------------------------------------------------------------------
# Audio that stops


def test_audio_that_stops_mid_speech_ends_the_turn_and_later_speech_is_a_new_one(client, query_clip, other_clip):
    """A mic muted (or a network stalled) in the middle of speech: no more chunks, no EndOfInput. The turn ends
    once no audio came for the end-silence time, and speech that comes later is a segment of its own."""
    clip = voiced(query_clip)
    with ConverseSession(client) as s:
        s.stream(speech_events(clip, realtime=True, chunk_ms=20, trailing_silence_s=0.0))
        s.wait("speech_started", timeout_s=HANG_S)
        ended = s.wait("speech_ended", timeout_s=HANG_S)  # with no audio after the speech: only the watchdog ends it
        assert abs(ended.speech_ended.audio_end_s - len(clip) / 16000) < 0.15
        judged = s.wait("judged", timeout_s=HANG_S)
        assert judged.judged.audio_end_s == ended.speech_ended.audio_end_s
        s.send(*fast(other_clip))
        later = s.wait("speech_started", timeout_s=HANG_S)
        again = s.wait("speech_ended", timeout_s=HANG_S)
        s.close()
    assert later.speech_started.audio_start_s >= ended.speech_ended.audio_end_s
    assert abs((again.speech_ended.audio_end_s - again.speech_ended.audio_start_s)
               - len(voiced(other_clip)) / 16000) < 0.5  # the second utterance alone, nothing of the first


# ---------------------------------------------------------------------------------------------------------------
# Limits reach the client


@pytest.mark.timeout(1200)  # a prefill of the whole 4k context: a minute on 2 busy cores, more under heavy load
def test_an_answer_cut_by_the_context_says_so_and_a_history_that_does_not_fit_is_reported(client, duplex_model_dir):
    tok = VitaTokenizer.from_file(duplex_model_dir)
    room = 14

    def prompt_len(text: str) -> int:
        user = user_turn(text, {}, turn_id=1, state=StateToken.TEXT, unix_s=0.0)
        return len(answer_prompt(tok, [], user, StateToken.TEXT, system=None, context_len=1 << 30).input_ids)

    words = 1
    while prompt_len("word " * (2 * words)) <= CONTEXT - room:
        words *= 2
    lo, hi = words, 2 * words  # the longest text that still leaves `room` tokens (or a word's worth more)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if prompt_len("word " * mid) <= CONTEXT - room else (lo, mid)
    text = "word " * lo
    left = CONTEXT - prompt_len(text)

    with ConverseSession(client, session_config(max_tokens=100, ignore_eos=True)) as s:
        s.send(text_event(text))
        started = s.wait("answer_started", timeout_s=HANG_S)
        done = s.wait("completed", turn_id=started.turn_id, timeout_s=HANG_S)
        s.send(text_event("and now?"))
        second = s.wait("answer_started", where=lambda e: e.turn_id != started.turn_id, timeout_s=HANG_S)
        finished = s.wait("completed", turn_id=second.turn_id, timeout_s=HANG_S)
        s.close()
    assert 0 < left < 100 and started.answer_started.max_tokens == left  # cut below the session's 100
    assert done.completed.finish_reason == Completed.CONTEXT_LENGTH
    assert done.completed.usage.completion_tokens == left
    assert started.answer_started.history_turns_dropped == 0
    # The long first exchange does not fit beside the new question: left out of the prompt, and said so.
    assert second.answer_started.history_turns_dropped == 2
    assert second.answer_started.max_tokens == 100
    assert finished.completed.finish_reason == Completed.LENGTH


@pytest.mark.timeout(1200)  # eight images are 2k prompt tokens
def test_images_beyond_the_limit_and_dropped_frames_are_reported(client):
    with ConverseSession(client) as s:
        for k in range(9):
            s.send(image_event(png(shade=k)))
        refused = s.wait("error", timeout_s=HANG_S)
        for k in range(260):  # 1 ms apart: the kept 256 span a quarter second, sampled into 2 frames
            s.send(ClientEvent(frame=TimestampedFrame(timestamp_s=k / 1000, image=Image(data=png(16, k % 256)))))
        s.send(text_event("What do you see?"))
        started = s.wait("answer_started", timeout_s=HANG_S)
        done = s.wait("completed", turn_id=started.turn_id, timeout_s=HANG_S)
        s.close()
    assert refused.error.code == RESOURCE_EXHAUSTED and "8 images" in refused.error.message
    assert len(s.of("error")) == 1
    assert started.answer_started.frames_dropped == 4  # 260 sent, the latest 256 kept
    one_image = 256  # a 32x32 image is one 448 tile: (448 / 14)^2 patches, downsampled by 2 each way
    assert done.completed.usage.image_tokens == 8 * one_image
    assert done.completed.usage.video_tokens == 2 * one_image
