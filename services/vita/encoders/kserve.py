"""An encoder as a KServe Open Inference Protocol v2 model over gRPC: callable directly, deployable as a KServe
InferenceService (a custom predictor whose container port is the gRPC one).

`kserve.ModelServer.start()` runs its own event loop and always opens a REST port on 0.0.0.0 besides gRPC on
[::]; this process also runs the Redis worker, so it mounts exactly what ModelServer's gRPC server mounts (kserve's
`InferenceServicer` over a `DataPlane` and `ModelRepository`, with its error-to-status interceptor) on a server of
its own, bound to the given host and port, in the worker's loop. There is no REST port. The v2 ServerLive,
ServerReady and ModelReady RPCs are this port's health; grpc.health.v1 lives on the service's --grpc-port.

Every answer is a status a client can act on (tests/integration/test_fuzz_kserve.py fuzzes the port): tensors that
do not decode are INVALID_ARGUMENT, and the model repository extension's load and unload are FAILED_PRECONDITION:
the port serves its one encoder, which no client may unload from under the others.

Only the service process may import this module: kserve and tritonclient register the same `inference.*`
protobuf symbols, so they cannot share a process. (Importing kserve also runs its ModelServer argument parser over
sys.argv; it only reads flags it knows and ignores ours.)
"""

from __future__ import annotations

import asyncio
import struct

import grpc
import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelRepository
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import to_http_parameters
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from vita.encoders.base import Encoder, timed_forward
from vita.errors import InvalidInputError
from vita.runtime.guard import StatusGuard
from vita.runtime.server import EXCLUSIVE_PORT, MAX_MESSAGE_BYTES, listen
from vita.telemetry.metrics import Metrics


class EncoderModel(Model):
    """Media in (see `Encoder.v2_inputs`), embeddings out: FP32 `embeddings` [tokens, hidden] with every item's
    rows in input order, and INT32 `item_tokens` [items]."""

    def __init__(self, encoder: Encoder, metrics: Metrics) -> None:
        super().__init__(encoder.pool.value)
        self.encoder = encoder
        self.metrics = metrics
        self.ready = True  # the tower is loaded before the model exists

    def get_input_types(self) -> list[dict]:
        return list(self.encoder.v2_inputs)

    def get_output_types(self) -> list[dict]:
        return [{"name": "embeddings", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "item_tokens", "datatype": "INT32", "shape": [-1]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        try:
            inputs = await asyncio.to_thread(self._prepare, payload)
        except InvalidInputError as e:
            raise InvalidInput(str(e)) from None
        outputs = await asyncio.to_thread(timed_forward, self.encoder, inputs, self.metrics)
        embeddings = _output("embeddings", "FP32", torch.cat(outputs).float().cpu().numpy())
        item_tokens = _output("item_tokens", "INT32", np.array([x.shape[0] for x in outputs], dtype=np.int32))
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[embeddings, item_tokens])

    def _prepare(self, payload: InferRequest) -> list[torch.Tensor]:
        """Decoding runs in a thread, like the worker's; input parameters override the request's."""
        request_parameters = to_http_parameters(payload.parameters or {})
        inputs = []
        for tensor in payload.inputs:
            try:
                array = tensor.as_numpy()
            # kserve decodes with numpy and struct, which raise what they raise: a BYTES length prefix past the
            # end (struct.error), a value out of its datatype's range (OverflowError), a shape that does not fit.
            except (InvalidInput, ValueError, TypeError, OverflowError, struct.error) as e:
                raise InvalidInputError(f"input {tensor.name!r} does not decode as {tensor.datatype} "
                                        f"{list(tensor.shape)}: {e}") from None
            parameters = {**request_parameters, **(tensor.parameters or {})}
            inputs += self.encoder.from_v2(tensor.name, array, parameters)
        if not inputs:
            raise InvalidInputError("the input tensors hold no media")
        return inputs


def _output(name: str, datatype: str, array: np.ndarray) -> InferOutput:
    """As raw bytes: tensor contents would cost a Python object per float."""
    output = InferOutput(name, list(array.shape), datatype)
    output.set_data_from_numpy(array, binary_data=True)
    return output


class _OneModelServicer(InferenceServicer):
    """kserve's v2 servicer with the repository extension's load and unload refused."""

    def __init__(self, registry: ModelRepository, model: EncoderModel) -> None:
        super().__init__(DataPlane(model_registry=registry), ModelRepositoryExtension(registry))
        self._model_name = model.name

    async def RepositoryModelLoad(self, request, context: grpc.aio.ServicerContext):
        await self._refuse(context)

    async def RepositoryModelUnload(self, request, context: grpc.aio.ServicerContext):
        await self._refuse(context)

    async def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"this port serves the model {self._model_name!r} alone: models are not loaded or "
                            "unloaded at run time")


class KServeEndpoint:
    """The v2 gRPC server of one encoder; `stop` flips ModelReady to false before it closes the port."""

    def __init__(self, encoder: Encoder, metrics: Metrics, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.model = EncoderModel(encoder, metrics)
        registry = ModelRepository()
        registry.update(self.model)
        self.server = grpc.aio.server(
            interceptors=(StatusGuard(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *EXCLUSIVE_PORT],
        )
        add_GRPCInferenceServiceServicer_to_server(_OneModelServicer(registry, self.model), self.server)
        self.port = listen(self.server, host, port)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace_s: float) -> None:
        self.model.stop()
        await self.server.stop(grace_s)
