"""`vita.runtime.guard.StatusGuard` on a real gRPC server (the `ServiceServer` every service runs), over loopback:
how a handler's failure ends the call, and what is logged about it.

A failure after the handler's own abort once made the guard abort again ("Abort already called!", logged with a
traceback by grpc) and log the client's mistake as an error; a streaming handler abandoned mid-write (its client
left) was finalized in another context, where OpenTelemetry logged "Failed to detach context".
"""

from __future__ import annotations

import asyncio
import gc
import logging

import grpc
import pytest
from opentelemetry import trace

from vita.errors import InvalidInputError
from vita.runtime.server import GrpcService, ServiceServer

tracer = trace.get_tracer(__name__)
SERVICE = "vita.test.Probe"


async def fails(request: bytes, context) -> None:
    yield b"one"
    raise RuntimeError("a bug of the handler's")


async def refuses(request: bytes, context) -> None:
    yield b"one"
    raise InvalidInputError(f"the value {'y' * 1000!r} is out of range")


async def aborts_then_fails(request: bytes, context) -> None:
    try:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the client's mistake")
    finally:
        raise RuntimeError("a bug in the handler's cleanup")
    yield b""  # an async generator  # pragma: no cover


async def streams_in_a_span(request: bytes, context) -> None:
    with tracer.start_as_current_span("probe"):
        while True:
            yield b"x" * 65536  # soon more than the client's flow-control window: the server waits in a write


def register(server: grpc.aio.Server) -> None:
    handlers = {name: grpc.unary_stream_rpc_method_handler(handler, request_deserializer=bytes,
                                                           response_serializer=bytes)
                for name, handler in (("Fails", fails), ("Refuses", refuses), ("AbortsThenFails", aborts_then_fails),
                                      ("StreamsInASpan", streams_in_a_span))}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def run(body):
    server = ServiceServer([GrpcService(SERVICE, register)])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            return await body(channel)
    finally:
        await server.drain()


async def status(channel, method: str) -> grpc.aio.AioRpcError:
    call = channel.unary_stream(f"/{SERVICE}/{method}", request_serializer=bytes, response_deserializer=bytes)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call(b"", timeout=30):
            pass
    await asyncio.sleep(0.2)  # whatever grpc logs after the status
    return err.value


def loud(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno >= logging.WARNING or r.exc_info]


def test_an_unexpected_error_is_internal_and_logged_once_with_its_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    err = asyncio.run(run(lambda channel: status(channel, "Fails")))
    assert err.code() == grpc.StatusCode.INTERNAL and "RuntimeError" in err.details()
    [record] = loud(caplog.records)
    assert record.levelno == logging.ERROR and record.name == "vita.runtime.guard"
    assert record.exc_info[0] is RuntimeError


def test_a_clients_bad_input_is_invalid_argument_logged_at_info_cut_short(caplog):
    caplog.set_level(logging.DEBUG)
    err = asyncio.run(run(lambda channel: status(channel, "Refuses")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in err.details()
    assert not loud(caplog.records), loud(caplog.records)
    [record] = [r for r in caplog.records if r.name == "vita.runtime.guard"]
    assert record.levelno == logging.INFO and len(record.getMessage()) < 600


def test_a_failure_after_the_handlers_abort_never_aborts_twice(caplog):
    caplog.set_level(logging.DEBUG)
    err = asyncio.run(run(lambda channel: status(channel, "AbortsThenFails")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "the client's mistake"
    # The cleanup's bug is the server's, logged once; nothing about a second abort.
    [record] = loud(caplog.records)
    assert record.name == "vita.runtime.guard" and record.levelno == logging.ERROR
    assert "after its status was sent" in record.getMessage() and record.exc_info[0] is RuntimeError


def test_a_stream_abandoned_mid_write_closes_its_generator_in_its_own_context(caplog):
    caplog.set_level(logging.DEBUG)

    async def body(channel):
        call = channel.unary_stream(f"/{SERVICE}/StreamsInASpan", request_serializer=bytes,
                                    response_deserializer=bytes)(b"", timeout=30)
        await call.read()
        await asyncio.sleep(0.5)  # the server is blocked writing into a full window
        call.cancel()
        for _ in range(3):
            await asyncio.sleep(0.2)
            gc.collect()
        return call

    asyncio.run(run(body))
    assert not loud(caplog.records), [(r.name, r.getMessage()) for r in loud(caplog.records)]
