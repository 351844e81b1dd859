"""VITA's prompt format: the turn template, system prompts per data type, state tokens, placeholder expansion.

A prompt is built as segments: text, and the special tokens only the template places (`</s>`, the `<image>`,
`<video>`, `<audio>` placeholders, a bot turn's state token). Every piece of text, the user's, a system prompt's
or an earlier answer's, is encoded as plain text, so a user who types `<1>` or `</s>` gets those characters, never
the tokens. `render_prompt` writes the segments as one string for logs and tests. After encoding, each
placeholder id is repeated once per encoder embedding, and the model overwrites those rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Literal

from vita.errors import ContextLengthError, InvalidInputError
from vita.processing.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, Segment, Special, VitaTokenizer

EOS = "</s>"
ROLES = ("user", "bot")
Modality = Literal["image", "video", "audio"]
PLACEHOLDERS: dict[Modality, str] = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN, "audio": AUDIO_TOKEN}
_MODALITY_OF = {piece: modality for modality, piece in PLACEHOLDERS.items()}
_MARKUP = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})\n?|({re.escape(AUDIO_TOKEN)})")


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
    """One turn. `content` is plain text: whatever it holds, it never encodes to a special token.

    `media` are the turn's placeholders, in the order of its media, put before the text (each image and the
    video on a line of its own, as VITA was trained); `state` is the state token a bot turn starts with
    (training targets; served history leaves it out).
    """

    role: Literal["user", "bot"]
    content: str = ""
    media: tuple[Modality, ...] = ()
    state: StateToken | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidInputError(f"message role must be 'user' or 'bot', not {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidInputError(f"message content must be a string, not {type(self.content).__name__}")
        object.__setattr__(self, "media", tuple(self.media))
        unknown = [m for m in self.media if m not in PLACEHOLDERS]
        if unknown:
            raise InvalidInputError(f"unknown medium {unknown[0]!r}; use one of {', '.join(PLACEHOLDERS)}")
        if self.state is not None:
            if self.role != "bot" or self.state not in set(StateToken):
                raise InvalidInputError(f"only a bot message starts with a state token ({', '.join(StateToken)}); "
                                        f"got {self.state!r} on a {self.role} message")
            object.__setattr__(self, "state", StateToken(self.state))
            if self.state is StateToken.NOISY_AUDIO and self.content:
                raise InvalidInputError("a noisy-audio answer must be empty: the model learns to stay silent")

    @classmethod
    def user(cls, text: str = "", *, images: int = 0, videos: int = 0, audios: int = 0) -> Message:
        """A user turn with its media in VITA's order: images, then the video, then spoken questions."""
        return cls("user", text, ("image",) * images + ("video",) * videos + ("audio",) * audios)

    @classmethod
    def from_markup(cls, role: Literal["user", "bot"], text: str) -> Message:
        """A turn written in VITA's data format, where `<image>`, `<video>` and `<audio>` in a user turn's text
        mark its media (training manifests, benchmark prompts): the marks become `media`, in their order, and
        leave the text (with the line break that follows an image or video mark, which the template puts back).

        For data files only, never for what a user types: only these three marks are markup, so a `<1>` or
        `</s>` in the data stays text, and a bot turn's text is taken as it is.
        """
        if role != "user":
            return cls(role, text)
        media: list[Modality] = []
        rest = _MARKUP.sub(lambda m: media.append(_MODALITY_OF[m.group(1) or m.group(2)]) or "", text)
        return cls(role, rest, tuple(media))

    def segments(self) -> list[Segment]:
        """`role:`, the placeholders, the state token, the text: what goes between two turn ends."""
        out: list[Segment] = [f"{self.role}:"]
        for modality in self.media:
            out.append(Special(PLACEHOLDERS[modality]))
            if modality != "audio":
                out.append("\n")
        if self.state is not None:
            out.append(Special(self.state.value))
        out.append(self.content)
        return out


def split_state(answer: Sequence[int], tokenizer: VitaTokenizer) -> tuple[StateToken | None, list[int]]:
    """Separates a generated answer's leading state token id from the rest of its ids."""
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
) -> list[Segment]:
    """`system:...</s>\\nuser:...</s>\\nbot:...</s>` as segments, ending in `\\nbot:` when the model is to answer.

    The turn ends (and the placeholders and state tokens) are `Special` segments; all text, a `</s>` typed in
    a message or a system prompt included, stays text.
    """
    if not messages:
        raise InvalidInputError("the conversation has no messages")
    for k, message in enumerate(messages):
        if message.role != ROLES[k % 2]:
            raise InvalidInputError(f"message {k} has role {message.role!r}; turns must alternate user, bot, "
                                    "user, ... starting with user")
    if add_generation_prompt and messages[-1].role != "user":
        raise InvalidInputError("the last message must be the user's for the model to answer it")
    if system is None:
        system = SYSTEM_PROMPTS.select(data_type, audio_question=audio_question)
    turns: list[list[Segment]] = [[f"system:{system}"]] + [m.segments() for m in messages]
    segments: list[Segment] = []
    for k, turn in enumerate(turns):
        segments += [*turn, Special(EOS)] + (["\n"] if k < len(turns) - 1 or add_generation_prompt else [])
    return [*segments, "bot:"] if add_generation_prompt else segments


def render_prompt(segments: Sequence[Segment]) -> str:
    """The segments as one string, special tokens written as their pieces: for logs and tests only (encoding
    this string would turn those pieces into plain text)."""
    return "".join(s.piece if isinstance(s, Special) else s for s in segments)


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
    segments = build_prompt(messages, system=system, data_type=data_type, audio_question=audio_question,
                            add_generation_prompt=add_generation_prompt)
    prompt = expand_placeholders(tokenizer.encode_segments(segments, add_bos=True), image_tokens=image_tokens,
                                 video_tokens=video_tokens, audio_tokens=audio_tokens, tokenizer=tokenizer)
    if max_length is not None and len(prompt.input_ids) > max_length:
        media = ", ".join(_count(len(sizes), m) for m, sizes in
                          (("image", image_tokens), ("video", video_tokens), ("audio", audio_tokens)) if sizes)
        expanded = f" after expanding {media}" if media else ""
        raise ContextLengthError(f"prompt is {len(prompt.input_ids)} tokens{expanded}; "
                                 f"at most {max_length} fit the model's context")
    return prompt


def _count(n: int, modality: Modality) -> str:
    """'1 image', '2 images', '2 audio' (uncountable)."""
    plural = "s" if n != 1 and modality != "audio" else ""
    return f"{n} {modality}{plural}"
