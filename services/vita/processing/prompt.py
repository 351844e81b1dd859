"""VITA's prompt format: the turn template, system prompts per data type, state tokens, placeholder expansion.

A prompt is built as text first (easy to log and to test as a string), then encoded; each `<image>`, `<video>`
and `<audio>` id is then repeated once per encoder embedding, and the model overwrites those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Literal

from vita.errors import ContextLengthError, InvalidInputError
from vita.processing.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, VitaTokenizer

EOS = "</s>"
ROLES = ("user", "bot")
Modality = Literal["image", "video", "audio"]
PLACEHOLDERS: dict[Modality, str] = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN, "audio": AUDIO_TOKEN}


class DataType(Enum):
    """What the answer is grounded on; the same question is answered from the picture or from knowledge."""

    IMAGE = "image"
    VIDEO = "video"
    TEXT = "text"

    @classmethod
    def for_media(cls, *, has_images: bool, has_video: bool) -> DataType:
        if has_images:
            return cls.IMAGE
        return cls.VIDEO if has_video else cls.TEXT


class StateToken(StrEnum):
    """First token of every answer: the model says what it heard before it says anything else."""

    QUERY_AUDIO = "<1>"
    NOISY_AUDIO = "<2>"  # not meant for the assistant: the answer is this token then eos, i.e. silence
    TEXT = "<3>"


_VITA = (
    "You are an AI robot and your name is VITA. You are a multimodal large language model developed by the "
    "open-source community. Your aim is to be helpful, honest and harmless. You answer fluently in the language "
    "the user chooses, English or Chinese. If the user corrects a wrong answer, apologise and discuss the "
    "correct answer with the user."
)
_IMAGE = (" You must answer the question strictly according to the content of the image given by the user. "
          "Note that you are seeing an image, not a video.")
_VIDEO = (" You must answer the question strictly according to the content of the video given by the user. "
          "Note that you are seeing a video, not an image.")
_TEXT = " No image or video is given: answer from your own knowledge."
_AUDIO = (" The user asks the question by speech: understand the spoken question in the audio and answer it "
          "in text. Speech that is not a question for you must be ignored.")


@dataclass(frozen=True)
class SystemPrompts:
    """One system prompt per data type, each with a variant for a question asked by speech."""

    image: str = _VITA + _IMAGE
    image_audio: str = _VITA + _IMAGE + _AUDIO
    video: str = _VITA + _VIDEO
    video_audio: str = _VITA + _VIDEO + _AUDIO
    text: str = _VITA + _TEXT
    text_audio: str = _VITA + _TEXT + _AUDIO

    def select(self, data_type: DataType, *, audio_question: bool) -> str:
        return getattr(self, data_type.value + ("_audio" if audio_question else ""))


SYSTEM_PROMPTS = SystemPrompts()


@dataclass(frozen=True)
class Message:
    """One turn; `content` may hold `<image>`, `<video>` and `<audio>` placeholders."""

    role: Literal["user", "bot"]
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidInputError(f"message role must be 'user' or 'bot', not {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidInputError(f"message content must be a string, not {type(self.content).__name__}")


def answer_text(state: StateToken, text: str = "") -> str:
    """A training target for the bot turn: the state token, then the answer (none for noisy audio)."""
    if state is StateToken.NOISY_AUDIO and text:
        raise InvalidInputError("a noisy-audio answer must be empty: the model learns to stay silent")
    return state.value + text


def split_state(
    answer: str | Sequence[int], tokenizer: VitaTokenizer | None = None
) -> tuple[StateToken | None, str | list[int]]:
    """Separates a generated answer's leading state token (text, or ids with `tokenizer`) from the rest."""
    if isinstance(answer, str):
        for state in StateToken:
            if answer.startswith(state.value):
                return state, answer[len(state.value):]
        return None, answer
    if tokenizer is None:
        raise TypeError("split_state needs the tokenizer to read state tokens from ids")
    ids = list(answer)
    states = {token_id: StateToken(piece) for piece, token_id in tokenizer.state_ids.items()}
    if ids and ids[0] in states:
        return states[ids[0]], ids[1:]
    return None, ids


