"""`--device`/`--dtype` names of every service, resolved once at start-up (`vita.model.placement`)."""

import pytest
import torch

from vita.errors import InvalidInputError
from vita.model.placement import resolve_device, resolve_dtype


def test_auto_is_the_cpu_in_float32_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto picks it")
    device = resolve_device("auto")
    assert device == torch.device("cpu") and resolve_dtype("auto", device) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", device) == torch.float16


@pytest.mark.parametrize(("name", "message"), [("gpu", "device 'gpu': "), ("cuda:x", "device 'cuda:x': ")])
def test_bad_device_names_are_invalid_input(name, message):
    with pytest.raises(InvalidInputError, match=message):
        resolve_device(name)


def test_bad_dtype_names_are_invalid_input():
    with pytest.raises(InvalidInputError, match="dtype must be auto or one of float32, bfloat16, float16, got 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
