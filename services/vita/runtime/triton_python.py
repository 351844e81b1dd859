"""What every Triton Python-backend model of this project does at the stub boundary: tensors in, errors out.

Only Triton's Python backend stub provides `triton_python_backend_utils`, so only the models it loads
(`vita.llm.backends.triton.python_model`, `vita.encoders.triton_model`) import this module.

Tensors cross the boundary by DLPack only. The stub of the nvidia-pytriton wheel (Triton 2.51) embeds pybind11
older than 2.12, whose numpy bridge reads `PyArray_Descr.elsize` at numpy 1's offset; under numpy 2 (which the
project pins) that word holds the dtype's flags, 0 for numeric dtypes, and the arrays the stub builds are wrong
(`as_numpy()` of UINT8 [1, 2, 3, 4, 5] is [1, 1, 1, 1, 1]); a BYTES input, deserialized through the same bridge,
kills the stub. DLPack bypasses numpy but has no strings: these models take media as UINT8, features as FP32.
docs/serving.md ("Encoders on Triton") has the details.
"""

from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils

from vita.errors import InvalidInputError, VitaError


def tensor_from_triton(name: str, tensor) -> torch.Tensor:
    """An input (`pb_utils.Tensor`) as a torch tensor of its own: DLPack, then copied (the memory is Triton's).

    InvalidInputError when it cannot be read (a BYTES tensor: DLPack has no strings)."""
    try:
        return torch.from_dlpack(tensor.to_dlpack()).clone()
    except Exception as e:
        raise InvalidInputError(f"input {name!r} cannot be read: {e}") from None


def triton_error(e: Exception):
    """`e` as a `pb_utils.TritonError`: INVALID_ARG for bad input (the client's gRPC INVALID_ARGUMENT), else
    INTERNAL with the exception's type."""
    message = str(e) if isinstance(e, VitaError) else f"{type(e).__name__}: {e}"
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(e, InvalidInputError) else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def string_parameters(model_config: dict) -> dict[str, str]:
    """The `parameters` of a model's config.pbtxt (as Triton hands it to `initialize`), key -> string value."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def vita_model_config(args: dict[str, str]) -> tuple[dict, dict[str, str], str]:
    """What every vita `TritonPythonModel.initialize` reads first: the model config (parsed `args["model_config"]`),
    its string parameters, and the `checkpoint_dir` one, checked; `torch_threads`, if set, is applied.

    Raises ValueError when `checkpoint_dir` is empty or still a `${...}` placeholder (Triton then fails the load
    with that message)."""
    config = json.loads(args["model_config"])
    params = string_parameters(config)
    checkpoint = params.get("checkpoint_dir", "")
    if not checkpoint or checkpoint.startswith("${"):
        raise ValueError("the checkpoint_dir parameter of config.pbtxt is not filled in: set it to a model "
                         "directory (vita.llm.backends.triton.server.write_cpu_repository does)")
    if int(params.get("torch_threads") or 0):
        torch.set_num_threads(int(params["torch_threads"]))
    return config, params, checkpoint
