"""`vita export`: a trained checkpoint -> the model repository the serving stack loads.

    REPO/
      config.json                       Hugging Face MixtralConfig fields (what TensorRT-LLM's Mixtral
                                        convert_checkpoint.py and transformers read) + the towers under "vita"
      model-0000i-of-0000N.safetensors  HF Mixtral tensor names (experts per index), towers under
      model.safetensors.index.json      vision_tower.* / audio_tower.* (one model.safetensors when it fits)
      tokenizer.model                   SentencePiece, with tokenizer_config.json and generation_config.json
      triton/tensorrt_llm/config.pbtxt  the Triton model configurations (model_repository/ templates); the
                                        TensorRT-LLM engine goes in triton/tensorrt_llm/1/ once built on a GPU
      training.json                     the last stage's record, when the checkpoint has one
      manifest.json                     format, versions, model summary, and sha256 + size of every file above

`vita serve ... --model REPO` / `vita up --model REPO` load it (`VitaForCausalLM.from_pretrained`), and so does
`transformers.MixtralForCausalLM` for the text model. `verify_repository` (`vita export --verify REPO`) checks
every file against the manifest; a changed or truncated file is a CheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from vita.errors import CheckpointError, InvalidInputError
from vita.model.checkpoint import save_sharded
from vita.model.fingerprint import MANIFEST, file_sha256
from vita.model.vita import VitaForCausalLM, missing_model
from vita.processing.tokenizer import VitaTokenizer

FORMAT = "vita-model-repository"
FORMAT_VERSION = 1
TRITON_DIR = "triton"
TEMPLATES = Path(__file__).resolve().parents[3] / "model_repository"  # the repository's Triton templates
_PACKAGES = ("vita-omni", "torch", "safetensors", "sentencepiece", "numpy")


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory from what a user may point at: the directory itself, a stage's output_dir (its
    `final/`, else its newest checkpoint), or one training checkpoint (`checkpoints/step-N`)."""
    path = Path(path)
    candidates = [path, path / "model", path / "final"]
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        candidates.append(path / "checkpoints" / latest.read_text().strip() / "model")
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if not path.is_dir():
        raise CheckpointError(missing_model(path))
    raise CheckpointError(f"{path}: no model here (expected config.json in it, in model/, in final/, or a "
                          "checkpoints/latest)")


def hf_config(model: VitaForCausalLM) -> dict[str, Any]:
    """MixtralConfig's fields, plus "vita": the towers' configs (ignored by Mixtral readers)."""
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    vita = model.vita_config
    config["vita"] = {"vision": None if vita.vision is None else dataclasses.asdict(vita.vision),
                      "audio": None if vita.audio is None else dataclasses.asdict(vita.audio)}
    return config


def tokenizer_files(tokenizer: VitaTokenizer, directory: Path) -> None:
    """tokenizer.model plus the small JSON files Hugging Face and TensorRT-LLM's scripts look for."""
    tokenizer.save(directory)
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 32768,
    })
    _write_json(directory / "generation_config.json", {"bos_token_id": tokenizer.bos_id,
                                                       "eos_token_id": tokenizer.eos_id})


def export_model(checkpoint: str | Path, output: str | Path, *, max_shard_bytes: int = 5 * 10**9,
                 overwrite: bool = False, templates: str | Path | None = None) -> Path:
    """Writes the repository to a staging directory next to `output`, then renames it into place."""
    source = resolve_checkpoint(checkpoint)
    output = Path(output)
    _check_output(output, Path(checkpoint), source, overwrite)
    templates = Path(templates) if templates is not None else TEMPLATES
    if not templates.is_dir():
        raise InvalidInputError(f"Triton templates not found at {templates} (pass --templates DIR)")
    model = VitaForCausalLM.from_pretrained(source)
    tokenizer = VitaTokenizer.from_file(source)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_json(staging / "config.json", hf_config(model))
        save_sharded(model.hf_state_dict(), staging, max_shard_bytes=max_shard_bytes)
        tokenizer_files(tokenizer, staging)
        shutil.copytree(templates, staging / TRITON_DIR, ignore=shutil.ignore_patterns("*.md", "__pycache__"))
        record = source / "training.json"
        if record.is_file():
            shutil.copy2(record, staging / "training.json")
        _write_json(staging / MANIFEST, _manifest(staging, model, source))
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _check_output(output: Path, checkpoint: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that would destroy what it should not: the checkpoint being exported (or a directory
    holding it), or, with overwrite, an existing directory that is not a repository this command wrote (no
    manifest of FORMAT) and not empty. InvalidInputError naming the problem."""
    resolved = output.resolve()
    for held in (checkpoint.resolve(), source.resolve()):
        if resolved == held or resolved in held.parents:
            raise InvalidInputError(f"--output {output} holds the checkpoint being exported ({held}); write the "
                                    f"repository elsewhere, e.g. {output / 'model'}")
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise InvalidInputError(f"--output {output}: {parent} is a file, not a directory")
    if not output.exists():
        return
    if not output.is_dir():
        raise InvalidInputError(f"--output {output} is a file, not a directory")
    if not overwrite:
        raise InvalidInputError(f"{output} exists: pass --overwrite to replace it")
    try:
        format_ = json.loads((output / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        format_ = None
    if format_ != FORMAT and any(output.iterdir()):
        raise InvalidInputError(f"{output} is not a model repository `vita export` wrote (no {MANIFEST} of "
                                f"format {FORMAT}): --overwrite replaces only those; empty it or choose another "
                                "directory")


def _manifest(directory: Path, model: VitaForCausalLM, source: Path) -> dict[str, Any]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in _PACKAGES},
        "model": {"architecture": "VitaForCausalLM (Mixtral MoE + vision and audio towers)",
                  "vocab_size": model.config.vocab_size, "hidden_size": model.config.hidden_size,
                  "num_hidden_layers": model.config.num_hidden_layers,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "dtype": str(model.lm_head.weight.dtype).removeprefix("torch.")},
        "source": str(source.resolve()),
        "files": {p.relative_to(directory).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                  for p in files},
    }


def verify_repository(directory: str | Path) -> dict[str, Any]:
    """Checks every file the manifest lists (present, same size, same sha256); returns the manifest."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: not an exported model repository") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    for name, entry in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {entry['bytes']}: the file is "
                                  "truncated or was changed after export")
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{file}: sha256 {digest[:12]}... does not match the manifest's "
                                  f"{entry['sha256'][:12]}...: the file is corrupt or was changed after export")
    return manifest


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
