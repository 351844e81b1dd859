"""W3C trace context carried inside bus messages, so one request is one trace across every service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from opentelemetry import propagate
from opentelemetry.context import Context


class Traced(Protocol):
    """Any bus job: they all have a `map<string, string> trace_context` field."""

    @property
    def trace_context(self) -> Mapping[str, str]: ...


def current_trace_context() -> dict[str, str]:
    """The active span's `traceparent`/`tracestate`, for a producer to store in the job it submits."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_parent(message: Traced) -> Context:
    """The context a consumer passes to `start_as_current_span(..., context=...)` to continue the producer's trace."""
    return propagate.extract(dict(message.trace_context))
