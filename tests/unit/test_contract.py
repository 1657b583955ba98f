"""The pydantic edge models and the ``.avsc`` files describe the same events.

The models are written by hand; these tests fail the moment the two drift apart:
field by field, down into nested records (``ClaimRef``, ``Conflict``) inside arrays
(``tuple[...]`` in the models), nullable unions and enums. Older writer versions
kept in ``schemas/history`` must stay readable by the current reader schemas.
"""

from __future__ import annotations

import json
import re
import types
import uuid
from collections.abc import Iterator
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import fastavro
import pytest
from annotated_types import Ge, Le
from pydantic import AwareDatetime, BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from topology_store.schemas.models import EVENT_MODELS, ClaimBucket, ClaimRef, Conflict, Event, RecordMetadata
from topology_store.schemas.registry import EVENT_TYPES, HISTORY_DIR, SCHEMA_DIR, fingerprint_bytes, load_registry

SCHEMA_FILES: list[Path] = sorted(SCHEMA_DIR.glob("*.avsc"))
HISTORY_FILES: list[Path] = sorted(HISTORY_DIR.glob("*.avsc"))

ENVELOPE = ["event_id", "occurred_at", "source", "trace_id"]

AVRO_INT_RANGE = (-(2**31), 2**31 - 1)
AVRO_LONG_RANGE = (-(2**63), 2**63 - 1)

# The nested record types of the contract and the models that mirror them.
NESTED_MODELS: dict[str, type[BaseModel]] = {"ClaimRef": ClaimRef, "Conflict": Conflict, "RecordMetadata": RecordMetadata}


def _raw(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return raw


def _schemas() -> list[tuple[str, dict[str, Any]]]:
    return [(path.stem, _raw(path)) for path in SCHEMA_FILES]


def _history() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, _raw(path)) for path in HISTORY_FILES]


def _model_for(raw: dict[str, Any]) -> type[Event]:
    return EVENT_MODELS[raw["name"]]


def _is_nullable_avro(avro_type: Any) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


def _non_null_avro(avro_type: Any) -> Any:
    if isinstance(avro_type, list):
        branches = [branch for branch in avro_type if branch != "null"]
        assert len(branches) == 1, f"only [null, T] unions are expected, got {avro_type}"
        return branches[0]
    return avro_type


