"""The audit index (core.audit.event_audit_keys): which keys an event and its
decisions touched. Pure; the integration test of `topology audit history` relies on it."""

from __future__ import annotations

from tests.unit.claims_support import CLEAR_EMAIL, OWNER_A, SECRET, T0, begin, commit, create, ns, ref, transfer
from topology_store.core.audit import event_audit_keys
from topology_store.core.claims import Registry, decide
from topology_store.schemas.models import CellRegistered, ClaimBucket, protect_value


def keys_of(command: object, registry: Registry | None = None) -> set[tuple[str, str]]:
    registry = registry if registry is not None else Registry()
    verdict = decide(registry, command, T0, SECRET)  # type: ignore[arg-type]
    return event_audit_keys(command, verdict.decisions, SECRET)  # type: ignore[arg-type]


def test_a_cell_event_touches_its_cell() -> None:
    event = CellRegistered(source="ops", cell_id="cell-9", address="https://cell-9.example", session_prefix="c9",
                           region="eu")
    assert event_audit_keys(event, (), SECRET) == {("cell", "cell-9")}


def test_a_claim_touches_its_stored_key_and_an_email_only_as_its_hash() -> None:
    assert keys_of(create("gitlab-org")) == {("claim", "NAMESPACE:gitlab-org")}
    hashed = protect_value(ClaimBucket.EMAIL, CLEAR_EMAIL.lower(), SECRET)
    touched = keys_of(create(CLEAR_EMAIL, bucket=ClaimBucket.EMAIL))
    assert touched == {("claim", f"EMAIL:{hashed}")}
    assert CLEAR_EMAIL.lower() not in repr(touched)


def test_a_request_touches_its_claims_its_lease_and_its_owner() -> None:
    request = begin([ref("alpha"), ref("beta")])
    cell_id, owner_type, owner_id = OWNER_A
    assert keys_of(request) == {
        ("claim", "NAMESPACE:alpha"),
        ("claim", "NAMESPACE:beta"),
        ("lease", str(request.lease_id)),
        ("owner", f"{cell_id}/{owner_type}/{owner_id}"),
    }


def test_the_decisions_claims_and_leases_count_too() -> None:
    # A commit names only its lease; the decision adds the claims the lease held.
    registry = Registry()
    request = begin(ns("alpha"))
    decide(registry, request, T0, SECRET)
    assert keys_of(commit(request), registry) == {("claim", "NAMESPACE:alpha"), ("lease", str(request.lease_id))}
    # A transfer names only the owner; the decision adds every claim it moved.
    registry = Registry()
    decide(registry, create("gamma"), T0, SECRET)
    moved = keys_of(transfer(), registry)
    assert ("claim", "NAMESPACE:gamma") in moved and any(kind == "owner" for kind, _ in moved)


def test_a_rejected_request_touches_what_it_asked_for() -> None:
    registry = Registry()
    decide(registry, create("delta"), T0, SECRET)
    late = begin(ns("delta"), owner=("cell-2", "GROUP", 7))
    assert keys_of(late, registry) == {
        ("claim", "NAMESPACE:delta"),
        ("lease", str(late.lease_id)),
        ("owner", "cell-2/GROUP/7"),
    }
