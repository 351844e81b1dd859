"""OpenTelemetry tracing: one trace per request across gRPC and Redis hops (W3C trace context).

Off by default: without an exporter the API is a no-op. `configure_tracing(service, otlp_endpoint=...)` (or the
standard OTEL_EXPORTER_OTLP_ENDPOINT variable) sends spans over OTLP/gRPC; tests pass their own exporter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter


def configure_tracing(service: str, *, otlp_endpoint: str | None = None,
                      exporter: SpanExporter | None = None) -> TracerProvider | None:
    """Installs a tracer provider when there is somewhere to send spans; returns it (None when tracing is off)."""
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return provider


def extract_context(carrier: Mapping[str, str] | Iterable[tuple[str, str]]) -> context.Context:
    """The parent context carried by gRPC invocation metadata (bus messages: `vita.bus.trace.trace_parent`)."""
    return propagate.extract(dict(carrier))
