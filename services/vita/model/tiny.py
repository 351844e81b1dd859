"""The tiny random-weight model used by the demo, the CLI default and the tests: no download needed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from vita.model.config import VitaConfig


def vita_home() -> Path:
    """Where local artefacts live: $VITA_HOME, else ~/.cache/vita."""
    return Path(os.environ.get("VITA_HOME") or Path.home() / ".cache" / "vita")


def default_tiny_dir() -> Path:
    return vita_home() / "models" / "tiny"


def build_tiny_checkpoint(output: str | Path | None = None, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny preset with seeded random weights and a tokenizer trained on the built-in corpus.

    Written to a temporary directory first and renamed, so a half-written model is never picked up.
    """
    from vita.model.vita import VitaForCausalLM
    from vita.processing.corpus import build_tiny_tokenizer

    path = Path(output) if output is not None else default_tiny_dir()
    if path.joinpath("config.json").is_file() and not overwrite:
        return path
    config = VitaConfig.preset("tiny")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        tokenizer = build_tiny_tokenizer(staging / "tokenizer", vocab_size=config.llm.vocab_size)
        torch.manual_seed(seed)
        model = VitaForCausalLM(config)
        model.save_pretrained(staging / "model", tokenizer=tokenizer)
        if path.exists():
            shutil.rmtree(path)
        staging.joinpath("model").rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
