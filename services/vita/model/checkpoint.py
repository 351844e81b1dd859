"""Safetensors checkpoints in the Hugging Face layout: one `model.safetensors`, or numbered shards plus
`model.safetensors.index.json`. Every way a directory can be wrong becomes a CheckpointError that names it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vita.errors import CheckpointError, InvalidInputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_SHOWN_NAMES = 5  # per kind of problem; the rest are counted


def save_sharded(
    state_dict: Mapping[str, Tensor], directory: str | Path, *, max_shard_bytes: int = 5 * 10**9
) -> list[Path]:
    """Write `model.safetensors` if everything fits in one shard, else `model-0000i-of-0000N.safetensors` + index.

    Files are written under a temporary name and renamed, so a crash never leaves a half-written shard behind;
    weight files of an earlier save in the other layout are removed so the directory is never ambiguous.
    """
    if max_shard_bytes < 1:
        raise InvalidInputError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = _nbytes(tensor)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    for stale in directory.iterdir():
        if _WEIGHT_FILE.match(stale.name) and stale.name not in names:
            stale.unlink()
    for name, keys in zip(names, shards):
        tensors = {k: state_dict[k].detach().to("cpu").contiguous() for k in keys}
        _atomic_write(directory / name, lambda tmp, tensors=tensors: save_file(tensors, tmp, metadata={"format": "pt"}))
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(map(_nbytes, state_dict.values()))},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
        }
        _atomic_write(directory / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    return [directory / name for name in names]


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`, with the mode a plain open() would give (0666 less the umask):
    safetensors writes 0600, which the uid of another container (Triton, the engine Job) could not read."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)  # read by setting; set back at once
    os.umask(mask)
    return mask


def load_sharded(directory: str | Path, *, keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """All tensors of a directory in either layout (the index wins when both exist, as in transformers).

    `keep`: read only the tensors whose names it accepts; a shard holding none of them is not opened.
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if keep is None or keep(key):
                by_shard.setdefault(shard, []).append(key)
        tensors: dict[str, Tensor] = {}
        for shard, keys in by_shard.items():
            if not (directory / shard).is_file():
                raise CheckpointError(f"{index_path} names shard {shard}, which does not exist in {directory}")
            loaded = _load_file(directory / shard, None if keep is None else set(keys).__contains__)
            absent = [k for k in keys if k not in loaded]
            if absent:
                raise CheckpointError(
                    f"{directory / shard} lacks {_names(absent)} that {INDEX_FILE} assigns to it"
                )
            tensors.update((k, loaded[k]) for k in keys)
        return tensors
    if (directory / SINGLE_FILE).is_file():
        return _load_file(directory / SINGLE_FILE, keep)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory" if not directory.exists() else
                              f"{directory}: a file, not a checkpoint directory")
    raise CheckpointError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def _load_file(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    try:
        if keep is None:
            return load_file(path)
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in filter(keep, f.keys())}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def validate_state_dict(expected: Mapping[str, Tensor], loaded: Mapping[str, Tensor]) -> None:
    """Raise one CheckpointError listing every missing, unexpected, mis-shaped and mis-typed tensor.

    Floating-point tensors may differ in precision (a bf16 checkpoint loads into an fp32 model by casting);
    any other dtype difference (say int64 where a float is expected) is an error.
    """
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    common = sorted(expected.keys() & loaded.keys())
    shapes = [
        f"{k} (expected {tuple(expected[k].shape)}, got {tuple(loaded[k].shape)})"
        for k in common
        if expected[k].shape != loaded[k].shape
    ]
    dtypes = [
        f"{k} (expected {expected[k].dtype}, got {loaded[k].dtype})"
        for k in common
        if expected[k].dtype != loaded[k].dtype
        and not (expected[k].dtype.is_floating_point and loaded[k].dtype.is_floating_point)
    ]
    problems = [
        f"{len(items)} {kind}: {_names(items)}"
        for kind, items in (
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("wrong shapes", shapes),
            ("wrong dtypes", dtypes),
        )
        if items
    ]
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))


def load_pretrained_encoder(encoder: nn.Module, directory: str | Path, *, prefix: str, what: str) -> None:
    """Loads a pretrained encoder's weights into `encoder`, written bare (ours) or under `prefix` (the source
    project's checkpoint: InternVL's `vision_model.`, WeNet's `encoder.`), whose other tensors are ignored.

    Raises `CheckpointError`, starting with `what` (the config key that named `directory`), when the directory is
    not a checkpoint or a tensor is missing, extra or of another shape.
    """
    try:
        tensors = load_sharded(directory)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    own = encoder.state_dict()
    try:
        validate_state_dict(own, tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{what} {directory} does not fit this model's encoder: "
                              f"{str(e).removeprefix('checkpoint does not match the model: ')}") from None
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_NAMES])
    return shown if len(items) <= _SHOWN_NAMES else f"{shown} and {len(items) - _SHOWN_NAMES} more"

