"""Stage 1 vocabulary extension: new rows are the mean of their spelling's base rows, old rows stay, text
round-trips, and Chinese takes fewer tokens."""

from __future__ import annotations

import pytest
import torch

from tests import training_helpers as th
from vita.errors import InvalidInputError
from vita.processing.corpus import bilingual_corpus
from vita.processing.tokenizer import USER_DEFINED_SYMBOLS, Special, VitaTokenizer
from vita.training.vocab import (
    base_tokenizer_from_corpus,
    chinese_lines,
    extend_tokenizer,
    extend_vocabulary,
    spelling,
    train_chinese_model,
)

MIXED = "今天北京的天气怎么样？ It is sunny in Beijing this morning. 图片里有三个苹果。 <image>\n<3>12 plus 30 is 42."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> VitaTokenizer:
    return base_tokenizer_from_corpus(tmp_path_factory.mktemp("tok") / "base.model", 1024)


@pytest.fixture(scope="module")
def extended(base):
    model = th.micro_model(base.vocab_size, seed=3)
    before = {"embed": model.get_input_embeddings().weight.detach().clone(),
              "head": model.lm_head.weight.detach().clone()}
    extension = extend_vocabulary(model, base, bilingual_corpus(), sp_vocab_size=600)
    return model, extension, before


def test_the_base_is_english_only_and_spells_chinese_in_bytes(base):
    assert base.vocab_size == 1024
    assert len(base.encode("天气")) == 6  # three UTF-8 bytes per character


def test_old_rows_unchanged_and_new_rows_are_the_mean_of_their_spelling(base, extended):
    model, extension, before = extended
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    n = extension.base_size
    assert embed.shape[0] == head.shape[0] == model.config.vocab_size == extension.vocab_size > n
    assert torch.equal(embed[:n], before["embed"]) and torch.equal(head[:n], before["head"])
    for k, piece in enumerate(extension.pieces):
        ids = spelling(base, piece)
        torch.testing.assert_close(embed[n + k], before["embed"][ids].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(head[n + k], before["head"][ids].mean(0), rtol=0, atol=1e-7)
    assert any(len(spelling(base, p)) > 1 for p in extension.pieces)  # real means, not copies


def test_extended_tokenizer_round_trips_and_keeps_base_ids(base, extended):
    _, extension, _ = extended
    tok = extension.tokenizer
    assert tok.vocab_size == extension.vocab_size
    for i in range(0, base.vocab_size, 7):
        assert tok._sp.id_to_piece(i) == base._sp.id_to_piece(i)
    for text in (MIXED, "图片里有几个苹果？", "What colour is the square?", "混合 mixed 文本 text 123"):
        assert tok.decode(tok.encode(text), skip_special=False) == text
    chinese = "今天北京的天气怎么样？图片里有三个苹果。"
    assert len(tok.encode(chinese)) < len(base.encode(chinese)) / 3
    english = "It is sunny in Beijing this morning."
    assert tok.encode(english) == base.encode(english)  # English unchanged
    # the state and placeholder tokens stay single special pieces (text never yields them)
    for symbol in USER_DEFINED_SYMBOLS:
        assert tok.id_of(symbol) == base.id_of(symbol) and tok.is_special(tok.id_of(symbol))
        assert tok.encode_segments([Special(symbol)]) == [tok.id_of(symbol)]


def test_the_model_runs_on_new_ids(extended):
    model, extension, _ = extended
    ids = torch.tensor([extension.tokenizer.encode("今天北京的天气怎么样？")])
    assert int(ids.max()) >= extension.base_size
    assert model(ids).logits.shape == (1, ids.shape[1], extension.vocab_size)


def test_target_size_is_exact_and_characters_come_first(base):
    zh = train_chinese_model(chinese_lines(bilingual_corpus()), 600)
    full = extend_tokenizer(base, zh)
    chars = [p for p in full.pieces if len(p) == 1]
    target = base.vocab_size + len(chars) + 5
    cut = extend_tokenizer(base, zh, target_vocab_size=target)
    assert cut.tokenizer.vocab_size == target
    assert set(chars) <= set(cut.pieces)  # no merge without its characters
    text = "今天北京的天气怎么样？"
    assert cut.tokenizer.decode(cut.tokenizer.encode(text)) == text
    with pytest.raises(InvalidInputError, match="new pieces"):
        extend_tokenizer(base, zh, target_vocab_size=base.vocab_size + len(full.pieces) + 1)


def test_special_symbols_are_added_when_the_base_lacks_them(tmp_path):
    """A plain base (as Mixtral's has no <image>/<1>...) gets VITA's symbols as single pieces first."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the square is red"] * 50 + ["what colour"] * 50),
                                   model_writer=buffer, model_type="bpe", vocab_size=300, hard_vocab_limit=False,
                                   byte_fallback=True, minloglevel=2)
    plain = VitaTokenizer(buffer.getvalue())
    assert not plain.has_piece("<image>")
    extension = extend_tokenizer(plain, train_chinese_model(["你好世界"] * 20, 50))
    assert extension.pieces[: len(USER_DEFINED_SYMBOLS)] == list(USER_DEFINED_SYMBOLS)
    tok = extension.tokenizer
    for symbol in USER_DEFINED_SYMBOLS:
        assert tok.is_special(tok.id_of(symbol))
        ids = tok.encode_segments(["what", Special(symbol), "colour"])
        assert ids.count(tok.id_of(symbol)) == 1
        assert tok.id_of(symbol) not in tok.encode(f"what{symbol}colour")  # typed, it stays text
