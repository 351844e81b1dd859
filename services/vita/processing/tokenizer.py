"""SentencePiece tokenizer with VITA's special tokens, streaming detokenisation and training from plain text.

Ids follow Llama/Mixtral: `<unk>` 0, `<s>` 1, `</s>` 2; the media placeholders and state tokens are single ids.
Text never becomes a special id: `encode` turns a typed `<1>`, `<image>` or `</s>` into the ordinary pieces of
its characters, so no user can forge the state tokens the duplex judgement relies on, a turn end, or a media
slot. Only a prompt template places special tokens, as `Special` segments given to `encode_segments`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from vita.errors import CheckpointError, InvalidInputError

MODEL_FILE = "tokenizer.model"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
AUDIO_TOKEN = "<audio>"
STATE_TOKENS = ("<1>", "<2>", "<3>")
USER_DEFINED_SYMBOLS = (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN, *STATE_TOKENS)


@dataclass(frozen=True)
class Special:
    """A special token a prompt template places by id (`</s>`, `<image>`, `<3>`, ...); text never yields one."""

    piece: str


Segment = str | Special


class VitaTokenizer:
    """A loaded SentencePiece model; any SentencePiece file with bos and eos loads (a plain Mixtral one too)."""

    def __init__(self, model_proto: bytes, *, source: str = "tokenizer") -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise CheckpointError(f"{source} is not a SentencePiece model: {e}") from None
        self._source = source
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise CheckpointError(f"{source} defines no bos or eos piece; generation needs both")
        self._control_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._special_ids = self._control_ids | {self.id_of(p) for p in USER_DEFINED_SYMBOLS if self.has_piece(p)}
        # Text after a special token is tokenized on its own. SentencePiece never merges across a user-defined
        # symbol, so that gives the ids of the whole prompt as one text, except that a model with a dummy prefix
        # (Llama/Mixtral) would add one "▁" per part: such parts are tokenized behind an anchor symbol instead.
        self._dummy_prefix = self._sp.encode("a", out_type=str)[:1] != ["a"]
        self._anchor = next((p for p in USER_DEFINED_SYMBOLS if self.has_piece(p)
                             and self._sp.encode(p)[-1:] == [self.id_of(p)]), None)

    @classmethod
    def from_file(cls, path: str | Path) -> VitaTokenizer:
        """Loads `path`, or `path/tokenizer.model` when `path` is a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MODEL_FILE
        path.write_bytes(self._sp.serialized_model_proto())
        return path

    # --- vocabulary --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def image_id(self) -> int:
        return self.id_of(IMAGE_TOKEN)

    @property
    def video_id(self) -> int:
        return self.id_of(VIDEO_TOKEN)

    @property
    def audio_id(self) -> int:
        return self.id_of(AUDIO_TOKEN)

    @property
    def state_ids(self) -> dict[str, int]:
        return {piece: self.id_of(piece) for piece in STATE_TOKENS}

    def has_piece(self, piece: str) -> bool:
        """SentencePiece maps unknown pieces to the unk id rather than failing, so compare the round trip."""
        return self._sp.id_to_piece(self._sp.piece_to_id(piece)) == piece

    def id_of(self, piece: str) -> int:
        if not self.has_piece(piece):
            raise CheckpointError(f"{self._source} has no piece {piece!r} (a VITA tokenizer defines "
                                  f"{', '.join(USER_DEFINED_SYMBOLS)} as single tokens)")
        return self._sp.piece_to_id(piece)

    # --- text <-> ids ------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Plain text to ids; never a special id, whatever the text holds (see the module docstring).

        Raises InvalidInputError for text that is not valid Unicode: a lone surrogate, which is how Python
        carries bytes that were not UTF-8 (`sys.argv`, `os.fsdecode`, the `surrogateescape` error handler).
        """
        return self.encode_segments([text], add_bos=add_bos)

    def encode_segments(self, segments: Iterable[Segment], *, add_bos: bool = False) -> list[int]:
        """A prompt template's text and special tokens to ids: each `Special` is its one id, and every `str`,
        template or user text alike, is plain text that yields no special id."""
        ids = [self.bos_id] if add_bos else []
        text: list[str] = []  # adjacent text is tokenized as one string, as it would be in one text
        at_start = True
        for segment in segments:
            if isinstance(segment, Special):
                ids += self._encode_text("".join(text), at_start=at_start)
                ids.append(self.id_of(segment.piece))
                text, at_start = [], False
            elif isinstance(segment, str):
                _check_unicode(segment)  # per segment, so a position in the error is one in the user's text
                text.append(segment)
            else:
                raise InvalidInputError(f"text must be a string, not {type(segment).__name__}")
        return ids + self._encode_text("".join(text), at_start=at_start)

    def _encode_text(self, text: str, *, at_start: bool) -> list[int]:
        if not text:
            return []
        if at_start or not self._dummy_prefix or self._anchor is None:
            ids = self._sp.encode(text)
        else:
            ids = self._sp.encode(self._anchor + text)
            ids = ids[ids.index(self.id_of(self._anchor)) + 1 :]
        if not self._special_ids.intersection(ids):
            return ids
        out: list[int] = []
        for token_id in ids:  # a user-defined symbol typed in the text: its characters' ordinary pieces
            out += self._plain_ids(self._sp.id_to_piece(token_id)) if token_id in self._special_ids else [token_id]
        return out

    def _plain_ids(self, symbol: str) -> list[int]:
        """A special's text as ordinary pieces: its first character alone, then the rest as text ("<", "image>")."""
        first = symbol[0]
        if self.has_piece(first) and self._sp.piece_to_id(first) not in self._special_ids:
            ids = [self._sp.piece_to_id(first)]
        else:
            pieces = [f"<0x{byte:02X}>" for byte in first.encode()]
            ids = ([self._sp.piece_to_id(p) for p in pieces] if all(self.has_piece(p) for p in pieces)
                   else [self._sp.unk_id()])
        return ids + self._encode_text(symbol[1:], at_start=False)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """With `skip_special`, drops bos/eos, placeholders and state tokens: the text a user should see.

        Without it, special tokens are written as their pieces, for logs: that text does not encode back to
        the special ids (`encode` never yields them).
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInputError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {self.vocab_size}")
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece renders control pieces as nothing; write them out so a log shows them.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._control_ids:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _check_unicode(text: str) -> None:
    """One-line InvalidInputError for a string SentencePiece cannot take: it must encode to UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        if 0xDC80 <= char <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
            raise InvalidInputError(
                f"text is not valid UTF-8: byte 0x{char - 0xDC00:02x} at character {e.start} "
                "(send text as UTF-8; Latin-1 and other legacy encodings are not accepted)"
            ) from None
        raise InvalidInputError(f"text holds a lone surrogate U+{char:04X} at character {e.start}, "
                                "which is not a character; send text as valid Unicode") from None


