"""What a stage learns from, recorded when it starts, so that a resume continues only the run it is.

`--resume` continues the newest checkpoint of a stage's output_dir, and a finished stage trains nothing. Both are
right only while the stage's inputs are the ones it started with: its init weights, pretrained encoders, tokenizer,
samples, and the settings that say what it learns (which parameters train, the data's order and packing, the
spoken questions). After an upstream stage or a stand-in encoder was trained again, or the curriculum rebuilt, a resume
would instead export a model of the old inputs. So the first step of a run writes `<output_dir>/inputs.json`, and a
resume compares (`changed_inputs`): the caller refuses, or starts the stage again (`vita train --on-input-change`).

What may change on a resume, as before: the optimisation (rates, schedule, `max_steps` to extend a run, batch
split, precision, threads) and logging. A path's identity is its content's SHA-256 for files up to
`HASHED_BYTES`; larger files (full-size weights) count by size and modification time, so that checking a 100 GB
checkpoint costs no read of it. The media the samples name are not read: a rebuilt curriculum rewrites its
manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vita.model.fingerprint import file_sha256
from vita.training.config import StageConfig
from vita.training.sample import Sample

RECORD = "inputs.json"
ON_INPUT_CHANGE = ("error", "restart")  # what a resume does when they changed (`vita train --on-input-change`)
HASHED_BYTES = 64 << 20
# StageConfig fields that may change between a run and its resume (dotted for nested ones).
# The manifests and `data.repeat` count through the samples they give (`samples_identity`), not as settings.
RESUMABLE = {"max_steps", "save_every", "keep_checkpoints", "log_every", "output_dir", "tensorboard", "threads",
             "progress", "precision", "fsdp", "optim", "data.micro_batch_size", "data.grad_accum",
             "data.media_cache", "data.max_length", "data.manifests", "data.repeat"}
# Settings that name input paths: they count by what they hold (`path_identity`), not by where they are.
PATH_FIELDS = {"init.model", "init.tokenizer", "init.vision_encoder", "init.audio_encoder", "vocab.text_files"}


def stage_inputs(config: StageConfig, samples: Sequence[Sample]) -> dict[str, str]:
    """Flat `{name: identity}` of everything the stage learns from: each input path (`init.model`,
    `init.vision_encoder`, ...) as `path_identity` gives it, the samples as `samples_identity` gives them (the
    manifests and `data.repeat` read), and each other setting outside `RESUMABLE` as its JSON."""
    paths = {"init.model": config.init.model, "init.tokenizer": config.init.tokenizer,
             "init.vision_encoder": config.init.vision_encoder, "init.audio_encoder": config.init.audio_encoder,
             **{f"vocab.text_files[{i}]": p for i, p in enumerate(config.vocab.text_files)}}
    inputs = {name: path_identity(Path(path)) for name, path in paths.items() if path}
    inputs["samples"] = samples_identity(samples)
    inputs.update({f"config.{k}": json.dumps(v, sort_keys=True) for k, v in _settings(config.to_dict()).items()})
    return inputs


def samples_identity(samples: Sequence[Sample]) -> str:
    """`sha256:<hex>` over every sample's fields in order (not the media files they name)."""
    total = hashlib.sha256()
    for sample in samples:
        fields = dataclasses.asdict(sample)
        fields.pop("origin")
        total.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return f"sha256:{total.hexdigest()}"


def path_identity(path: Path) -> str:
    """One file's or a directory tree's identity: `sha256:<hex>` over the (relative name, content digest) of
    every file, a large file's digest being its size and mtime; `absent` for a path that does not exist (a Hugging
    Face repository name, say)."""
    if not path.exists():
        return "absent"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = hashlib.sha256()
    for file in files:
        total.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        total.update(_file_digest(file).encode() + b"\n")
    return f"sha256:{total.hexdigest()}"


def _file_digest(file: Path) -> str:
    stat = file.stat()
    if stat.st_size > HASHED_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    return file_sha256(file)


def _settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config's leaves and sub-dicts outside `RESUMABLE` and `PATH_FIELDS`, by dotted name."""
    kept = {}
    for key, value in config.items():
        name = prefix + key
        if name in RESUMABLE or name in PATH_FIELDS:
            continue
        if isinstance(value, dict) and name in ("init", "data", "vocab", "spoken"):
            kept.update(_settings(value, name + "."))
        else:
            kept[name] = value
    return kept


def record_inputs(output_dir: Path, inputs: dict[str, str]) -> None:
    """Written by the main rank when a run starts from its init (not on a resume)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
    tmp.rename(output_dir / RECORD)


def changed_inputs(output_dir: Path, inputs: dict[str, str]) -> list[str] | None:
    """The names whose identity differs from the record (added and removed ones too), sorted; None when the run
    has no record (started before runs recorded their inputs): nothing to compare with."""
    path = output_dir / RECORD
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    return sorted(k for k in recorded.keys() | inputs.keys() if recorded.get(k) != inputs.get(k))


def clear_run(output_dir: Path) -> None:
    """What a run wrote in `output_dir` (checkpoints, the final model, metrics, the inputs' record), for a run that
    starts again; the synthesised-speech cache (`media/`, keyed by content) stays."""
    for name in ("checkpoints", "final", ".final.tmp", "tensorboard"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", RECORD):
        (output_dir / name).unlink(missing_ok=True)
