"""``topology schemas check``: every schema version stays readable, in both directions.

For each event type, the versions are ``schemas/history/<Type>.vN.avsc`` (N = 1, 2, ...)
and the current ``schemas/<Type>.avsc`` (the newest). The check fails when

1. **compatibility**: some version cannot read data written with another one, by
   Avro's schema-resolution rules (Avro specification, "Schema Resolution"). Both
   directions and every pair: *backward* (a newer reader, older data: replays and
   old records in the log) and *forward* (an older reader, newer data: a projector
   not yet upgraded while producers are, adr/0001). The rules are checked
   structurally (:func:`resolution_problems`), and every pair is also exercised by
   writing sample records with one schema and reading them with the other through
   fastavro. On top of Avro's rules, this project forbids changing a field's
   ``logicalType``: the fingerprint does not see it, and old data would decode
   silently wrong (adr/0001);
2. **the lock** (``schemas/fingerprints.json``): every schema version ever recorded
   there must still exist, with the same fingerprint and the same content (all but
   ``doc``). An ``.avsc`` edited in place — instead of its old version being copied to
   ``history/`` first — changes or loses a locked version and fails, whatever the
   change; so does a deleted event type. A version not yet in the lock fails too,
   until ``topology schemas check --update-lock`` records it, which makes every new
   schema version an explicit, reviewed change. ``--update-lock`` only ever adds.

To change a schema: copy ``schemas/<Type>.avsc`` to ``schemas/history/<Type>.vN.avsc``
(next N), edit the current file, run ``topology schemas check --update-lock``, and add
an encoded sample of the new version (``python -m tests.fixtures.make_event_fixtures``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
from fastavro import schemaless_reader, schemaless_writer

from topology_store.schemas.registry import HISTORY_DIR, SCHEMA_DIR, fingerprint_bytes

LOCK_FILE = SCHEMA_DIR / "fingerprints.json"
PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# Avro's promotions: what a reader of the key type accepts besides its own type.
PROMOTABLE_FROM = {
    "long": {"int"},
    "float": {"int", "long"},
    "double": {"int", "long", "float"},
    "string": {"bytes"},
    "bytes": {"string"},
}
_HISTORY_NAME = re.compile(r"^(?P<type>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")


# --- schema versions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    event_type: str
    number: int
    path: Path
    raw: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.event_type} v{self.number}"

    @property
    def fingerprint(self) -> str:
        return fingerprint_bytes(fastavro.parse_schema(self.raw, named_schemas={})).hex()

    @property
    def content_sha256(self) -> str:
        """Everything resolution can depend on: the schema without ``doc``. Defaults,
        logical types and aliases are invisible to the fingerprint but not to this."""
        return hashlib.sha256(json.dumps(_without_docs(self.raw), sort_keys=True, separators=(",", ":")).encode())\
            .hexdigest()


def _without_docs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_docs(v) for k, v in node.items() if k != "doc"}
    if isinstance(node, list):
        return [_without_docs(item) for item in node]
    return node


@dataclass
class Problem:
    kind: str  # compatibility | lock | layout
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def load_versions(schema_dir: Path = SCHEMA_DIR) -> tuple[dict[str, list[Version]], list[Problem]]:
    """Every version of every event type, oldest first; the current file is the newest."""
    problems: list[Problem] = []
    versions: dict[str, list[Version]] = {}
    history_dir = schema_dir / "history"
    currents = {path.stem: path for path in sorted(schema_dir.glob("*.avsc"))}
    for path in sorted(history_dir.glob("*.avsc")) if history_dir.is_dir() else []:
        match = _HISTORY_NAME.match(path.name)
        if match is None:
            problems.append(Problem("layout", f"history/{path.name}: name it <EventType>.v<N>.avsc"))
            continue
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("name") != match["type"]:
            problems.append(Problem("layout", f"history/{path.name} holds record {raw.get('name')!r}"))
            continue
        if match["type"] not in currents:
            problems.append(Problem("layout", f"history/{path.name}: no current schemas/{match['type']}.avsc; "
                                              "an event type is never removed (old records must stay readable)"))
        versions.setdefault(match["type"], []).append(Version(match["type"], int(match["version"]), path, raw))
    for event_type, path in currents.items():
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("name") != event_type:
            problems.append(Problem("layout", f"{path.name} holds record {raw.get('name')!r}"))
            continue
        older = sorted(versions.get(event_type, []), key=lambda v: v.number)
        numbers = [v.number for v in older]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(Problem("layout", f"{event_type}: history versions are {numbers}, not 1..{len(numbers)}"))
        versions[event_type] = [*older, Version(event_type, len(older) + 1, path, raw)]
    return versions, problems


# --- Avro schema resolution ---------------------------------------------------------------


class _Names:
    """Named types (record, enum, fixed) of one schema, by full and by short name."""

    def __init__(self) -> None:
        self.types: dict[str, dict[str, Any]] = {}

    def resolve(self, node: Any, namespace: str | None = None) -> Any:
        """The schema with every reference to a named type replaced by its definition."""
        if isinstance(node, str):
            if node in PRIMITIVES:
                return {"type": node}
            full = node if "." in node or namespace is None else f"{namespace}.{node}"
            found = self.types.get(full) or self.types.get(node)
            if found is None:
                raise ValueError(f"unknown type {node!r}")
            return found
        if isinstance(node, list):
            return [self.resolve(branch, namespace) for branch in node]
        kind = node["type"]
        if kind in ("record", "error", "enum", "fixed"):
            name = node["name"]
            space = node.get("namespace", namespace)
            if "." in name:
                space = name.rsplit(".", 1)[0]
            full = name if "." in name or not space else f"{space}.{name}"
            resolved: dict[str, Any] = {**node, "name": name.rsplit(".", 1)[-1], "fullname": full}
            self.types[full] = resolved
            self.types.setdefault(resolved["name"], resolved)
            if kind in ("record", "error"):
                resolved["fields"] = [{**f, "type": self.resolve(f["type"], space)} for f in node["fields"]]
            return resolved
        if kind == "array":
            return {**node, "items": self.resolve(node["items"], namespace)}
        if kind == "map":
            return {**node, "values": self.resolve(node["values"], namespace)}
        if isinstance(kind, dict | list) or kind not in PRIMITIVES:
            return self.resolve(kind, namespace)  # {"type": {"type": ...}} or a named reference
        return node


def _kind(schema: Any) -> str:
    return "union" if isinstance(schema, list) else schema["type"]


def _named_match(writer: dict[str, Any], reader: dict[str, Any]) -> bool:
    aliases = {alias.rsplit(".", 1)[-1] for alias in reader.get("aliases", [])}
    return writer["name"] == reader["name"] or writer["name"] in aliases


def _matches(writer: Any, reader: Any) -> bool:
    """Whether ``reader`` is the branch a reader union picks for ``writer`` (spec: "match")."""
    w, r = _kind(writer), _kind(reader)
    if w in PRIMITIVES and r in PRIMITIVES:
        return w == r or w in PROMOTABLE_FROM.get(r, set())
    if w != r:
        return False
    if w in ("record", "error", "enum", "fixed"):
        return _named_match(writer, reader)
    return True


def resolution_problems(writer: Any, reader: Any, path: str = "", seen: set[tuple[int, int]] | None = None) -> list[str]:
    """Why data written with ``writer`` cannot be read with ``reader`` (both resolved
    by :class:`_Names`); empty when it can."""
    seen = set() if seen is None else seen
    if (id(writer), id(reader)) in seen:
        return []  # a recursive type: this pair is being checked further up
    seen.add((id(writer), id(reader)))
    where = path or "(record)"
    w, r = _kind(writer), _kind(reader)
    if w == "union":
        return [problem for branch in writer for problem in resolution_problems(branch, reader, path, seen)]
    if r == "union":
        for branch in reader:
            if _matches(writer, branch):
                return resolution_problems(writer, branch, path, seen)
        return [f"{where}: a {_describe(writer)} value matches no branch of the reader's union"]
    if not _matches(writer, reader):
        return [f"{where}: written as {_describe(writer)}, read as {_describe(reader)}"]
    problems: list[str] = []
    if w in PRIMITIVES and writer.get("logicalType") != reader.get("logicalType"):
        problems.append(f"{where}: logical type {writer.get('logicalType')} became {reader.get('logicalType')} "
                        "(invisible to the fingerprint; old data would decode wrong)")
    if w in ("record", "error"):
        written = {f["name"]: f for f in writer["fields"]}
        for field_ in reader["fields"]:
            names = [field_["name"], *field_.get("aliases", [])]
            source = next((written[n] for n in names if n in written), None)
            inner = f"{path}.{field_['name']}" if path else field_["name"]
            if source is None:
                if "default" not in field_:
                    problems.append(f"{inner}: the reader's field has no default, and the writer does not have it")
                continue
            problems += resolution_problems(source["type"], field_["type"], inner, seen)
    elif w == "enum":
        missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
        if missing and "default" not in reader:
            problems.append(f"{where}: symbols {missing} unknown to the reader, which has no default symbol")
    elif w == "fixed" and writer["size"] != reader["size"]:
        problems.append(f"{where}: fixed size {writer['size']} read as size {reader['size']}")
    elif w == "array":
        problems += resolution_problems(writer["items"], reader["items"], f"{path}[]", seen)
    elif w == "map":
        problems += resolution_problems(writer["values"], reader["values"], f"{path}{{}}", seen)
    return problems


def _describe(schema: Any) -> str:
    kind = _kind(schema)
    if kind in ("record", "error", "enum", "fixed"):
        return f"{kind} {schema['name']}"
    if kind in PRIMITIVES and schema.get("logicalType"):
        return f"{kind} ({schema['logicalType']})"
    return kind


# --- sample data through fastavro ---------------------------------------------------------


def sample(schema: Any, variant: int) -> Any:
    """A deterministic datum of a resolved schema; ``variant`` walks through enum
    symbols and union branches, so unknown symbols and every branch get written."""
    kind = _kind(schema)
    if kind == "union":
        return sample(schema[variant % len(schema)], variant)
    logical = schema.get("logicalType") if isinstance(schema, dict) else None
    if logical == "uuid":
        return uuid.UUID(int=variant + 1)
    if logical in ("timestamp-millis", "timestamp-micros"):
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=variant)
    if logical == "date":
        return datetime(2026, 1, 1).date() + timedelta(days=variant)
    return {
        "null": lambda: None,
        "boolean": lambda: variant % 2 == 0,
        "int": lambda: variant + 1,
        "long": lambda: variant + 1,
        "float": lambda: float(variant) + 0.5,
        "double": lambda: float(variant) + 0.25,
        "bytes": lambda: bytes([variant % 256]),
        "string": lambda: f"s{variant}",
        "record": lambda: {f["name"]: sample(f["type"], variant + i) for i, f in enumerate(schema.get("fields", []))},
        "error": lambda: {f["name"]: sample(f["type"], variant + i) for i, f in enumerate(schema.get("fields", []))},
        "enum": lambda: schema["symbols"][variant % len(schema["symbols"])],
        "fixed": lambda: bytes(schema["size"]),
        "array": lambda: [sample(schema["items"], variant + i) for i in range(2)],
        "map": lambda: {f"k{i}": sample(schema["values"], variant + i) for i in range(2)},
    }[kind]()


def _variants(schema: Any) -> int:
    """Enough samples to write every enum symbol and union branch at least once."""
    widest = 1

    def walk(node: Any, depth: int = 0) -> None:
        nonlocal widest
        if depth > 20:
            return
        if isinstance(node, list):
            widest = max(widest, len(node))
            for branch in node:
                walk(branch, depth + 1)
            return
        if node["type"] == "enum":
            widest = max(widest, len(node["symbols"]))
        for f in node.get("fields", []):
            walk(f["type"], depth + 1)
        for key in ("items", "values"):
            if key in node:
                walk(node[key], depth + 1)

    walk(schema)
    return widest


def round_trip_problems(writer: Version, reader: Version) -> list[str]:
    """Write samples with ``writer``, read them with ``reader``, through fastavro."""
    written = fastavro.parse_schema(writer.raw, named_schemas={})
    read = fastavro.parse_schema(reader.raw, named_schemas={})
    resolved = _Names().resolve(writer.raw)
    for variant in range(_variants(resolved)):
        datum = sample(resolved, variant)
        buffer = io.BytesIO()
        try:
            schemaless_writer(buffer, written, datum)
            buffer.seek(0)
            schemaless_reader(buffer, written, read)
        except Exception as exc:  # fastavro raises many types on a failed resolution
            return [f"fastavro could not read sample {variant}: {type(exc).__name__}: {exc}"]
    return []


# --- the check ----------------------------------------------------------------------------


def compatibility_problems(versions: dict[str, list[Version]]) -> list[Problem]:
    problems: list[Problem] = []
    for event_type in sorted(versions):
        family = versions[event_type]
        resolved = {v.number: _Names().resolve(v.raw) for v in family}
        for writer in family:
            for reader in family:
                if writer is reader:
                    continue
                direction = "backward" if reader.number > writer.number else "forward"
                found = resolution_problems(resolved[writer.number], resolved[reader.number])
                found = found or round_trip_problems(writer, reader)
                for message in found:
                    problems.append(Problem("compatibility", f"{direction}: {writer.label} data read with "
                                                             f"{reader.label}: {message}"))
    return problems


def _relative(path: Path, schema_dir: Path) -> str:
    return path.relative_to(schema_dir).as_posix()


def lock_entries(versions: dict[str, list[Version]], schema_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        event_type: [
            {"version": v.number, "file": _relative(v.path, schema_dir), "fingerprint": v.fingerprint,
             "sha256": v.content_sha256}
            for v in family
        ]
        for event_type, family in sorted(versions.items())
    }


def lock_problems(versions: dict[str, list[Version]], locked: dict[str, list[dict[str, Any]]],
                  schema_dir: Path) -> tuple[list[Problem], list[Problem]]:
    """(fatal, recordable): versions the lock has but the files lost, and new or
    moved versions that ``--update-lock`` may record."""
    fatal: list[Problem] = []
    recordable: list[Problem] = []
    current = lock_entries(versions, schema_dir)
    for event_type, entries in sorted(locked.items()):
        present = {(e["fingerprint"], e["sha256"]): e for e in current.get(event_type, [])}
        for entry in entries:
            found = present.get((entry["fingerprint"], entry["sha256"]))
            if found is None:
                fatal.append(Problem("lock", f"{event_type} v{entry['version']} ({entry['file']}, fingerprint "
                                             f"{entry['fingerprint']}) is gone: a schema was edited in place or "
                                             "deleted. Restore it; to change a schema, copy it to "
                                             "schemas/history/<Type>.vN.avsc first"))
            elif (found["file"], found["version"]) != (entry["file"], entry["version"]):
                recordable.append(Problem("lock", f"{event_type} v{entry['version']} moved to {found['file']} "
                                                  f"(v{found['version']})"))
    for event_type, entries in sorted(current.items()):
        known = {(e["fingerprint"], e["sha256"]) for e in locked.get(event_type, [])}
        for entry in entries:
            if (entry["fingerprint"], entry["sha256"]) not in known:
                recordable.append(Problem("lock", f"{event_type} v{entry['version']} ({entry['file']}) is not in "
                                                  "the lock: record it with `topology schemas check --update-lock`"))
    return fatal, recordable


@dataclass
class Report:
    versions: dict[str, list[Version]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    lock_updated: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def check(schema_dir: Path = SCHEMA_DIR, lock_path: Path | None = None, update_lock: bool = False) -> Report:
    lock_path = lock_path or schema_dir / LOCK_FILE.name
    versions, problems = load_versions(schema_dir)
    problems += compatibility_problems(versions)
    locked: dict[str, list[dict[str, Any]]] = {}
    if lock_path.exists():
        locked = json.loads(lock_path.read_text(encoding="utf-8"))["event_types"]
    fatal, recordable = lock_problems(versions, locked, schema_dir)
    report = Report(versions, problems + fatal)
    if update_lock and not report.problems:
        # Only ever adds (and re-files moved versions): a fatal problem above blocks it.
        document = {
            "about": "Every schema version ever shipped; `topology schemas check` fails when one disappears or "
                     "changes. Update only with `topology schemas check --update-lock`.",
            "event_types": lock_entries(versions, schema_dir),
        }
        lock_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        report.lock_updated = bool(recordable)
    else:
        report.problems += recordable
    return report


__all__ = ["HISTORY_DIR", "LOCK_FILE", "Problem", "Report", "Version", "check",
           "load_versions", "resolution_problems"]
