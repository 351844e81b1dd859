"""The weights and tokenizer a stage starts from (when it is not resuming a checkpoint of its own).

- `init.model`: a model directory: the previous stage's `final/`, or at full size a Hugging Face Mixtral directory
  (text only; with `init.preset` the preset's towers are added with seeded random weights).
- `init.preset`: seeded random weights of a preset, with `init.tokenizer`, or (tiny runs) an English-only base
  tokenizer trained on the built-in corpus (`init.base_tokenizer_vocab`).
- `init.vision_encoder`: a pretrained InternViT put into the vision tower (`vision_pretrain.load_vision_encoder`).
- `init.audio_encoder`: a pretrained audio encoder put into the audio tower (`audio_pretrain.load_audio_encoder`).
Then, if the stage says so, stage 1's vocabulary extension, the audio encoder's global CMVN and the
connectors' data-dependent init (`fit_connectors`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vita.errors import CheckpointError
from vita.model.audio import compute_cmvn_stats
from vita.model.config import VitaConfig
from vita.model.vita import VitaForCausalLM
from vita.processing.audio import audio_features, fbank
from vita.processing.image import preprocess_image
from vita.processing.tokenizer import VitaTokenizer
from vita.training.audio_pretrain import load_audio_encoder
from vita.training.config import ConfigError, StageConfig
from vita.training.examples import load_waveform
from vita.training.sample import Sample
from vita.training.vision_pretrain import load_vision_encoder
from vita.training.vocab import base_tokenizer_from_corpus, chinese_lines, extend_vocabulary

log = logging.getLogger("vita.training")

CMVN_CLIPS = 256  # clips the global CMVN statistics are computed from
FIT_ITEMS = 64  # images (or clips) a connector's data-dependent init is computed from


@dataclass
class Initialised:
    model: VitaForCausalLM
    tokenizer: VitaTokenizer
    notes: dict[str, Any] = field(default_factory=dict)


def initial_model(config: StageConfig, samples: Sequence[Sample], work_dir: Path) -> Initialised:
    init = config.init
    notes: dict[str, Any] = {}
    if init.model:
        model = VitaForCausalLM.from_pretrained(init.model)
        if model.vision_tower is None and model.audio_tower is None and init.preset:
            model = _with_towers(model, VitaConfig.preset(init.preset), init.seed)
            notes["towers"] = f"random ({init.preset} preset, seed {init.seed})"
        tokenizer = VitaTokenizer.from_file(init.tokenizer or init.model)
    else:
        vita_config = VitaConfig.preset(init.preset)
        if init.base_tokenizer_vocab:
            tokenizer = base_tokenizer_from_corpus(work_dir / "base-tokenizer.model", init.base_tokenizer_vocab)
        elif init.tokenizer:
            tokenizer = VitaTokenizer.from_file(init.tokenizer)
        else:
            raise ConfigError("init.preset needs init.tokenizer or init.base_tokenizer_vocab")
        vita_config.llm.vocab_size = tokenizer.vocab_size
        torch.manual_seed(init.seed)
        model = VitaForCausalLM(vita_config)
        notes["weights"] = f"random ({init.preset} preset, seed {init.seed})"
    if init.vision_encoder:
        if model.vision_tower is None:
            raise ConfigError("init.vision_encoder: the model has no vision tower")
        load_vision_encoder(model.vision_tower.encoder, init.vision_encoder)
        notes["vision_encoder"] = init.vision_encoder
    if init.audio_encoder:
        if model.audio_tower is None:
            raise ConfigError("init.audio_encoder: the model has no audio tower")
        load_audio_encoder(model.audio_tower.encoder, init.audio_encoder)
        notes["audio_encoder"] = init.audio_encoder
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {model.config.vocab_size} "
                              "embedding rows")
    if config.vocab.enabled:
        extension = extend_vocabulary(model, tokenizer, _vocab_text(config, samples),
                                      sp_vocab_size=config.vocab.sp_vocab_size,
                                      target_vocab_size=config.vocab.target_vocab_size)
        tokenizer = extension.tokenizer
        notes["vocab"] = {"base": extension.base_size, "added": len(extension.pieces),
                          "vocab_size": extension.vocab_size}
    if config.fit_audio_cmvn:
        notes["cmvn_clips"] = fit_cmvn(model, samples)
    if config.fit_connectors:
        notes["fit_connectors"] = fit_connectors(model, samples, config.fit_connectors)
    return Initialised(model, tokenizer, notes)


def _with_towers(text_model: VitaForCausalLM, preset: VitaConfig, seed: int) -> VitaForCausalLM:
    config = VitaConfig(llm=text_model.vita_config.llm, vision=preset.vision, audio=preset.audio)
    torch.manual_seed(seed)
    model = VitaForCausalLM(config)
    missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("vision_tower.", "audio_tower.")) for k in missing)
    return model


def _vocab_text(config: StageConfig, samples: Sequence[Sample]) -> list[str]:
    """Chinese text for the SentencePiece model: the files, the built-in corpus, the stage's conversations."""
    vocab = config.vocab
    lines: list[str] = []
    for name in vocab.text_files:
        try:
            with open(name, encoding="utf-8") as f:
                lines += [line.rstrip("\n") for line, _ in zip(f, range(vocab.max_sentences))]
        except OSError as e:
            raise ConfigError(f"vocab.text_files: cannot read {name} ({e.strerror})") from None
    if vocab.builtin_corpus:
        from vita.processing.corpus import bilingual_corpus

        lines += bilingual_corpus(20_000)
    if vocab.from_data:
        lines += [turn["content"] for s in samples for turn in s.conversation]
    return chinese_lines(lines)[: vocab.max_sentences]


