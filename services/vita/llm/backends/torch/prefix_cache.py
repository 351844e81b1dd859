"""Prefix caching (vLLM's `enable_prefix_caching`): KV blocks of token prefixes, found again by a chained hash.

The engine's KV cache is one row per slot, not paged, so cached blocks live in a pool of their own and are copied
into a new sequence's row at admission (and out of a row when its prompt is prefilled or the sequence ends). A
copy is a memory move of `layers * block_size * kv_heads * head_dim * 2` values per block, orders of magnitude
cheaper than recomputing the block, and it keeps the attention kernel on contiguous rows.

A block's hash (SHA-256, vLLM's default `prefix_caching_hash_algo`, truncated to 16 bytes; on CPUs with SHA
extensions it runs at twice blake2b's speed, which matters for prompts given as embeddings: 1.7 MB per 1,725 rows
of the tiny model) chains its parent's hash with the identity of its own inputs: the token ids for a text prompt, the
bytes of the embedding rows for a prompt given as embeddings (so two different images or audio clips at the same
placeholder ids never share an entry, and the same clip in the same history always does). Only full blocks are
cached; the last prompt token is always recomputed, because its logits give the first generated token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from vita.errors import InvalidInputError
from vita.model.llm import KVCache


def block_hashes(identity: Tensor, block_size: int, parent: bytes | None = None, start_block: int = 0) -> list[bytes]:
    """Chained hashes of the full blocks of `identity`, from block `start_block` on.

    `identity` is (L,) token ids or (L, H) embedding rows; `parent` is the hash of block `start_block - 1` (None for
    the first block). Ids and embeddings hash in separate namespaces (the dtype is part of the first block's key).
    """
    if identity.ndim not in (1, 2):
        raise InvalidInputError(f"a prefix identity is (L,) ids or (L, H) embeddings, got {tuple(identity.shape)}")
    n_full = identity.shape[0] // block_size
    if n_full <= start_block:
        return []
    rows = identity[start_block * block_size : n_full * block_size].detach().to("cpu").contiguous()
    data = memoryview(rows.view(torch.uint8).numpy()).cast("B")  # bytes of each row, in order; any dtype (bf16 too)
    per_block = len(data) // (n_full - start_block)
    previous = parent if parent is not None else f"{identity.dtype}/{tuple(identity.shape[1:])}".encode()
    out = []
    for i in range(n_full - start_block):
        block = hashlib.sha256(previous)
        block.update(data[i * per_block : (i + 1) * per_block])  # a view: the block's bytes are not copied
        previous = block.digest()[:16]
        out.append(previous)
    return out


@dataclass
class PrefixCacheStats:
    """vLLM's counters: prompt tokens looked up, and how many of them were found cached."""

    queries: int = 0
    hits: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """A pool of `num_blocks` KV blocks, (layers, num_blocks, block_size, kv_heads, head_dim), evicted LRU.

    Not thread-safe: the engine thread alone uses it.
    """

    def __init__(self, cache: KVCache, *, block_size: int, num_blocks: int) -> None:
        if block_size < 1 or num_blocks < 1:
            raise InvalidInputError(f"a prefix cache needs block_size >= 1 and num_blocks >= 1, got {block_size} "
                                    f"and {num_blocks}")
        layers, _, _, kv_heads, head_dim = cache.k.shape
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.cache = cache
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=cache.k.dtype, device=cache.k.device)
        self.v = torch.zeros(shape, dtype=cache.v.dtype, device=cache.v.device)
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # hash -> pool block, least recently used first
        self._free = list(range(num_blocks - 1, -1, -1))
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    def __len__(self) -> int:
        return len(self._blocks)

    def load(self, hashes: list[bytes], slot: int, max_blocks: int) -> int:
        """Copy the longest cached run of `hashes` (at most `max_blocks`) into `slot`'s row from position 0.

        Returns the number of positions filled (a multiple of block_size). Counts every block of `hashes` as queried.
        """
        found = []
        for h in hashes[:max_blocks]:
            block = self._blocks.get(h)
            if block is None:
                break
            self._blocks.move_to_end(h)
            found.append(block)
        self.stats.queries += len(hashes) * self.block_size
        self.stats.hits += len(found) * self.block_size
        if found:
            n = len(found) * self.block_size
            index = torch.tensor(found, device=self.k.device)
            layers = self.k.shape[0]
            for pool, rows in ((self.k, self.cache.k), (self.v, self.cache.v)):
                rows[:, slot, :n] = pool.index_select(1, index).reshape(layers, n, *pool.shape[3:])
        return len(found) * self.block_size

    def store(self, hashes: list[bytes], slot: int, first_block: int = 0) -> None:
        """Keep blocks `first_block + i` of `slot`'s row under `hashes[i]`; blocks already cached are only touched."""
        new = [(first_block + i, h) for i, h in enumerate(hashes) if h not in self._blocks]
        for h in hashes:
            if h in self._blocks:
                self._blocks.move_to_end(h)
        new = new[: self.num_blocks]  # more than the pool holds: keep the prefix side, which later lookups reach
        if not new:
            return
        targets = []
        for _ in new:
            if not self._free:
                _, freed = self._blocks.popitem(last=False)
                self._free.append(freed)
                self.stats.evicted_blocks += 1
            targets.append(self._free.pop())
        bs = self.block_size
        src = torch.tensor([p for b, _ in new for p in range(b * bs, (b + 1) * bs)], device=self.k.device)
        dst = torch.tensor(targets, device=self.k.device)
        for pool, rows in ((self.k, self.cache.k), (self.v, self.cache.v)):
            picked = rows[:, slot].index_select(1, src)  # (layers, n * bs, kv_heads, D)
            pool.index_copy_(1, dst, picked.view(pool.shape[0], len(new), bs, *pool.shape[3:]))
        for (_, h), target in zip(new, targets, strict=True):
            self._blocks[h] = target
        self.stats.stored_blocks += len(new)