def _is_optional(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _non_none(annotation: Any) -> Any:
    if _is_optional(annotation):
        (inner,) = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _strip_annotated(inner)
    return _strip_annotated(annotation)


def _constraints(field: FieldInfo) -> list[Any]:
    """Constraints on the field itself and on an ``Annotated`` alias inside ``T | None``
    (pydantic keeps ``OwnerId | None``'s bounds on the inner type)."""
    found = list(field.metadata)
    annotation = field.annotation
    candidates = get_args(annotation) if _is_optional(annotation) else (annotation,)
    for candidate in candidates:
        if get_origin(candidate) is Annotated:
            for extra in get_args(candidate)[1:]:
                found.extend(extra.metadata if isinstance(extra, FieldInfo) else [extra])
    return found


def _bounds(field: FieldInfo) -> tuple[Any, Any]:
    constraints = _constraints(field)
    lower = next((m.ge for m in constraints if isinstance(m, Ge)), None)
    upper = next((m.le for m in constraints if isinstance(m, Le)), None)
    return lower, upper


def _as_avro_default(value: Any) -> Any:
    """A model default as Avro writes it: arrays are JSON lists, tuples in the models."""
    return list(value) if isinstance(value, tuple) else value


def _tuple_item(annotation: Any) -> Any:
    """``X`` of ``tuple[X, ...]``; fails for any other annotation."""
    assert get_origin(annotation) is tuple, f"an Avro array must be tuple[X, ...] in the model, got {annotation}"
    args = get_args(annotation)
    assert len(args) == 2 and args[1] is Ellipsis, f"an Avro array must be tuple[X, ...], got {annotation}"
    return _strip_annotated(args[0])


def _walk_fields(
    fields: list[dict[str, Any]], model: type[BaseModel], path: str
) -> Iterator[tuple[str, dict[str, Any], FieldInfo]]:
    """Every (path, Avro field, model field) pair, descending into arrays of records."""
    for field in fields:
        info = model.model_fields[field["name"]]
        here = f"{path}.{field['name']}"
        yield here, field, info
        avro = _non_null_avro(field["type"])
        if isinstance(avro, dict) and avro.get("type") == "array" and isinstance(avro["items"], dict):
            items = avro["items"]
            if items.get("type") == "record":
                nested = _tuple_item(_non_none(info.annotation))
                assert isinstance(nested, type) and issubclass(nested, BaseModel), here
                yield from _walk_fields(items["fields"], nested, f"{here}[]")


def _all_fields() -> list[tuple[str, dict[str, Any], FieldInfo]]:
    return [found for stem, raw in _schemas() for found in _walk_fields(raw["fields"], _model_for(raw), stem)]


def _records(avro_type: Any) -> Iterator[dict[str, Any]]:
    """Every named record definition inside a type."""
    if isinstance(avro_type, list):
        for branch in avro_type:
            yield from _records(branch)
    elif isinstance(avro_type, dict):
        if avro_type.get("type") == "record":
            yield avro_type
            for field in avro_type["fields"]:
                yield from _records(field["type"])
        elif avro_type.get("type") == "array":
            yield from _records(avro_type["items"])


def _enums(avro_type: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(avro_type, list):
        for branch in avro_type:
            yield from _enums(branch, path)
    elif isinstance(avro_type, dict):
        kind = avro_type.get("type")
        if kind == "enum":
            yield path, avro_type
        elif kind == "record":
            for field in avro_type["fields"]:
                yield from _enums(field["type"], f"{path}.{field['name']}")
        elif kind == "array":
            yield from _enums(avro_type["items"], f"{path}[]")


def _enum_fields(schemas: list[tuple[str, dict[str, Any]]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(path, enum definition) for every enum in the schemas, nested ones included."""
    found: list[tuple[str, dict[str, Any]]] = []
    for stem, raw in schemas if schemas is not None else _schemas():
        for field in raw["fields"]:
            found.extend(_enums(field["type"], f"{stem}.{field['name']}"))
    return found


schema_params = pytest.mark.parametrize(("stem", "raw"), _schemas(), ids=[p.stem for p in SCHEMA_FILES])
history_params = pytest.mark.parametrize(("name", "raw"), _history(), ids=[p.name for p in HISTORY_FILES])


def test_there_are_schema_files() -> None:
    assert len(SCHEMA_FILES) == 20
    # GitLab's buckets, owner type and record metadata (adr/0022) made a new version of
    # every claim event; GitLab's cell id (adr/0021) one of CellRegistered and CellUpdated.
    claim_events = ["ClaimsCommitted", "ClaimsDestroyRequested", "ClaimsDestroyed", "ClaimsRequested",
                    "LeaseCommitted", "LeaseGranted", "LeaseReleased", "OwnerTransferRequested",
                    "OwnerTransferred", "RequestRejected"]
    assert {path.name for path in HISTORY_FILES} == {
        "CellRegistered.v1.avsc", "CellUpdated.v1.avsc",
        "ClaimCreated.v1.avsc", "ClaimCreated.v2.avsc", "ClaimReleased.v1.avsc", "ClaimReleased.v2.avsc",
        "LeaseExpiryTick.v1.avsc", *(f"{name}.v1.avsc" for name in claim_events)}


def test_schema_files_and_models_name_the_same_event_types() -> None:
    assert {raw["name"] for _, raw in _schemas()} == set(EVENT_MODELS)
    assert set(EVENT_TYPES) == set(EVENT_MODELS)


@schema_params
def test_file_name_is_the_record_name(stem: str, raw: dict[str, Any]) -> None:
    assert raw["type"] == "record"
    assert raw["name"] == stem
    assert raw["namespace"] == "org.topology.events"


@schema_params
def test_model_event_type_matches_schema(stem: str, raw: dict[str, Any]) -> None:
    model = _model_for(raw)
    assert model.EVENT_TYPE == raw["name"]
    assert model.__name__ == raw["name"]


@schema_params
def test_schema_file_is_self_contained(stem: str, raw: dict[str, Any]) -> None:
    # Every named type it uses is defined in the file itself.
    parsed: Any = fastavro.parse_schema(raw, named_schemas={})
    assert parsed["name"] == f"org.topology.events.{stem}"


@schema_params
def test_field_names_and_order_match(stem: str, raw: dict[str, Any]) -> None:
    avro_fields = [field["name"] for field in raw["fields"]]
    model_fields = list(_model_for(raw).model_fields)
    assert avro_fields == model_fields


@pytest.mark.parametrize("record_name", sorted(NESTED_MODELS))
def test_nested_record_fields_match_their_model(record_name: str) -> None:
    model = NESTED_MODELS[record_name]
    assert model.__name__ == record_name
    definitions = [record for _, raw in _schemas() for field in raw["fields"] for record in _records(field["type"])
                   if record["name"] == record_name]
    assert definitions, f"no schema uses {record_name}"
    for record in definitions:
        assert [field["name"] for field in record["fields"]] == list(model.model_fields)


def test_every_nested_record_has_a_model() -> None:
    names = {record["name"] for _, raw in _schemas() for field in raw["fields"] for record in _records(field["type"])}
    assert names == set(NESTED_MODELS)


def test_same_named_records_are_identical_across_files() -> None:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for _, raw in _schemas():
        for field in raw["fields"]:
            for record in _records(field["type"]):
                by_name.setdefault(record["name"], []).append(record)
    assert set(by_name) == {"ClaimRef", "Conflict", "RecordMetadata"}
    for name, definitions in by_name.items():
        assert all(d == definitions[0] for d in definitions), name


@schema_params
def test_envelope_fields_come_first(stem: str, raw: dict[str, Any]) -> None:
    fields = raw["fields"]
    assert [field["name"] for field in fields[:4]] == ENVELOPE
    event_id, occurred_at, source, trace_id = fields[:4]
    assert event_id["type"] == {"type": "string", "logicalType": "uuid"}
    assert "default" not in event_id
    assert occurred_at["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert "default" not in occurred_at
    assert source["type"] == "string"
    assert "default" not in source
    assert trace_id["type"] == ["null", "string"]
    assert trace_id["default"] is None


def test_envelope_fields_are_identical_in_every_schema() -> None:
    envelopes = [raw["fields"][:4] for _, raw in _schemas()]
    assert all(envelope == envelopes[0] for envelope in envelopes)


@schema_params
def test_nullable_in_avro_iff_optional_in_model(stem: str, raw: dict[str, Any]) -> None:
    for path, field, info in _walk_fields(raw["fields"], _model_for(raw), stem):
        assert _is_nullable_avro(field["type"]) == _is_optional(info.annotation), path


def test_there_are_nullable_fields_of_each_kind() -> None:
    # The nullable rules above must see a nullable uuid and a nullable long, not only strings.
    nullable = {path: _non_null_avro(field["type"]) for path, field, _ in _all_fields()
                if _is_nullable_avro(field["type"])}
    assert nullable["LeaseReleased.request_id"] == {"type": "string", "logicalType": "uuid"}
    assert nullable["OwnerTransferRequested.to_owner_id"] == "long"
    assert nullable["CellUpdated.weight"] == "int"


@schema_params
def test_nullable_unions_put_null_first_with_null_default(stem: str, raw: dict[str, Any]) -> None:
    # Avro requires a union's default to match its first branch.
    for path, field, _ in _walk_fields(raw["fields"], _model_for(raw), stem):
        if _is_nullable_avro(field["type"]):
            assert field["type"][0] == "null", path
            assert "default" in field and field["default"] is None, path


@schema_params
def test_avro_defaults_match_model_defaults(stem: str, raw: dict[str, Any]) -> None:
    for path, field, info in _walk_fields(raw["fields"], _model_for(raw), stem):
        if "default" in field:
            assert info.default_factory is None, path
            assert _as_avro_default(info.default) == field["default"], path
            assert not info.is_required(), path


@schema_params
def test_model_static_defaults_exist_in_avro(stem: str, raw: dict[str, Any]) -> None:
    # A model field with a plain default must have the same default in Avro, or an
    # older writer that lacks the field could not be read, and a producer using the
    # .avsc could not leave out what the JSON API lets it leave out. Factories
    # (event_id, occurred_at, ClaimsRequested.lease_id) are the producer's business
    # and have no Avro default.
    # A model default missing from the .avsc is contract drift: a reader of old data
    # could not fill the field in.
    for path, field, info in _walk_fields(raw["fields"], _model_for(raw), stem):
        if info.default is not PydanticUndefined:
            assert "default" in field, path
            assert field["default"] == _as_avro_default(info.default), path
        elif info.default_factory is None:
            assert info.is_required(), path
            assert "default" not in field, path


def _assert_type_corresponds(path: str, avro: Any, python: Any) -> None:
    if isinstance(avro, dict) and avro.get("logicalType") == "uuid":
        assert python is uuid.UUID, path
    elif isinstance(avro, dict) and avro.get("logicalType") == "timestamp-millis":
        assert python is AwareDatetime or python is datetime, path
    elif isinstance(avro, dict) and avro.get("type") == "enum":
        assert isinstance(python, type) and issubclass(python, StrEnum), path
        assert python.__name__ == avro["name"], path
    elif isinstance(avro, dict) and avro.get("type") == "array":
        item = _tuple_item(python)
        _assert_type_corresponds(f"{path}[]", avro["items"], item)
    elif isinstance(avro, dict) and avro.get("type") == "record":
        assert isinstance(python, type) and issubclass(python, BaseModel), path
        assert python.__name__ == avro["name"], path
        assert [field["name"] for field in avro["fields"]] == list(python.model_fields), path
        for field in avro["fields"]:
            info = python.model_fields[field["name"]]
            _assert_type_corresponds(f"{path}.{field['name']}", _non_null_avro(field["type"]), _non_none(info.annotation))
    elif avro == "string":
        assert python is str, path
    elif avro in ("int", "long"):
        assert python is int, path
    elif avro == "bytes":
        assert python is bytes, path
    elif isinstance(avro, str) and avro[:1].isupper():  # a reference to a named type defined before
        assert isinstance(python, type) and python.__name__ == avro, path
    else:  # pragma: no cover - a new Avro type needs a rule here
        pytest.fail(f"no correspondence rule for {path}: {avro}")


@schema_params
def test_field_types_correspond(stem: str, raw: dict[str, Any]) -> None:
    model = _model_for(raw)
    for field in raw["fields"]:
        info = model.model_fields[field["name"]]
        _assert_type_corresponds(f"{stem}.{field['name']}", _non_null_avro(field["type"]), _non_none(info.annotation))


@pytest.mark.parametrize(
    ("avro", "python"),
    [
        ({"type": "array", "items": "string"}, list[str]),
        ({"type": "array", "items": "string"}, tuple[str, str]),
        ({"type": "array", "items": "long"}, tuple[str, ...]),
        ({"type": "record", "name": "ClaimRef", "fields": [{"name": "bucket", "type": "string"},
                                                           {"name": "value", "type": "string"}]}, ClaimRef),
        ({"type": "record", "name": "Conflict", "fields": [{"name": "bucket", "type": "string"}]}, Conflict),
        ({"type": "enum", "name": "ClaimBucket", "symbols": ["A"]}, str),
        ({"type": "string", "logicalType": "uuid"}, str),
    ],
    ids=["list", "fixed-tuple", "item-type", "nested-field-type", "nested-field-names", "enum", "uuid"],
)
def test_type_correspondence_catches_drift(avro: dict[str, Any], python: Any) -> None:
    # The checker itself must fail on each kind of drift, or a passing contract proves nothing.
    with pytest.raises(AssertionError):
        _assert_type_corresponds("probe", avro, python)


def test_avro_numbers_are_bounded_in_model() -> None:
    # The model must not accept a number the Avro type cannot carry: such an event
    # would validate and then fail in the Avro writer (OverflowError).
    # An unbounded int would validate and then fail to encode as an Avro long.
    unbounded = []
    for path, field, info in _all_fields():
        avro = _non_null_avro(field["type"])
        if avro in ("int", "long"):
            low, high = AVRO_INT_RANGE if avro == "int" else AVRO_LONG_RANGE
            lower, upper = _bounds(info)
            if lower is None or lower < low or upper is None or upper > high:
                unbounded.append(path)
    assert unbounded == []


def test_to_owner_id_bounds_are_seen_through_the_optional() -> None:
    # OwnerId | None keeps its bounds inside the union; _bounds must find them there.
    info = EVENT_MODELS["OwnerTransferRequested"].model_fields["to_owner_id"]
    assert info.metadata == []
    assert _bounds(info) == (0, 2**63 - 1)


def test_there_are_enum_fields() -> None:
    found = {path: avro_enum["name"] for path, avro_enum in _enum_fields()}
    assert set(found.values()) == {"CellState", "ClaimBucket", "OwnerType", "ReleaseCause", "RejectionReason"}
    assert found["CellStateChanged.state"] == "CellState"
    assert found["ClaimCreated.bucket"] == "ClaimBucket"
    assert found["ClaimReleased.owner_type"] == "OwnerType"
    assert found["LeaseReleased.cause"] == "ReleaseCause"
    assert found["RequestRejected.reason"] == "RejectionReason"
    assert found["ClaimsRequested.claims[].bucket"] == "ClaimBucket"
    assert found["RequestRejected.conflicts[].bucket"] == "ClaimBucket"
    # Every claim list carries its bucket enum.
    for path, field, _ in _all_fields():
        if path.endswith(".claims"):
            assert found[f"{path}[].bucket"] == "ClaimBucket", path


def _python_enum_at(path: str) -> type[StrEnum]:
    """The model's enum class at an enum path like ``LeaseGranted.claims[].bucket``."""
    stem, *parts = path.split(".")
    model: type[BaseModel] = EVENT_MODELS[stem]
    annotation: Any = None
    for part in parts:
        name = part.removesuffix("[]")
        annotation = _non_none(model.model_fields[name].annotation)
        if part.endswith("[]"):
            annotation = _tuple_item(annotation)
            model = annotation
    assert isinstance(annotation, type) and issubclass(annotation, StrEnum), path
    return annotation


@pytest.mark.parametrize(("path", "avro_enum"), _enum_fields(), ids=[path for path, _ in _enum_fields()])
def test_enum_symbols_are_python_members_plus_unknown(path: str, avro_enum: dict[str, Any]) -> None:
    python = _python_enum_at(path)
    members = [member.value for member in python]
    assert "UNKNOWN" not in members  # never emitted, never accepted
    assert [name for name in python.__members__] == members  # name == value
    symbols = avro_enum["symbols"]
    assert symbols.count("UNKNOWN") == 1
    # Members in the model's order; UNKNOWN sits where it was when the enum was born,
    # and symbols added later only ever follow it (see the history tests below).
    assert [symbol for symbol in symbols if symbol != "UNKNOWN"] == members
    assert avro_enum["default"] == "UNKNOWN"


def test_claim_bucket_symbols_keep_their_order_and_append_new_ones() -> None:
    for path, avro_enum in _enum_fields():
        if avro_enum["name"] == "ClaimBucket":
            assert avro_enum["symbols"] == [
                "NAMESPACE", "USERNAME", "EMAIL", "KEY", "UNKNOWN", "PACKAGE", "IMAGE", "ORGANIZATION_ID",
                *GITLAB_BUCKETS], path
    assert [b.value for b in ClaimBucket] == ["NAMESPACE", "USERNAME", "EMAIL", "KEY", "PACKAGE", "IMAGE",
                                             "ORGANIZATION_ID", *GITLAB_BUCKETS]


# Appended for GitLab's bucket set (adr/0022), in the order of its Bucket.Type numbers.
GITLAB_BUCKETS = ["ROUTE", "ORGANIZATION_PATH", "REDIRECT_ROUTE", "PROJECT_ID", "NAMESPACE_ID", "GPG_KEY", "SSH_KEY",
                  "USER_ID", "SERVICE_DESK_CUSTOM_EMAIL", "GPG_KEY_FINGERPRINT", "SSH_KEY_FINGERPRINT", "SNIPPET_ID",
                  "PAGES_DOMAIN", "PAGES_UNIQUE_DOMAIN"]


def test_enums_without_history_end_with_unknown() -> None:
    in_history = {avro_enum["name"] for _, avro_enum in _enum_fields(_history())}
    for path, avro_enum in _enum_fields():
        if avro_enum["name"] not in in_history:
            assert avro_enum["symbols"][-1] == "UNKNOWN", path


def test_same_named_enums_are_identical_across_files() -> None:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for _, avro_enum in _enum_fields():
        by_name.setdefault(avro_enum["name"], []).append(avro_enum)
    for name, definitions in by_name.items():
        assert all(d["symbols"] == definitions[0]["symbols"] for d in definitions), name
        assert all(d.get("default") == definitions[0].get("default") for d in definitions), name


# --- history: older writer schemas ---------------------------------------------------------


@history_params
def test_history_file_names_its_event_type_and_version(name: str, raw: dict[str, Any]) -> None:
    match = re.fullmatch(r"(?P<event>[A-Za-z]+)\.v(?P<version>[1-9][0-9]*)\.avsc", name)
    assert match is not None, name
    assert raw["name"] == match["event"]
    assert raw["namespace"] == "org.topology.events"
    assert raw["name"] in EVENT_MODELS
    parsed = fastavro.parse_schema(raw, named_schemas={})  # self-contained like the current files
    assert fingerprint_bytes(parsed) != load_registry().readers[raw["name"]].fingerprint


@history_params
def test_history_schema_is_a_known_writer(name: str, raw: dict[str, Any]) -> None:
    parsed = fastavro.parse_schema(raw, named_schemas={})
    writer = load_registry().writers[fingerprint_bytes(parsed)]
    assert writer.event_type == raw["name"]


@history_params
def test_current_reader_can_resolve_history_writer(name: str, raw: dict[str, Any]) -> None:
    current = load_registry().readers[raw["name"]].raw
    written = {field["name"]: field for field in raw["fields"]}
    for field in current["fields"]:
        # A field the old writer lacks needs a reader default.
        assert field["name"] in written or "default" in field, field["name"]
    old_enums = {avro_enum["name"]: avro_enum for _, avro_enum in _enum_fields([(raw["name"], raw)])}
    new_enums = {avro_enum["name"]: avro_enum for _, avro_enum in _enum_fields([(current["name"], current)])}
    for enum_name, old in old_enums.items():
        new = new_enums[enum_name]
        # Symbols are only ever appended: every old symbol keeps its place.
        assert new["symbols"][: len(old["symbols"])] == old["symbols"], enum_name
        assert new.get("default") == old.get("default"), enum_name
