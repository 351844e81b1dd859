"""The prompts the orchestrator sends to the llm pools: token ids, and where each encoder embedding goes.

Pure functions of the tokenizer, the turns and the encoders' `EmbeddingRef`s (no Redis, no weights), shared by
Generate (one user turn) and Converse (a history, a judgement, an answer). The orchestrator never reads an
embedding: it plans the prompt from the token counts the encoders report and tells the llm worker which rows of
which blob fill which span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vita.errors import ContextLengthError
from vita.processing.prompt import Message, Span, StateToken, encode_prompt
from vita.processing.tokenizer import VitaTokenizer
from vita.v1.assistant_pb2 import Usage
from vita.v1.bus_pb2 import EmbeddingPlacement, EmbeddingRef
from vita.v1.session_pb2 import SessionMedia, SessionTurn

MODALITIES = ("image", "video", "audio")


@dataclass
class Prompt:
    """A prompt for a `GenerationJob`: ids with placeholder spans, and the embeddings that fill the spans."""

    input_ids: list[int]
    spans: list[Span]
    placements: list[EmbeddingPlacement]
    turns_dropped: int = 0  # turns of the history left out because the whole of it did not fit the context

    def usage(self) -> Usage:
        """The prompt side of `Usage`: all tokens, and per modality the tokens its embeddings fill."""
        return Usage(prompt_tokens=len(self.input_ids), **{
            f"{m}_tokens": sum(s.length for s in self.spans if s.modality == m) for m in MODALITIES})


def media_prompt(tokenizer: VitaTokenizer, messages: Sequence[Message], media: Sequence[SessionMedia], *,
                 audio_question: bool, system: str | None, context_len: int,
                 add_generation_prompt: bool = True) -> Prompt:
    """Template and expand `messages`, whose placeholders `media` fills in order (one blob per encode job).

    Raises ContextLengthError when the prompt needs more than `context_len - 1` tokens (one is left to answer).
    """
    prompt = encode_prompt(
        tokenizer, messages, audio_question=audio_question,
        image_tokens=[n for m in media if m.modality == "image" for n in m.embedding.item_tokens],
        video_tokens=[m.embedding.shape[0] for m in media if m.modality == "video"],
        audio_tokens=[n for m in media if m.modality == "audio" for n in m.embedding.item_tokens],
        system=system, max_length=context_len - 1, add_generation_prompt=add_generation_prompt)
    return Prompt(prompt.input_ids, prompt.spans, placements(prompt.spans, media))


def history_prompt(tokenizer: VitaTokenizer, turns: Sequence[SessionTurn], *, audio_question: bool,
                   system: str | None, context_len: int, add_generation_prompt: bool = True) -> Prompt:
    """A conversation as one prompt; the oldest exchanges are left out while it does not fit the context, and
    `Prompt.turns_dropped` counts the turns of `turns` left out so. `add_generation_prompt=False`: it ends with
    the last turn's end (the last turn may then be the bot's), not where the bot's next turn begins.

    Raises ContextLengthError when even the last turn alone does not fit.
    """
    runs = _runs(turns)
    dropped = 0
    while True:
        kept = [t for t, _ in runs]
        try:
            prompt = media_prompt(tokenizer, [message(t) for t in kept], [m for t in kept for m in t.media],
                                  audio_question=audio_question, system=system, context_len=context_len,
                                  add_generation_prompt=add_generation_prompt)
            prompt.turns_dropped = dropped
            return prompt
        except ContextLengthError:
            if len(runs) <= 1:
                raise
            dropped += sum(n for _, n in runs[:2])  # the oldest user turn and its answer
            runs = runs[2:]


def judge_prompt(tokenizer: VitaTokenizer, turns: Sequence[SessionTurn], audio: EmbeddingRef, *,
                 answering: str | None, system: str | None, context_len: int) -> Prompt:
    """What the monitor judges: the history, the answer streaming now as it stands (`answering`), the new speech.

    Its first generated token is the decision (a state token), so the prompt ends where the bot's turn begins.
    """
    history = list(turns)
    if answering is not None:
        history.append(SessionTurn(role=SessionTurn.BOT, content=answering))
    speech = SessionTurn(role=SessionTurn.USER, media=[SessionMedia(modality="audio", embedding=audio)])
    return history_prompt(tokenizer, [*history, speech], audio_question=True, system=system,
                          context_len=context_len)


def judge_prefix_prompt(tokenizer: VitaTokenizer, turns: Sequence[SessionTurn], *, system: str | None,
                        context_len: int) -> Prompt:
    """The monitor's next `judge_prompt` up to the end of the history (no answer in flight): what the orchestrator
    has the monitor pool prefill into its prefix cache while nobody speaks, so that judging the next speech
    computes only the speech (`ConverseCall`, "history prefill"). Its ids and placements are a prefix of that
    judgement's whenever the history fits the context whole. The history must end with an answer: after a user
    turn the next speech would join that turn (`alternating`), inside the prefix.

    Raises ValueError when the last turn is not the bot's; ContextLengthError when even it alone does not fit.
    """
    if not turns or turns[-1].role != SessionTurn.BOT:
        raise ValueError("a judgement's prefix is a history that ends with an answer")
    return history_prompt(tokenizer, turns, audio_question=True, system=system, context_len=context_len,
                          add_generation_prompt=False)


def answer_prompt(tokenizer: VitaTokenizer, turns: Sequence[SessionTurn], user: SessionTurn, state: StateToken, *,
                  system: str | None, context_len: int) -> Prompt:
    """The history and the user's turn, then the state token already decided: the answer starts after it."""
    audio_question = any(m.modality == "audio" for m in user.media)
    prompt = history_prompt(tokenizer, [*turns, user], audio_question=audio_question, system=system,
                            context_len=context_len)
    prompt.input_ids.append(tokenizer.state_ids[state.value])
    return prompt


