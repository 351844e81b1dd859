"""Every RPC of every service ends with a status the caller can act on, whatever arrived on the wire.

Without this, grpc answers bytes that do not parse as the request message (a truncated frame, a string field that
is not UTF-8) with a bare INTERNAL "Exception deserializing request!", and an exception a handler did not expect
with UNKNOWN. `StatusGuard`, a server interceptor, wraps each method's handler:

- the request deserializer never raises: an undecodable message becomes INVALID_ARGUMENT naming the method;
- a Redis error that outlived the client's retries becomes UNAVAILABLE (retry later);
- anything else unexpected is logged with its traceback and becomes INTERNAL with a message saying so.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class _Undecodable:
    """What the guarded deserializer returns instead of raising; the handler wrapper turns it into a status."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as e:
            return _Undecodable(e)
    return parse


async def _refuse(context: grpc.aio.ServicerContext, method: str, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request is not a valid protobuf message "
                        f"(a string field must be UTF-8): {request.error}")


async def _fail(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    if isinstance(error, RedisError):
        log.warning("%s: the bus is unreachable: %s", method, error)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the message bus (Redis) is unreachable: {error}; retry")
    log.error("%s failed", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: the service failed on this request ({type(error).__name__})")


class _Checked:
    """A request stream that ends at the first undecodable message, as if the client had half-closed there.

    The status cannot be sent from here: the servicer may iterate in a task of its own while the handler writes a
    response, and grpc refuses a second operation on the call (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS) - the status
    was then never sent and the call hung until its deadline. The handler wrapper sends it once the servicer ends.
    """

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self.requests = requests
        self.refused: _Undecodable | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for request in self.requests:
            if isinstance(request, _Undecodable):
                self.refused = request
                return
            yield request


def _guard(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = _safe(handler.request_deserializer)
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            try:
                return await inner_uu(request, context)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:
                await _fail(context, method, e)
        return handler._replace(unary_unary=unary_unary, request_deserializer=parse)

    if handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
        inner_uw = handler.unary_stream  # writes its responses with context.write (e.g. grpc health's Watch)

        async def unary_write(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            try:
                await inner_uw(request, context)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:
                await _fail(context, method, e)
        return handler._replace(unary_stream=unary_write, request_deserializer=parse)

    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            try:
                async for response in inner_us(request, context):
                    yield response
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:
                await _fail(context, method, e)
        return handler._replace(unary_stream=unary_stream, request_deserializer=parse)

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            checked = _Checked(requests)
            try:
                response = await inner_su(checked.__aiter__(), context)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:
                if checked.refused is None:
                    await _fail(context, method, e)
            if checked.refused is not None:
                await _refuse(context, method, checked.refused)
            return response
        return handler._replace(stream_unary=stream_unary, request_deserializer=parse)

    inner_ss = handler.stream_stream
    if not inspect.isasyncgenfunction(inner_ss):  # writes with context.write

        async def stream_write(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            checked = _Checked(requests)
            try:
                await inner_ss(checked.__aiter__(), context)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:
                if checked.refused is None:
                    await _fail(context, method, e)
            if checked.refused is not None:
                await _refuse(context, method, checked.refused)
        return handler._replace(stream_stream=stream_write, request_deserializer=parse)

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        checked = _Checked(requests)
        try:
            async for response in inner_ss(checked.__aiter__(), context):
                yield response
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:
            if checked.refused is None:
                await _fail(context, method, e)
        if checked.refused is not None:
            await _refuse(context, method, checked.refused)
    return handler._replace(stream_stream=stream_stream, request_deserializer=parse)


class StatusGuard(grpc.aio.ServerInterceptor):
    """Install on a `grpc.aio.server` (`interceptors=[StatusGuard()]`); see the module docstring."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _guard(details.method, handler)
