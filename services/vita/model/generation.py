"""Sampling and token-by-token generation on the static KV cache: prefill once, then one forward per token."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vita.errors import ContextLengthError, InvalidInputError

if TYPE_CHECKING:
    from vita.model.llm import MoECausalLM


@dataclass
class SamplingParams:
    """How tokens are picked. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()  # stop after any of these, in addition to the model's eos
    ignore_eos: bool = False  # decode all max_new_tokens through eos (benchmarks, load tests)

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise InvalidInputError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        if isinstance(self.stop_token_ids, str | bytes) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise InvalidInputError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        self.stop_token_ids = tuple(self.stop_token_ids)

    @classmethod
    def from_message(cls, sampling: Any, max_new_tokens: int) -> SamplingParams:
        """The decoding of a `vita.v1.SamplingParams` message (read by its fields, so this module needs no proto):
        top_p 0 means 1 (proto3's unset), a seed only when the message has one. Raises InvalidInputError for a
        value out of range, naming the field as `__post_init__` does."""
        return cls(max_new_tokens=max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p or 1.0, seed=sampling.seed if sampling.HasField("seed") else None,
                   ignore_eos=sampling.ignore_eos)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def token_budget(requested: int, prompt_len: int, context_len: int) -> int:
    """How many tokens to generate: `requested`, cut so prompt + completion fit in `context_len`; at least 1.

    The one rule for `max_tokens` (orchestrator, pipeline, decode loop), as in vLLM and OpenAI: the prompt and the
    answer share the model's context. Never below 1: a prompt that fills the context still gets the token sampled
    at its last position.
    """
    return max(1, min(requested, context_len - prompt_len))


def stop_ids(params: SamplingParams, eos_token_id: int) -> frozenset[int]:
    """The tokens that end a sequence: eos (unless ignored) and the request's stop tokens."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else {eos_token_id})


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator makes sampling reproducible; without a seed the global RNG is used."""
    return None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)


def sample_next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from logits (B, V): greedy, or temperature + top-k + top-p (nucleus) sampling."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens ranked above it already hold top_p of the mass; the best always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs > params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _decode_steps(
    model: MoECausalLM,
    input_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> Iterator[Tensor]:
    """Prefill, then one batched forward per token; yields each step's (B,) tokens until max_new_tokens.

    Stops early when the context is full. Nothing is computed after the last yield, so a consumer that stops
    iterating (eos) costs no extra forward.
    """
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, prompt_len = prompt.shape[:2]
    context = model.config.max_position_embeddings
    if prompt_len > context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens but the model's context is {context}")
    # The last token is sampled but never fed back, so it takes no position: one more than the room after the prompt.
    steps = token_budget(params.max_new_tokens, prompt_len - 1, context)
    cache = model.new_cache(batch, prompt_len + steps - 1)
    positions = torch.arange(prompt_len, device=prompt.device).expand(batch, prompt_len)
    logits = model(input_ids, inputs_embeds=inputs_embeds, cache=cache, positions=positions).logits[:, -1]
    token = sample_next_token(logits, params, generator)
    positions = positions[:, -1:]
    for _ in range(steps - 1):
        yield token
        positions = positions + 1
        logits = model(token[:, None], cache=cache, positions=positions).logits[:, -1]
        token = sample_next_token(logits, params, generator)
    yield token


@torch.inference_mode()
def stream_generate(
    model: MoECausalLM,
    input_ids: Tensor | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    params: SamplingParams,
) -> Iterator[int]:
    """Yield the token ids of one sequence as they are produced.

    Ends after max_new_tokens, or after yielding the model's eos or one of `params.stop_token_ids` (the stop token
    is yielded, so the caller can tell why it ended). `input_ids` (L,) or (1, L); `inputs_embeds` (L, H) or (1, L, H).
    """
    if input_ids is not None and input_ids.ndim == 1:
        input_ids = input_ids[None]
    if inputs_embeds is not None and inputs_embeds.ndim == 2:
        inputs_embeds = inputs_embeds[None]
    if (input_ids is None) == (inputs_embeds is None):
        raise InvalidInputError("pass exactly one of input_ids and inputs_embeds")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise InvalidInputError(f"stream_generate takes one non-empty sequence, got shape {tuple(prompt.shape)}")
    stops = stop_ids(params, model.config.eos_token_id)
    generator = make_generator(params, model.lm_head.weight.device)
    for token in _decode_steps(model, input_ids, inputs_embeds, params, generator):
        token_id = int(token[0])
        yield token_id
        if token_id in stops:
            return


@torch.inference_mode()
def generate(
    model: MoECausalLM,
    input_ids: Tensor,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    ignore_eos: bool = False,
) -> Tensor:
    """transformers-style `generate`: (batch, prompt_len + new) ids, greedy unless do_sample.

    Equal-length prompts decode together, one forward per step. eos_token_id None means the config's eos, as in
    transformers; a row that has finished is padded with the (first) eos until every row has, then it stops.
    ignore_eos decodes all max_new_tokens regardless (benchmarks).
    """
    if input_ids.ndim != 2:
        raise InvalidInputError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos = [] if ignore_eos else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature if do_sample else 0.0,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=eos,
    )
    stops = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for token in _decode_steps(model, input_ids, None, params, make_generator(params, input_ids.device)):
        if eos:
            token = token.masked_fill(finished, eos[0])
            finished |= torch.isin(token, stops)
        new_tokens.append(token)
        if finished.all():
            break
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)], dim=1)
