"""``topology emit``: publish events given as JSON, one result line per event (adr/0001).

The whole input is validated before anything is sent, so a bad line 5,000 does
not leave 4,999 events published: invalid input sends nothing.

``event_from_json`` is the one reading of an event given as JSON: ``topology
emit`` and the outbox relay (a row's ``payload_json``, adr/0008) both use it, so
the same fields give the same event and the same Avro bytes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import Event, EventInputError, parse_event


def event_from_json(data: Any, event_type: str | None = None) -> Event:
    """The event whose fields ``data`` (decoded JSON) gives; ``event_type`` stands in for,
    or must agree with, its ``type`` field. Raises ``EventInputError`` naming every fault."""
    if not isinstance(data, dict):
        raise EventInputError(f"an event must be a JSON object, not {type(data).__name__}")
    return parse_event(data, event_type)


@dataclass(frozen=True)
class InputError:
    line: int
    message: str


def parse_lines(lines: Iterable[str]) -> tuple[list[Event], list[InputError]]:
    events: list[Event] = []
    errors: list[InputError] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(InputError(number, f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        try:
            events.append(event_from_json(data))
        except EventInputError as exc:
            errors.append(InputError(number, str(exc)))
    return events, errors


async def emit(settings: Settings, lines: Iterable[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Returns the process exit status: 0 all acknowledged, 1 some not, 2 invalid input."""
    # The streams of the moment of the call (a default of sys.stdout would be the import's).
    out, err = out or sys.stdout, err or sys.stderr
    events, errors = parse_lines(lines)
    if errors:
        for error in errors:
            print(f"line {error.line}: {error.message}", file=err)
        print(f"{len(errors)} invalid event(s); nothing was sent", file=err)
        return 2
    failed = 0
    publisher = EventPublisher(settings)
    try:
        await publisher.start()
    except KafkaError as exc:
        await publisher.stop()
        print(f"cannot reach the broker at {settings.kafka_bootstrap} ({type(exc).__name__}); nothing was sent",
              file=err)
        return 1
    try:
        async for outcome in publisher.publish_many(events):
            if isinstance(outcome, PublishFailed):
                failed += 1
                line = {"event_id": str(outcome.event.event_id), "type": outcome.event.EVENT_TYPE,
                        "status": "failed", "error": repr(outcome.cause)}
            else:
                line = {"event_id": str(outcome.event_id), "type": outcome.event_type, "status": "acknowledged",
                        "topic": outcome.topic, "partition": outcome.partition, "offset": outcome.offset}
            print(json.dumps(line), file=out, flush=True)
    finally:
        await publisher.stop()
    if failed:
        print(f"{failed} of {len(events)} event(s) were not acknowledged", file=err)
        return 1
    return 0
