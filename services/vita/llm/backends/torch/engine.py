"""Continuous batching on the slot KV cache, in the spirit of vLLM's scheduler/worker split but in one class.

Each `step()` first drops cancelled sequences (their slots are free before any more compute), then admits waiting
sequences into free slots, prefills, then runs one batched decode forward for every sequence whose prompt is in the
cache. A new request therefore waits at most one decode step before its prefill starts, however long the running
generations are: that is what keeps the monitor's short judgements from queueing behind the generator's answers.

With chunked prefill (`EngineConfig.enable_chunked_prefill`) a step is one forward of at most
`max_num_batched_tokens` tokens: the running sequences' decode tokens first, then prompt chunks first come first
served, so a 4,000-token prompt is spread over many steps and never stalls the running streams for its whole
prefill; the chunks and the decode rows share the step's read of the expert weights (`forward_batches`). With prefix caching
(`enable_prefix_caching`) a prompt starts from the KV blocks of the longest prefix seen before (`prefix_cache`).
With CUDA graphs (`cuda_graphs`, on by default when the model is on a CUDA device) a step that only decodes replays
a graph captured for its batch-size bucket and context bucket (`vita.model.cuda_graph`), its rows padded to the
bucket with a scratch row of the cache that no sequence is given.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vita.errors import ContextLengthError, InvalidInputError
from vita.llm.backends.base import PromptInput, TokenOutput
from vita.llm.backends.torch.prefix_cache import PrefixCache, PrefixCacheStats, block_hashes
from vita.model.cuda_graph import CUDAGraphDecoder
from vita.model.generation import SamplingParams, make_generator, sample_next_token, stop_ids
from vita.model.llm import CacheBatch, MoECausalLM


@dataclass
class EngineConfig:
    """Scheduler and cache settings, under vLLM's names.

    enable_chunked_prefill: each step is one fused forward of at most `max_num_batched_tokens` tokens (decode
      tokens + prompt chunks); the budget must be more than max_batch_size so that a prompt always progresses.
      Off: each prompt is prefilled whole in a forward of its own, then the step decodes.
    block_size: tokens per prefix-cache block. num_prefix_blocks: blocks in the prefix-cache pool (None: as many as
      the slot cache holds, max_batch_size * max_seq_len / block_size, which doubles the KV memory).
    cuda_graphs: decode-only steps replay CUDA graphs (None: when the model is on a CUDA device; vLLM's
      `enforce_eager` is `cuda_graphs=False`). True off CUDA runs the same padded, bucketed step eagerly (tests).
    cudagraph_capture_sizes: the batch sizes captured (None: 1, 2, 4, 8, then multiples of 8 up to max_batch_size,
      as vLLM's default list); a batch runs in the smallest that holds it.
    min_graph_kv_len: the smallest context bucket; buckets double from it up to max_seq_len (a step attends over
      its whole bucket, so the buckets bound that waste to 2x; each bucket and size is one graph, captured lazily).
    """

    enable_chunked_prefill: bool = False
    max_num_batched_tokens: int = 64
    enable_prefix_caching: bool = False
    block_size: int = 16
    num_prefix_blocks: int | None = None
    cuda_graphs: bool | None = None
    cudagraph_capture_sizes: tuple[int, ...] | None = None
    min_graph_kv_len: int = 256


@dataclass
class EngineRequest:
    """One sequence to generate: a prompt as ids (L,) or embeddings (L, H), and how to sample it."""

    request_id: str
    params: SamplingParams
    input_ids: Tensor | None = None
    inputs_embeds: Tensor | None = None
    queued_at: float = 0.0  # time.perf_counter() when `add` queued it
    # (L, 4) int64 that determines an embeddings prompt's keys and values without its values: per position the token
    # id and, for encoder rows, their item's digest and row (`PromptInput.slot_identity`); the prefix cache hashes it
    # instead of the (L, H) rows. None: it hashes the rows.
    identity: Tensor | None = None

    @property
    def prompt_len(self) -> int:
        prompt = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return 0 if prompt is None else prompt.shape[0]

    @classmethod
    def from_prompt(cls, model: MoECausalLM, request_id: str, prompt: PromptInput,
                    params: SamplingParams) -> EngineRequest:
        """A backend's prompt as the engine takes it: ids alone, or (L, H) embeddings with the slot rows replaced
        by the encoder outputs."""
        if prompt.slot_positions is None or prompt.slot_positions.numel() == 0:
            return cls(request_id, params, input_ids=prompt.input_ids)
        table = model.get_input_embeddings()
        with torch.inference_mode():  # on the model's device: the encoders' rows arrive on the CPU
            embeds = table(prompt.input_ids.to(table.weight.device)).clone()
            embeds[prompt.slot_positions.to(embeds.device)] = prompt.slot_embeddings.to(embeds.device, embeds.dtype)
        identity = None
        if prompt.slot_identity is not None:
            identity = torch.zeros(prompt.input_ids.shape[0], 4, dtype=torch.long)
            identity[:, 0] = prompt.input_ids
            identity[prompt.slot_positions, 1:] = prompt.slot_identity
        return cls(request_id, params, inputs_embeds=embeds, identity=identity)


@dataclass
class EngineStats:
    """Counters a test or a metric can read: how much compute each part of the schedule took."""

    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (prefix-cache hits are not computed)
    prefill_chunks: int = 0  # prefill forwards
    decode_tokens: int = 0  # one per running sequence per decode forward
    max_step_tokens: int = 0  # the most tokens (prefill + decode) one step computed
    cancelled: int = 0
    tokens_by_request: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSnapshot:
    """What the metrics read after a step: gauges now, and counters since the engine started."""

    num_running: int
    num_waiting: int
    decode_tokens: int
    prefix_queries: int | None = None  # None: prefix caching off
    prefix_hits: int | None = None

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineSnapshot:
        prefix = engine.prefix_cache_stats
        return cls(engine.num_running, engine.num_waiting, engine.stats.decode_tokens,
                   None if prefix is None else prefix.queries, None if prefix is None else prefix.hits)


@dataclass
class _Sequence:
    request: EngineRequest
    slot: int
    stops: frozenset[int]
    generator: torch.Generator | None
    queued_s: float = 0.0  # how long it waited for its slot (TokenOutput.queued_s of its first output)
    position: int = 0  # positions [0, position) have keys/values in the cache; the next token goes here
    last_token: int = 0
    generated: int = 0
    token_ids: list[int] = field(default_factory=list)  # generated so far (prefix caching of the answer)
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of the prompt's full blocks

    @property
    def prefilling(self) -> bool:
        return self.position < self.request.prompt_len


class LLMEngine:
    """Owns the model, the KV cache and the schedule. Thread-safe `add`/`cancel`; `step()` runs in one thread."""

    def __init__(self, model: MoECausalLM, *, max_batch_size: int = 8, max_seq_len: int | None = None,
                 config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config = config or EngineConfig()
        if config.enable_chunked_prefill and config.max_num_batched_tokens <= max_batch_size:
            raise InvalidInputError(f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be more than "
                                    f"max_batch_size ({max_batch_size}): a prompt chunk needs room beside the "
                                    "running sequences' decode tokens")
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings,
                               model.config.max_position_embeddings)
        self._device = model.lm_head.weight.device
        graphs = config.cuda_graphs if config.cuda_graphs is not None else self._device.type == "cuda"
        self._max_batch_size = max_batch_size
        # With graphs the cache has one more row, never given to a sequence: the padding rows' writes go there.
        self.cache = model.new_cache(max_batch_size + (1 if graphs else 0), self.max_seq_len)
        self._graph_sizes: tuple[int, ...] = ()
        if graphs:
            sizes = config.cudagraph_capture_sizes or (1, 2, 4, *range(8, max_batch_size + 8, 8))
            self._graph_sizes = tuple(sorted({min(s, max_batch_size) for s in sizes if s >= 1} | {max_batch_size}))
        self._graphs: dict[tuple[int, int], CUDAGraphDecoder] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if graphs and self._device.type == "cuda" else None
        self.prefix_cache: PrefixCache | None = None
        if config.enable_prefix_caching:
            blocks = config.num_prefix_blocks or max_batch_size * self.max_seq_len // config.block_size
            self.prefix_cache = PrefixCache(self.cache, block_size=config.block_size, num_blocks=max(1, blocks))
        self.free_slots = list(range(max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: deque[EngineRequest] = deque()
        self.running: dict[str, _Sequence] = {}  # in admission order: prefills go first come first served
        self.stats = EngineStats()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode-only steps run captured graphs (the padded, bucketed static step)."""
        return bool(self._graph_sizes)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return None if self.prefix_cache is None else self.prefix_cache.stats

    def add(self, request: EngineRequest) -> None:
        """Queue a sequence; it is prefilled from the next step that has a free slot."""
        if (request.input_ids is None) == (request.inputs_embeds is None):
            raise InvalidInputError("a request needs exactly one of input_ids and inputs_embeds")
        if request.prompt_len == 0:
            raise InvalidInputError("the prompt is empty")
        if request.prompt_len >= self.max_seq_len:
            raise ContextLengthError(f"the prompt has {request.prompt_len} tokens; this engine's context is "
                                     f"{self.max_seq_len} and at least one token must be generated")
        with self._lock:
            if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
                raise InvalidInputError(f"request id {request.request_id!r} is already in the engine")
            request.queued_at = time.perf_counter()
            self.waiting.append(request)

    def cancel(self, request_id: str) -> None:
        """Takes effect at the start of the next step: no forward runs for this sequence after the current one."""
        with self._lock:
            self._cancel.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._cancel)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        outputs = self._drop_cancelled()
        self._admit()
        if self.config.enable_chunked_prefill:
            outputs += self._chunked_step()
        else:
            outputs += self._prefill_whole()
            # Sequences prefilled just now decode too: their first token came from the prefill.
            decoding = [s for s in self.running.values() if not s.prefilling]
            if decoding:
                outputs += self._decode(decoding)
        self.stats.steps += 1
        return outputs

    # --- schedule ---------------------------------------------------------------------------------------

    def _drop_cancelled(self) -> list[TokenOutput]:
        with self._lock:
            cancel, self._cancel = self._cancel, set()
            dropped = [r for r in self.waiting if r.request_id in cancel]
            for r in dropped:
                self.waiting.remove(r)
        now = time.perf_counter()
        outputs = [TokenOutput(r.request_id, None, 0, "cancelled", queued_s=now - r.queued_at) for r in dropped]
        for request_id in cancel:
            seq = self.running.get(request_id)
            if seq is not None:
                self._release(seq)
                outputs.append(TokenOutput(request_id, None, seq.generated, "cancelled",
                                           queued_s=None if seq.generated else seq.queued_s))
        self.stats.cancelled += len(outputs)
        return outputs

    def _admit(self) -> None:
        """Waiting requests take free slots; with prefix caching their row starts from the cached blocks."""
        while self.free_slots:
            with self._lock:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            seq = _Sequence(request, self.free_slots.pop(), stop_ids(request.params, self.model.config.eos_token_id),
                            make_generator(request.params, self._device),
                            queued_s=time.perf_counter() - request.queued_at)
            if self.prefix_cache is not None:
                seq.hashes = block_hashes(self._identity(request), self.prefix_cache.block_size)
                # The last prompt token is always computed: its logits pick the first generated token.
                seq.position = self.prefix_cache.load(seq.hashes, seq.slot,
                                                      (request.prompt_len - 1) // self.prefix_cache.block_size)
            self.running[request.request_id] = seq

    def _prefill_whole(self) -> list[TokenOutput]:
        """Chunked prefill off: every admitted prompt is computed in one forward of its own."""
        outputs, computed = [], 0
        for seq in [s for s in self.running.values() if s.prefilling]:
            n = seq.request.prompt_len - seq.position
            ids, embeds = self._chunk_inputs(seq, n)
            logits = self.model(ids, inputs_embeds=embeds, cache=self.cache, slots=self._slots([seq]),
                                positions=self._positions(seq, n), logits_to_keep=1).logits
            computed += n
            outputs.append(self._prefilled(seq, n, logits[:, -1]))
        decode_tokens = sum(1 for s in self.running.values() if not s.prefilling)
        self.stats.max_step_tokens = max(self.stats.max_step_tokens, computed + decode_tokens)
        return [o for o in outputs if o is not None]

    def _chunked_step(self) -> list[TokenOutput]:
        """One fused forward of the step's decode tokens and prompt chunks, at most `max_num_batched_tokens` in all.

        Running sequences decode first; the rest of the budget goes to prompts first come first served. A prompt
        whose last chunk ran this step gets its first token from that chunk and decodes from the next step.
        """
        decoding = [s for s in self.running.values() if not s.prefilling]
        budget = self.config.max_num_batched_tokens - len(decoding)
        chunks = []
        for seq in [s for s in self.running.values() if s.prefilling]:
            take = min(seq.request.prompt_len - seq.position, budget)
            if take <= 0:
                break
            chunks.append((seq, take))
            budget -= take
        if not chunks and decoding and self.cuda_graphs:
            self.stats.max_step_tokens = max(self.stats.max_step_tokens, len(decoding))
            return self._decode(decoding)
        batches = [CacheBatch(self._positions(seq, n), self._slots([seq]), *self._chunk_inputs(seq, n))
                   for seq, n in chunks]
        if decoding:
            batches.insert(0, CacheBatch(torch.tensor([[s.position] for s in decoding], device=self._device),
                                         self._slots(decoding),
                                         torch.tensor([[s.last_token] for s in decoding], device=self._device)))
        if not batches:
            return []
        self.stats.max_step_tokens = max(self.stats.max_step_tokens, len(decoding) + sum(n for _, n in chunks))
        logits = self.model.forward_batches(batches, self.cache)
        outputs = self._decoded(decoding, logits.pop(0)[:, -1]) if decoding else []
        for (seq, n), chunk_logits in zip(chunks, logits, strict=True):
            output = self._prefilled(seq, n, chunk_logits[:, -1])
            if output is not None:
                outputs.append(output)
        return outputs

    def _chunk_inputs(self, seq: _Sequence, n: int) -> tuple[Tensor | None, Tensor | None]:
        """The next n prompt tokens of `seq` as (input_ids (1, n), None) or (None, inputs_embeds (1, n, H))."""
        request, start = seq.request, seq.position
        if request.input_ids is not None:
            return request.input_ids[None, start : start + n].to(self._device), None
        return None, request.inputs_embeds[None, start : start + n].to(self._device)

    def _positions(self, seq: _Sequence, n: int) -> Tensor:
        return torch.arange(seq.position, seq.position + n, device=self._device)[None]

    def _slots(self, seqs: list[_Sequence]) -> Tensor:
        return torch.tensor([s.slot for s in seqs], device=self._device)

    def _prefilled(self, seq: _Sequence, n: int, logits: Tensor) -> TokenOutput | None:
        """n more prompt positions are in the cache; at the prompt's end, sample the first token from `logits`."""
        seq.position += n
        self.stats.prefill_tokens += n
        self.stats.prefill_chunks += 1
        if seq.prefilling:
            return None
        if self.prefix_cache is not None:  # concurrent requests with the same system prompt find it at once
            self.prefix_cache.store(seq.hashes, seq.slot)
        token = int(sample_next_token(logits, seq.request.params, seq.generator)[0])
        return self._emit(seq, token)

    def _decode(self, seqs: list[_Sequence]) -> list[TokenOutput]:
        if self.cuda_graphs:
            return self._decoded(seqs, self._graph_decode(seqs))
        ids = torch.tensor([[s.last_token] for s in seqs], device=self._device)
        positions = torch.tensor([[s.position] for s in seqs], device=self._device)
        logits = self.model(ids, cache=self.cache, slots=self._slots(seqs), positions=positions).logits[:, -1]
        return self._decoded(seqs, logits)

    def _graph_decode(self, seqs: list[_Sequence]) -> Tensor:
        """The rows' logits (B, vocab) from the graph of the smallest captured size >= B and the smallest context
        bucket holding the longest row; the padding rows feed token 0 at position 0 of the scratch row."""
        size = next(s for s in self._graph_sizes if s >= len(seqs))
        need = max(s.position for s in seqs) + 1
        kv_len = min(self.max_seq_len, max(self.config.min_graph_kv_len, 1 << (need - 1).bit_length()))
        decoder = self._graphs.get((size, kv_len))
        if decoder is None:
            decoder = CUDAGraphDecoder(self.model, self.cache, size, kv_len=kv_len, scratch_slot=self._max_batch_size,
                                       pool=self._graph_pool)
            self._graphs[(size, kv_len)] = decoder
        pad = size - len(seqs)
        ids = torch.tensor([s.last_token for s in seqs] + [0] * pad, device=self._device)
        positions = torch.tensor([s.position for s in seqs] + [0] * pad, device=self._device)
        slots = torch.tensor([s.slot for s in seqs] + [self._max_batch_size] * pad, device=self._device)
        return decoder(ids, positions, slots)[: len(seqs)]

    def _decoded(self, seqs: list[_Sequence], logits: Tensor) -> list[TokenOutput]:
        """Each sequence's next token from its row of `logits` (B, vocab)."""
        self.stats.decode_tokens += len(seqs)
        tokens = self._sample(logits, seqs)
        outputs = []
        for seq, token in zip(seqs, tokens, strict=True):
            seq.position += 1
            outputs.append(self._emit(seq, token))
        return outputs

    def _sample(self, logits: Tensor, seqs: list[_Sequence]) -> list[int]:
        """Greedy rows share one argmax; sampled rows each use their own parameters and seeded generator."""
        tokens = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            if seq.request.params.temperature > 0:
                tokens[row] = int(sample_next_token(logits[row : row + 1], seq.request.params, seq.generator)[0])
        return tokens

    def _emit(self, seq: _Sequence, token: int) -> TokenOutput:
        index = seq.generated
        seq.generated += 1
        seq.last_token = token
        if self.prefix_cache is not None:
            seq.token_ids.append(token)
        by_request = self.stats.tokens_by_request
        by_request[seq.request.request_id] = by_request.get(seq.request.request_id, 0) + 1
        finish = None
        if token in seq.stops:
            finish = "stop"
        elif seq.generated >= seq.request.params.max_new_tokens or seq.position >= self.max_seq_len:
            finish = "length"
        if finish is not None:
            self._release(seq)
        return TokenOutput(seq.request.request_id, token, index, finish, queued_s=seq.queued_s if index == 0 else None)

    def _release(self, seq: _Sequence) -> None:
        if self.prefix_cache is not None and not seq.prefilling:
            self._store_answer(seq)
        del self.running[seq.request.request_id]
        self.free_slots.append(seq.slot)

    def _store_answer(self, seq: _Sequence) -> None:
        """Cache the full blocks of prompt + answer in the row, for the next turn of the same conversation, whose
        prompt is this history with the answer in it."""
        request, block_size = seq.request, self.prefix_cache.block_size
        fed = seq.token_ids[: seq.position - request.prompt_len]  # generated tokens whose keys are in the row
        if not fed:
            return
        first = len(seq.hashes)
        answer = torch.tensor(fed, dtype=torch.long, device=self._device)
        if request.inputs_embeds is None:
            identity = torch.cat((request.input_ids.to(self._device), answer))
        elif request.identity is not None:  # the answer's ids, with no encoder row
            rows = torch.zeros(len(fed), request.identity.shape[1], dtype=torch.long)
            rows[:, 0] = answer.cpu()
            identity = torch.cat((request.identity, rows))
        else:  # the rows the next prompt will hold there: the answer's token embeddings
            answer_rows = self.model.get_input_embeddings()(answer).to(request.inputs_embeds.dtype)
            identity = torch.cat((request.inputs_embeds.to(self._device), answer_rows))
        parent = seq.hashes[-1] if seq.hashes else None
        hashes = block_hashes(identity, block_size, parent, start_block=first)
        self.prefix_cache.store(hashes, seq.slot, first_block=first)

    @staticmethod
    def _identity(request: EngineRequest) -> Tensor:
        """What a prompt's keys/values are a function of: its ids; for a prompt with encoder rows (images, audio),
        the ids and the rows' identity when the request has one, else the embedding rows themselves."""
        if request.input_ids is not None:
            return request.input_ids
        return request.identity if request.identity is not None else request.inputs_embeds


class EngineLoop:
    """Runs `engine.step()` in a background thread while there is work; outputs go to `on_output`."""

    def __init__(self, engine: LLMEngine, on_output: Callable[[TokenOutput], None], *,
                 on_step: Callable[[LLMEngine, float], None] | None = None) -> None:
        self.engine = engine
        self.on_output = on_output
        self.on_step = on_step
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        self.engine.add(request)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)
        self._wake.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            start = time.perf_counter()
            for output in self.engine.step():
                self.on_output(output)
            if self.on_step is not None:
                self.on_step(self.engine, time.perf_counter() - start)
