"""Training checkpoints: everything an exact resume needs, written atomically.

    <output_dir>/checkpoints/step-000300/
        model/            config.json, HF-named safetensors, tokenizer.model (a model directory: exportable)
        trainer.pt        step, optimizer (full, keyed by parameter name), scheduler, data cursor, config
        rng-rank{r}.pt    Python, NumPy and torch (CPU and CUDA) RNG states of each rank
    <output_dir>/checkpoints/latest   the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when complete, then `latest` is replaced (also by
rename), so a run killed at any moment leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vita.errors import CheckpointError
from vita.model.checkpoint import save_sharded
from vita.model.config import VitaConfig
from vita.model.hf_names import llm_state_dict_to_hf
from vita.processing.tokenizer import VitaTokenizer

log = logging.getLogger("vita.training")

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def save_model_dir(directory: Path, state: dict[str, torch.Tensor], config: VitaConfig, tokenizer: VitaTokenizer,
                   *, max_shard_bytes: int = 2 << 30) -> None:
    """What `VitaForCausalLM.save_pretrained` writes, from a (possibly gathered) state dict."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory)
    save_sharded(llm_state_dict_to_hf(state), directory, max_shard_bytes=max_shard_bytes)
    tokenizer.save(directory)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = max(1, keep)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / "trainer.pt").is_file():
                return path
        steps = sorted((p for p in self.root.glob("step-*") if _STEP_DIR.match(p.name)), key=lambda p: int(p.name[5:]))
        found = [p for p in steps if (p / "trainer.pt").is_file()]
        for broken in steps[steps.index(found[-1]) + 1 if found else 0:]:
            log.warning("checkpoint %s is incomplete (no trainer.pt): %s", broken,
                        f"resuming from {found[-1].name}" if found else "no complete checkpoint before it",
                        extra={"checkpoint": str(broken)})
        return found[-1] if found else None

    def staging(self, step: int) -> Path:
        """A fresh temporary directory for step `step` (rank 0 fills it, then calls `commit`)."""
        path = self.root / f".step-{step:06d}.tmp"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, step: int) -> Path:
        final = self.root / f"step-{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        tmp = self.root / ".latest.tmp"
        tmp.write_text(final.name + "\n")
        os.replace(tmp, self.root / "latest")
        for old in sorted((p for p in self.root.glob("step-*") if _STEP_DIR.match(p.name)),
                          key=lambda p: int(p.name[5:]))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_trainer_state(path: Path) -> dict[str, Any]:
        return _load_pt(path / "trainer.pt", "the trainer state")

    @staticmethod
    def load_rng(path: Path, rank: int) -> dict[str, Any] | None:
        file = path / f"rng-rank{rank}.pt"
        return _load_pt(file, "the random state") if file.is_file() else None


def _load_pt(file: Path, what: str) -> Any:
    """torch.load of a checkpoint file; raises CheckpointError naming it when it is unreadable or corrupt (torch
    raises anything from OSError to ValueError or pickle's errors on a damaged file)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged pickle raises any type
        raise CheckpointError(f"{file}: cannot read {what}: corrupt or not a checkpoint ({type(e).__name__}: "
                              f"{e})") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drops metrics lines after `step` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a line cut off by the kill: everything after it is gone too
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
