"""The interface every generation backend implements: the prompt form they all take and the token events they
all stream. Backends import this module, never each other (the torch engine is only the torch backend's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from vita.errors import FatalError
from vita.model.generation import SamplingParams


class EngineDeadError(FatalError):
    """The backend's engine is gone (its process exited): this worker can generate no more (vLLM's name)."""


@dataclass(frozen=True)
class TokenOutput:
    """One event of one sequence: a new token, and/or the end (`finish_reason` stop, length or cancelled)."""

    request_id: str
    token_id: int | None
    index: int  # 0 for the first generated token
    finish_reason: str | None = None
    # On a sequence's first output only: seconds it waited in the engine for a free slot (from `add` to admission),
    # on the engine's clock. None where the engine does not say (Triton).
    queued_s: float | None = None


@dataclass
class PromptInput:
    """Token ids whose `slot_positions` rows are replaced by `slot_embeddings` (encoder outputs, in order).

    The torch backend overwrites those rows of the token embeddings; the Triton backend rewrites the ids at those
    positions to `vocab_size + k`, which TensorRT-LLM reads as row k of `prompt_embedding_table`.

    `slot_identity` says what each slot row is without its values: its item's digest (`EmbeddingRef.digest`, two
    int64) and its row in that item. The torch engine's prefix cache keys blocks by it (vLLM keys a block by its
    multimodal items' `mm_hash` and offsets) instead of hashing the rows' bytes at every request, which grows with
    the prompt: 8 ms for a 1,725-row history at Mixtral's width (BENCHMARKS.md). None: the rows are hashed.
    """

    input_ids: Tensor  # (L,) int64
    slot_positions: Tensor | None = None  # (N,) int64, ascending
    slot_embeddings: Tensor | None = None  # (N, hidden)
    slot_identity: Tensor | None = None  # (N, 3) int64: digest high, digest low, row within its item

    def __post_init__(self) -> None:
        n_pos = 0 if self.slot_positions is None else self.slot_positions.numel()
        n_emb = 0 if self.slot_embeddings is None else self.slot_embeddings.shape[0]
        if n_pos != n_emb:
            raise ValueError(f"{n_pos} slot positions but {n_emb} slot embeddings")
        if self.slot_identity is not None and tuple(self.slot_identity.shape) != (n_pos, 3):
            raise ValueError(f"slot_identity must be ({n_pos}, 3) for {n_pos} slot rows; got "
                             f"{tuple(self.slot_identity.shape)}")


@dataclass
class BackendRequest:
    request_id: str
    prompt: PromptInput
    params: SamplingParams


class GenerationBackend(Protocol):
    """Streams `TokenOutput`s of one request; `cancel` must stop the compute, not only the stream."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]: ...

    async def cancel(self, request_id: str) -> None: ...

    async def wait_dead(self) -> EngineDeadError:
        """Returns once the backend can generate no more (its engine process exited); never, for a backend whose
        engine cannot die without this process (the serving process then restarts on its own failure)."""
        ...