def build_prompt(
    messages: Sequence[Message],
    *,
    system: str | None = None,
    data_type: DataType,
    audio_question: bool,
    add_generation_prompt: bool = True,
) -> str:
    """`system:...</s>\\nuser:...</s>\\nbot:...</s>`, ending in `\\nbot:` when the model is to answer next."""
    if not messages:
        raise InvalidInputError("the conversation has no messages")
    for k, message in enumerate(messages):
        if message.role != ROLES[k % 2]:
            raise InvalidInputError(f"message {k} has role {message.role!r}; turns must alternate user, bot, "
                                    "user, ... starting with user")
        if EOS in message.content:
            raise InvalidInputError(f"message {k} contains the end-of-turn marker {EOS!r}")
    if add_generation_prompt and messages[-1].role != "user":
        raise InvalidInputError("the last message must be the user's for the model to answer it")
    if system is None:
        system = SYSTEM_PROMPTS.select(data_type, audio_question=audio_question)
    elif EOS in system:
        raise InvalidInputError(f"the system prompt contains the end-of-turn marker {EOS!r}")
    turns = [f"system:{system}"] + [f"{m.role}:{m.content}" for m in messages]
    prompt = "".join(turn + EOS + "\n" for turn in turns)
    return prompt + "bot:" if add_generation_prompt else prompt.removesuffix("\n")


@dataclass(frozen=True)
class Span:
    """Where the `index`-th input of `modality` puts its `length` encoder embeddings in `input_ids`."""

    modality: Modality
    start: int
    length: int
    index: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class ExpandedPrompt:
    """Ids ready for the model; `spans` (in prompt order) say which rows the encoder outputs replace."""

    input_ids: list[int]
    spans: list[Span]


def expand_placeholders(
    token_ids: Sequence[int],
    *,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    audio_tokens: Sequence[int] = (),
    tokenizer: VitaTokenizer,
) -> ExpandedPrompt:
    """Repeats the k-th placeholder of each modality `*_tokens[k]` times (e.g. 256 per image tile)."""
    counts: dict[Modality, Sequence[int]] = {"image": image_tokens, "video": video_tokens, "audio": audio_tokens}
    for modality, sizes in counts.items():
        for k, n in enumerate(sizes):
            if n < 1:
                raise InvalidInputError(f"{modality}_tokens[{k}] is {n}; every {modality} needs at least one token")
    slot_of = {tokenizer.id_of(p): m for m, p in PLACEHOLDERS.items() if tokenizer.has_piece(p)}
    seen: dict[Modality, int] = dict.fromkeys(counts, 0)
    input_ids: list[int] = []
    spans: list[Span] = []
    for token_id in token_ids:
        modality = slot_of.get(token_id)
        if modality is None:
            input_ids.append(token_id)
            continue
        k = seen[modality]
        seen[modality] += 1
        if k < len(counts[modality]):
            spans.append(Span(modality, len(input_ids), counts[modality][k], k))
            input_ids.extend([token_id] * counts[modality][k])
    for modality, sizes in counts.items():
        if seen[modality] != len(sizes):
            raise InvalidInputError(f"the prompt has {seen[modality]} {PLACEHOLDERS[modality]} placeholder(s) "
                                    f"but {_count(len(sizes), modality)} given")
    return ExpandedPrompt(input_ids, spans)


def encode_prompt(
    tokenizer: VitaTokenizer,
    messages: Sequence[Message],
    *,
    audio_question: bool,
    image_tokens: Sequence[int] = (),
    video_tokens: Sequence[int] = (),
    audio_tokens: Sequence[int] = (),
    system: str | None = None,
    max_length: int | None = None,
    add_generation_prompt: bool = True,
) -> ExpandedPrompt:
    """Template, encode with bos, expand; the data type follows the media (images first, then video)."""
    data_type = DataType.for_media(has_images=bool(image_tokens), has_video=bool(video_tokens))
    text = build_prompt(messages, system=system, data_type=data_type, audio_question=audio_question,
                        add_generation_prompt=add_generation_prompt)
    prompt = expand_placeholders(tokenizer.encode(text, add_bos=True), image_tokens=image_tokens,
                                 video_tokens=video_tokens, audio_tokens=audio_tokens, tokenizer=tokenizer)
    if max_length is not None and len(prompt.input_ids) > max_length:
        media = ", ".join(_count(len(sizes), m) for m, sizes in
                          (("image", image_tokens), ("video", video_tokens), ("audio", audio_tokens)) if sizes)
        expanded = f" after expanding {media}" if media else ""
        raise ContextLengthError(f"prompt is {len(prompt.input_ids)} tokens{expanded}; "
                                 f"the model's context is {max_length}")
    return prompt


def _count(n: int, modality: Modality) -> str:
    """'1 image', '2 images', '2 audio' (uncountable)."""
    plural = "s" if n != 1 and modality != "audio" else ""
    return f"{n} {modality}{plural}"
