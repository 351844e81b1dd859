"""Stage 1 vocabulary extension: Chinese pieces added to the base tokenizer, embeddings initialised from it.

As in Chinese-LLaMA and VITA: a SentencePiece BPE model is trained on Chinese text, its pieces that the base
vocabulary lacks are appended to the base model (after VITA's placeholder and state tokens, if the base lacks
those too), and the embedding matrix and lm_head grow by as many rows. Each new row starts as the mean of the base
rows of the pieces that spell the new piece under the base tokenizer (for a Chinese character unknown to the base,
its UTF-8 byte pieces), so the extended model scores text as the base did until training moves the new rows.
At full size this takes Mixtral's 32,000 pieces to 51,747 (`target_vocab_size`).

The pieces are appended to the serialised ModelProto in protobuf wire format (repeated fields concatenate), which
needs no generated protobuf module: the one shipped with sentencepiece requires a newer protobuf runtime than
grpc allows here.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sentencepiece as spm
import torch
from torch import nn

from vita.errors import InvalidInputError
from vita.model.vita import VitaForCausalLM
from vita.processing.tokenizer import USER_DEFINED_SYMBOLS, VitaTokenizer, train_tokenizer

log = logging.getLogger("vita.training.vocab")

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_NORMAL, _USER_DEFINED = 1, 4  # sentencepiece ModelProto.SentencePiece.Type


@dataclass
class Extension:
    """What `extend_tokenizer` added: the new tokenizer and its new pieces, in id order from `base_size`."""

    tokenizer: VitaTokenizer
    base_size: int
    pieces: list[str]

    @property
    def vocab_size(self) -> int:
        return self.base_size + len(self.pieces)


def chinese_lines(lines: Iterable[str]) -> list[str]:
    """The lines that contain at least one CJK character."""
    return [line for line in lines if CJK.search(line)]


def train_chinese_model(lines: Sequence[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model of Chinese text, with the base tokenizer's normalisation (identity, whitespace
    kept, no dummy prefix) so its pieces mean the same; `vocab_size` is an upper bound for small corpora."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise InvalidInputError("vocabulary extension needs Chinese text, and none was given")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=0.9995, split_digits=True, byte_fallback=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def extend_tokenizer(base: VitaTokenizer, chinese_model: bytes, target_vocab_size: int | None = None) -> Extension:
    """Base pieces unchanged (same ids), then VITA's special symbols the base lacks, then the Chinese model's
    normal pieces the base lacks: its characters, then its merges in BPE order, up to `target_vocab_size`.

    Appended BPE pieces score below every base piece (keeping the Chinese model's order among themselves), so
    merges of base pieces happen as before and a BPE prefix of the Chinese merges is always complete.
    """
    sp = base._sp
    have = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    floor = min(sp.get_score(i) for i in range(sp.get_piece_size())) - 1.0
    added: list[tuple[str, float, int]] = [(s, 0.0, _USER_DEFINED) for s in USER_DEFINED_SYMBOLS if s not in have]
    have.update(s for s, _, _ in added)
    zh = spm.SentencePieceProcessor()
    zh.LoadFromSerializedProto(chinese_model)
    chars, merges = [], []
    for i in range(zh.get_piece_size()):
        piece = zh.id_to_piece(i)
        if zh.is_unknown(i) or zh.is_control(i) or zh.is_byte(i) or zh.is_unused(i) or piece in have:
            continue
        (chars if len(piece) == 1 else merges).append((piece, floor + zh.get_score(i), _NORMAL))
        have.add(piece)
    # Characters first: a merge is only reachable when its characters are pieces, so a cut at the target size
    # must drop merges (the least frequent, last in BPE order), never characters.
    added += chars + merges
    if target_vocab_size is not None:
        need = target_vocab_size - sp.get_piece_size()
        if need < 0:
            raise InvalidInputError(f"target_vocab_size {target_vocab_size} is below the base vocabulary "
                                    f"({sp.get_piece_size()})")
        if need > len(added):
            raise InvalidInputError(f"the Chinese text gives {len(added)} new pieces; {need} are needed to reach "
                                    f"target_vocab_size {target_vocab_size}: use more text or a larger sp_vocab_size")
        added = added[:need]
    proto = sp.serialized_model_proto() + b"".join(_piece_record(*a) for a in added)
    tokenizer = VitaTokenizer(proto, source="extended tokenizer")
    return Extension(tokenizer, sp.get_piece_size(), [piece for piece, _, _ in added])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _piece_record(piece: str, score: float, kind: int) -> bytes:
    """ModelProto field 1 (`pieces`): SentencePiece{piece = 1 (string), score = 2 (float), type = 3 (enum)}."""
    text = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def spelling(base: VitaTokenizer, piece: str) -> list[int]:
    """The base ids that spell `piece` (its `▁` is a space), without bos."""
    ids = base.encode(piece.replace("\u2581", " "))
    if not ids:
        raise InvalidInputError(f"piece {piece!r} spells to nothing under the base tokenizer")
    return ids


@torch.no_grad()
def resize_embeddings(model: VitaForCausalLM, extension: Extension, base: VitaTokenizer) -> None:
    """Grow embed_tokens and lm_head to the extended vocabulary; new row = mean of its spelling's base rows."""
    old_embed, old_head = model.get_input_embeddings(), model.lm_head
    n_old = old_embed.weight.shape[0]
    if n_old != extension.base_size:
        raise InvalidInputError(f"the model has {n_old} embedding rows but the base tokenizer {extension.base_size}"
                                " pieces: they must match before the vocabulary is extended")
    n_new = extension.vocab_size
    weight = old_embed.weight
    embed = nn.Embedding(n_new, weight.shape[1], device=weight.device, dtype=weight.dtype)
    head = nn.Linear(weight.shape[1], n_new, bias=False, device=weight.device, dtype=weight.dtype)
    embed.weight[:n_old] = old_embed.weight
    head.weight[:n_old] = old_head.weight
    for k, piece in enumerate(extension.pieces):
        ids = torch.tensor(spelling(base, piece), device=weight.device)
        embed.weight[n_old + k] = old_embed.weight[ids].mean(0)
        head.weight[n_old + k] = old_head.weight[ids].mean(0)
    embed.weight.requires_grad_(old_embed.weight.requires_grad)
    head.weight.requires_grad_(old_head.weight.requires_grad)
    model.model.embed_tokens = embed
    model.lm_head = head
    model.config.vocab_size = n_new
    model.vita_config.llm.vocab_size = n_new


BASE_WORD_REPEATS = 5  # how often each curriculum line joins the base tokenizer's text: enough to be merged whole


def base_tokenizer_from_corpus(output_path, vocab_size: int) -> VitaTokenizer:
    """Tiny runs: an English-only base tokenizer trained on the built-in corpus, the system prompts and role names
    (what Mixtral's vocabulary is at full size: the base that stage 1 extends with Chinese pieces), and the English
    of the synthetic curriculum's questions and answers, `BASE_WORD_REPEATS` times each.

    Mixtral's 32,000 pieces hold words such as "blue", "circle" or "seven" whole; the built-in corpus (1,000 English
    lines) is too small for BPE to learn them, so an answer that starts a turn was spelt in two to four pieces
    ("bl", "ue"), whose first piece is shared by several answers (blue, black). The curriculum's lines give the
    stand-in base what the real one has.
    """
    from dataclasses import astuple

    from vita.processing.corpus import bilingual_corpus
    from vita.processing.prompt import SYSTEM_PROMPTS
    from vita.training.curriculum import english_lines

    lines = [line for line in bilingual_corpus() if not CJK.search(line)]
    lines += [*astuple(SYSTEM_PROMPTS), "system:", "user:", "bot:"]
    lines += english_lines() * BASE_WORD_REPEATS
    return VitaTokenizer.from_file(train_tokenizer(lines, output_path, vocab_size))


def extend_vocabulary(model: VitaForCausalLM, base: VitaTokenizer, lines: Sequence[str], *, sp_vocab_size: int,
                      target_vocab_size: int | None = None) -> Extension:
    """Train the Chinese model on `lines` (their CJK ones), extend `base`, resize `model` in place."""
    text = chinese_lines(lines)
    extension = extend_tokenizer(base, train_chinese_model(text, sp_vocab_size), target_vocab_size)
    resize_embeddings(model, extension, base)
    log.info("vocabulary extended", extra={"base": extension.base_size, "added": len(extension.pieces),
                                           "vocab_size": extension.vocab_size, "chinese_lines": len(text)})
    return extension
