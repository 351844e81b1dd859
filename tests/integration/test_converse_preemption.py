"""Preemptive generation and the history prefill in the Converse state machine (orchestrator/converse.py,
preemptive.py): the decisions.

The real `ConverseCall` on the real session store (Redis, a private prefix) and the real tokenizer; the pools are a
fake that answers at once and records what it was asked, and the VAD's events are given to the call directly, so
each test fixes exactly when the speech pauses, resumes and ends. Every wait is on a state the call reaches (an
event out, a job submitted, a cancel), never on the clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from redis.asyncio import Redis

from vita.bus.replies import ReplyTimeout
from vita.bus.streams import BusConfig
from vita.model.vita import read_model_config
from vita.orchestrator.config import OrchestratorConfig
from vita.orchestrator.converse import ConverseCall
from vita.orchestrator.preemptive import Preemption, discard_reason
from vita.orchestrator.sessions import SessionStore
from vita.processing.tokenizer import VitaTokenizer
from vita.processing.vad import SpeechEvent
from vita.telemetry.metrics import Metrics
from vita.v1.assistant_pb2 import (
    AudioChunk,
    ClientEvent,
    Completed,
    EndOfInput,
    SessionConfig,
    TextDelta,
    TextMessage,
    UtteranceJudged,
)
from vita.v1.bus_pb2 import EmbeddingRef, GenerationEvent, GenerationJob
from vita.v1.media_pb2 import Image
from vita.v1.session_pb2 import SessionState, SessionTurn

SPEECH = np.zeros(16000, np.float32)  # the fake encoder never looks at it


class FakePools:
    """`PoolClient`'s surface: encodes and judges at once; each generation is "answer N" (N counts the jobs),
    made in full before anyone reads it, as a generator that got ahead of a held-back answer would have it."""

    def __init__(self, tokenizer: VitaTokenizer, context_len: int, changed: asyncio.Event) -> None:
        self.tokenizer, self.context_len, self.changed = tokenizer, context_len, changed
        self.verdict = "<1>"
        self.judged = 0
        self.judge_prompts: list = []  # (role, Prompt) per judgement
        self.prefilled: list = []  # (role, Prompt) per history prefill
        self.prefill_error: Exception | None = None
        self.generated: list[str] = []  # request ids, in order
        self.cancelled: list[str] = []
        self._streams: dict[str, asyncio.Queue] = {}

    async def encode(self, request_id, *, images=(), video=None, audio=(), deadline_ms=0):
        refs = {}
        if audio:
            refs["audio"] = EmbeddingRef(key=f"emb:{request_id}", shape=[4, 8], item_tokens=[4])
        if images:
            refs["image"] = EmbeddingRef(key=f"emb:{request_id}.img", shape=[2 * len(images), 8],
                                         item_tokens=[2] * len(images))
        return refs

    async def judge(self, request_id, role, prompt):
        self.judged += 1
        self.judge_prompts.append((role, prompt))
        self.changed.set()
        return self.tokenizer.state_ids[self.verdict]

    async def prefill(self, request_id, role, prompt):
        self.prefilled.append((role, prompt))
        self.changed.set()
        if self.prefill_error is not None:
            raise self.prefill_error

    async def generate(self, request_id, role, prompt, sampling, *, deadline_ms=0):
        n = len(self.generated) + 1
        job = GenerationJob(request_id=request_id, role=role, reply_stream=f"reply:{request_id}", max_tokens=64)
        stream = self._streams[job.reply_stream] = asyncio.Queue()
        text = f"answer {n}"
        ids = self.tokenizer.encode(text)
        stream.put_nowait(GenerationEvent(request_id=request_id, delta=TextDelta(text=text, token_ids=ids)))
        stream.put_nowait(GenerationEvent(request_id=request_id, finished=Completed(finish_reason=Completed.STOP)))
        self.generated.append(request_id)
        self.changed.set()
        return job

    async def tokens(self, reply_stream):
        stream = self._streams[reply_stream]
        while True:
            yield await stream.get()

    async def cancel(self, request_id):
        self.cancelled.append(request_id)
        self.changed.set()

    async def stopped(self, request_id):
        return 0

    def finish_reason(self, job, finished):
        return finished.finish_reason

    async def replay(self, request_id):
        return []


class Call:
    """One ConverseCall driven by hand: client events in `send`, VAD events in `vad`, server events in `events`."""

    def __init__(self, tokenizer, context_len, store: SessionStore, config: OrchestratorConfig) -> None:
        self.changed = asyncio.Event()
        self.pools = FakePools(tokenizer, context_len, self.changed)
        self.call = ConverseCall(self.pools, tokenizer, store, config, Metrics())
        self.store = store
        self.events = []
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self, config: SessionConfig | None = None) -> None:
        async def requests():
            yield ClientEvent(config=config or SessionConfig())
            while (event := await self._inbox.get()) is not None:
                yield event

        async def consume():
            async for event in self.call.run(requests()):
                self.events.append(event)
                self.changed.set()

        self._task = asyncio.create_task(consume())
        await self.until(lambda: self.of("session_started"), "session started")

    def send(self, event: ClientEvent) -> None:
        self._inbox.put_nowait(event)

    def vad(self, kind: str, segment: int = 0, end_s: float = 1.0) -> None:
        """What the reader does with a VAD event (audio for the kinds that carry it)."""
        audio = None if kind in ("started", "resumed") else SPEECH[: int(end_s * 16000)]
        self.call._on_speech(SpeechEvent(kind, 0.0, end_s, audio, segment))

    async def until(self, predicate: Callable[[], object], what: str) -> None:
        """Wait for a state of the call; the timeout only stops a hang (the machine may be busy)."""
        async with asyncio.timeout(60):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        assert predicate(), what

    def of(self, kind: str) -> list:
        return [e for e in self.events if e.WhichOneof("event") == kind]

    def text(self) -> str:
        return "".join(e.delta.text for e in self.of("delta"))

    async def stored(self) -> SessionState:
        return await self.store.load(self.call.session_id)

    async def end(self) -> None:
        self.send(ClientEvent(end=EndOfInput()))
        await asyncio.wait_for(self._task, 60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> VitaTokenizer:
    return VitaTokenizer.from_file(tiny_model_dir)


@pytest.fixture(scope="module")
def context_len(tiny_model_dir) -> int:
    return read_model_config(tiny_model_dir).llm.max_position_embeddings


@pytest.fixture
def run(tokenizer, context_len, redis_prefix):
    """Run `scenario(call)` on a fresh call, with preemptive generation on unless the config says otherwise."""
    def runner(scenario, config: OrchestratorConfig | None = None, session: SessionConfig | None = None):
        async def main():
            redis = Redis.from_url("redis://127.0.0.1:6379/0")
            try:
                call = Call(tokenizer, context_len, SessionStore(redis, BusConfig(prefix=redis_prefix)),
                            config or OrchestratorConfig())
                await call.start(session)
                return await scenario(call)
            finally:
                await redis.aclose()
        return asyncio.run(main())
    return runner


def _turns(state: SessionState) -> list[tuple[int, str]]:
    return [(t.role, t.content) for t in state.turns]


USER, BOT = SessionTurn.USER, SessionTurn.BOT


def test_the_answer_starts_at_the_pause_and_nothing_reaches_the_client_before_the_turn_ends(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")
        await c.until(lambda: c.pools.generated, "generation started at the pause")
        c.vad("ended")  # SpeechEnded goes out now: whatever the call said of the answer before comes before it
        await c.until(lambda: c.of("completed"), "the answer")
        await c.end()
        return c, await c.stored()

    c, state = run(scenario)
    kinds = [e.WhichOneof("event") for e in c.events]
    assert kinds == ["session_started", "speech_started", "speech_ended", "judged", "answer_started", "delta",
                     "completed"]
    assert _turns(state) == [(USER, ""), (BOT, "answer 1")]
    assert not state.HasField("active")


def test_released_answer_keeps_the_judgement_made_at_the_pause_and_its_turn_id(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")
        await c.until(lambda: c.pools.generated, "generation started")
        c.vad("ended")
        await c.until(lambda: c.of("completed"), "the answer")
        await c.end()
        return c, await c.stored()

    c, state = run(scenario)
    assert c.pools.judged == 1 and len(c.pools.generated) == 1 and c.pools.cancelled == []
    [judged] = c.of("judged")
    assert judged.judged.outcome == UtteranceJudged.QUERY
    turn = judged.turn_id
    assert {e.turn_id for e in c.of("answer_started") + c.of("delta") + c.of("completed")} == {turn}
    kinds = [e.WhichOneof("event") for e in c.events]
    assert kinds.index("speech_ended") < kinds.index("judged") < kinds.index("answer_started") < kinds.index("delta")
    assert [t.turn_id for t in state.turns] == [turn, turn]
    assert c.text() == "answer 1"


def test_speech_resuming_discards_the_answer_and_the_turn_stays_one(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused", end_s=0.8)
        await c.until(lambda: c.pools.generated, "first generation")
        first = c.pools.generated[0]
        c.vad("resumed")
        await c.until(lambda: first in c.pools.cancelled, "the first generation cancelled")
        c.vad("paused", end_s=2.0)
        await c.until(lambda: len(c.pools.generated) == 2, "second generation")
        c.vad("ended", end_s=2.0)
        await c.until(lambda: c.of("completed"), "the answer")
        await c.end()
        return c, first, await c.stored()

    c, first, state = run(scenario)
    assert c.text() == "answer 2" and "answer 1" not in c.text()
    assert len(c.of("judged")) == 1 and len(c.of("answer_started")) == 1
    assert _turns(state) == [(USER, ""), (BOT, "answer 2")]  # one turn; the discarded answer is nowhere
    assert c.pools.cancelled == [first]


def test_resumed_before_the_worker_got_to_the_pause_starts_nothing(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")
        c.vad("resumed")  # queued behind the pause: the worker finds it stale
        c.vad("ended")
        await c.until(lambda: c.of("completed"), "the answer")
        await c.end()
        return c, await c.stored()

    c, state = run(scenario)
    assert len(c.pools.generated) == 1 and c.pools.cancelled == []  # only the turn's own answer
    assert _turns(state) == [(USER, ""), (BOT, "answer 1")]


def test_a_typed_question_between_pause_and_end_discards_the_answer_made_without_it(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")
        await c.until(lambda: c.pools.generated, "preemptive generation")
        first = c.pools.generated[0]
        c.send(ClientEvent(text=TextMessage(text="and the weather?")))
        await c.until(lambda: first in c.pools.cancelled, "discarded: the history changed")
        await c.until(lambda: c.of("completed"), "the typed question's answer")
        c.vad("ended")
        await c.until(lambda: len(c.of("completed")) == 2, "the spoken question's answer")
        await c.end()
        return c, first, await c.stored()

    c, first, state = run(scenario)
    assert c.pools.cancelled == [first] and len(c.pools.generated) == 3
    assert _turns(state) == [(USER, "and the weather?"), (BOT, "answer 2"), (USER, ""), (BOT, "answer 3")]
    assert "answer 1" not in c.text()


def test_an_image_sent_between_pause_and_end_discards_the_answer_and_joins_the_turn(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")
        await c.until(lambda: c.pools.generated, "preemptive generation")
        first = c.pools.generated[0]
        await c.store.add_image(c.call.session_id, Image(data=b"png"))  # what the reader does with an image
        c.vad("ended")
        await c.until(lambda: c.of("completed"), "the answer")
        await c.end()
        return c, first, await c.stored()

    c, first, state = run(scenario)
    assert c.pools.cancelled == [first] and c.text() == "answer 2"
    assert [m.modality for m in state.turns[0].media] == ["image", "audio"]
    assert _turns(state) == [(USER, ""), (BOT, "answer 2")]


def test_a_call_that_ends_before_the_turn_does_cancels_the_answer_and_records_nothing(run):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")
        await c.until(lambda: c.pools.generated, "preemptive generation")
        await c.end()  # no "ended": the client hung up in the pause
        return c, await c.stored()

    c, state = run(scenario)
    assert c.pools.cancelled == c.pools.generated and len(c.pools.generated) == 1
    assert _turns(state) == [] and not state.HasField("active")
    assert c.of("answer_started") == [] and c.of("judged") == []


def test_speech_judged_not_a_query_at_the_pause_starts_no_answer_and_is_not_judged_again(run):
    async def scenario(c: Call):
        c.pools.verdict = "<2>"
        c.vad("started")
        c.vad("paused")
        await c.until(lambda: c.pools.judged, "judged at the pause")
        c.vad("ended")
        await c.until(lambda: c.of("judged"), "the judgement")
        await c.end()
        return c, await c.stored()

    c, state = run(scenario)
    assert c.pools.judged == 1 and c.pools.generated == []
    assert c.of("judged")[0].judged.outcome == UtteranceJudged.IGNORED
    assert _turns(state) == []


@pytest.mark.parametrize("where", ["server", "session"])
def test_preemptive_generation_off_answers_at_the_end_of_the_turn(run, where):
    async def scenario(c: Call):
        c.vad("started")
        c.vad("paused")  # the VAD does not report pauses then; one that came anyway is ignored
        c.vad("ended")
        await c.until(lambda: c.of("completed"), "the answer")
        await c.end()
        return c

    config = OrchestratorConfig(preemptive_generation=where != "server")
    session = SessionConfig(preemptive_generation=False) if where == "session" else None
    c = run(scenario, config, session)
    [request_id] = c.pools.generated
    assert ".pre." not in request_id and c.pools.judged == 1  # answered at the end of the turn, as before
    assert not c.call.vad.report_pauses


def test_discard_reason_names_what_changed():
    state = SessionState(session_id="s", generator_role=GenerationJob.GENERATOR)
    p = Preemption(3, SPEECH, 0.0, 1.0, token="<1>", job=GenerationJob(request_id="r"))
    p.snapshot(state)
    assert discard_reason(p, segment=3, state=state) is None
    assert discard_reason(p, segment=4, state=state) == "another segment ended"
    changed = SessionState()
    changed.CopyFrom(state)
    changed.turns.add(role=USER, content="typed")
    assert discard_reason(p, segment=3, state=changed) == "history changed"
    changed.CopyFrom(state)
    changed.config.system_prompt = "be brief"
    assert discard_reason(p, segment=3, state=changed) == "config changed"
    changed.CopyFrom(state)
    changed.generator_role = GenerationJob.MONITOR
    assert discard_reason(p, segment=3, state=changed) == "roles swapped"
    assert discard_reason(Preemption(3, SPEECH, 0.0, 1.0), segment=3, state=state) == "not ready"
    p.resumed = True
    assert discard_reason(p, segment=3, state=state) == "speech resumed"


# --- history prefill: the monitor pool gets each answered history before the next speech is judged ----------------

SILENCE_CHUNK = ClientEvent(audio=AudioChunk(pcm16=bytes(3200)))  # 100 ms of silence: the call has heard audio


def _prefilled(c: Call, outcome: str) -> float:
    """History prefills counted on the monitor pool (the session's judging pool: no role swap in these tests)."""
    labels = {"pool": "llm:monitor", "outcome": outcome}
    return c.call.metrics.registry.get_sample_value("vita:history_prefills_total", labels) or 0


async def _answer_then_judge_again(c: Call) -> None:
    """A spoken query answered, then more speech judged; waits until both judgements and the prefill are in."""
    c.vad("started")
    c.vad("ended")
    await c.until(lambda: c.of("completed"), "the answer")
    await c.until(lambda: c.pools.prefilled or not c.call.config.prefill_monitor_history, "the history prefill")
    c.pools.verdict = "<2>"
    c.vad("started", segment=1)
    c.vad("ended", segment=1, end_s=2.0)
    await c.until(lambda: c.pools.judged == 2, "the second judgement")


def test_after_an_answer_the_monitor_pool_prefills_the_history_the_next_judgement_starts_with(run):
    async def scenario(c: Call):
        c.send(SILENCE_CHUNK)
        await _answer_then_judge_again(c)
        await c.end()
        return c, await c.stored()

    c, state = run(scenario, OrchestratorConfig(preemptive_generation=False))
    [(role, prefix)] = c.pools.prefilled
    (_, first), (next_role, judged) = c.pools.judge_prompts
    assert role == next_role == GenerationJob.MONITOR  # the pool that judges the next speech, not the generator
    # The whole history, answer included, and it is where the next judgement's prompt starts.
    assert len(prefix.input_ids) > len(first.input_ids)
    assert judged.input_ids[: len(prefix.input_ids)] == prefix.input_ids
    assert list(judged.placements[: len(prefix.placements)]) == list(prefix.placements)
    assert c.pools.tokenizer.decode(prefix.input_ids).endswith("answer 1")
    assert _turns(state) == [(USER, ""), (BOT, "answer 1")]
    assert _prefilled(c, "done") == 1


@pytest.mark.parametrize("case", ["switched off", "text only"])
def test_no_history_prefill_when_switched_off_or_when_the_call_never_sent_audio(run, case):
    async def scenario(c: Call):
        if case == "text only":
            c.send(ClientEvent(text=TextMessage(text="hello")))
            await c.until(lambda: c.of("completed"), "the answer")
            c.send(ClientEvent(text=TextMessage(text="and again")))
            await c.until(lambda: len(c.of("completed")) == 2, "the second answer")
        else:
            c.send(SILENCE_CHUNK)
            await _answer_then_judge_again(c)
        await c.end()
        return c

    c = run(scenario, OrchestratorConfig(preemptive_generation=False, prefill_monitor_history=case != "switched off"))
    assert c.pools.prefilled == [] and _prefilled(c, "done") == 0


def test_a_failed_history_prefill_is_counted_and_the_session_goes_on(run):
    async def scenario(c: Call):
        c.pools.prefill_error = ReplyTimeout("the llm:monitor pool did not answer")
        c.send(SILENCE_CHUNK)
        await _answer_then_judge_again(c)
        await c.until(lambda: _prefilled(c, "failed") == 1, "the failure counted")
        await c.end()
        return c

    c = run(scenario, OrchestratorConfig(preemptive_generation=False))
    assert len(c.pools.prefilled) == 1 and _prefilled(c, "done") == 0
    assert c.of("error") == []  # nothing reaches the client: the judgement computed the history itself
    assert [e.judged.outcome for e in c.of("judged")] == [UtteranceJudged.QUERY, UtteranceJudged.IGNORED]
