"""Small models, tokenizers and samples for the training tests (media made on the spot, no download)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vita.model.config import AudioConfig, LLMConfig, VisionConfig, VitaConfig
from vita.model.vita import VitaForCausalLM
from vita.processing.audio import write_wav
from vita.processing.corpus import build_tiny_tokenizer
from vita.processing.tokenizer import VitaTokenizer
from vita.training.sample import Sample


@functools.cache
def _tokenizer_bytes(vocab_size: int) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(tmp, vocab_size=vocab_size)
        return Path(tmp, "tokenizer.model").read_bytes()


def tokenizer(vocab_size: int = 1024) -> VitaTokenizer:
    """The built-in bilingual tokenizer at a small size (trained once per process)."""
    return VitaTokenizer(_tokenizer_bytes(vocab_size))


def micro_config(vocab_size: int) -> VitaConfig:
    """Smaller than the tiny preset: every structural rule kept, a forward+backward in tens of milliseconds."""
    return VitaConfig(
        llm=LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=2048),
        vision=VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        audio=AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          subsampling_channels=8),
    )


def micro_model(vocab_size: int, seed: int = 0) -> VitaForCausalLM:
    torch.manual_seed(seed)
    return VitaForCausalLM(micro_config(vocab_size))


def write_model(directory: Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """A micro model directory (config, safetensors, tokenizer) that `init.model` can start from."""
    tok = tokenizer(vocab_size)
    micro_model(tok.vocab_size, seed).save_pretrained(directory, tokenizer=tok)
    return directory


def write_image(path: Path, seed: int, size: tuple[int, int] = (448, 448)) -> str:
    if path.is_file():
        return str(path)
    r = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in r.integers(150, 255, 3)))
    x, y = (int(v) for v in r.integers(0, 200, 2))
    ImageDraw.Draw(img).rectangle((x, y, x + 120, y + 120), fill=tuple(int(c) for c in r.integers(0, 150, 3)))
    img.save(path)
    return str(path)


def write_tone(path: Path, seconds: float, freq: float = 440.0) -> str:
    if path.is_file():
        return str(path)
    t = np.arange(int(seconds * 16000)) / 16000
    write_wav(path, (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32))
    return str(path)


def text(question: str, answer: str, **kw) -> Sample:
    return Sample("text", [{"role": "user", "content": question}, {"role": "bot", "content": answer}], **kw)


def mixed_samples(tmp: Path, n_text: int = 6) -> list[Sample]:
    """Text, image and audio samples (and one video-free two-turn conversation), media written under `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    samples = [text(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in
               [(1, 2), (3, 4), (10, 20), (7, 8), (12, 30), (5, 5), (9, 1), (2, 2)][:n_text]]
    samples.append(Sample("image", [{"role": "user", "content": "<image>\nWhat colour is the square?"},
                                    {"role": "bot", "content": "The square is red."}],
                          images=[write_image(tmp / "a.png", 1)]))
    samples.append(Sample("asr", [{"role": "user", "content": "<audio>Transcribe the speech."},
                                  {"role": "bot", "content": "hello there"}],
                          audio=[write_tone(tmp / "a.wav", 1.3)]))
    samples.append(Sample("text", [{"role": "user", "content": "Hello!"}, {"role": "bot", "content": "Hi."},
                                   {"role": "user", "content": "今天北京的天气怎么样？"},
                                   {"role": "bot", "content": "今天北京是晴天。"}]))
    return samples


def write_manifest(path: Path, samples: list[Sample]) -> Path:
    """JSONL with absolute media paths (the manifest format of `vita.training.data`)."""
    with path.open("w") as f:
        for s in samples:
            f.write(json.dumps({"kind": s.kind, "conversation": s.conversation, "images": s.images,
                                "video": s.video, "audio": s.audio, "state": s.state}, ensure_ascii=False) + "\n")
    return path
