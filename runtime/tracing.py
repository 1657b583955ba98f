"""Tracing: W3C trace context through Kafka, on OpenTelemetry's API (adr/0011).

The code depends only on ``opentelemetry-api``: without an SDK and an exporter
every span is a no-op. The producer (``producer/publisher.py``) writes the
``traceparent`` (and ``tracestate``) of its publish span into each record's
headers and the envelope's ``trace_id``; the projector (``projector/consumer.py``)
reads them back and starts one apply span per batch, linked to every event's
context (a batch holds many traces), and a child of that context when the batch
holds a single trace.

A process exports spans when the standard ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp`` or ``console``) and the SDK is installed (the ``tracing``
extra): :func:`configure_tracing`, called by the ``topology`` command. The OTLP
exporter reads ``OTEL_EXPORTER_OTLP_ENDPOINT`` and friends; ``OTEL_SERVICE_NAME``
overrides the service name (``topology-<command>``). An application that sets up
its own tracer provider (``opentelemetry-instrument``, a host application using
``EventPublisher``) needs none of this.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext

log = logging.getLogger(__name__)

TRACER_NAME = "topology"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# The SDK keeps 128 links per span by default; more would only be dropped.
MAX_LINKS = 128

_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """The project's tracer (a proxy until a provider is set, so it may be taken early)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


def inject_headers(span: trace.Span | None = None) -> list[tuple[str, bytes]]:
    """Kafka headers carrying ``span``'s context, or the current one (empty when not traced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return [(name, value.encode("ascii")) for name, value in carrier.items() if name in (TRACEPARENT, TRACESTATE)]


def trace_id_of(span: trace.Span | None = None) -> str | None:
    """The W3C trace id of ``span`` (or the current one) as 32 hex digits, for the
    envelope's ``trace_id``; None when not traced."""
    context = (span if span is not None else trace.get_current_span()).get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def context_from_headers(headers: Sequence[tuple[str, bytes]]) -> SpanContext | None:
    """The remote span context in a record's ``traceparent`` header, if valid."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in (TRACEPARENT, TRACESTATE):
            carrier[name] = bytes(value).decode("ascii", "replace")
    if TRACEPARENT not in carrier:
        return None
    context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    return context if context.is_valid else None


def batch_contexts(headers_of_records: Iterable[Sequence[tuple[str, bytes]]]) -> tuple[list[SpanContext], int]:
    """The distinct trace contexts of a batch's records (at most :data:`MAX_LINKS`)
    and how many distinct ones were left out."""
    seen: dict[bytes, None] = {}
    for headers in headers_of_records:
        for name, value in headers:
            if name == TRACEPARENT:
                seen.setdefault(bytes(value), None)
                break
    contexts: list[SpanContext] = []
    dropped = 0
    for raw in seen:
        if len(contexts) >= MAX_LINKS:
            dropped += 1
            continue
        context = context_from_headers([(TRACEPARENT, raw)])
        if context is not None:
            contexts.append(context)
    return contexts, dropped


def apply_span_arguments(contexts: Sequence[SpanContext]) -> tuple[Context | None, list[Link]]:
    """Parent and links of an apply span: linked to every event's context, and a
    child of it when they all belong to one trace (the trace then continues)."""
    links = [Link(context) for context in contexts]
    if contexts and len({context.trace_id for context in contexts}) == 1:
        return trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])), links
    return None, links


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install an SDK tracer provider when ``OTEL_TRACES_EXPORTER`` asks for one;
    True when spans will be exported."""
    env = os.environ if environ is None else environ
    wanted = [name.strip() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    wanted = [name for name in wanted if name != "none"]
    if not wanted or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not installed "
                    "(pip install 'topology-store[tracing]'); traces are not exported")
        return False
    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    exporting = False
    for name in wanted:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            exporting = True
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.warning("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http "
                            "(pip install 'topology-store[tracing]'); traces are not exported")
                continue
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            exporting = True
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (otlp, console or none)", name)
    if not exporting:
        return False
    trace.set_tracer_provider(provider)
    return True
