"""The request side of the read API's contract (adr/0009): the types of what clients send,
so that the OpenAPI document says exactly what the server takes.

- Integers are JSON integers in bodies (``false`` or ``"1"`` is not an owner id), and
  decimal digits in paths and queries (not ``+1``, `` 1``, ``1_0`` or ``1.0``).
- UUIDs are the 8-4-4-4-12 hex form the ``uuid`` format names (not ``{...}``, ``urn:uuid:``
  or 32 bare digits).
- Claim values have one format per bucket: ``schemas.models.claim_value_pattern`` is the
  rule the server applies and the pattern the document declares (with every control
  character refused, as in paths and query values). What JSON Schema cannot say (a value
  longer than 255 characters once lower-cased, a lone surrogate, two values equal once
  canonical) is in the descriptions, and answered 400.
- Request bodies take no field the document does not name.

And, in the document: the links between the claim operations (OpenAPI links) and exact
bounds, :func:`document_contract`.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Le
from fastapi import FastAPI
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, field_validator

from topology_store.schemas.models import (
    CLAIM_VALUE_RULES,
    CONTROL_CHARACTERS,
    MAX_BIGINT,
    MAX_CLAIM_VALUE_LENGTH,
    max_claim_value_length,
    MAX_LEASE_TTL_MS,
    ClaimBucket,
    canonical_claim_value,
    claim_value_pattern,
)

_DECIMAL = re.compile(r"-?[0-9]{1,20}")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")
# Free text in a query: anything but control characters (RequestLimitsMiddleware refuses them).
TEXT_PATTERN = f"^[^{CONTROL_CHARACTERS}]*$"


def parse_param_int(text: str) -> int:
    """A path or query integer: decimal ASCII digits, an optional minus sign, nothing else."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError("must be an integer in decimal digits")
    return int(text)


def parse_version(text: str) -> int:
    """A topology version in a query (``since``, ``min_version``): 0 to a bigint's maximum."""
    version = parse_param_int(text)
    if not 0 <= version <= MAX_BIGINT:
        raise ValueError(f"must be from 0 to {MAX_BIGINT}")
    return version


def _json_integer(value: Any) -> Any:
    # JSON true/false and strings are not integers, whatever Python's int() thinks.
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON integer")  # noqa: TRY004 - pydantic reports only ValueError
    return value


def _param_integer(value: Any) -> Any:
    return parse_param_int(value) if isinstance(value, str) else value


def _uuid_text(value: Any) -> Any:
    if isinstance(value, str) and not _UUID.fullmatch(value):
        raise ValueError("must be a UUID: 8-4-4-4-12 hex digits")
    return value


# Before the type's own validation; bounds go before them in an Annotated (Ge, Le), or
# pydantic's JSON schema names them ge/le instead of minimum/maximum.
JSON_INTEGER = BeforeValidator(_json_integer)
PARAM_INTEGER = BeforeValidator(_param_integer)
Uuid = Annotated[uuid.UUID, BeforeValidator(_uuid_text)]
OwnerIdBody = Annotated[int, Ge(0), Le(MAX_BIGINT), JSON_INTEGER]
LeaseTtlBody = Annotated[int, Ge(1000), Le(MAX_LEASE_TTL_MS), JSON_INTEGER]
OwnerIdParam = Annotated[int, Ge(0), Le(MAX_BIGINT), PARAM_INTEGER]
VersionParam = Annotated[int, Ge(0), Le(MAX_BIGINT), PARAM_INTEGER]


def door_claim_value(bucket: ClaimBucket | str, value: str) -> str:
    """The canonical form of a claim value a client sends, or ValueError saying why it is
    none: no control character (the declared pattern excludes them), then the bucket's rule."""
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (NUL, line breaks, ...)")
    return canonical_claim_value(bucket, value)


def parse_bucket(text: str) -> ClaimBucket:
    """A bucket named in a path, in any (ASCII) letter case; ValueError otherwise."""
    if not text.isascii():  # "ſ".upper() == "S": only the declared spellings
        raise ValueError(text)
    return ClaimBucket(text.upper())


def claim_value_schema(bucket: ClaimBucket) -> dict[str, Any]:
    """What the document says of a ``bucket`` value (the server decides with the same rule)."""
    return {"pattern": claim_value_pattern(bucket, CONTROL_CHARACTERS),
            "description": f"{bucket.value}: {CLAIM_VALUE_RULES[bucket]}; at most {max_claim_value_length(bucket)} "
            "characters (also once lower-cased), no control characters, valid Unicode (no lone surrogate)"}


# The union of every bucket's format: KEY's, the loosest (every other bucket's values are
# KEY values). For a value whose bucket is another parameter.
ANY_CLAIM_VALUE_PATTERN = claim_value_pattern(ClaimBucket.KEY, CONTROL_CHARACTERS)
CLAIM_VALUE_FORMATS = "; ".join(f"{bucket.value}: {CLAIM_VALUE_RULES[bucket]}" for bucket in ClaimBucket)


