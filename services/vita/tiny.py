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


def existing_tiny_checkpoint(output: str | Path | None = None) -> Path | None:
    """The tiny model directory `build_tiny_checkpoint(output)` would reuse, or None when it would write one."""
    path = Path(output) if output is not None else default_tiny_dir()
    return path if path.joinpath("config.json").is_file() else None


def build_tiny_checkpoint(output: str | Path | None = None, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny preset with seeded random weights and a tokenizer trained on the built-in corpus.

    Published with `atomic_directory`, so a half-written model is never picked up. Returns the directory
    (default `$VITA_HOME/models/tiny`); an existing one is reused unless `overwrite`.
    """
    if not overwrite and (existing := existing_tiny_checkpoint(output)) is not None:
        return existing
    path = Path(output) if output is not None else default_tiny_dir()
    config = VitaConfig.preset("tiny")
    with atomic_directory(path, overwrite=overwrite) as staging:
        tokenizer = build_tiny_tokenizer(staging, vocab_size=config.llm.vocab_size)  # writes tokenizer.model
        torch.manual_seed(seed)
        model = VitaForCausalLM(config)
        model.save_pretrained(staging, tokenizer=tokenizer)
    return path
