"""Generation on Triton Inference Server running TensorRT-LLM's `inflight_batcher_llm` model, over gRPC.

The tensors are those of `model_repository/tensorrt_llm/config.pbtxt`. A multimodal prompt uses TensorRT-LLM's
prompt table: slot positions get the ids `vocab_size + k`, which the engine reads as row k of
`prompt_embedding_table` ([1, N, hidden], FP16: the table must be in the engine's dtype, the Mixtral engine is
float16, and it halves what a 12-tile image puts on the wire, 25 MB instead of 50).

Finish reasons. TensorRT-LLM's responses carry none, and its executor leaves `end_id` out of the output, while
stop words (our `stop_token_ids`, sent as `stop_words_list`) stay in. So a token of `stop_token_ids` (or
`end_id`, should a server send it) ends with "stop", the `max_new_tokens`-th token with "length", and a stream
that ends before either yields a token-less end event: "cancelled" after `cancel()`, else "stop" (it ended
on the dropped `end_id`). The one misreading: an engine that clamps `request_output_len` to its `max_seq_len`
ends early too, and that reads as "stop".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import torch
from tritonclient.grpc.aio import InferenceServerClient, InferInput, InferRequestedOutput, InferResult
from tritonclient.utils import np_to_triton_dtype

from vita.errors import InvalidInputError, VitaError
from vita.llm.backends.base import BackendRequest, EngineDeadError, PromptInput, TokenOutput
from vita.model.generation import SamplingParams, stop_ids

_OUTPUTS = ("output_ids", "sequence_length")  # TensorRT-LLM refuses a request that does not ask for both


class BackendError(VitaError):
    """Triton refused or failed a request; the message is the server's."""


