"""The tiny random-weight model used by the demo, the CLI default and the tests: no download needed.

It lives outside `vita.model` because its tokenizer is trained on the built-in corpus of `vita.processing`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vita.model.config import VitaConfig
from vita.model.vita import VitaForCausalLM
from vita.paths import atomic_directory, vita_home
from vita.processing.corpus import build_tiny_tokenizer


def default_tiny_dir() -> Path:
    return vita_home() / "models" / "tiny"


def build_tiny_checkpoint(output: str | Path | None = None, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny preset with seeded random weights and a tokenizer trained on the built-in corpus.

    Published with `atomic_directory`, so a half-written model is never picked up. Returns the directory
    (default `$VITA_HOME/models/tiny`); an existing one is reused unless `overwrite`.
    """
    path = Path(output) if output is not None else default_tiny_dir()
    if path.joinpath("config.json").is_file() and not overwrite:
        return path
    config = VitaConfig.preset("tiny")
    with atomic_directory(path, overwrite=overwrite) as staging:
        tokenizer = build_tiny_tokenizer(staging, vocab_size=config.llm.vocab_size)  # writes tokenizer.model
        torch.manual_seed(seed)
        model = VitaForCausalLM(config)
        model.save_pretrained(staging, tokenizer=tokenizer)
    return path
