"""Bytes on the bus: one protobuf message per stream entry, and tensors as raw little-endian blobs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from google.protobuf.message import DecodeError, Message

from vita.errors import InvalidInputError
from vita.v1.bus_pb2 import TensorBlob

# numpy has no bfloat16: its bits travel as uint16, which is exactly torch's in-memory layout.
_DTYPES: dict[torch.dtype, tuple[int, np.dtype, torch.dtype]] = {
    torch.float32: (TensorBlob.FLOAT32, np.dtype("<f4"), torch.float32),
    torch.float16: (TensorBlob.FLOAT16, np.dtype("<f2"), torch.float16),
    torch.bfloat16: (TensorBlob.BFLOAT16, np.dtype("<u2"), torch.uint16),
}
_BY_CODE = {code: (wire, torch_dtype, view) for torch_dtype, (code, wire, view) in _DTYPES.items()}


class MalformedEntry(ValueError):
    """Bytes no reader can use; retrying cannot help, so consumers dead-letter them at once."""


def encode_entry(message: Message) -> dict[bytes, bytes]:
    """The entry's single field is named by the message type, so a reader can tell types apart and refuse strays."""
    return {message.DESCRIPTOR.full_name.encode(): message.SerializeToString()}


def decode_entry(fields: Mapping[bytes, bytes], types: Iterable[type[Message]]) -> Message:
    by_name = {t.DESCRIPTOR.full_name.encode(): t for t in types}
    if len(fields) != 1:
        raise MalformedEntry(f"a bus entry has exactly one field; got {sorted(fields)}")
    ((name, data),) = fields.items()
    if name not in by_name:
        raise MalformedEntry(f"unexpected message type {name!r}; this stream carries {sorted(by_name)}")
    try:
        return by_name[name].FromString(data)
    except DecodeError as e:
        raise MalformedEntry(f"undecodable {name.decode()}: {e}") from e


def tensor_to_blob(tensor: torch.Tensor) -> TensorBlob:
    if tensor.dtype not in _DTYPES:
        raise InvalidInputError(f"cannot put a {tensor.dtype} tensor on the bus; supported: {list(_DTYPES)}")
    code, wire, view = _DTYPES[tensor.dtype]
    host = tensor.detach().cpu().contiguous().view(view).numpy()
    return TensorBlob(dtype=code, shape=tensor.shape, data=host.astype(wire, copy=False).tobytes())


def blob_to_tensor(blob: TensorBlob) -> torch.Tensor:
    """One copy: the blob's immutable bytes into a writable tensor (torch refuses to alias read-only memory)."""
    if blob.dtype not in _BY_CODE:
        raise MalformedEntry(f"tensor blob has unknown dtype {blob.dtype}")
    wire, torch_dtype, _ = _BY_CODE[blob.dtype]
    shape = tuple(blob.shape)
    if any(d < 0 for d in shape) or len(blob.data) != math.prod(shape) * wire.itemsize:
        raise MalformedEntry(f"tensor blob of shape {shape} x {wire.itemsize} B holds {len(blob.data)} bytes")
    host = np.frombuffer(blob.data, dtype=wire).astype(wire.newbyteorder("="))
    return torch.from_numpy(host).view(torch_dtype).reshape(shape)
