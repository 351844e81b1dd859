"""Embedding blobs: an encoder writes its output once, the llm worker reads it directly by reference.

The orchestrator only forwards the small EmbeddingRef, so megabytes of activations never pass through it.
Blobs are not deleted after reading: a redelivered generation job must find them again; the TTL cleans up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from vita.bus.codec import MalformedEntry, blob_to_tensor, tensor_to_blob
from vita.bus.streams import BusConfig, milliseconds
from vita.errors import InvalidInputError, VitaError
from vita.v1.bus_pb2 import EmbeddingRef, TensorBlob


class EmbeddingMissing(VitaError):
    """The blob expired (its job waited longer than the TTL) or was never written: the media must be re-encoded."""


async def write_embedding(
    redis: Redis, config: BusConfig, blob_id: str, embedding: torch.Tensor, item_tokens: Sequence[int]
) -> EmbeddingRef:
    """Store a (tokens, hidden) embedding under `{prefix}:emb:{blob_id}` with its TTL and return the reference."""
    if embedding.dim() != 2:
        raise InvalidInputError(f"an embedding must be (tokens, hidden); got shape {tuple(embedding.shape)}")
    if any(n < 0 for n in item_tokens) or sum(item_tokens) != embedding.shape[0]:
        raise InvalidInputError(
            f"item_tokens {list(item_tokens)} must be non-negative and add up to the {embedding.shape[0]} rows"
        )
    key = config.embedding(blob_id)
    blob = tensor_to_blob(embedding)
    await redis.set(key, blob.SerializeToString(), px=milliseconds(config.embedding_ttl_s))
    return EmbeddingRef(key=key, dtype=blob.dtype, shape=blob.shape, item_tokens=item_tokens,
                        digest=blob_digest(blob))


def blob_digest(blob: TensorBlob) -> bytes:
    """`EmbeddingRef.digest`: 16 bytes of SHA-256 over the dtype, shape and data, so equal digests mean equal rows."""
    h = hashlib.sha256(f"{blob.dtype}/{list(blob.shape)}/".encode())
    h.update(blob.data)
    return h.digest()[:16]


async def read_embeddings(redis: Redis, refs: Sequence[EmbeddingRef]) -> list[torch.Tensor]:
    """All blobs of one generation job in one pipelined round trip (per Cluster node), checked against their
    references. GETs, not one MGET: the blobs of different jobs live in different Cluster hash slots."""
    if not refs:
        return []
    pipe = redis.pipeline(transaction=False)
    for ref in refs:
        pipe.get(ref.key)
    tensors = []
    for ref, raw in zip(refs, await pipe.execute()):
        if raw is None:
            raise EmbeddingMissing(f"embedding {ref.key} is gone: it expired or was never written")
        try:
            blob = TensorBlob.FromString(raw)
        except DecodeError as e:
            raise MalformedEntry(f"{ref.key} does not hold a TensorBlob: {e}") from e
        if blob.dtype != ref.dtype or list(blob.shape) != list(ref.shape):
            raise MalformedEntry(
                f"{ref.key} holds {_dtype_name(blob.dtype)}{list(blob.shape)}, "
                f"its reference says {_dtype_name(ref.dtype)}{list(ref.shape)}"
            )
        tensors.append(blob_to_tensor(blob))
    return tensors


def _dtype_name(code: int) -> str:
    """Proto3 enums are open: a corrupt blob may carry a number with no name (DType.Name would raise)."""
    return TensorBlob.DType.Name(code) if code in TensorBlob.DType.values() else f"dtype#{code}"
