"""Avro single-object encoding (Avro specification, "Single-object encoding").

    C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema | Avro binary body

The fingerprint names the writer schema; the body is resolved against the
current reader schema of the same event type, which is how schema evolution works.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from topology_store.schemas.registry import SchemaRegistry, load_registry

# Every record carries its event type in this header, so a reader can route or dead-letter
# it without decoding the body (adr/0001).
EVENT_TYPE_HEADER = "event_type"
MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8


class DecodeError(ValueError):
    """Bytes that cannot be read as a known event."""


@dataclass(frozen=True)
class DecodedEvent:
    event_type: str
    payload: dict[str, Any]


class EventCodec:
    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self._registry = registry or load_registry()

    def encode(self, event_type: str, payload: dict[str, Any]) -> bytes:
        schema = self._registry.reader(event_type)
        buffer = io.BytesIO()
        buffer.write(MAGIC)
        buffer.write(schema.fingerprint)
        schemaless_writer(buffer, schema.parsed, payload, strict_allow_default=True)
        return buffer.getvalue()

    def decode(self, data: bytes) -> DecodedEvent:
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding (bad marker or too short)")
        fingerprint = bytes(data[2:HEADER_SIZE])
        writer = self._registry.writers.get(fingerprint)
        if writer is None:
            raise DecodeError(f"unknown writer schema fingerprint {fingerprint.hex()}")
        reader = self._registry.readers.get(writer.event_type)
        if reader is None:
            raise DecodeError(f"no reader schema for event type {writer.event_type}")
        body = io.BytesIO(data[HEADER_SIZE:])
        try:
            payload = schemaless_reader(body, writer.parsed, reader.parsed)
        except Exception as exc:  # fastavro raises a variety of errors on corrupt bodies
            raise DecodeError(f"corrupt {writer.event_type} body: {exc}") from exc
        if body.tell() != len(data) - HEADER_SIZE:
            raise DecodeError(f"{writer.event_type} body has trailing bytes")
        assert isinstance(payload, dict)
        return DecodedEvent(event_type=writer.event_type, payload=payload)
