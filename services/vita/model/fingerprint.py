"""Which model a replica serves, as a short digest every process of a deployment can compare.

The orchestrator tokenizes prompts and places embeddings for its own model; the llm workers decode token ids and
the encoders make embeddings for theirs. If a pool runs another model (a rolling upgrade half done, a values file
pointing one pool elsewhere), every answer is garbage without any error. So each job carries the orchestrator's
fingerprint and a worker that serves another model refuses it with FAILED_PRECONDITION, naming both.

The digest covers what makes two repositories interchangeable: with the manifest `vita export` writes, the sha256
of every file it lists (the weights included, read from the manifest, not hashed again); without one (a directory
from `vita init-tiny`, a Hugging Face download), config.json, the tokenizer files and the weight files: whole when
they hold at most FULL_HASH_BYTES together (a tiny model: a fraction of a second), else only each one's name and
safetensors header (names, dtypes, shapes, offsets; hashing the values of a full-size model takes minutes), so two
full-size checkpoints of the same shapes without a manifest are not told apart.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

MANIFEST = "manifest.json"  # what `vita export` writes (vita.training.export.MANIFEST)
_CONTENT = ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json")
FULL_HASH_BYTES = 1 << 30


def model_fingerprint(model_dir: str | Path) -> str:
    """16 hex digits naming the model in `model_dir` (see the module's docstring for what they cover). Raises
    OSError when the directory cannot be read."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    manifest = root / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        if isinstance(files, dict) and files:
            for name in sorted(files):
                entry = files[name]
                digest.update(f"{name}\0{entry.get('sha256', '') if isinstance(entry, dict) else entry}\n".encode())
            return digest.hexdigest()[:16]
    for name in _CONTENT:
        if (path := root / name).is_file():
            digest.update(f"{name}\0".encode() + path.read_bytes() + b"\n")
    weights = sorted(root.glob("*.safetensors"))
    whole = sum(p.stat().st_size for p in weights) <= FULL_HASH_BYTES
    for path in weights:
        digest.update(f"{path.name}\0".encode() + (file_sha256(path).encode() if whole else _safetensors_header(path))
                      + b"\n")
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB pieces (hex): what an export manifest lists for each file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets), read without the data."""
    with path.open("rb") as f:
        size = f.read(8)
        if len(size) < 8:
            return b""
        (length,) = struct.unpack("<Q", size)
        return f.read(min(length, 100 << 20))


def other_model(wanted: str, served: str, pool: str) -> str | None:
    """None when a job made for model `wanted` may run on a replica of `pool` serving `served` ("" on either side:
    not stated, not checked); else why not, in one line (a FAILED_PRECONDITION message)."""
    if not wanted or not served or wanted == served:
        return None
    return (f"the {pool} pool serves model {served} but the orchestrator sent a job for model {wanted}: every "
            "orchestrator and pool of a deployment must load the same model repository (--model)")
