"""A test double for Triton Inference Server: Triton's gRPC protocol, answered by the torch engine.

Triton with TensorRT-LLM needs GPUs, so `TritonBackend` is tested against this server instead. It implements
the service of tritonclient's own generated code, so it parses exactly the bytes tritonclient sends, and
checks each request against `config.pbtxt` as Triton does (input names, datatypes, shapes, required inputs).
It answers as TensorRT-LLM's `inflight_batcher_llm` model does in decoupled mode: one response per token
(`output_ids` [1, 1, n], `sequence_length` [1, 1]), or one at the end when `streaming` is false; `end_id` left
out of the output; the empty final response flagged `triton_final_response` when the client asks for it;
failures as `error_message`. A request with `stop` true cancels the in-flight request of the same id, and a
cancelled stream cancels its requests.

It is not Triton: one model at version 1, one sequence per request (batch dimension 1), raw tensor contents
only; the config's batching and instance settings are not applied, and the engine stops on the model's eos as
well as on `end_id` (end_id -1 stops on neither). Methods it does not implement answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import torch
from google.protobuf import text_format
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import triton_to_np_dtype

import vita
from vita.errors import InvalidInputError
from vita.llm.engine import EngineLoop, EngineRequest, LLMEngine, TokenOutput
from vita.model.generation import SamplingParams
from vita.model.llm import MoECausalLM

_VERSION = "1"
_Send = Callable[[service_pb2.ModelStreamInferResponse], None]


class TritonTorchServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Serves `<repository>/<model_name>/config.pbtxt` with an `LLMEngine` of its `max_batch_size` slots."""

    def __init__(self, model: MoECausalLM, repository: str | Path, *,
                 model_name: str = "tensorrt_llm") -> None:
        self.model_name = model_name
        config_text = (Path(repository) / model_name / "config.pbtxt").read_text()
        self.config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
        self.engine = LLMEngine(model, max_batch_size=self.config.max_batch_size)
        self._engine_loop = EngineLoop(self.engine, self._on_output)
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}  # in-flight request id -> engine outputs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Binds (port 0: any free port), starts the engine thread and the server; returns the port."""
        self._loop = asyncio.get_running_loop()
        self._server = grpc.aio.server(options=[  # Triton's limits: a prompt table can be tens of MB
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(f"{host}:{port}")
        self._engine_loop.start()
        await self._server.start()
        return port

    async def stop(self) -> None:
        await self._server.stop(grace=None)
        await asyncio.to_thread(self._engine_loop.stop)

    # --- health and metadata ----------------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=self._serves(request.name, request.version))

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="vita-triton-torch", version=vita.__version__)

    async def ModelMetadata(self, request, context):
        await self._check_model(request, context)

        def metadata(tensor):
            return service_pb2.ModelMetadataResponse.TensorMetadata(
                name=tensor.name, datatype=_datatype(tensor.data_type), shape=[-1, *tensor.dims])

        return service_pb2.ModelMetadataResponse(
            name=self.model_name, versions=[_VERSION], platform=self.config.backend,
            inputs=[metadata(t) for t in self.config.input],
            outputs=[metadata(t) for t in self.config.output],
        )

    async def ModelConfig(self, request, context):
        await self._check_model(request, context)
        return service_pb2.ModelConfigResponse(config=self.config)

    def _serves(self, name: str, version: str) -> bool:
        return name == self.model_name and version in ("", _VERSION)

    async def _check_model(self, request, context) -> None:
        if not self._serves(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Request for unknown model: '{request.name}' is not found")

    # --- inference --------------------------------------------------------------------------------------

    async def ModelStreamInfer(self, request_iterator, context
                               ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        responses: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, responses))
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:
            reader.cancel()  # the client went away: each of its requests cancels its engine sequence

    async def _read(self, request_iterator, responses: asyncio.Queue) -> None:
        """Serves the stream's requests concurrently; None once the client is done and all are answered."""
        try:
            async with asyncio.TaskGroup() as requests:
                async for request in request_iterator:
                    requests.create_task(self._serve(request, responses.put_nowait))
        finally:
            responses.put_nowait(None)

    async def _serve(self, request: service_pb2.ModelInferRequest, send: _Send) -> None:
        try:
            tensors = self._tensors(request)
            if _scalar(tensors, "stop", False):
                self._stop(request.id)
                send(self._response(request, None, final=True))  # TensorRT-LLM acknowledges with a bare final
            else:
                await self._generate(request, tensors, send)
        except Exception as e:  # as in Triton: the request fails with a message, the stream and server go on
            response = service_pb2.ModelInferResponse(model_name=self.model_name, model_version=_VERSION,
                                                      id=request.id)
            send(service_pb2.ModelStreamInferResponse(error_message=str(e), infer_response=response))

    def _stop(self, request_id: str) -> None:
        if not request_id:
            raise InvalidInputError("a stop request needs the id of the request to stop")
        if request_id in self._queues:  # else it has finished already: nothing to do, as in TensorRT-LLM
            self._engine_loop.cancel(request_id)

    async def _generate(self, request: service_pb2.ModelInferRequest, tensors: dict[str, np.ndarray],
                        send: _Send) -> None:
        request_id = request.id or uuid.uuid4().hex
        if request_id in self._queues:
            raise InvalidInputError(f"request id {request_id!r} is already in flight")
        engine_request = self._engine_request(request_id, tensors)
        end_id, streaming = _scalar(tensors, "end_id"), _scalar(tensors, "streaming", False)
        queue = self._queues[request_id] = asyncio.Queue()
        tokens: list[int] = []
        running = False
        try:
            self._engine_loop.submit(engine_request)
            running = True
            while running:
                output = await queue.get()
                running = output.finish_reason is None
                if output.token_id is None or (output.finish_reason == "stop" and output.token_id == end_id):
                    continue  # a cancelled sequence's end, or end_id: TensorRT-LLM leaves it out
                if streaming:
                    send(self._response(request, [output.token_id], final=False))
                else:
                    tokens.append(output.token_id)
        finally:
            del self._queues[request_id]
            if running:
                self._engine_loop.cancel(request_id)
        if not streaming:
            send(self._response(request, tokens, final=True))
        elif _bool_parameter(request, "triton_enable_empty_final_response"):
            send(self._response(request, None, final=True))

    def _on_output(self, output: TokenOutput) -> None:
        """Engine thread -> event loop."""
        queue = self._queues.get(output.request_id)
        if queue is not None:
            self._loop.call_soon_threadsafe(queue.put_nowait, output)

    # --- tensors ----------------------------------------------------------------------------------------

    def _tensors(self, request: service_pb2.ModelInferRequest) -> dict[str, np.ndarray]:
        """The request's inputs by name, checked against the model configuration as Triton checks them."""
        model = self.model_name
        specs = {spec.name: spec for spec in self.config.input}
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInputError("this server reads raw_input_contents, which is what tritonclient sends")
        tensors = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            spec = specs.get(tensor.name)
            if spec is None:
                raise InvalidInputError(f"unexpected inference input '{tensor.name}' for model '{model}'")
            datatype = _datatype(spec.data_type)
            if tensor.datatype != datatype:
                raise InvalidInputError(f"inference input '{tensor.name}' data-type is '{tensor.datatype}', "
                                        f"but model '{model}' expects '{datatype}'")
            shape, dims = list(tensor.shape), [1, *spec.dims]  # this server takes one sequence per request
            if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
                raise InvalidInputError(f"unexpected shape for input '{tensor.name}' for model '{model}'. "
                                        f"Expected {dims}, got {shape}")
            array = np.frombuffer(raw, dtype=triton_to_np_dtype(datatype))
            if array.size != np.prod(shape):
                raise InvalidInputError(f"input '{tensor.name}' has {array.size} elements but shape {shape}")
            tensors[tensor.name] = array.reshape(shape)
        missing = [spec.name for spec in self.config.input if not spec.optional and spec.name not in tensors]
        if missing:
            raise InvalidInputError(f"missing required input(s) {missing} for model '{model}'")
        outputs = {spec.name for spec in self.config.output}
        for output in request.outputs:
            if output.name not in outputs:
                raise InvalidInputError(f"unexpected inference output '{output.name}' for model '{model}'")
        return tensors

    def _engine_request(self, request_id: str, tensors: dict[str, np.ndarray]) -> EngineRequest:
        ids = tensors["input_ids"][0]
        length = _scalar(tensors, "input_lengths")
        if not 0 < length <= ids.size:
            raise InvalidInputError(f"input_lengths is {length} but input_ids has {ids.size} tokens")
        ids = torch.from_numpy(ids[:length].astype(np.int64))
        embeds = self._embed(ids, tensors)
        return EngineRequest(request_id, _sampling(tensors), input_ids=ids if embeds is None else None,
                             inputs_embeds=embeds)

    def _embed(self, ids: torch.Tensor, tensors: dict[str, np.ndarray]) -> torch.Tensor | None:
        """TensorRT-LLM's prompt table: an id vocab_size + k reads row k of `prompt_embedding_table`."""
        model = self.engine.model
        vocab = model.config.vocab_size
        if int(ids.min()) < 0:
            raise InvalidInputError(f"input_ids must be >= 0, got {int(ids.min())}")
        virtual = ids >= vocab
        if not virtual.any():
            return None
        if "prompt_embedding_table" not in tensors:
            raise InvalidInputError(f"input_ids hold ids >= vocab_size {vocab} but no prompt_embedding_table")
        table = tensors["prompt_embedding_table"][0]
        size = _scalar(tensors, "prompt_vocab_size", table.shape[0])
        if table.shape[1] != model.config.hidden_size or size > table.shape[0]:
            raise InvalidInputError(f"prompt_embedding_table is {list(table.shape)} with prompt_vocab_size "
                                    f"{size}; the model's hidden size is {model.config.hidden_size}")
        if int(ids.max()) >= vocab + size:
            raise InvalidInputError(f"input id {int(ids.max())} addresses row {int(ids.max()) - vocab} of a "
                                    f"prompt table of {size} rows (prompt_vocab_size)")
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(ids.clamp(max=vocab - 1)).clone()
            rows = torch.from_numpy(table.astype(np.float32))[ids[virtual] - vocab]
            embeds[virtual] = rows.to(embeds.dtype)
        return embeds

    def _response(self, request: service_pb2.ModelInferRequest, tokens: list[int] | None, *,
                  final: bool) -> service_pb2.ModelStreamInferResponse:
        """`output_ids` [1, 1, n] and `sequence_length` [1, 1] (those the request asks for), or no outputs."""
        response = service_pb2.ModelInferResponse(model_name=self.model_name, model_version=_VERSION,
                                                  id=request.id)
        response.parameters["triton_final_response"].bool_param = final
        if tokens is not None:
            wanted = {output.name for output in request.outputs} or {"output_ids", "sequence_length"}
            arrays = {"output_ids": np.array([[tokens]], np.int32),
                      "sequence_length": np.array([[len(tokens)]], np.int32)}
            for name, array in arrays.items():
                if name in wanted:
                    response.outputs.add(name=name, datatype="INT32", shape=array.shape)
                    response.raw_output_contents.append(array.tobytes())
        return service_pb2.ModelStreamInferResponse(infer_response=response)


def _sampling(tensors: dict[str, np.ndarray]) -> SamplingParams:
    """TensorRT-LLM's sampling inputs: greedy when top-k is 1, or when neither top-k nor top-p is set."""
    output_len = _scalar(tensors, "request_output_len")
    if output_len < 1:
        raise InvalidInputError(f"request_output_len must be >= 1, got {output_len}")
    top_k, top_p = _scalar(tensors, "runtime_top_k", 0), _scalar(tensors, "runtime_top_p", 0.0)
    greedy = top_k == 1 or (top_k == 0 and top_p == 0)
    end_id = _scalar(tensors, "end_id")
    return SamplingParams(
        max_new_tokens=output_len, temperature=0.0 if greedy else _scalar(tensors, "temperature", 1.0),
        top_k=top_k, top_p=top_p or 1.0, seed=_scalar(tensors, "random_seed"),
        stop_token_ids=[*([] if end_id is None or end_id < 0 else [end_id]), *_stop_words(tensors)],
        ignore_eos=end_id is not None and end_id < 0,  # TensorRT-LLM's end_id -1: no token ends the sequence
    )


def _stop_words(tensors: dict[str, np.ndarray]) -> list[int]:
    """`stop_words_list` [1, 2, K]: token ids, then each word's end offset (padded with -1)."""
    if "stop_words_list" not in tensors:
        return []
    ids, offsets = tensors["stop_words_list"][0]
    ends = [int(end) for end in offsets if end >= 0]
    if any(end - start != 1 for start, end in zip([0, *ends], ends)):
        raise InvalidInputError("this server takes single-token stop words only")
    return [int(ids[end - 1]) for end in ends]


def _scalar(tensors: dict[str, np.ndarray], name: str, default=None):
    """A [1, 1] input as a Python number, or `default` when the optional input was not sent."""
    return tensors[name].item() if name in tensors else default


def _datatype(data_type: int) -> str:
    """TYPE_FP16 in a model config is FP16 on the wire."""
    return model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")


def _bool_parameter(request: service_pb2.ModelInferRequest, name: str) -> bool:
    parameter = request.parameters.get(name)
    return parameter is not None and parameter.bool_param
