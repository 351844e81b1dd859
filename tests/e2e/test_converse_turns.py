"""Turn-taking through the process stack on the duplex fine-tuned tiny model: a hesitation mid-sentence is one turn
(also when an answer was started preemptively in the pause), brisk barge-in words stop an answer (with events), and
`vita eval duplex` runs a shortened evaluation.

Speech is espeak-ng (`vita.training.speech`); every wait is on an event (see `converse_helpers.barrier`).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from converse_helpers import barrier, fast, scrape, stored, wait_until

from vita.bus.codec import decode_entry
from vita.bus.streams import REPLY_TYPES, BusConfig
from vita.client import ConverseSession, session_config, speech_events, text_event
from vita.training.speech import espeak, hesitant
from vita.v1.assistant_pb2 import CancelAnswer, ClientEvent, Completed, UtteranceJudged
from vita.v1.session_pb2 import SessionTurn

pytestmark = pytest.mark.slow
HESITANT = ("what is the weather like in Beijing", 3, 0.55)  # "what is the ... weather like in Beijing"


def _config(**vad) -> ClientEvent:
    config = session_config(max_tokens=2000, ignore_eos=True)  # cut to the context: streams until stopped
    for name, value in vad.items():
        setattr(config.config.vad, name, value)
    return config


def test_a_hesitation_mid_sentence_is_one_turn_and_one_answer(client):
    with ConverseSession(client) as s:
        s.send(*fast(hesitant(*HESITANT)))
        judged = s.wait("judged")
        barrier(s)
        s.close()
    assert judged.judged.outcome == UtteranceJudged.QUERY
    assert len(s.of("speech_started")) == len(s.of("speech_ended")) == len(s.of("judged")) == 1
    assert len(s.of("answer_started")) == 1
    ended = s.of("speech_ended")[0].speech_ended
    assert ended.audio_end_s - ended.audio_start_s > 2.0  # both halves and the pause between them


def test_without_the_end_of_turn_judgement_the_hesitation_splits_the_turn(client):
    with ConverseSession(client, _config(incomplete_silence_ms=-1)) as s:
        s.send(*fast(hesitant(*HESITANT)))
        s.wait("judged")
        barrier(s)
        s.send(ClientEvent(cancel=CancelAnswer()))
        s.close()
    assert len(s.of("speech_ended")) == 2 and len(s.of("judged")) == 2  # what issue 13 reported


def _split_in_the_pause(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The clip cut in the middle of its longest pause inside the speech: the words before it, then the rest."""
    quiet = np.convolve(np.abs(clip), np.ones(160) / 160, "same") < 0.003  # 10 ms average under -50 dBFS
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))  # run boundaries
    runs = [(b - a, a, b) for a, b in zip(edges[:-1] + 1, edges[1:] + 1) if quiet[a]]
    _, a, b = max(runs)
    return clip[: (a + b) // 2], clip[(a + b) // 2 :]


def test_speech_resuming_after_a_pause_discards_the_answer_started_there_and_the_turn_stays_one(client, stack,
                                                                                                 redis):
    before, after = _split_in_the_pause(hesitant(*HESITANT))
    port = stack.service("orchestrator").metrics_port

    def preemptive(outcome: str) -> float:
        return scrape(port, "vita:preemptive_answers_total", outcome=outcome)

    started, released, discarded = preemptive("started"), preemptive("released"), preemptive("discarded")
    config = session_config(max_tokens=120, ignore_eos=True)  # long enough to be still running when discarded
    # A long hold for unfinished speech: the pause lasts however long the busy machine takes to start the answer.
    config.config.vad.incomplete_silence_ms = 120_000
    with ConverseSession(client, config) as s:
        s.send(*speech_events(before, realtime=False, chunk_ms=100, trailing_silence_s=0.0))
        s.wait("speech_started")
        wait_until(lambda: preemptive("started") > started, "an answer started in the pause")
        s.send(*fast(after))  # the speech goes on: that answer is discarded
        judged = s.wait("judged")
        s.wait("completed", turn_id=judged.turn_id)
        text = s.answer_text(judged.turn_id)
        s.close()
    assert judged.judged.outcome == UtteranceJudged.QUERY
    assert [len(s.of(k)) for k in ("speech_started", "speech_ended", "judged", "answer_started")] == [1, 1, 1, 1]
    assert preemptive("released") == released + 1 and preemptive("discarded") >= discarded + 1
    # The history: the one turn, with exactly what the client received.
    turns = stored(redis, stack, s.session_id).turns
    assert [(t.role, t.turn_id) for t in turns] == [(SessionTurn.USER, judged.turn_id),
                                                    (SessionTurn.BOT, judged.turn_id)]
    assert [m.modality for m in turns[0].media] == ["audio"] and turns[1].content == text and text
    # The discarded answer was cancelled on the generator; the released one ran to its length.
    pattern = BusConfig(prefix=stack.prefix).reply(f"{s.session_id}.pre.x").replace(".pre.x}", ".pre.*}")

    def endings() -> list[int]:
        ends = []
        for key in redis.scan_iter(match=pattern):
            events = [decode_entry(fields, REPLY_TYPES) for _, fields in redis.xrange(key)]
            ends += [e.finished.finish_reason for e in events if e.WhichOneof("event") == "finished"]
        return sorted(ends)

    wait_until(lambda: Completed.CANCELLED in endings(), "the discarded generation stopped")
    assert endings().count(Completed.LENGTH) == 1


@pytest.mark.parametrize("word", ["no", "stop"])
def test_a_brisk_word_in_an_unseen_voice_stops_the_answer(client, word):
    clip = espeak(word, "brisk")
    assert len(clip) < 16000  # espeak's whole clip, silence included; the word itself is under 0.25 s
    with ConverseSession(client, _config()) as s:
        s.send(text_event("Tell me a long story."))
        first = s.wait("delta").turn_id
        s.send(*fast(clip))
        interrupted = s.wait("interrupted", turn_id=first)
        barrier(s)
        for started in s.of("answer_started")[1:]:  # the word's own answer, if the model judged it a query
            s.send(ClientEvent(cancel=CancelAnswer(turn_id=started.turn_id)))
        s.close()
    assert s.of("speech_started") and s.of("speech_ended")
    assert 0 < interrupted.interrupted.tokens_sent < 2000
    assert not s.of("completed", first)
    # The rule stops the answer whatever the model judges; which judgement it gets is the model's (a "no" can pass
    # for a question): a barge-in answers nothing, a query is answered as its own turn.
    [judged] = s.of("judged")
    started = [e.turn_id for e in s.of("answer_started")]
    if judged.judged.outcome == UtteranceJudged.BARGE_IN:
        assert judged.judged.state_token != "<1>" and started == [first]  # stopped, nothing new answered
    else:
        assert judged.judged.outcome == UtteranceJudged.QUERY and judged.judged.state_token == "<1>"
        assert started == [first, judged.turn_id]


def test_a_brisk_word_outside_an_answer_is_no_barge_in_and_the_rule_can_be_switched_off(client):
    with ConverseSession(client) as s:
        s.send(*fast(espeak("stop please", "brisk")))
        barrier(s)
        s.close()
    assert all(e.judged.outcome != UtteranceJudged.BARGE_IN for e in s.of("judged"))
    with ConverseSession(client, _config(barge_in_max_ms=-1)) as s:
        s.send(text_event("Tell me a long story."))
        first = s.wait("delta").turn_id
        s.send(*fast(espeak("no", "brisk")))
        s.wait("judged")
        barrier(s)
        for started in s.of("answer_started"):  # the first, and the word's own if the model judged it a query
            s.send(ClientEvent(cancel=CancelAnswer(turn_id=started.turn_id)))
        s.close()
    # Rule off: the word is heard (a segment, a judgement), but only the model's own "<1>" could stop the answer.
    assert all(e.judged.outcome != UtteranceJudged.BARGE_IN for e in s.of("judged"))
    queries = [e for e in s.of("judged") if e.judged.outcome == UtteranceJudged.QUERY]
    assert len(s.of("answer_started")) == 1 + len(queries)
    assert len(s.of("interrupted", first)) == 1  # the cancel's, or the query's (then nothing after it)


def test_talk_to_someone_else_during_an_answer_leaves_it_playing(client, other_clip):
    with ConverseSession(client, _config()) as s:
        s.send(text_event("Tell me a long story."))
        first = s.wait("delta").turn_id
        s.send(*fast(other_clip))
        judged = s.wait("judged")
        barrier(s)
        playing = not s.of("interrupted")
        s.send(ClientEvent(cancel=CancelAnswer(turn_id=first)))
        s.wait("interrupted", turn_id=first)
        s.close()
    assert judged.judged.outcome == UtteranceJudged.IGNORED  # too long for a barge-in word
    assert playing and len(s.of("interrupted")) == 1


def test_vita_eval_duplex_quick(stack, tmp_path):
    out, table = tmp_path / "duplex.json", tmp_path / "duplex.md"
    r = subprocess.run([sys.executable, "-m", "vita.cli", "eval", "duplex", "--target", stack.target, "--quick",
                        "--compare-off", "--output", str(out), "--markdown", str(table)], capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    m, off = result["metrics"]["default"], result["metrics"]["off"]
    assert {k: v["n"] for k, v in m.items()} == {c: 2 for c in ("pause", "interrupt_query", "interrupt_word",
                                                                 "others", "background")}
    assert len(result["items"]) == 20
    assert m["pause"]["split_rate"] == m["pause"]["takeover_rate"] == 0.0 and m["pause"]["answered_rate"] == 1.0
    assert off["pause"]["split_rate"] == 1.0  # silence alone cuts the question at the hesitation
    assert m["interrupt_word"]["takeover_rate"] == 1.0 and 0 < m["interrupt_word"]["stop_latency_s"] < 10
    assert m["others"]["no_response_rate"] == 1.0
    assert "| pause | 2 |" in r.stdout and table.read_text() in r.stdout
    bad = subprocess.run([sys.executable, "-m", "vita.cli", "eval", "duplex", "--per-category", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--per-category" in bad.stderr and "Traceback" not in bad.stderr
