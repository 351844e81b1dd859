"""The encoder interface: how one media item becomes tower input, and one forward over many inputs.

The Redis worker (`worker.py`) and the KServe v2 port (`kserve.py`) are two front doors to the same `Encoder`;
`audio.py` and `vision.py` are the two towers behind it. The helpers here are what both towers' input checks share.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import torch

from vita.bus.codec import MalformedEntry, blob_to_tensor
from vita.bus.streams import Pool
from vita.errors import CheckpointError, InvalidInputError
from vita.model.placement import resolve_device, resolve_dtype
from vita.model.vita import load_tower
from vita.telemetry.metrics import Metrics
from vita.v1.bus_pb2 import EncodeJob, MediaItem, TensorBlob

T = TypeVar("T")


class Encoder(ABC):
    """A tower behind a pool. `prepare`/`from_v2` run per job on the CPU, so bad media fail alone; `forward` runs
    once for the inputs of every job read together."""

    pool: ClassVar[Pool]
    modality: ClassVar[str]  # the `modality` metric label, and the tower's name: `VitaForCausalLM.<modality>_tower`
    kinds: ClassVar[frozenset[int]]  # the EncodeJob kinds this pool encodes
    v2_inputs: ClassVar[tuple[dict, ...]]  # KServe model metadata of the tensors `from_v2` takes

    def __init__(self, tower: torch.nn.Module) -> None:
        self.tower = tower.eval()
        self.config = tower.config

    @abstractmethod
    def prepare(self, kind: int, item: MediaItem) -> torch.Tensor:
        """One item of an EncodeJob as tower input; bad media raise InvalidInputError."""

    @abstractmethod
    def from_v2(self, name: str, array: np.ndarray, parameters: Mapping[str, object]) -> list[torch.Tensor]:
        """One KServe v2 input tensor (a BYTES array of media, or raw samples) as tower inputs."""

    @abstractmethod
    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One batched tower pass: a (tokens, hidden) embedding per input."""

    @property
    def placement(self) -> tuple[torch.device, torch.dtype]:
        """Where inputs must go: the tower's device and dtype."""
        param = next(self.tower.parameters())
        return param.device, param.dtype


def load_encoder(encoder_cls: type[Encoder], model_dir: Path, device: str, dtype: str) -> Encoder:
    """Read only this pool's tower from the checkpoint, on `device` in `dtype` (`vita.model.placement` names): the
    LLM next to it is never loaded.

    CheckpointError when the model has no such tower (it cannot serve this pool); InvalidInputError for a device or
    dtype torch cannot use.
    """
    target = resolve_device(device)
    try:
        tower = load_tower(model_dir, encoder_cls.modality, dtype=resolve_dtype(dtype, target), device=target)
    except CheckpointError as e:
        raise CheckpointError(f"{e}: it cannot serve the {encoder_cls.pool} pool") from None
    return encoder_cls(tower)


def prepare_all(what: str, sources: Iterable[T], prepare: Callable[[T], torch.Tensor]) -> list[torch.Tensor]:
    """Every source in order; a bad one is named by its position, as the in-process processor names it."""
    inputs = []
    for k, source in enumerate(sources):
        try:
            inputs.append(prepare(source))
        except InvalidInputError as e:
            raise InvalidInputError(f"{what} {k}: {e}") from None
    return inputs


def blob_input(blob: TensorBlob, what: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A preprocessed item, checked against the `shape` its tower takes (None: any size of at least 1)."""
    try:
        x = blob_to_tensor(blob)
    except MalformedEntry as e:
        raise InvalidInputError(f"{what}: {e}") from None
    return checked_input(x, what, shape)


def checked_input(x: torch.Tensor, what: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """A preprocessed tower input of `shape` (None: any size of at least 1), finite, as float32."""
    if x.dim() != len(shape) or any(n < 1 or (want is not None and n != want) for n, want in zip(x.shape, shape)):
        wanted = ", ".join("N" if n is None else str(n) for n in shape)
        raise InvalidInputError(f"{what} must have shape ({wanted}); got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InvalidInputError(f"{what} contain NaN or Inf")
    return x.float()


def v2_bytes(name: str, array: np.ndarray) -> list[bytes]:
    """The encoded files of an input: BYTES (one file per element) or UINT8 [bytes] (one file, the form Triton's
    Python-backend models take). Anything else is refused, so a string can never be taken for a file path."""
    if array.dtype == np.uint8 and array.ndim == 1:
        if not array.size:
            raise InvalidInputError(f"input {name!r} is empty")
        return [array.tobytes()]
    if array.dtype != np.object_ or not all(isinstance(x, bytes) for x in array.flat):
        raise InvalidInputError(f"input {name!r} must be BYTES holding encoded files, or UINT8 [bytes] "
                                f"holding one")
    return list(array.flat)


def v2_floats(name: str, array: np.ndarray) -> torch.Tensor:
    """A preprocessed input (features, pixel tiles) as float32: FP32 as sent, other numbers converted; BYTES and
    BOOL are refused (numpy would raise, or read b"1" as 1.0)."""
    if array.dtype.kind not in "fiu":
        raise InvalidInputError(f"input {name!r} must hold numbers (FP32); got {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def timed_forward(encoder: Encoder, inputs: Sequence[torch.Tensor], metrics: Metrics) -> list[torch.Tensor]:
    """The forward both front doors (the Redis worker and KServe) run, under the one latency histogram."""
    start = time.perf_counter()
    outputs = encoder.forward(inputs)
    metrics.encoder_latency.labels(encoder.modality).observe(time.perf_counter() - start)
    return outputs


def kind_name(kind: int) -> str:
    return EncodeJob.Kind.Name(kind).lower() if kind in EncodeJob.Kind.values() else f"kind {kind}"
