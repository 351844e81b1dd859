"""SentencePiece tokenizer with VITA's special tokens, streaming detokenisation and training from plain text.

Ids follow Llama/Mixtral: `<unk>` 0, `<s>` 1, `</s>` 2. The media placeholders and state tokens are user-defined
symbols, so each is one id wherever it appears in text; `</s>` is a control symbol that SentencePiece never
produces from text, so `encode` splits on it to let prompt templates write turn ends as plain text.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from vita.errors import CheckpointError, InvalidInputError

MODEL_FILE = "tokenizer.model"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
AUDIO_TOKEN = "<audio>"
STATE_TOKENS = ("<1>", "<2>", "<3>")
USER_DEFINED_SYMBOLS = (IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN, *STATE_TOKENS)


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
        self._eos_piece = self._sp.id_to_piece(self._sp.eos_id())
        self._control_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._special_ids = self._control_ids | {self.id_of(p) for p in USER_DEFINED_SYMBOLS if self.has_piece(p)}

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
        ids = [self.bos_id] if add_bos else []
        for k, segment in enumerate(text.split(self._eos_piece)):
            if k:
                ids.append(self.eos_id)
            ids.extend(self._sp.encode(segment))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """With `skip_special`, drops bos/eos, placeholders and state tokens: the text a user should see."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInputError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {self.vocab_size}")
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._special_ids])
        # SentencePiece renders control pieces as nothing; write them out so the text re-encodes to the same ids.
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
