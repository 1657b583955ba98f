"""Loads the ``.avsc`` files and indexes them by name and by fingerprint.

``schemas/*.avsc`` are the current reader schemas. ``schemas/history/*.avsc`` keep
every schema version that was ever emitted, so bytes written by an older producer
still name a writer schema this reader knows (see adr/0001).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).parent
HISTORY_DIR = SCHEMA_DIR / "history"

_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin CRC-64 that the Avro specification names CRC-64-AVRO."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint_bytes(parsed_schema: Any) -> bytes:
    """The 8 fingerprint bytes of single-object encoding: CRC-64-AVRO of the
    parsing canonical form, little-endian as the specification requires."""
    canonical = to_parsing_canonical_form(parsed_schema)
    return struct.pack("<Q", crc64_avro(canonical.encode("utf-8")))


@dataclass(frozen=True)
class EventSchema:
    """One version of one event type's Avro schema."""

    event_type: str
    parsed: Any
    fingerprint: bytes
    raw: dict[str, Any]


def _load(path: Path) -> EventSchema:
    raw = json.loads(path.read_text(encoding="utf-8"))
    # A fresh named-type scope per file: every file is self-contained, which is
    # what lets a Ruby or Go producer use one file without the others.
    parsed = fastavro.parse_schema(raw, named_schemas={})
    return EventSchema(
        event_type=raw["name"], parsed=parsed, fingerprint=fingerprint_bytes(parsed), raw=raw
    )


@dataclass(frozen=True)
class SchemaRegistry:
    """Reader schemas by event type; every known writer schema by fingerprint."""

    readers: dict[str, EventSchema]
    writers: dict[bytes, EventSchema]

    def reader(self, event_type: str) -> EventSchema:
        try:
            return self.readers[event_type]
        except KeyError:
            raise UnknownEventType(event_type) from None


class UnknownEventType(KeyError):
    """An event type for which no ``.avsc`` exists."""


@cache
def load_registry() -> SchemaRegistry:
    readers = {s.event_type: s for s in map(_load, sorted(SCHEMA_DIR.glob("*.avsc")))}
    writers = {s.fingerprint: s for s in readers.values()}
    if HISTORY_DIR.is_dir():
        for schema in map(_load, sorted(HISTORY_DIR.glob("*.avsc"))):
            writers.setdefault(schema.fingerprint, schema)
    return SchemaRegistry(readers=readers, writers=writers)


EVENT_TYPES: tuple[str, ...] = tuple(sorted(load_registry().readers))
