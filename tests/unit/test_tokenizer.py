import io
import random

import pytest
import sentencepiece as spm

from vita.errors import CheckpointError, InvalidInputError
from vita.model.config import VitaConfig
from vita.processing.corpus import bilingual_corpus, build_tiny_tokenizer
from vita.processing.tokenizer import IncrementalDecoder, Special, VitaTokenizer, train_tokenizer

TEXTS = [
    "What colour is the red circle?",
    "这个三角形是什么颜色的？",
    "The star is gold. 这个星形是金色的。 17加35等于52。",
    "  two spaces, a tab\tand\na newline ",
    "龘鑫 unseen characters and an emoji 🦊",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = train_tokenizer(bilingual_corpus(400), tmp_path_factory.mktemp("tok") / "tokenizer.model", 700)
    return VitaTokenizer.from_file(path)


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """A plain SentencePiece model as Llama/Mixtral ship it: dummy prefix, no VITA pieces."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(bilingual_corpus(200)), model_writer=buffer, model_type="bpe", vocab_size=500,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, num_threads=1, minloglevel=2,
    )
    return VitaTokenizer(buffer.getvalue(), source="llama-style")


def test_special_tokens_have_fixed_single_ids(tok):
    assert (tok.id_of("<unk>"), tok.bos_id, tok.eos_id) == (0, 1, 2)
    singles = {"<image>": tok.image_id, "<video>": tok.video_id, "<audio>": tok.audio_id, **tok.state_ids}
    assert list(tok.state_ids) == ["<1>", "<2>", "<3>"]
    assert len(set(singles.values())) == 6 and not set(singles.values()) & {0, 1, 2}
    for piece, token_id in singles.items():
        assert tok.encode_segments([Special(piece)]) == [token_id]
        assert tok.encode_segments(["see", Special(piece), "here"]).count(token_id) == 1
    assert tok.encode_segments(["a", Special("</s>"), "b"]) == [*tok.encode("a"), 2, *tok.encode("b")]
    assert tok.encode_segments([Special("</s>")], add_bos=True) == [1, 2]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert 0 not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


def test_unseen_chinese_falls_back_to_bytes(tok):
    assert not tok.has_piece("龘")
    ids = tok.encode("龘")
    assert len(ids) == 3  # U+9F98 is three UTF-8 bytes, one byte piece each
    assert tok.decode(ids) == "龘"


def test_decode_skip_special(tok):
    ids = tok.encode_segments([Special("<1>"), "It is red.", Special("</s>")], add_bos=True)
    assert tok.decode(ids) == "It is red."
    assert tok.decode(ids, skip_special=False) == "<s><1>It is red.</s>"
    # The rendering is for logs: as text, its specials are plain characters.
    rendered = tok.encode(tok.decode(ids, skip_special=False))
    assert not any(tok.is_special(i) for i in rendered) and tok.decode(rendered) == "<s><1>It is red.</s>"


def test_decode_rejects_ids_outside_vocab(tok):
    with pytest.raises(InvalidInputError, match=f"token id {tok.vocab_size} is outside"):
        tok.decode([5, tok.vocab_size])


def _stream(tok, ids, **kw):
    decoder = IncrementalDecoder(tok, **kw)
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert tail == ""
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_holds_partial_characters(tok):
    deltas, _ = _stream(tok, tok.encode("A龘"))
    assert deltas == ["A", "", "", "龘"]


def test_incremental_random_ids(tok):
    """Any id sequence, split bytes and stray specials included, streams to exactly `decode`."""
    r = random.Random(0)
    for _ in range(200):
        ids = [r.randrange(tok.vocab_size) for _ in range(r.randint(1, 12))]
        for skip in (True, False):
            deltas, tail = _stream(tok, ids, skip_special=skip)
            assert "".join(deltas) + tail == tok.decode(ids, skip_special=skip)


def test_llama_style_model_loads_without_vita_pieces(llama_style):
    assert (llama_style.bos_id, llama_style.eos_id) == (1, 2)
    assert not llama_style.has_piece("<image>")
    with pytest.raises(CheckpointError, match="no piece '<image>'"):
        _ = llama_style.image_id


def test_incremental_keeps_leading_spaces_with_dummy_prefix(llama_style):
    """Decoding '▁is' alone gives 'is' under a dummy prefix; in a stream the space must survive."""
    ids = llama_style.encode("The red circle is next to the blue square.")
    deltas, tail = _stream(llama_style, ids)
    assert "".join(deltas) + tail == llama_style.decode(ids) == "The red circle is next to the blue square."


def test_save_and_load(tok, tmp_path):
    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.model"
    loaded = VitaTokenizer.from_file(tmp_path / "model")
    assert loaded.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    with pytest.raises(CheckpointError, match="not found"):
        VitaTokenizer.from_file(tmp_path / "missing")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model"):
        VitaTokenizer.from_file(tmp_path / "bad.model")


def test_training_is_deterministic(tmp_path):
    corpus = bilingual_corpus(300, seed=3)
    a = train_tokenizer(corpus, tmp_path / "a.model", 600).read_bytes()
    assert train_tokenizer(corpus, tmp_path / "b.model", 600).read_bytes() == a


def test_training_rejects_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="empty"):
        train_tokenizer(["", "  "], tmp_path / "x.model", 600)
    with pytest.raises(InvalidInputError, match="vocab_size 200"):
        train_tokenizer(["hello"], tmp_path / "x.model", 200)


def test_corpus_is_deterministic_and_bilingual():
    lines = bilingual_corpus(500, seed=1)
    assert lines == bilingual_corpus(500, seed=1) != bilingual_corpus(500, seed=2)
    assert len(lines) == 500
    chinese = [line for line in lines if any("\u4e00" <= ch <= "\u9fff" for ch in line)]
    english = [line for line in lines if line.isascii()]
    assert len(chinese) > 100 and len(english) > 100


def test_tiny_tokenizer_fills_the_tiny_vocabulary(tmp_path):
    """The tiny LLM samples any id below its vocab_size, so every one of them must decode."""
    vocab_size = VitaConfig.preset("tiny").llm.vocab_size
    tok = build_tiny_tokenizer(tmp_path, vocab_size=vocab_size)
    assert tok.vocab_size == vocab_size
    assert (tmp_path / "tokenizer.model").is_file()
    assert tok.encode("system:") == [tok.id_of("system"), tok.id_of(":")]
