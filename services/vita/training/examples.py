"""Sample -> Example: the token ids, next-token targets and media tensors one training sequence is made of.

The prompt is the one the serving side builds (`vita.processing.prompt`): `system:...</s>\\nuser:...</s>\\nbot:`,
the system prompt chosen by data type (image, video, text) and by whether a question is spoken, unless the
conversation brings its own. A user turn's `<image>`/`<video>`/`<audio>` marks become its media
(`Message.from_markup`), placed as the template places them; all other text stays text. Each bot turn is a target:
`Message("bot", text, state=...)` (its state token, then its text) and `</s>`; everything else is context (target
-100). The answer is tokenised apart from the `bot:` before it, as generation produces it. Placeholders are
expanded to one id per encoder embedding (256 per image tile or video frame, 12.5 per second of audio), exactly as
`VitaProcessor` expands them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vita.errors import InvalidInputError
from vita.model.config import VitaConfig
from vita.processing.audio import load_audio, num_audio_tokens
from vita.processing.image import preprocess_image
from vita.processing.prompt import EOS, DataType, Message, StateToken, build_prompt, expand_placeholders
from vita.processing.tokenizer import Segment, Special, VitaTokenizer
from vita.processing.video import decode_video, video_to_pixel_values
from vita.training.sample import Sample

IGNORE = -100  # target of a position that predicts nothing (context, padding)
QUESTION_KINDS = ("text", "image", "video", "duplex")


@dataclass
class Example:
    """One tokenised sample. `targets[t]` is the id that position t must predict (the next token) or IGNORE."""

    input_ids: list[int]
    targets: list[int]
    kind: str
    image_pixels: Tensor | None = None  # (tiles, 3, 448, 448), every image's tiles in prompt order
    video_pixels: Tensor | None = None  # (frames, 3, 448, 448)
    audio: list[Tensor] = field(default_factory=list)  # 16 kHz mono waveforms in prompt order
    index: int = -1  # position in the epoch's order, for the data cursor
    # Leading tokens that are plain context (before the first media slot and the first target): packing may
    # share them with the other samples of a row that start with the same ids (`packing.pack(share_prefix=)`).
    shareable: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def packable(self) -> bool:
        """Text and image samples are packed; a video sample always trains in a row of its own."""
        return self.video_pixels is None and self.kind != "video"

    @property
    def num_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


class TooLong(InvalidInputError):
    """The sample is longer than the stage allows; the data stream skips and counts it."""


class ExampleEncoder:
    """Tokenises samples for one model config and tokenizer."""

    def __init__(self, tokenizer: VitaTokenizer, config: VitaConfig, *, state_tokens: bool = False,
                 max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.state_tokens = state_tokens
        self.max_length = max_length or config.llm.max_position_embeddings

    def __call__(self, sample: Sample, index: int = -1) -> Example:
        try:
            return self._encode(sample, index)
        except TooLong:
            raise
        except (InvalidInputError, FileNotFoundError, OSError, ValueError) as e:
            label = f", id {sample.meta['id']}" if sample.meta.get("id") else ""
            raise InvalidInputError(f"{sample.kind} sample{label}: {e}") from None

    def _encode(self, sample: Sample, index: int) -> Example:
        turns = list(sample.conversation)
        system = turns.pop(0)["content"] if turns and turns[0]["role"] == "system" else None
        if not turns or turns[-1]["role"] != "bot":
            raise InvalidInputError("a training conversation must end with the bot's answer")
        for k, turn in enumerate(turns):
            if turn["role"] != ("user", "bot")[k % 2]:
                raise InvalidInputError("turns must alternate user, bot, ... starting with user")
        # The data format's media marks become the user turns' media, as the serving template places them.
        users = [Message.from_markup("user", t["content"]) for t in turns[0::2]]
        answers = [t["content"] for t in turns[1::2]]

        image_pixels = [self._image(path) for path in sample.images]
        video_pixels = self._video(sample.video) if sample.video else None
        if sample.audio and self.config.audio is None:
            raise InvalidInputError("the model has no audio tower: it cannot train on audio")
        audio = [load_waveform(ref) for ref in sample.audio]
        data_type = DataType.for_media(has_images=bool(image_pixels), has_video=video_pixels is not None)

        tok = self.tokenizer
        # A sample's `state` is its last answer's state token; earlier answers get theirs from their question
        # (`<1>` spoken, `<3>` typed). Without one, a question sample gets inferred states when the stage asks
        # for state tokens; ASR and captioning samples never have any (they are not questions).
        use_states = sample.state is not None or (self.state_tokens and sample.kind in QUESTION_KINDS)
        first = build_prompt(users[:1], system=system, data_type=data_type, audio_question=bool(audio))
        ids = tok.encode_segments(first, add_bos=True)  # exactly the serving prompt of a one-turn request
        labels = [IGNORE] * len(ids)
        for k, (user, text) in enumerate(zip(users, answers)):
            if k:
                between = _after_special(tok, ["\n", *user.segments(), Special(EOS), "\n", "bot:"])
                ids += between
                labels += [IGNORE] * len(between)
            last = k == len(answers) - 1
            state = (sample.state if last and sample.state else self._state(user)) if use_states else None
            bot = Message("bot", text, state=StateToken(state) if state else None)
            # the answer is tokenised apart from the `bot:` before it, as generation produces it
            answer = _after_special(tok, [*bot.segments()[1:], Special(EOS)])
            ids += answer
            labels += answer

        tiles = self.config.vision.tokens_per_tile if self.config.vision is not None else 0
        expanded = expand_placeholders(
            ids, tokenizer=tok,
            image_tokens=[p.shape[0] * tiles for p in image_pixels],
            video_tokens=[video_pixels.shape[0] * tiles] if video_pixels is not None else [],
            audio_tokens=[num_audio_tokens(len(w), self.config.audio) for w in audio] if audio else [],
        )
        if len(expanded.input_ids) > self.max_length:
            raise TooLong(f"the sample is {len(expanded.input_ids)} tokens; at most {self.max_length} fit")
        full: list[int] = []
        src = 0
        for span in expanded.spans:  # placeholders sit in user turns: context
            n_text = span.start - len(full)
            full += labels[src : src + n_text] + [IGNORE] * span.length
            src += n_text + 1
        full += labels[src:]
        targets = [*full[1:], IGNORE]
        first_target = next((t for t, label in enumerate(targets) if label != IGNORE), len(targets))
        first_media = expanded.spans[0].start if expanded.spans else len(targets)
        return Example(
            input_ids=expanded.input_ids, targets=targets, kind=sample.kind,
            image_pixels=torch.cat(image_pixels) if image_pixels else None, video_pixels=video_pixels,
            audio=audio, index=index, shareable=min(first_target, first_media),
        )

    @staticmethod
    def _state(user: Message) -> str:
        return "<1>" if "audio" in user.media else "<3>"

    def _image(self, path: str) -> Tensor:
        if self.config.vision is None:
            raise InvalidInputError("the model has no vision tower: it cannot train on images")
        with _naming(path):
            return preprocess_image(path, self.config.vision)

    def _video(self, path: str) -> Tensor:
        if self.config.vision is None:
            raise InvalidInputError("the model has no vision tower: it cannot train on video")
        with _naming(path):
            return video_to_pixel_values(decode_video(path), self.config.vision)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """A media file that cannot be read is named in the error (the manifest line alone does not say which)."""
    try:
        yield
    except (InvalidInputError, OSError, ValueError) as e:
        if path in str(e):
            raise
        raise InvalidInputError(f"{path}: {e}") from None


def _after_special(tok: VitaTokenizer, segments: list[Segment]) -> list[int]:
    """Ids of segments that follow a special token in the sequence (a turn end, `bot:`'s answer): text right
    after a special token is tokenised as such (no dummy prefix), which encoding them alone would not do."""
    return tok.encode_segments([Special(EOS), *segments])[1:]


def load_waveform(ref: str) -> Tensor:
    """16 kHz mono float32; `file#t=BEGIN,END` (a segment of a long recording) is decoded by the data module."""
    if "#t=" in ref:
        from vita.training.data import load_audio_ref

        return torch.from_numpy(load_audio_ref(ref))
    return load_audio(ref)
