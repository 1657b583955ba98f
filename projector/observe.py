"""What the projector tells an operator about a batch: its apply span (W3C trace
context from the records' headers, adr/0011) and its structured log lines.

Log lines carry ``topic``, ``partition``, ``offset`` and ``event_id`` as fields,
never a claim value: values may be personal data (e-mails), and the JSON log
redacts them anyway (runtime/logs.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from topology_store.runtime.settings import Settings
from topology_store.runtime.tracing import apply_span_arguments, batch_contexts, tracer
from topology_store.schemas.models import CELL_EVENT_TYPES, CLAIM_EVENT_TYPES, DECISION_EVENT_TYPES, REQUEST_EVENT_TYPES

if TYPE_CHECKING:
    from topology_store.core.fold import PositionedEvent
    from topology_store.projector.store import PartitionAdvance

log = logging.getLogger("topology_store.projector.consumer")

# Metric labels take only these (an unknown header value would be unbounded cardinality).
KNOWN_EVENT_TYPES = CELL_EVENT_TYPES | CLAIM_EVENT_TYPES | REQUEST_EVENT_TYPES | DECISION_EVENT_TYPES | {
    "LeaseExpiryTick"
}


def bounded_event_type(raw: str) -> str:
    return raw if raw in KNOWN_EVENT_TYPES else "unknown"


@contextmanager
def apply_span(settings: Settings, batch: Mapping[TopicPartition, Sequence[ConsumerRecord]]) -> Iterator[trace.Span]:
    """The span of one batch, current while it is decoded and committed: linked to
    the trace context of every record that carried one (a batch holds many traces),
    and their child when they all belong to one trace."""
    contexts, dropped = batch_contexts(record.headers for records in batch.values() for record in records)
    parent, links = apply_span_arguments(contexts)
    attributes: dict[str, str | int] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.consumer.group.name": settings.consumer_group,
        "messaging.batch.message_count": sum(len(records) for records in batch.values()),
        "topology.batch.partitions": len(batch),
    }
    if dropped:
        attributes["topology.batch.links_dropped"] = dropped
    with tracer().start_as_current_span(
        "topology apply", context=parent, kind=SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span


def batch_failed(exc: BaseException) -> None:
    """Mark the current apply span: the batch was not committed (it will be re-read)."""
    span = trace.get_current_span()
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def batch_committed(
    version: int,
    decisions: Sequence[tuple[PositionedEvent, object]],
    dead_letters: int,
    advances: Mapping[tuple[str, int], PartitionAdvance],
) -> None:
    """The span's outcome and the batch's log lines: a DEBUG summary with the
    offsets each partition advanced over, and one INFO line per rejected event."""
    span = trace.get_current_span()
    span.set_attribute("topology.version", version)
    span.set_attribute("topology.batch.dead_letters", dead_letters)
    for positioned, decision in decisions:
        outcome = getattr(getattr(decision, "outcome", None), "value", None)
        if outcome == "rejected":
            event = positioned.event
            log.info(
                "event rejected: %s", getattr(decision, "reason", None) or "no reason",
                extra={"event_id": str(event.event_id), "event_type": event.EVENT_TYPE, "topic": positioned.topic,
                       "partition": positioned.partition, "offset": positioned.offset},
            )
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "committed %d events, %d dead letters, version %d", len(decisions), dead_letters, version,
            extra={"version": version, "offsets": {
                f"{topic}[{partition}]": [advance.expected, advance.next_offset - 1]
                for (topic, partition), advance in advances.items()
            }},
        )
