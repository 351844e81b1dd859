"""Mixtral-style sparse MoE decoder in the spirit of gpt-fast, under Hugging Face Mixtral parameter names.

Experts are stacked per layer, `block_sparse_moe.w1`/`w3` (E, I, H) and `w2` (E, H, I), so dispatch is one bmm per
matrix over all experts rather than a loop; `vita.model.hf_names` maps them to and from the per-expert hub names.
The KV cache is one static buffer addressed by (slot, position), so the same forward serves prefill, incremental
decode and batched decode of sequences of different lengths, which is what continuous batching is built on.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vita.errors import ContextLengthError, InvalidInputError
from vita.model import fused_moe, generation
from vita.model.checkpoint import load_sharded, save_sharded, validate_state_dict
from vita.model.config import LLMConfig
from vita.model.hf_names import input_major, llm_state_dict_from_hf, llm_state_dict_to_hf, read_hf_config

# `segment_ids` of a packed row's shared prefix (`vita.training.packing`): every sample of the row sees it.
SHARED_SEGMENT = -2


@dataclass
class CausalLMOutput:
    logits: Tensor  # (batch, seq, vocab)


class KVCache:
    """Static key/value buffers of shape (layers, slots, max_seq_len, kv_heads, head_dim), written in place.

    A slot is the row of one sequence; whoever owns the cache (a scheduler, `generate`) decides which are live.
    Stale entries beyond a row's current position are never read: attention masks them by position.
    """

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k = k
        self.v = v

    @classmethod
    def allocate(
        cls,
        config: LLMConfig,
        max_batch_size: int,
        max_seq_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> KVCache:
        if max_batch_size < 1 or max_seq_len < 1:
            raise InvalidInputError(
                f"a KV cache needs max_batch_size >= 1 and max_seq_len >= 1, got {max_batch_size} and {max_seq_len}"
            )
        shape = (config.num_hidden_layers, max_batch_size, max_seq_len, config.num_key_value_heads, config.head_dim)
        # Zeros, not empty: masked values still get multiplied by 0, and 0 * (NaN garbage) would be NaN.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]


@dataclass
class CacheStep:
    """Where one forward writes and reads the cache; built once per forward and shared by every layer."""

    cache: KVCache
    index: tuple[Tensor, Tensor]  # (slots (B, 1), positions (B, T)): where this step's keys/values go
    rows: slice | Tensor  # the slots, as a slice when contiguous so that reading them is a view, not a copy
    kv_len: int  # keys [0, kv_len) can be attended to: the largest position + 1

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v (B, T, kv_heads, D) at their positions; return the rows' keys/values (B, kv_heads, kv_len, D)."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_put_(self.index, k)
        values.index_put_(self.index, v)
        keys, values = keys[:, : self.kv_len], values[:, : self.kv_len]
        if isinstance(self.rows, slice):
            keys, values = keys[self.rows], values[self.rows]
        else:
            keys, values = keys.index_select(0, self.rows), values.index_select(0, self.rows)
        return keys.transpose(1, 2), values.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@functools.cache
def _inv_freq(head_dim: int, theta: float, device: torch.device) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and signed sin (B, T, 1, head_dim) for the rotate-half RoPE layout of HF checkpoints.

    Computed per forward in fp32 from the positions, so no table is cast to bf16 by `.to(dtype)` or left on `meta`.
    The sin's first half is negated so that rotate_half(x) * sin becomes a roll: one op instead of four.
    """
    freqs = (positions[..., None].float() * _inv_freq(head_dim, theta, positions.device))[:, :, None, :]
    sin = freqs.sin()
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    """Grouped-query attention over the KV cache, with each kv head's query group folded into the query length.

    Folding (B, kv_heads, groups * T, D) lets SDPA use the kv heads as they are, with no repeat of keys/values.
    """

    def __init__(self, config: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_kv = config.num_key_value_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        q_dim, kv_dim = config.num_attention_heads * config.head_dim, self.n_kv * config.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, step: CacheStep | None) -> Tensor:
        """x (B, T, hidden) -> (B, T, hidden). `mask` is additive, in the folded layout of `fold_query_mask`:
        (B, 1, groups * T, L), or (B, 1, 1, L) for a single query; L is T without a cache, else the cache's kv_len."""
        B, T, _ = x.shape
        n_kv, groups, D = self.n_kv, self.groups, self.head_dim
        # Query head h serves kv head h // groups (HF's order): heads (n_kv * groups) split as (n_kv, groups).
        q = apply_rope(self.q_proj(x).view(B, T, n_kv * groups, D), *rope)  # (B, T, n_kv * groups, D)
        k = apply_rope(self.k_proj(x).view(B, T, n_kv, D), *rope)  # (B, T, n_kv, D)
        v = self.v_proj(x).view(B, T, n_kv, D)  # (B, T, n_kv, D)
        if step is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_kv, L=T, D)
        else:
            k, v = step.update(self.layer_idx, k, v)  # (B, n_kv, L=kv_len, D): this row's cache, new keys included
        # Fold: (B, T, n_kv, groups, D) -> (B, n_kv, groups, T, D) -> (B, n_kv, groups * T, D). Query row r is
        # group r // T at position r % T (group-major), which is the row order `fold_query_mask` gives the mask.
        q = q.view(B, T, n_kv, groups, D).permute(0, 2, 3, 1, 4).reshape(B, n_kv, groups * T, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_kv, groups * T, D)
        # Unfold: (B, n_kv, groups, T, D) -> (B, T, n_kv, groups, D) -> (B, T, n_kv * groups * D), heads in HF order.
        out = out.view(B, n_kv, groups, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, n_kv * groups * D)
        return self.o_proj(out)


