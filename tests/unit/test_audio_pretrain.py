"""The stand-in audio pretraining: utterances labelled with their words and language, never the curriculum's chatter;
a loss that falls; weights (CMVN included) in WeNet's names that load by name, and a wrong checkpoint named."""

from __future__ import annotations

import json

import pytest
import torch

from vita.errors import CheckpointError
from vita.model.audio import AudioEncoder
from vita.model.checkpoint import load_sharded
from vita.model.config import VitaConfig
from vita.training import curriculum as cur
from vita.training.audio_pretrain import (
    IGNORE,
    INTENTS,
    LANGUAGES,
    AudioPretrainConfig,
    draw_utterances,
    labels_for,
    load_audio_encoder,
    pretrain_audio_encoder,
    vocabulary,
)

AUDIO = VitaConfig.preset("tiny-224").audio


def test_utterances_are_seeded_cover_the_questions_and_never_the_curriculums_chatter() -> None:
    drawn = draw_utterances(3000, seed=5, noise_share=0.1)
    assert drawn == draw_utterances(3000, seed=5, noise_share=0.1) != draw_utterances(3000, seed=6, noise_share=0.1)
    texts = {t for t, _, _ in drawn}
    chatter = {p for phrases in cur.CHATTER.values() for p in phrases}
    assert not texts & chatter
    assert {q for qs in cur.SPOKEN_IMAGE.values() for q in qs} <= texts
    heldout_sums = {f"what is {cur.NUMBER_WORDS[a]} plus {cur.NUMBER_WORDS[b]}"
                    for a, b in cur._split_sums("heldout", cur.CurriculumSizes())}
    assert not texts & heldout_sums  # the curriculum's held-out sums stay unheard
    assert {lang for _, _, lang in drawn} == set(LANGUAGES)
    assert all((t == "") == (lang == "none") for t, _, lang in drawn)

    vocab = vocabulary()
    labels = labels_for([("what colour is the shape", "en-m", "en"), ("", "", "none"),
                         ("ich habe keine Zeit", "de", "de"), ("what is two plus three", "en-f", "en"),
                         ("the red cup is on the dog", "en-gb", "en")], vocab)
    words = labels["words"]
    assert {vocab[k] for k in words[0].nonzero().flatten().tolist()} == {"what", "colour", "is", "the", "shape"}
    assert words[1:3].sum() == 0  # noise and other languages spot no English word
    assert [LANGUAGES[k] for k in labels["language"]] == ["en", "none", "de", "en", "en"]
    assert [INTENTS[k] if k != IGNORE else None for k in labels["intent"]] == ["colour", None, None, "sum", "statement"]


def test_pretraining_lowers_the_loss_writes_wenet_names_with_the_cmvn_and_is_reused(tmp_path) -> None:
    config = AudioPretrainConfig(clips=48, steps=40, batch_size=8, lr=5e-3, probe_clips=12, log_every=10, threads=2)
    summary = pretrain_audio_encoder(config, tmp_path / "enc", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "enc" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0  # nats: the bag-of-words softmax starts near ln(186)
    assert set(summary["heldout"]) == {"word_recall", "intent", "language", "speaker"}  # the recipe's four heads
    info = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert info["audio"]["hidden_size"] == AUDIO.hidden_size and info["pretraining"]["key"] == config.key()

    saved = load_sharded(tmp_path / "enc")
    assert "encoders.0.self_attn.linear_pos.weight" in saved and "embed.conv1.weight" in saved
    assert float(saved["global_cmvn.istd"].std()) > 0  # fitted on the recordings, not the identity
    encoder = AudioEncoder(AUDIO)
    load_audio_encoder(encoder, tmp_path / "enc")
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    stamp = (tmp_path / "enc" / "model.safetensors").stat().st_mtime_ns
    assert pretrain_audio_encoder(config, tmp_path / "enc", progress=False) == summary
    assert (tmp_path / "enc" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained


def test_the_speaker_head_labels_query_voices_apart_and_off_keeps_the_key_of_encoders_before_it(tmp_path) -> None:
    """`speaker_head` (the recipe): 0 for the curriculum's query voices, 1 for any other, noise ignored; off, the key
    is the one encoders trained before the head carry, so they are reused, and the probe scores three heads."""
    from vita.training import curriculum as cur
    from vita.training.audio_pretrain import IGNORE, labels_for, vocabulary

    utterances = [("what colour is it", cur.QUERY_VOICES[0], "en"), ("what colour is it", "en-m-low", "en"),
                  ("ich habe keine Zeit", "de", "de"), ("", "", "none")]
    assert labels_for(utterances, vocabulary())["speaker"].tolist() == [0, 1, 1, IGNORE]
    assert AudioPretrainConfig().key()["speaker_head"] is True
    assert "speaker_head" not in AudioPretrainConfig(speaker_head=False).key()
    config = AudioPretrainConfig(clips=32, steps=4, batch_size=8, probe_clips=12, log_every=2, threads=2,
                                 speaker_head=False)
    summary = pretrain_audio_encoder(config, tmp_path / "enc", progress=False)
    assert set(summary["heldout"]) == {"word_recall", "intent", "language"}


def test_a_checkpoint_that_does_not_fit_is_named(tmp_path) -> None:
    from vita.model.checkpoint import save_sharded
    from vita.model.config import AudioConfig

    save_sharded(AudioEncoder(AudioConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=128, subsampling_channels=16)).state_dict(), tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"init\.audio_encoder .* wrong shapes: "):
        load_audio_encoder(AudioEncoder(AUDIO), tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"init\.audio_encoder"):
        load_audio_encoder(AudioEncoder(AUDIO), tmp_path / "nowhere")


@pytest.mark.parametrize("command", ["pretrain-vision", "pretrain-audio"])
def test_the_cli_defaults_are_the_configs(command) -> None:
    """`make train-tiny` runs the commands with their defaults: they must be the configs' (whose key decides reuse)."""
    from vita import cli
    from vita.training.vision_pretrain import VisionPretrainConfig

    parser = cli.build_parser()
    args = parser.parse_args([command, "--output", "x"])
    config = VisionPretrainConfig() if command == "pretrain-vision" else AudioPretrainConfig()
    for name in ("steps", "batch_size", "lr", "seed", "data_seed", "preset"):
        assert getattr(args, name) == getattr(config, name), name
    if command == "pretrain-audio":
        assert args.speaker_head == config.speaker_head is True
        assert not parser.parse_args([command, "--output", "x", "--no-speaker-head"]).speaker_head
    assert getattr(args, "pictures" if command == "pretrain-vision" else "clips") == getattr(
        config, "pictures" if command == "pretrain-vision" else "clips")
    if command == "pretrain-vision":
        from vita.training.vision_pretrain import CLASSIFIED

        assert args.word_shift == config.word_shift and tuple(args.pooled) == config.pooled
        assert dict(args.head_decay_scale) == config.head_decay_scale  # the same heads scaled (none by default)
        pooled = next(a for a in parser._subparsers._group_actions[0].choices[command]._actions if a.dest == "pooled")
        assert tuple(pooled.choices) == CLASSIFIED  # the CLI's copy, kept so that --help imports no torch