def user_turn(text: str, refs: dict[str, EmbeddingRef], *, turn_id: int, state: StateToken,
              unix_s: float) -> SessionTurn:
    """A user turn for the history: the text as typed, and its media (placed before the text by `message`).

    `refs` maps "image" (any number of images in one blob), "video" and "audio" to their encoder output.
    """
    media = [SessionMedia(modality=m, embedding=refs[m]) for m in MODALITIES if m in refs]
    return SessionTurn(role=SessionTurn.USER, turn_id=turn_id, content=text, media=media,
                       state_token=state.value, unix_s=unix_s)


def message(turn: SessionTurn) -> Message:
    """A stored turn as the template's message: its text (plain, whatever it holds) and one placeholder per
    encoded item of its media, in the order stored (images, video, audio)."""
    if turn.role != SessionTurn.USER:
        return Message("bot", turn.content)
    media = [m.modality for m in turn.media for _ in range(1 if m.modality == "video" else len(m.embedding.item_tokens))]
    return Message("user", turn.content, tuple(media))


def alternating(turns: Sequence[SessionTurn]) -> list[SessionTurn]:
    """The template needs user, bot, user, ...: a user turn whose answer failed is merged with the next one.

    Turns of the same role in a row are merged (user contents joined by a newline); leading bot turns are dropped.
    The input is not modified.
    """
    return [turn for turn, _ in _runs(turns)]


def _runs(turns: Sequence[SessionTurn]) -> list[tuple[SessionTurn, int]]:
    """`alternating`, with how many input turns each output turn stands for."""
    out: list[tuple[SessionTurn, int]] = []
    for turn in turns:
        if out and out[-1][0].role == turn.role:
            merged = SessionTurn()
            merged.CopyFrom(out[-1][0])
            merged.content += ("\n" if turn.role == SessionTurn.USER else "") + turn.content
            merged.media.extend(turn.media)
            out[-1] = (merged, out[-1][1] + 1)
        else:
            out.append((turn, 1))
    while out and out[0][0].role != SessionTurn.USER:
        out.pop(0)
    return out


def placements(spans: Sequence[Span], media: Sequence[SessionMedia]) -> list[EmbeddingPlacement]:
    """Where each blob goes: it fills the next spans of its modality, in prompt order.

    A blob holds one span per item (`item_tokens`: images, audio clips), a video blob exactly one span.
    """
    by_modality: dict[str, list[Span]] = {}
    for span in sorted(spans, key=lambda s: s.start):
        by_modality.setdefault(span.modality, []).append(span)
    out = []
    for m in media:
        n = 1 if m.modality == "video" else len(m.embedding.item_tokens)
        mine, by_modality[m.modality] = by_modality[m.modality][:n], by_modality[m.modality][n:]
        out.append(EmbeddingPlacement(embedding=m.embedding, spans=[
            EmbeddingPlacement.Span(start=s.start, length=s.length) for s in mine]))
    return out
