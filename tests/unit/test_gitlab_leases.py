"""GitLab's lease model in the claim decider (adr/0022): one lease creates and destroys, a
destroyed claim keeps routing until the commit, only its own cell destroys it, a lease
without a server-side TTL, GitLab records' subjects and Rails rows, and request digests
that did not change for requests recorded before."""

from __future__ import annotations

import hmac
import json
import uuid

from tests.unit.claims_support import OWNER_A, SECRET, T0, begin, commit, destroy, key, ref, rollback, tick
from topology_store.core.claims import ClaimStatus, LeaseStatus, Registry, decide, request_digest, routed_namespaces
from topology_store.schemas.models import (
    NO_EXPIRY,
    ClaimBucket,
    ClaimRef,
    ClaimsRequested,
    LeaseCommitted,
    LeaseGranted,
    LeaseReleased,
    OwnerType,
    RecordMetadata,
    RejectionReason,
    RequestRejected,
)
from tests.unit.test_claims import SEC, committed, granted, run

OTHER_CELL = ("cell-2", OwnerType.GROUP, 5)
SUBJECT = RecordMetadata(owner_type=OwnerType.USER, owner_id=42, source_type="RAILS_TABLE_USERS",
                         source_id=(42).to_bytes(8, "big"), user_data=b"\x0a\x01x")


def rename(old: str, new: str, **kwargs: object) -> ClaimsRequested:
    return begin((ref(new),), destroys=(ref(old),), **kwargs)  # type: ignore[arg-type]


def rejection(registry: Registry, command: ClaimsRequested) -> RequestRejected:
    verdict = run(registry, command)
    assert verdict.outcome == "rejected", verdict
    decision = verdict.decisions[-1]
    assert isinstance(decision, RequestRejected)
    return decision


def test_a_rename_is_one_lease_and_the_old_path_routes_until_the_commit() -> None:
    registry = Registry()
    committed(registry, "old")
    request = rename("old", "new")
    verdict = run(registry, request)
    (grant,) = verdict.decisions
    assert isinstance(grant, LeaseGranted) and [r.value for r in grant.destroy_claims] == ["old"]
    # LEASE_DESTROYING: still committed (still routes), marked with the lease.
    assert registry.claims[key("old")].status is ClaimStatus.COMMITTED
    assert registry.claims[key("old")].lease_id == request.lease_id
    assert registry.claims[key("new")].status is ClaimStatus.LEASED
    before = dict(registry.claims)
    verdict = run(registry, commit(request))
    (done,) = verdict.decisions
    assert isinstance(done, LeaseCommitted) and [r.value for r in done.destroy_claims] == ["old"]
    assert key("old") not in registry.claims
    assert registry.claims[key("new")].status is ClaimStatus.COMMITTED
    assert routed_namespaces(before, registry.claims, [key("old"), key("new")]) == {"old": None, "new": "cell-1"}


def test_a_rolled_back_rename_keeps_the_old_path_and_frees_the_new() -> None:
    registry = Registry()
    committed(registry, "old")
    request = rename("old", "new")
    run(registry, request)
    (done,) = run(registry, rollback(request)).decisions
    assert isinstance(done, LeaseReleased) and [r.value for r in done.destroy_claims] == ["old"]
    assert registry.claims[key("old")].lease_id is None
    assert registry.claims[key("old")].status is ClaimStatus.COMMITTED
    assert key("new") not in registry.claims


def test_an_expired_rename_keeps_the_old_path() -> None:
    registry = Registry()
    committed(registry, "old")
    request = rename("old", "new", ttl_ms=1000)
    run(registry, request)
    (expired,) = decide(registry, tick(request), T0 + 2 * SEC, SECRET).decisions
    assert isinstance(expired, LeaseReleased) and [r.value for r in expired.destroy_claims] == ["old"]
    assert registry.claims[key("old")].lease_id is None and key("new") not in registry.claims


def test_only_the_cell_holding_a_claim_destroys_it() -> None:
    registry = Registry()
    committed(registry, "theirs", owner=OTHER_CELL)
    refused = rejection(registry, begin((ref("mine"),), destroys=(ref("theirs"),)))
    assert refused.reason is RejectionReason.WRONG_CELL
    assert [c.cell_id for c in refused.conflicts] == ["cell-2"]
    assert key("mine") not in registry.claims  # all or nothing


