"""The audio and vision encoders as Triton Python-backend models: `model_repository_cpu/{audio,vision}-encoder`.

Imported by those models' `1/model.py` inside Triton's Python backend stub, which alone provides
`triton_python_backend_utils`; nothing else imports this module. The model names are the KServe models' (the
pools' names), and so is the output, `embeddings`; the inputs are the ones of `Encoder.from_v2` that cross the
stub without numpy (`vita.runtime.triton_python`): an encoded file as UINT8 bytes, or preprocessed FP32 features.

One item per request, batch dimension 1: `embeddings` [1, tokens, hidden] FP32. Triton's dynamic batcher hands
`execute` every request waiting (ragged: any sizes), and their items go through one tower forward, as the Redis
worker batches its jobs. A request with bad input gets an INVALID_ARG error naming it and fails alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from vita.encoders.audio import AudioTowerEncoder
from vita.encoders.base import Encoder, load_encoder
from vita.encoders.vision import VisionTowerEncoder
from vita.errors import InvalidInputError
from vita.model.placement import TORCH_DTYPES
from vita.runtime.triton_python import tensor_from_triton, triton_error, vita_model_config

ENCODERS: dict[str, type[Encoder]] = {"audio-encoder": AudioTowerEncoder, "vision-encoder": VisionTowerEncoder}


class EncoderPythonModel:
    """The `TritonPythonModel` of an encoder (see the module docstring); `pool` is its model name."""

    def __init__(self, args: dict[str, str], pool: str) -> None:
        config, params, checkpoint = vita_model_config(args)
        dtype = params.get("dtype") or "float32"
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"the dtype parameter must be one of {sorted(TORCH_DTYPES)}, not {dtype!r}")
        # Only this pool's tower is read from the checkpoint.
        self.encoder = load_encoder(ENCODERS[pool], Path(checkpoint), "cpu", dtype)
        self.input_names = tuple(tensor["name"] for tensor in config["input"])

    def execute(self, requests: list) -> list:
        prepared: list[torch.Tensor | Exception] = []
        for request in requests:
            try:
                prepared.append(self._prepare(request))
            except Exception as e:  # a bad request fails alone
                prepared.append(e)
        inputs = [p for p in prepared if isinstance(p, torch.Tensor)]
        try:
            outputs = iter(self.encoder.forward(inputs) if inputs else [])
        except Exception as e:  # the forward failed for everyone in it
            pb_utils.Logger.log_error(f"{self.encoder.pool} forward failed: {e!r}")
            outputs, prepared = iter([]), [p if isinstance(p, Exception) else e for p in prepared]
        responses = []
        for p in prepared:
            if isinstance(p, Exception):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=triton_error(p)))
            else:
                embeddings = next(outputs).float().contiguous().unsqueeze(0)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor.from_dlpack("embeddings", embeddings)]))
        return responses

    def _prepare(self, request) -> torch.Tensor:
        """The request's one item as tower input; InvalidInputError names what is wrong."""
        given = [(name, tensor) for name in self.input_names
                 if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None]
        if len(given) != 1:
            raise InvalidInputError(f"send exactly one of the inputs {list(self.input_names)}; got "
                                    f"{[name for name, _ in given] or 'none'}")
        name, tensor = given[0]
        x = tensor_from_triton(name, tensor)
        if x.dim() < 1 or x.shape[0] != 1:
            raise InvalidInputError(f"input {name!r}: one item per request (batch size 1); got shape "
                                    f"{list(x.shape)}; Triton batches requests itself")
        array = x[0].numpy()
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        (item,) = self.encoder.from_v2(name, array, {})
        return item