class IncrementalDecoder:
    """Streams text deltas from ids fed one at a time; the deltas plus `flush()` concatenate to `decode(ids)`.

    Each step decodes a short window that starts at the last settled boundary, so a piece's leading-space
    marker is rendered in context, and text ending in U+FFFD (a character whose byte-fallback tokens have
    not all arrived) is held back until it completes.
    """

    def __init__(self, tokenizer: VitaTokenizer, *, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: the previous settled boundary
        self._read = 0  # everything before this index has been emitted

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Emits what is held back (an incomplete byte sequence decodes to U+FFFD) at the end of a stream."""
        delta = self._decode(self._prefix, len(self._ids))[len(self._decode(self._prefix, self._read)):]
        self._prefix = self._read = len(self._ids)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special=self.skip_special)


def train_tokenizer(lines: Iterable[str], output_path: str | Path, vocab_size: int) -> Path:
    """Trains a BPE model with VITA's special tokens and writes it to `output_path`; deterministic.

    Byte fallback lets any text encode, unseen Chinese included. The identity normaliser, kept whitespace and
    no dummy prefix make `decode(encode(text)) == text` exact, which the prompt template relies on.
    `vocab_size` is an upper bound: a small corpus may yield fewer pieces.
    """
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise InvalidInputError("the tokenizer training text is empty")
    reserved = 3 + len(USER_DEFINED_SYMBOLS) + 256  # unk/bos/eos, user-defined symbols, byte pieces
    if vocab_size <= reserved:
        raise InvalidInputError(f"vocab_size {vocab_size} leaves no room for learned pieces: "
                                f"{reserved} ids are reserved for special tokens and bytes")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path