@torch.no_grad()
def fit_cmvn(model: VitaForCausalLM, samples: Sequence[Sample], max_clips: int = CMVN_CLIPS) -> int:
    """The audio encoder's global CMVN from the training audio (first clips in manifest order), as WeNet computes
    it before training an encoder; returns how many clips it used."""
    if model.audio_tower is None:
        raise ConfigError("fit_audio_cmvn: the model has no audio tower")
    refs = [ref for s in samples for ref in s.audio][:max_clips]
    if not refs:
        raise ConfigError("fit_audio_cmvn: the training data has no audio")
    audio_config = model.vita_config.audio
    batches = [fbank(load_waveform(ref), None, audio_config) for ref in refs]
    model.audio_tower.encoder.global_cmvn.set_stats(*compute_cmvn_stats(batches))
    return len(refs)


@torch.no_grad()
def fit_connector_output(linear: nn.Linear, outputs: Tensor, target_norm: float | Tensor) -> None:
    """Data-dependent init of a connector's last layer: its outputs (N, hidden) centred and rescaled so that their
    mean norm is `target_norm` (the token embeddings' norm).

    A random tower's outputs share a large common component and are several times smaller than the token
    embeddings (tiny preset: vision 8.1 with 7.7 common, audio ~5x smaller), so what tells one input from
    another is drowned in the residual stream; recentring and rescaling, as LSUV-style inits do (Mishkin & Matas,
    "All you need is a good init", 2016), lets the LLM pick it up in tens of steps instead of hundreds.
    """
    mean = outputs.mean(0)
    scale = target_norm / (outputs - mean).norm(dim=-1).mean().clamp_min(1e-8)
    linear.bias.sub_(mean).mul_(scale)
    linear.weight.mul_(scale)


@torch.no_grad()
def fit_connectors(model: VitaForCausalLM, samples: Sequence[Sample], which: Sequence[str],
                   max_items: int = FIT_ITEMS) -> dict[str, int]:
    """`fit_connector_output` for each connector in `which` ("vision", "audio") on the first `max_items` images
    (or video frames) and audio clips of the training data; returns how many items each fit used."""
    target = model.get_input_embeddings().weight.norm(dim=-1).mean()
    used: dict[str, int] = {}
    for name in which:
        if name == "vision":
            if model.vision_tower is None:
                raise ConfigError("fit_connectors: the model has no vision tower")
            paths = [p for s in samples for p in s.images][:max_items]
            if not paths:
                raise ConfigError("fit_connectors: vision needs images in the training data")
            pixels = torch.cat([preprocess_image(p, model.vita_config.vision) for p in paths])
            outputs = model.vision_tower(pixels).flatten(0, 1)
            fit_connector_output(model.vision_tower.connector.fc2, outputs, target)
            used[name] = len(paths)
        elif name == "audio":
            if model.audio_tower is None:
                raise ConfigError("fit_connectors: the model has no audio tower")
            refs = [ref for s in samples for ref in s.audio][:max_items]
            if not refs:
                raise ConfigError("fit_connectors: audio needs audio clips in the training data")
            features = audio_features([load_waveform(ref) for ref in refs], model.vita_config.audio)
            outputs = torch.cat(model.audio_tower.encode_features(features))
            fit_connector_output(model.audio_tower.connector.linear_2, outputs, target)
            used[name] = len(refs)
        else:
            raise ConfigError(f"fit_connectors: unknown connector {name!r} (vision, audio)")
    return used


def describe(model: VitaForCausalLM) -> dict[str, Any]:
    config = dataclasses.asdict(model.vita_config.llm)
    return {"vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
            "parameters": sum(p.numel() for p in model.parameters())}
