"""Fixtures the end-to-end modules share. Each module runs its own stack (module scope, a key prefix of its own);
`stack` here is the Converse modules' one (the trained duplex model, metrics on), and a module that needs another
(the random tiny model, the realtime gateway) defines its own `stack`, which `client` then serves."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from redis import Redis

from vita.client import VitaClient
from vita.stack import LocalStack


@pytest.fixture(scope="module")
def stack(request, duplex_model_dir, tmp_path_factory) -> Iterator[LocalStack]:
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    with LocalStack(model_dir=str(duplex_model_dir), prefix=f"{name}{uuid.uuid4().hex[:8]}", metrics=True,
                    log_dir=str(tmp_path_factory.mktemp("logs"))) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack) -> Iterator[VitaClient]:
    with VitaClient(stack.target, timeout_s=None) as c:
        yield c


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    r = Redis.from_url("redis://127.0.0.1:6379/0")
    yield r
    r.close()