def test_destroying_what_is_not_committed_is_refused() -> None:
    registry = Registry()
    refused = rejection(registry, begin((ref("a"),), destroys=(ref("nothing"),)))
    assert refused.reason is RejectionReason.NOT_HELD and refused.conflicts == ()
    leased = granted(registry, "pending")
    refused = rejection(registry, begin((ref("b"),), destroys=(ref("pending"),)))
    assert refused.reason is RejectionReason.NOT_HELD and [c.value for c in refused.conflicts] == ["pending"]
    assert registry.leases[leased.lease_id].status is LeaseStatus.OPEN


def test_a_claim_being_destroyed_is_held_against_everyone_else() -> None:
    registry = Registry()
    committed(registry, "old")
    run(registry, rename("old", "new"))
    # Another lease may not destroy it too, another cell may not take it, nor may the HTTP destroy.
    assert rejection(registry, begin((ref("x"),), destroys=(ref("old"),))).reason is RejectionReason.NOT_HELD
    assert rejection(registry, begin((ref("old"),), owner=OTHER_CELL)).reason is RejectionReason.CONFLICT
    assert run(registry, destroy((ref("old"),), owner=OWNER_A)).outcome == "rejected"


def test_a_lease_cannot_create_and_destroy_one_claim_even_spelled_two_ways() -> None:
    registry = Registry()
    clear = ClaimRef(bucket=ClaimBucket.EMAIL, value="a@example.com")
    hashed = ClaimRef(bucket=ClaimBucket.EMAIL, value=key("a@example.com", ClaimBucket.EMAIL)[1])
    committed(registry, "a@example.com", bucket=ClaimBucket.EMAIL)
    refused = rejection(registry, begin((clear,), destroys=(hashed,)))
    assert refused.reason is RejectionReason.INVALID


def test_a_lease_without_a_ttl_never_expires_by_a_tick() -> None:
    registry = Registry()
    request = granted(registry, "forever", ttl_ms=0)
    assert registry.leases[request.lease_id].expires_at == NO_EXPIRY
    verdict = decide(registry, tick(request), NO_EXPIRY.replace(year=9000), SECRET)
    assert verdict.outcome == "unchanged"
    assert registry.leases[request.lease_id].status is LeaseStatus.OPEN


def test_a_gitlab_record_is_owned_by_its_subject_and_keeps_its_rails_row() -> None:
    registry = Registry()
    record = ClaimRef(bucket=ClaimBucket.USERNAME, value="alice", metadata=SUBJECT)
    request = begin((record, ref("alice")))
    (grant,) = run(registry, request).decisions
    assert isinstance(grant, LeaseGranted)
    assert [r.metadata for r in grant.claims] == [SUBJECT, None]  # the decision carries it, for replays
    held = registry.claims[key("alice", ClaimBucket.USERNAME)]
    assert held.owner == ("cell-1", "USER", 42)
    assert (held.source_type, held.source_id, held.user_data) == ("RAILS_TABLE_USERS", (42).to_bytes(8, "big"),
                                                                  b"\x0a\x01x")
    assert registry.claims[key("alice")].owner == ("cell-1", "GROUP", 1)  # the request's owner
    assert registry.leases[request.lease_id].granted_at == T0


def test_digests_of_requests_without_gitlab_parts_are_unchanged() -> None:
    # A request recorded before adr/0022 must still match its retry: its digest, computed as
    # the code before it did (the fields in this order, as compact JSON, keyed HMAC-SHA256).
    request = begin((ref("a"), ref("b")), event_id=uuid.UUID(int=1), lease_id=uuid.UUID(int=2))
    content = ["ClaimsRequested", str(request.lease_id), "cell-1", "GROUP", 1, 60_000,
               sorted([["NAMESPACE", "a"], ["NAMESPACE", "b"]])]
    before = hmac.digest(SECRET, json.dumps(content, sort_keys=True, separators=(",", ":")).encode(), "sha256")
    assert request_digest(request, SECRET) == before
    # Its GitLab parts, when present, make other requests.
    with_destroy = request.model_copy(update={"destroy_claims": (ref("c"),)})
    with_record = request.model_copy(update={"claims": (ref("a").model_copy(update={"metadata": SUBJECT}), ref("b"))})
    other_source = request.model_copy(update={"claims": (ref("a").model_copy(update={"metadata": SUBJECT.model_copy(
        update={"source_id": (43).to_bytes(8, "big")})}), ref("b"))})
    assert len({request_digest(r, SECRET) for r in (request, with_destroy, with_record, other_source)}) == 4
