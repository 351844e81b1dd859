"""Every RPC of every service ends with a status the caller can act on, whatever arrived on the wire.

Without this, grpc answers bytes that do not parse as the request message (a truncated frame, a string field that
is not UTF-8) with a bare INTERNAL "Exception deserializing request!", and an exception a handler did not expect
with UNKNOWN. `StatusGuard`, a server interceptor, wraps each method's handler:

- the request deserializer never raises: an undecodable message becomes INVALID_ARGUMENT naming the method;
- a Redis error that outlived the client's retries becomes UNAVAILABLE (retry later);
- an `InvalidInputError` a handler let through becomes INVALID_ARGUMENT, logged at info: the client's mistake;
- anything else unexpected is logged with its traceback and becomes INTERNAL with a message saying so;
- a call whose status went out already (the handler aborted it) is never aborted again: a failure after that (the
  abort itself failing because the client's deadline passed or the client left) ends the call quietly, or, if it
  is the handler's own bug, is logged at error once;
- a streaming handler (an async generator) is driven by the guard, which writes its responses and closes it in the
  call's own task however the call ends: left to grpc, a generator abandoned mid-call (the client left, its
  deadline passed) was finalized later in another context, where OpenTelemetry could not detach its span's
  context ("Failed to detach context").

What services log about a call's status follows `status_level`: the client's mistakes at info, UNAVAILABLE at
warning, the server's failures at error; client-supplied values go into logs only through `excerpt`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from vita.errors import InvalidInputError

log = logging.getLogger(__name__)

# Statuses that say the client's request or its call ended it (its input, its deadline, its cancel, its quota, the
# state it asked about): a service working as it should, logged at info. UNAVAILABLE (retry later) is a warning;
# anything else (INTERNAL, UNKNOWN, DATA_LOSS...) is the server's failure, an error.
CLIENT_STATUSES = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
})


def status_level(code: grpc.StatusCode) -> int:
    """The logging level of a call that ends with `code` (see CLIENT_STATUSES)."""
    if code in CLIENT_STATUSES:
        return logging.INFO
    return logging.WARNING if code == grpc.StatusCode.UNAVAILABLE else logging.ERROR


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def excerpt(value: object, limit: int = 128) -> str:
    """`value` as text fit for one log line: control characters escaped (a client's "id\\n" cannot forge a
    line), at most `limit` characters of it, and how long it was when it was cut."""
    text = str(value)
    shown = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


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
    if context.done():  # the handler ended the call first; it has its status
        return
    log.info("%s: undecodable request: %s", method, excerpt(request.error, 400))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{method}: the request is not a valid protobuf message "
                        f"(a string field must be UTF-8): {request.error}")


async def _fail(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    """End the call for `error`, which the handler raised: with a status, logged once, unless it has one already.
    Returns only when the call has its status (grpc then ends it quietly); raises otherwise."""
    if context.done():  # the handler aborted: a second abort would raise UsageError("Abort already called!")
        if isinstance(error, grpc.aio.BaseError):
            # Sending the handler's status failed: the call had ended under it (its deadline passed, the client
            # left), which is no failure of this service, and the handler logged the status it meant to send.
            log.debug("%s: the call ended before its status went out (%s)", method, type(error).__name__)
        else:
            log.error("%s failed after its status was sent", method, exc_info=error)
        return
    if isinstance(error, grpc.aio.InternalError):
        # ExecuteBatchError: grpc's core refused to send on the call, which had ended under the handler (the client
        # cancelled it or went away, or its deadline passed). Nothing can be sent on it any more, and that is the
        # client's doing: grpc ends a cancelled call without a word.
        log.debug("%s: the call ended before the handler did (%s)", method, type(error).__name__)
        raise asyncio.CancelledError
    if isinstance(error, grpc.aio.BaseError):  # grpc's own, e.g. UsageError: a misuse of the call by the handler
        raise error
    if isinstance(error, RedisError):
        log.warning("%s: the bus is unreachable: %s", method, excerpt(error, 400))
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the message bus (Redis) is unreachable: {error}; retry")
    if isinstance(error, InvalidInputError):  # the client's request, which the handler did not check itself
        log.info("%s: invalid request: %s", method, excerpt(error, 400))
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
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

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            """The generator's responses written here, and the generator closed here, in the call's task."""
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            try:
                async with contextlib.aclosing(inner_us(request, context)) as responses:
                    async for response in responses:
                        await context.write(response)
            except (grpc.aio.AbortError, grpc.RpcError):
                raise
            except Exception as e:
                await _fail(context, method, e)
        return handler._replace(unary_stream=unary_stream, request_deserializer=parse)

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            checked = _Checked(requests)
            response = None
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

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        """As `unary_stream`: the generator's responses written, and the generator closed, in the call's task."""
        checked = _Checked(requests)
        try:
            async with contextlib.aclosing(inner_ss(checked.__aiter__(), context)) as responses:
                async for response in responses:
                    await context.write(response)
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