class TritonBackend:
    """One gRPC stream per request, all on one channel (HTTP/2 multiplexes them over one connection).

    Closing a stream is how Triton cancels a request, so a caller that stops iterating cancels exactly its
    own request; nothing is demultiplexed by id, and a broken stream fails one request, not all in flight.
    """

    def __init__(self, url: str, *, model_name: str = "tensorrt_llm", vocab_size: int, end_id: int,
                 pad_id: int = 0) -> None:
        self.url = url
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.end_id = end_id
        self.pad_id = pad_id
        self._client: InferenceServerClient | None = None
        self._writers: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}  # request id -> its stream
        self._cancelled: set[str] = set()

    async def start(self) -> None:
        self._client = InferenceServerClient(self.url)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]:
        """Tokens as they come; the last event carries the finish reason (see the module docstring)."""
        rid, params = request.request_id, request.params
        writer: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        writer.put_nowait(self._message(rid, self._inputs(request.prompt, params)))
        responses = self._client.stream_infer(_requests(writer))
        self._writers[rid] = writer
        stops = stop_ids(params, self.end_id)
        index, finish = 0, None
        try:
            async for result, error in responses:
                if error is not None:
                    raise BackendError(f"Triton failed request {rid!r}: {error.message()}")
                for token in _output_ids(result):
                    finish = ("stop" if token in stops else
                              "length" if index + 1 >= params.max_new_tokens else None)
                    yield TokenOutput(rid, token, index, finish)
                    index += 1
                if _is_final(result):
                    break
            if finish is None:
                finish = "cancelled" if rid in self._cancelled else "stop"
                yield TokenOutput(rid, None, index, finish)
        except grpc.RpcError as e:
            raise BackendError(f"Triton at {self.url} failed request {rid!r}: {e.details()}") from e
        finally:
            writer.put_nowait(None)  # done writing: the stream closes once Triton has answered all of it
            self._writers.pop(rid, None)
            self._cancelled.discard(rid)
            if finish is None:  # the caller stopped listening, or it failed: Triton cancels what still runs
                responses.cancel()

    async def wait_dead(self) -> EngineDeadError:
        """Never: an unreachable Triton fails each request (UNAVAILABLE), and serves again once it is back."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cancel(self, request_id: str) -> None:
        """TensorRT-LLM's `stop` request, sent on the request's own stream so that it cannot overtake it."""
        writer = self._writers.get(request_id)
        if writer is not None:
            self._cancelled.add(request_id)
            writer.put_nowait(self._message(request_id, _stop_inputs()))

    def _inputs(self, prompt: PromptInput, params: SamplingParams) -> list[InferInput]:
        """The request's tensors, each with the batch dimension of 1 that `max_batch_size > 0` asks for."""
        ids = prompt.input_ids.to(torch.int64).clone()
        if ids.ndim != 1 or ids.numel() == 0:
            raise InvalidInputError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        tensors: dict[str, np.ndarray] = {}
        text = torch.ones_like(ids, dtype=torch.bool)
        if prompt.slot_positions is not None and prompt.slot_positions.numel():
            slots = prompt.slot_positions.to(torch.int64)
            if int(slots.min()) < 0 or int(slots.max()) >= len(ids) or len(slots.unique()) != len(slots):
                raise InvalidInputError(f"slot positions must be distinct positions of the {len(ids)}-token "
                                        f"prompt, got {slots.tolist()}")
            table = prompt.slot_embeddings.detach().to("cpu", torch.float16)
            if not torch.isfinite(table).all():
                raise InvalidInputError("slot embeddings overflow float16, the prompt table's dtype")
            ids[slots] = self.vocab_size + torch.arange(slots.numel())
            text[slots] = False
            tensors["prompt_embedding_table"] = table.numpy()[None]
            tensors["prompt_vocab_size"] = _scalar(slots.numel(), np.int32)
        words = ids[text]
        if words.numel() and (int(words.min()) < 0 or int(words.max()) >= self.vocab_size):
            raise InvalidInputError(f"token ids must be in [0, {self.vocab_size}) outside slot positions "
                                    f"(larger ids address prompt_embedding_table), got {words.tolist()}")
        tensors |= {
            "input_ids": ids.to(torch.int32).numpy()[None],
            "input_lengths": _scalar(ids.numel(), np.int32),
            "request_output_len": _scalar(params.max_new_tokens, np.int32),
            "end_id": _scalar(-1 if params.ignore_eos else self.end_id, np.int32),  # -1: no token ends it
            "pad_id": _scalar(self.pad_id, np.int32),
            "streaming": _scalar(True, np.bool_),
        }
        if params.temperature == 0:
            tensors["runtime_top_k"] = _scalar(1, np.int32)  # TensorRT-LLM's greedy search
        else:
            tensors["temperature"] = _scalar(params.temperature, np.float32)
            tensors["runtime_top_k"] = _scalar(params.top_k, np.int32)  # 0 is off, as in SamplingParams
            tensors["runtime_top_p"] = _scalar(params.top_p, np.float32)
            if params.seed is not None:
                tensors["random_seed"] = _scalar(params.seed, np.uint64)
        if params.stop_token_ids:  # one single-token word per end offset
            stops = list(params.stop_token_ids)
            tensors["stop_words_list"] = np.array([[stops, list(range(1, len(stops) + 1))]], np.int32)
        return [_tensor(name, array) for name, array in tensors.items()]

    def _message(self, request_id: str, inputs: list[InferInput]) -> dict[str, Any]:
        """One request of a stream, as `stream_infer` takes it; asks for Triton's empty final response."""
        return {"model_name": self.model_name, "inputs": inputs, "request_id": request_id,
                "outputs": [InferRequestedOutput(name) for name in _OUTPUTS],
                "parameters": {"triton_enable_empty_final_response": True}}


async def _requests(writer: asyncio.Queue[dict[str, Any] | None]) -> AsyncIterator[dict[str, Any]]:
    while (message := await writer.get()) is not None:
        yield message


def _stop_inputs() -> list[InferInput]:
    """Triton checks the required inputs before TensorRT-LLM sees `stop`, so they go with dummy values."""
    tensors = {"input_ids": _scalar(0, np.int32), "input_lengths": _scalar(0, np.int32),
               "request_output_len": _scalar(0, np.int32), "stop": _scalar(True, np.bool_)}
    return [_tensor(name, array) for name, array in tensors.items()]


def _scalar(value: float, dtype: type) -> np.ndarray:
    return np.array([[value]], dtype)


def _tensor(name: str, array: np.ndarray) -> InferInput:
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def _output_ids(result: InferResult) -> list[int]:
    ids = result.as_numpy("output_ids")  # (batch 1, beam 1, new tokens); none in a bare final response
    return [] if ids is None else ids[0, 0].tolist()


def _is_final(result: InferResult) -> bool:
    final = result.get_response().parameters.get("triton_final_response")
    return final is not None and final.bool_param