class _DoorClaim(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str
    value: str

    @field_validator("value")
    @classmethod
    def _bucket_format(cls, value: str, info: ValidationInfo) -> str:
        door_claim_value(info.data["bucket"], value)
        return value


def _claim_model(bucket: ClaimBucket) -> type[_DoorClaim]:
    schema = claim_value_schema(bucket)
    name = "".join(part.title() for part in bucket.value.split("_")) + "Claim"
    return create_model(  # type: ignore[no-any-return, call-overload]
        name,
        __base__=_DoorClaim,
        bucket=(Literal[bucket.value], ...),  # type: ignore[valid-type]
        value=(str, Field(min_length=1, max_length=max_claim_value_length(bucket), description=schema["description"],
                          json_schema_extra={"pattern": schema["pattern"]})),
    )


CLAIM_MODELS: dict[ClaimBucket, type[_DoorClaim]] = {bucket: _claim_model(bucket) for bucket in ClaimBucket}
ClaimInput = Annotated[
    # A union over the buckets: each one's value format is in the document (oneOf).
    Union[tuple(CLAIM_MODELS.values())],  # type: ignore[valid-type]  # noqa: UP007 - built at run time
    Field(discriminator="bucket"),
]


def _ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


_CLAIM = "/v1/claims/{bucket}/{value}"
_FROM_BEGIN = {"bucket": "$request.body#/claims/0/bucket", "value": "$request.body#/claims/0/value"}
_COMMITTED = "$response.body#/decisions/0"
# What one claim call's answer says about the next one (OpenAPI links): a client, or a
# fuzzer's stateful run, follows a begin to its commit, rollback, decision, claim and owner.
LINKS: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {
    ("/v1/claims", "post", "201"): {
        "CommitTheLease": {"operationRef": _ref("/v1/leases/{lease_id}/commit", "post"),
                           "parameters": {"lease_id": "$response.body#/decisions/0/lease_id"},
                           "requestBody": {"cell_id": "$request.body#/cell_id"}},
        "RollBackTheLease": {"operationRef": _ref("/v1/leases/{lease_id}/rollback", "post"),
                             "parameters": {"lease_id": "$response.body#/decisions/0/lease_id"},
                             "requestBody": {"cell_id": "$request.body#/cell_id"}},
        "TheDecision": {"operationRef": _ref("/v1/requests/{request_id}", "get"),
                        "parameters": {"request_id": "$response.body#/request_id"}},
        "TheLeasedClaim": {"operationRef": _ref(_CLAIM, "get"), "parameters": _FROM_BEGIN},
        "TheOwner": {"operationRef": _ref("/v1/owners/{owner_type}/{owner_id}", "get"),
                     "parameters": {"owner_type": "$request.body#/owner_type", "owner_id": "$request.body#/owner_id",
                                    "cell_id": "$request.body#/cell_id"}},
    },
    ("/v1/leases/{lease_id}/commit", "post", "200"): {
        "TheDecision": {"operationRef": _ref("/v1/requests/{request_id}", "get"),
                        "parameters": {"request_id": "$response.body#/request_id"}},
        "TheCommittedClaim": {"operationRef": _ref(_CLAIM, "get"),
                              "parameters": {"bucket": f"{_COMMITTED}/claims/0/bucket",
                                             "value": f"{_COMMITTED}/claims/0/value"}},
        "DestroyTheClaim": {"operationRef": _ref(_CLAIM, "delete"),
                            "parameters": {"bucket": f"{_COMMITTED}/claims/0/bucket",
                                           "value": f"{_COMMITTED}/claims/0/value",
                                           "owner_type": f"{_COMMITTED}/owner_type",
                                           "owner_id": f"{_COMMITTED}/owner_id", "cell_id": f"{_COMMITTED}/cell_id"}},
    },
    ("/v1/leases/{lease_id}/rollback", "post", "200"): {
        "TheDecision": {"operationRef": _ref("/v1/requests/{request_id}", "get"),
                        "parameters": {"request_id": "$response.body#/request_id"}},
    },
    ("/v1/claims/{bucket}/{value}", "delete", "200"): {
        "TheDestroyedClaim": {"operationRef": _ref(_CLAIM, "get"),
                              "parameters": {"bucket": "$request.path.bucket", "value": "$request.path.value"}},
    },
}


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def exact_bounds(node: Any) -> Any:
    """FastAPI passes the document through a model whose bounds are floats: 2**63 - 1
    comes out as 9.223372036854776e+18, which is 2**63, a value the server refuses.
    Integral bounds become integers again (the one past a float's 53 bits is a bigint's)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                exact = int(value) if abs(value) < 2**53 else {float(MAX_BIGINT): MAX_BIGINT}.get(value)
                if exact is None:
                    raise ValueError(f"{key} {value!r} cannot be stated exactly")
                node[key] = exact
            else:
                exact_bounds(value)
    elif isinstance(node, list):
        for item in node:
            exact_bounds(item)
    return node


def document_contract(app: FastAPI) -> None:
    """Complete the app's OpenAPI document: :data:`LINKS`, and bounds as exact integers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = exact_bounds(build())
        for (path, method, status), links in LINKS.items():
            document["paths"][path][method]["responses"][status]["links"] = links
        return document

    app.openapi = openapi  # type: ignore[method-assign]
