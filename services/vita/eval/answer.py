"""What a benchmark asks (`Query`), what the model says (`Answer`), and the model behind an `Answerer`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vita.processing.prompt import Message


@dataclass
class Query:
    """One request: text in VITA's data markup (`<image>` etc. mark media; see `Message.from_markup`), media paths (audio may be `file#t=BEGIN,END` or a
    `(samples, rate)` tuple), earlier turns, and the longest answer worth waiting for."""

    text: str
    images: Sequence[str] = ()
    video: str | None = None
    audio: Sequence[Any] = ()
    history: Sequence[Message] = ()
    system: str | None = None
    max_new_tokens: int = 32


@dataclass(frozen=True)
class Answer:
    """The answer text, and the state token the model led with (None if it led with none)."""

    text: str
    state: str | None = None


class Answerer(Protocol):
    def __call__(self, query: Query) -> Answer | str: ...


def as_answer(result: Answer | str) -> Answer:
    return result if isinstance(result, Answer) else Answer(str(result))


@dataclass
class PipelineAnswerer:
    """Greedy answers from an in-process `VitaPipeline` (the reference path the services are checked against).

    `max_new_tokens`, when set, caps every query's own budget (a quick run over a benchmark).
    """

    pipeline: Any  # vita.inference.VitaPipeline
    max_new_tokens: int | None = None
    calls: int = field(default=0, init=False)

    @classmethod
    def load(cls, model_dir: str | None, *, threads: int | None = None,
             max_new_tokens: int | None = None) -> PipelineAnswerer:
        from vita.inference import VitaPipeline

        return cls(VitaPipeline.load(model_dir, threads=threads), max_new_tokens)

    def __call__(self, query: Query) -> Answer:
        from vita.inference import GenerationRequest
        from vita.model.generation import SamplingParams
        from vita.processing.prompt import split_state

        budget = query.max_new_tokens if self.max_new_tokens is None else min(query.max_new_tokens,
                                                                                self.max_new_tokens)
        turn = Message.from_markup("user", query.text)  # a benchmark's prompt marks its media in VITA's markup
        request = GenerationRequest(
            text=turn.content, images=list(query.images), video=query.video,
            audio=[_audio_input(a) for a in query.audio], history=list(query.history),
            system_prompt=query.system, sampling=SamplingParams(max_new_tokens=budget, temperature=0.0),
        )
        ids: list[int] = []
        for event in self.pipeline.stream(request):
            ids.extend(event.token_ids)
        self.calls += 1
        tokenizer = self.pipeline.tokenizer
        state, rest = split_state(ids, tokenizer)
        return Answer(tokenizer.decode(rest).strip(), state.value if state is not None else None)


def _audio_input(audio: Any) -> Any:
    """Time ranges of long recordings are cut here (the processor takes whole files or samples)."""
    if isinstance(audio, str) and "#t=" in audio:
        from vita.training.data import load_audio_ref

        return (load_audio_ref(audio), 16000)
    return audio


def scripted(answers: dict[str, str] | Callable[[Query], str], default: str = "") -> Answerer:
    """An answerer from a table keyed by query text (or a function): for tests whose score is known."""
    if callable(answers):
        return answers
    return lambda query: answers.get(query.text, default)
