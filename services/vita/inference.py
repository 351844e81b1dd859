"""In-process inference: processor + model + streaming detokenisation for one request at a time.

The services batch many requests on the same model (see `vita.llm`); this is the reference path they are compared
against, and what `vita generate` and the in-process demo use.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vita.model.generation import SamplingParams, stream_generate, token_budget
from vita.model.vita import VitaForCausalLM
from vita.processing.processor import AudioInput, ImageInput, PromptStats, VideoInput, VitaProcessor
from vita.processing.prompt import Message
from vita.processing.tokenizer import IncrementalDecoder, VitaTokenizer
from vita.tiny import build_tiny_checkpoint


@dataclass
class GenerationRequest:
    text: str = ""
    images: Sequence[ImageInput] = ()
    video: VideoInput | None = None
    audio: Sequence[AudioInput] = ()
    history: Sequence[Message] = ()
    system_prompt: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class Usage:
    prompt: PromptStats
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop token) or "length"
    encode_s: float
    time_to_first_token_s: float
    total_s: float

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.prompt_tokens

    @property
    def media_summary(self) -> str:
        return self.prompt.summary()

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class StreamEvent:
    """A text delta with the token that produced it; the last event carries `usage` instead."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    usage: Usage | None = None


class VitaPipeline:
    def __init__(self, model: VitaForCausalLM, tokenizer: VitaTokenizer, model_dir: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.processor = VitaProcessor(tokenizer, model.vita_config)

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, threads: int | None = None,
             dtype: torch.dtype = torch.float32) -> VitaPipeline:
        """Loads a model directory; with none given, the tiny model (built on first use)."""
        if threads:
            torch.set_num_threads(threads)
        path = Path(model_dir) if model_dir is not None else build_tiny_checkpoint()
        model = VitaForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, VitaTokenizer.from_file(path), path)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def stream(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        start = time.perf_counter()
        params = request.sampling
        context = self.model.config.max_position_embeddings
        inputs, stats = self.processor(
            request.text, images=request.images, video=request.video, audio=request.audio,
            history=request.history, system=request.system_prompt, max_length=context - 1,
        )
        embeds = self.model.embed_multimodal(inputs, self.processor.slot_ids)
        encode_s = time.perf_counter() - start
        budget = token_budget(params.max_new_tokens, stats.prompt_tokens, context)
        if budget < params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=budget)

        decoder = IncrementalDecoder(self.tokenizer)
        stops = {self.tokenizer.eos_id, *params.stop_token_ids}
        count, first_token_s, finish = 0, 0.0, "length"
        for token in stream_generate(self.model, inputs_embeds=embeds, params=params):
            count += 1
            if count == 1:
                first_token_s = time.perf_counter() - start
            if token in stops:
                finish = "stop"
                break
            yield StreamEvent(text=decoder.push(token), token_ids=(token,))
        tail = decoder.flush()
        if tail:
            yield StreamEvent(text=tail)
        yield StreamEvent(usage=Usage(stats, count, finish, encode_s, first_token_s, time.perf_counter() - start))
