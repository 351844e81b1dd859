"""Where a model runs: the device and dtype names every service's `--device`/`--dtype` takes, checked once at
start-up so that a device torch cannot use is a one-line error, not an assertion deep in a `.to()`."""

from __future__ import annotations

import torch

from vita.errors import InvalidInputError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`name` as a torch device ("cpu", "cuda", "cuda:1"; "auto": the first CUDA device when torch sees one, else the
    CPU). Raises InvalidInputError for a name torch does not parse or a CUDA device this torch cannot reach."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InvalidInputError(f"device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {name!r}: torch sees no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A name of TORCH_DTYPES, or "auto": bfloat16 on CUDA, float32 elsewhere (bf16 matmuls are slow on CPUs
    without AMX). Raises InvalidInputError for another name."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in TORCH_DTYPES:
        raise InvalidInputError(f"dtype must be auto or one of {', '.join(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]