def fold_query_mask(visible: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """(B, T, L) bool, True where query position t may see key l -> the additive mask `Attention` takes.

    `Attention` folds each kv head's `groups` query heads into the query length, group-major: row r of its
    (groups * T) queries is group r // T at position r % T. The mask follows that order, (B, 1, groups * T, L) with
    dim 1 broadcasting over the kv heads; a single query (T == 1) keeps (B, 1, 1, L), which broadcasts over the
    groups as it is. Float, built once per forward: SDPA would otherwise convert a boolean mask in every layer.
    """
    B, T, L = visible.shape
    visible = visible.unsqueeze(1)  # (B, 1, T, L)
    if T > 1:
        visible = visible.repeat(1, 1, groups, 1)  # (B, 1, groups * T, L): whole (T, L) blocks, one per group
    mask = torch.full(visible.shape, -math.inf, dtype=dtype, device=visible.device).masked_fill_(visible, 0.0)
    assert mask.shape == (B, 1, groups * T if T > 1 else 1, L)
    return mask


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts with stacked weights: w1/w3 (E, I, H) gate/up, w2 (E, H, I) down.

    The weights are stored input-major ((E, H, I) memory for w1) and used as x @ W^T: on CPU, MKL reads them about
    twice as fast that way for a few tokens, and decode is bound by reading expert weights. The parameters keep
    their (E, I, H) shape, so state dicts and checkpoints do not change.
    """

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        E, inter, hidden = config.num_local_experts, config.intermediate_size, config.hidden_size
        self.num_experts = E
        self.top_k = config.num_experts_per_tok
        # Forwards of at most this many tokens (decode steps) take the Triton kernel (`fused_moe`) where it runs:
        # 0, the default, until a GPU measurement shows it beats grouped_mm (benchmarks/llm_decode_gpu.py).
        self.fused_max_tokens = 0
        self.gate = nn.Linear(hidden, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, hidden, inter).mT)
        self.w2 = nn.Parameter(torch.empty(E, inter, hidden).mT)
        self.w3 = nn.Parameter(torch.empty(E, hidden, inter).mT)
        for w in (self.w1, self.w2, self.w3):  # what nn.Linear would give each expert: U(+-1/sqrt(fan_in))
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args) -> None:
        """Keep the input-major storage when load_state_dict(assign=True) swaps in tensors of another layout."""
        for name in ("w1", "w2", "w3"):
            if (w := state_dict.get(prefix + name)) is not None:
                state_dict[prefix + name] = input_major(w)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mixtral routing: softmax over all router logits, keep the top-k, renormalise them to sum to 1."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), experts

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        # On an accelerator, bf16 reads the experts in place with grouped GEMMs and no host sync (CUDA-graph
        # capture forbids syncs, and each one leaves the GPU idle); F.grouped_mm's kernels take bf16 only. Other
        # dtypes gather a few tokens' experts (a copy of their weights, gpt-fast's way, also sync-free). A traced
        # forward (torch.compile, e.g. the sync-free check of `decode_step`) takes the in-place path on CPU too.
        # A few tokens (`fused_max_tokens`, off by default) can take the Triton kernel instead (`fused_moe`).
        on_device = x.device.type != "cpu"
        if (x.shape[0] <= self.fused_max_tokens and not x.requires_grad and not torch.compiler.is_compiling()
                and fused_moe.supported(x)):
            w1, w2, w3 = (w.mT.to(x.dtype) for w in (self.w1, self.w2, self.w3))  # in place when dtypes agree
            out = fused_moe.fused_moe(x, weights, experts, w1, w3, w2)
        elif (on_device and x.dtype == torch.bfloat16) or (not on_device and torch.compiler.is_compiling()):
            out = self.grouped_mm(x, weights, experts)
        elif on_device and x.shape[0] * self.top_k <= self.num_experts:
            out = self.gathered(x, weights, experts)
        elif x.shape[0] == 1:
            out = self.single(x, weights, experts)
        elif x.device.type == "cpu" and x.requires_grad:
            out = self.grouped_mm(x, weights, experts)
        else:
            out = self.grouped(x, weights, experts)
        return out.view(shape)

    def gathered(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Per-token weight gather (N, k, I, H): no data-dependent shapes, best for a handful of tokens."""
        gate = torch.einsum("nh,nkih->nki", x, self.w1[experts])
        h = F.silu(gate) * torch.einsum("nh,nkih->nki", x, self.w3[experts])
        out = torch.einsum("nki,nkhi->nkh", h, self.w2[experts])
        return torch.einsum("nkh,nk->nh", out, weights)

    def single(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """One token (batch-1 decode): one bmm per matrix over its k experts, whose weights are read in place.

        A bmm streams one expert per core, where a matmul per expert would read them one after the other on one.
        """
        chosen, order = experts[0].sort()
        ids = chosen.tolist()
        w1, w2, w3 = (select_experts(w.mT, ids) for w in (self.w1, self.w2, self.w3))
        xs = x.expand(len(ids), 1, x.shape[-1])
        h = F.silu(torch.bmm(xs, w1)) * torch.bmm(xs, w3)
        return weights[:, order] @ torch.bmm(h, w2).squeeze(1)

    def grouped(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Batch the (token, expert) pairs by expert into a zero-padded (E, capacity, H) tensor: three bmm in all.

        One bmm streams every expert's weights on all cores; the padding costs compute, not weight reads. On CPU it
        beat one matmul per expert at every token count we measured (2 to 512).
        """
        pair_expert = experts.flatten()  # pair p is token p // k's choice p % k
        onehot = F.one_hot(pair_expert, self.num_experts)
        slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # how many earlier pairs went to the same expert
        batch = x.new_zeros(self.num_experts, int(onehot.sum(0).max()), x.shape[-1])
        batch[pair_expert, slot] = x.repeat_interleave(self.top_k, dim=0)
        h = F.silu(torch.bmm(batch, self.w1.mT)) * torch.bmm(batch, self.w3.mT)
        out = torch.bmm(h, self.w2.mT)[pair_expert, slot].view(-1, self.top_k, x.shape[-1])
        return torch.bmm(weights.unsqueeze(1), out).squeeze(1)

    def grouped_mm(self, x: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """The (token, expert) pairs sorted by expert, one `F.grouped_mm` per matrix: no padding (MegaBlocks'
        "dropless" MoE, Gale et al. 2022), the weights read in place, and no host sync (the group ends come from an
        `index_add_`, where `bincount` would sync to size its output). Training on CPU and bf16 on an accelerator
        take this path.

        Training skews the routing: in the tiny stage 3 the busiest expert holds 2-2.4x the mean load, so the
        padded `grouped` computes 2-2.4x the pairs, and its backward pays that twice more. Forward and backward of
        one layer at 1,024 tokens, loads 2.6x the mean on one expert: 38 ms against 96 ms (2 threads). For the few
        tokens of a decode step the padded bmm stays faster (8 tokens: 0.7 ms against 1.0 ms), so inference keeps
        it. x (N, H), weights and experts (N, k) -> (N, H).
        """
        k, H = self.top_k, x.shape[-1]
        pair_expert = experts.flatten()  # (N * k,): pair p is token p // k's choice p % k
        order = pair_expert.argsort(stable=True)  # (N * k,) pairs grouped by expert
        load = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        load.index_add_(0, pair_expert, torch.ones_like(pair_expert, dtype=torch.int32))  # (E,) pairs per expert
        offsets = load.cumsum(0, dtype=torch.int32)  # (E,) each group's end
        w1, w2, w3 = (w.mT.to(x.dtype) for w in (self.w1, self.w2, self.w3))  # (E, H, I), (E, I, H): in place
        xs = x[order // k]  # (N * k, H)
        h = F.silu(F.grouped_mm(xs, w1, offs=offsets)) * F.grouped_mm(xs, w3, offs=offsets)  # (N * k, I)
        out = F.grouped_mm(h, w2, offs=offsets)  # (N * k, H) in expert order
        out = torch.empty_like(out).index_copy(0, order, out).view(-1, k, H)  # (N, k, H) in pair order
        return torch.bmm(weights.unsqueeze(1), out).squeeze(1)


def select_experts(w: Tensor, ids: list[int]) -> Tensor:
    """w[ids] for sorted distinct ids, as a strided view rather than a copy when they are evenly spaced (top-2 always)."""
    step = ids[1] - ids[0] if len(ids) > 1 else 1
    if ids == list(range(ids[0], ids[-1] + 1, step)):
        return w[ids[0] : ids[-1] + 1 : step]
    return w[ids]


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = MoEFeedForward(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, step: CacheStep | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, step)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.*` part of a Mixtral checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, step: CacheStep | None) -> Tensor:
        for layer in self.layers:
            x = layer(x, rope, mask, step)
        return self.norm(x)

    def forward_fused(self, batches: list[_Prepared]) -> list[Tensor]:
        """Several batches of different shapes in one pass: attention per batch, the MoE on all their tokens at once.

        Decode rows (B, 1) and a prompt chunk (1, T) cannot share one padded batch without computing the padding, but
        every part of a layer except attention is per token: concatenating the tokens reads the experts' weights
        once per layer for the whole step instead of once per batch.
        """
        xs = [b.x for b in batches]
        sizes = [x.shape[0] * x.shape[1] for x in xs]
        for layer in self.layers:
            xs = [x + layer.self_attn(layer.input_layernorm(x), b.rope, b.mask, b.step) for x, b in zip(xs, batches, strict=True)]
            flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
            flat = flat + layer.block_sparse_moe(layer.post_attention_layernorm(flat))
            xs = [part.view(x.shape) for part, x in zip(flat.split(sizes), xs, strict=True)]
        return [self.norm(x) for x in xs]


@dataclass
class _Prepared:
    """One batch's embedded input and what its layers share: RoPE, the folded mask, where it reads/writes the cache."""

    x: Tensor  # (B, T, hidden)
    rope: tuple[Tensor, Tensor]
    mask: Tensor
    step: CacheStep | None


@dataclass
class CacheBatch:
    """One batch of a fused forward (`MoECausalLM.forward_batches`): the arguments `forward` takes with a cache."""

    positions: Tensor  # (B, T)
    slots: Tensor  # (B,)
    input_ids: Tensor | None = None  # (B, T)
    inputs_embeds: Tensor | None = None  # (B, T, hidden)


class MoECausalLM(nn.Module):
    """The text model. With a KV cache every row has its own positions, so rows of different lengths batch."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        if config.tie_word_embeddings:
            raise NotImplementedError("tied embeddings are not supported (Mixtral unties them)")
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def use_fused_moe(self, max_tokens: int) -> None:
        """Forwards of at most `max_tokens` tokens (0: none) run their experts with the Triton kernel
        (`vita.model.fused_moe`) where it runs (CUDA with Triton, or Triton's interpreter); others as before."""
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                module.fused_max_tokens = max_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self, max_batch_size: int, max_seq_len: int) -> KVCache:
        """A KV cache in this model's dtype and device."""
        p = self.lm_head.weight
        return KVCache.allocate(self.config, max_batch_size, max_seq_len, dtype=p.dtype, device=p.device)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        slots: Tensor | None = None,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Logits (B, T, vocab), or (B, logits_to_keep, vocab) for the last positions only when it is > 0
        (transformers' name): a prefill needs the last row alone, and the LM head is a large part of its cost.

        Without a cache: causal attention over the sequence. With one: `positions` (B, T) are absolute positions,
        `slots` (B,) the cache rows (default 0..B-1); keys are written there and each query sees keys at positions
        <= its own, so right-padded prefill and ragged decode batches work.
        `segment_ids` (B, T), training without a cache: packed samples, each with its own id and positions that
        restart at 0; a query then sees only the keys of its own segment at positions <= its own, and those of
        the row's shared prefix (id `SHARED_SEGMENT`, positions 0..P-1, its samples continuing at P).
        """
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, cache=cache, slots=slots,
                                    positions=positions, segment_ids=segment_ids)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.lm_head(hidden))

    def hidden_states(self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                      cache: KVCache | None = None, slots: Tensor | None = None, positions: Tensor | None = None,
                      segment_ids: Tensor | None = None) -> Tensor:
        """(B, T, hidden): the last layer's output after the final norm, what `lm_head` reads; the arguments are
        `forward`'s. Training applies the head only where a position has a target (`vita.training.forward`)."""
        prepared = self._prepare(input_ids, inputs_embeds, cache, slots, positions, segment_ids)
        return self.model(prepared.x, prepared.rope, prepared.mask, prepared.step)

    def forward_batches(self, batches: list[CacheBatch], cache: KVCache, *, logits_to_keep: int = 1) -> list[Tensor]:
        """One fused forward of several cache batches (decode rows and prompt chunks of a scheduler step).

        Returns each batch's logits (B, logits_to_keep, vocab). The batches' slots must be distinct across batches
        (each writes its own rows). Same results as one `forward` per batch, for the cost of one weight read.
        """
        prepared = [self._prepare(b.input_ids, b.inputs_embeds, cache, b.slots, b.positions, None) for b in batches]
        hidden = self.model.forward_fused(prepared)
        return [self.lm_head(h[:, -logits_to_keep:]) for h in hidden]

    def decode_step(self, input_ids: Tensor, positions: Tensor, cache: KVCache, kv_len: int,
                    slots: Tensor | None = None) -> Tensor:
        """One token per row with no host sync and shapes fixed by (B, kv_len): what a CUDA graph captures
        (`vita.model.cuda_graph.CUDAGraphDecoder`). input_ids, positions (B,) -> logits (B, vocab).

        Row b feeds `input_ids[b]` at `positions[b]` into cache row `slots[b]` (default: row b, the rows then read as
        a view, not a copy) and attends over that row's keys [0, kv_len), masked beyond its own position. Nothing is
        checked, since every check of a device tensor is a host sync: the caller guarantees what `forward` would
        verify (ids in the vocabulary, distinct slots in the cache, positions < kv_len <= cache.max_seq_len), as
        vLLM's model runner relies on its scheduler. The same values as
        `forward(input_ids[:, None], cache=cache, slots=slots, positions=positions[:, None])`.
        """
        B = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids[:, None])  # (B, 1, hidden)
        positions = positions[:, None]  # (B, 1)
        rows = slice(0, B) if slots is None else slots
        if slots is None:
            slots = torch.arange(B, device=x.device)
        step = CacheStep(cache=cache, index=(slots[:, None], positions), rows=rows, kv_len=kv_len)
        visible = torch.arange(kv_len, device=x.device) <= positions[:, :, None]  # (B, 1, kv_len)
        mask, rope = self._mask_and_rope(visible, positions, x.dtype)
        return self.lm_head(self.model(x, rope, mask, step)[:, -1])  # (B, vocab)

    def _prepare(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, cache: KVCache | None,
                 slots: Tensor | None, positions: Tensor | None, segment_ids: Tensor | None) -> _Prepared:
        x = self._embed(input_ids, inputs_embeds)
        B, T = x.shape[:2]
        if cache is None:
            if positions is None:
                positions = torch.arange(T, device=x.device).expand(B, T)
            limit = self.config.max_position_embeddings
            _check_positions(positions, B, T, limit, " (model max_position_embeddings)")
            step, key_positions = None, positions
        else:
            if segment_ids is not None:
                raise InvalidInputError("segment_ids are for packed training batches, not with a KV cache")
            step = self._cache_step(cache, slots, positions, B, T)
            key_positions = torch.arange(step.kv_len, device=x.device)
        # Query t of a row sees the keys at positions <= its own: (B, T, L), keys (B, L) or (L,) against (B, T, 1).
        visible = key_positions[..., None, :] <= positions[..., :, None]
        if segment_ids is not None:  # no cache here, so L == T: a packed sample sees its own tokens and the prefix
            if segment_ids.shape != (B, T):
                raise InvalidInputError(f"segment_ids must have shape ({B}, {T}), got {tuple(segment_ids.shape)}")
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            visible = visible & (same | (segment_ids[:, None, :] == SHARED_SEGMENT))  # (B, T, T)
        mask, rope = self._mask_and_rope(visible, positions, x.dtype)
        return _Prepared(x, rope, mask, step)

    def _mask_and_rope(self, visible: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, tuple]:
        """What every layer shares: the additive mask of `visible` (B, T, L) and RoPE of `positions` (B, T)."""
        # The mask must follow Attention's query fold (group-major rows): fold_query_mask owns that layout.
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        mask = fold_query_mask(visible, groups, dtype)
        return mask, rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def _embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidInputError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise InvalidInputError(
                    f"inputs_embeds must be (batch, seq, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise InvalidInputError(f"input_ids must be a non-empty (batch, seq) tensor, got {tuple(input_ids.shape)}")
        low, high = map(int, torch.aminmax(input_ids))
        if low < 0 or high >= self.config.vocab_size:
            raise InvalidInputError(f"token ids must be in [0, {self.config.vocab_size}), got [{low}, {high}]")
        return self.model.embed_tokens(input_ids)

    def _cache_step(
        self, cache: KVCache, slots: Tensor | None, positions: Tensor | None, B: int, T: int
    ) -> CacheStep:
        if positions is None:
            raise InvalidInputError("with a KV cache, positions (batch, seq) are required")
        limit = min(cache.max_seq_len, self.config.max_position_embeddings)
        kv_len = _check_positions(positions, B, T, limit, f" (KV cache {cache.max_seq_len}, "
                                  f"model max_position_embeddings {self.config.max_position_embeddings})")
        if slots is None:
            slots = torch.arange(B, device=positions.device)
        if slots.shape != (B,):
            raise InvalidInputError(f"slots must have shape ({B},), got {tuple(slots.shape)}")
        ids = slots.tolist()
        if min(ids) < 0 or max(ids) >= cache.max_batch_size or len(set(ids)) < B:
            raise InvalidInputError(f"slots must be distinct and in [0, {cache.max_batch_size}), got {ids}")
        rows = slice(ids[0], ids[0] + B) if ids == list(range(ids[0], ids[0] + B)) else slots
        return CacheStep(cache=cache, index=(slots[:, None], positions), rows=rows, kv_len=kv_len)

    def generate(self, input_ids: Tensor, **kwargs) -> Tensor:
        """transformers-style batch generation returning prompt + new ids; see `vita.model.generation.generate`."""
        return generation.generate(self, input_ids, **kwargs)

    # --- checkpoints (Hugging Face Mixtral layout) --------------------------------------------------------

    def save_pretrained(self, directory: str | Path, *, max_shard_bytes: int = 5 * 10**9) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_hf_dict()
        config["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        directory.joinpath("config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_sharded(llm_state_dict_to_hf(self.state_dict()), directory, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> MoECausalLM:
        """Load a Hugging Face Mixtral directory; any inconsistency is a CheckpointError naming the problem."""
        directory = Path(directory)
        model = cls.from_hf_state_dict(read_hf_config(directory), load_sharded(directory))
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_hf_state_dict(cls, config: LLMConfig, state_dict: Mapping[str, Tensor]) -> MoECausalLM:
        """The model holding `state_dict`'s tensors (hub or transformers-5 names, `llm_state_dict_from_hf`), on their
        device and in their dtype, without a copy where the layout already matches; a missing, unexpected or
        misshapen tensor is a CheckpointError."""
        with torch.device("meta"):  # no memory, no random init: every parameter comes from the state dict
            model = cls(config)
        loaded = llm_state_dict_from_hf(state_dict)
        validate_state_dict(model.state_dict(), loaded)
        model.load_state_dict(loaded, assign=True)
        return model


def _check_positions(positions: Tensor, B: int, T: int, limit: int, detail: str) -> int:
    """Validate (B, T) positions against the context limit; returns the largest position + 1."""
    if positions.shape != (B, T):
        raise InvalidInputError(f"positions must have shape ({B}, {T}), got {tuple(positions.shape)}")
    low, high = map(int, torch.aminmax(positions))
    if low < 0:
        raise InvalidInputError(f"positions must be >= 0, got {low}")
    if high >= limit:
        raise ContextLengthError(f"position {high} is beyond the context: at most {limit} positions fit{detail}")
    return high + 1
