"""The pure parts of the gRPC claim harness (bench/grpc_claims.py, issue 12): the sign-up
request bytes, the CommitUpdate made of a BeginUpdate answer's bytes, the status tally, the
open-loop release plan, the report's tables and verdict; and its load client against a stub
gRPC server on loopback (no stack, no timing: the harness reports figures, it never fails on
a time)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from bench.grpc_claims import (
    BEGIN,
    CLAIMS,
    COMMIT,
    GET_CELLS,
    HEALTH,
    Client,
    Step,
    build_grpcload,
    commit_suffix,
    go_tool,
    pair_calls,
    quiet,
    rails_key,
    record_kinds,
    release_plan,
    signup,
    signup_bytes,
    status_group,
    step_command,
    step_table,
    tally,
    verdict,
    within_target,
)
from topology_store.schemas.generated.proto import health_service_pb2
from topology_store.schemas.generated.proto.claims.v1 import messages_pb2 as m
from topology_store.schemas.generated.proto.claims.v1 import service_pb2 as s
from topology_store.schemas.generated.proto.types.v1 import uuid_pb2


class TestSignup:
    def test_rails_key_is_eight_bytes_big_endian(self) -> None:
        assert rails_key(1) == b"\x00" * 7 + b"\x01"
        assert rails_key(0x0102030405060708) == bytes(range(1, 9))
        assert int.from_bytes(rails_key(123_456_789), "big") == 123_456_789

    def test_three_records_of_one_user_under_one_lease(self) -> None:
        request = s.BeginUpdateRequest.FromString(signup(42, cell_id=7).SerializeToString())
        assert request.cell_id == 7
        assert not request.destroy_records
        got = [(r.bucket.type, r.bucket.value, r.subject.type, r.subject.id, r.source.type,
                r.source.rails_primary_key_id) for r in request.create_records]
        key = rails_key(42)
        assert got == [
            (m.Bucket.ROUTES, "user-42", m.Subject.USER, 42, m.Source.RAILS_TABLE_ROUTES, key),
            (m.Bucket.USERNAMES, "user-42", m.Subject.USER, 42, m.Source.RAILS_TABLE_USERS, key),
            (m.Bucket.EMAILS, "user-42@example.com", m.Subject.USER, 42, m.Source.RAILS_TABLE_EMAILS, key),
        ]

    def test_records_left_out_on_request(self) -> None:
        request = s.BeginUpdateRequest.FromString(signup(3, 1, ("usernames", "emails")).SerializeToString())
        assert [r.bucket.type for r in request.create_records] == [m.Bucket.USERNAMES, m.Bucket.EMAILS]
        assert record_kinds("emails, routes") == ("routes", "emails")  # Rails' order, whatever the order given
        for bad in ("", "routes,keys"):
            with pytest.raises(ValueError):
                record_kinds(bad)

    def test_every_user_of_a_batch_is_new(self) -> None:
        batch = [s.BeginUpdateRequest.FromString(b) for b in signup_bytes(10, 5, cell_id=1)]
        assert [r.create_records[1].bucket.value for r in batch] == [f"user-{n}" for n in range(10, 15)]
        assert {r.cell_id for r in batch} == {1}


class TestCommitBytes:
    @pytest.mark.parametrize("answered_cell", [3, 0, 99])
    def test_the_begin_answer_followed_by_the_suffix_commits_its_lease_for_our_cell(self, answered_cell: int) -> None:
        lease = str(uuid.uuid4())
        answer = s.BeginUpdateResponse(cell_id=answered_cell, lease_uuid=uuid_pb2.UUID(value=lease)).SerializeToString()
        commit = s.CommitUpdateRequest.FromString(answer + commit_suffix(3))
        assert commit.lease_uuid.value == lease
        assert commit.cell_id == 3  # ours, whatever the answer said: the last value of a scalar wins

    def test_the_field_numbers_it_relies_on(self) -> None:
        # If either message renumbered cell_id or lease_uuid, the bytes would commit nothing.
        for message in (s.BeginUpdateResponse, s.CommitUpdateRequest):
            fields = message.DESCRIPTOR.fields_by_name
            assert (fields["cell_id"].number, fields["lease_uuid"].number) == (1, 2)
            assert fields["lease_uuid"].message_type.full_name == uuid_pb2.UUID.DESCRIPTOR.full_name


class TestTally:
    def test_groups(self) -> None:
        assert status_group("OK") == "OK"
        assert status_group("RESOURCE_EXHAUSTED") == "RESOURCE_EXHAUSTED"
        assert status_group("UNIMPLEMENTED") == "other"
        assert status_group("ConnectionResetError") == "other"

    def test_counts_per_call_in_the_reported_order(self) -> None:
        statuses = Counter({"begin OK": 5, "begin ALREADY_EXISTS": 2, "begin UNIMPLEMENTED": 1, "begin INTERNAL": 1,
                            "commit OK": 4, "commit DEADLINE_EXCEEDED": 1})
        assert tally(statuses, "begin") == [5, 2, 0, 0, 0, 2]
        assert tally(statuses, "commit") == [4, 0, 0, 0, 1, 0]


class TestSettle:
    def test_a_lone_pair_answered_fast_and_not_shed_is_quiet(self) -> None:
        assert quiet({"statuses": {"begin OK": 1, "commit OK": 1}, "wall_s": 0.1})
        assert quiet({"statuses": {"begin UNIMPLEMENTED": 1}, "wall_s": 0.01})  # an idle server that says no

    def test_slow_or_shed_is_not(self) -> None:
        assert not quiet({"statuses": {"begin OK": 1, "commit OK": 1}, "wall_s": 0.6})
        assert not quiet({"statuses": {"begin RESOURCE_EXHAUSTED": 1}, "wall_s": 0.01})
        assert not quiet({"statuses": {"begin OK": 1, "commit UNAVAILABLE": 1}, "wall_s": 0.2})


class TestReleasePlan:
    def test_releases_on_the_clock_whatever_came_of_earlier_calls(self) -> None:
        # 10 pairs/s: pair k is due at k / 10 s; a pacer that wakes late releases all that fell due.
        assert release_plan(10, 30, [0.0, 0.05, 0.1, 0.25, 1.0, 9.0]) == [1, 1, 2, 3, 11, 30]

    def test_never_takes_back(self) -> None:
        assert release_plan(10, 30, [0.5, 0.2]) == [6, 6]


def step(rate: float, begin_ms: list[float], commit_ms: list[float], **statuses: int) -> Step:
    counts = Counter({"begin OK": len(begin_ms), "commit OK": len(commit_ms)})
    counts.update({k.replace("_", " ", 1): n for k, n in statuses.items()})
    return Step(f"{rate:g} pairs/s", rate, len(begin_ms), [v / 1000 for v in begin_ms], [v / 1000 for v in commit_ms],
                statuses=counts)


class TestVerdict:
    def test_met_within_the_target_and_all_ok(self) -> None:
        ok = step(150, [10.0] * 99 + [199.0], [5.0] * 100)
        assert within_target(ok)
        assert ": met (" in verdict([step(50, [1.0], [1.0]), ok])

    def test_a_slow_p99_of_either_call_is_not_met(self) -> None:
        assert not within_target(step(150, [10.0] * 98 + [250.0] * 2, [5.0] * 100))
        assert not within_target(step(150, [10.0] * 100, [5.0] * 98 + [201.0] * 2))
        assert "NOT met" in verdict([step(150, [10.0] * 98 + [250.0] * 2, [5.0] * 100)])

    def test_a_failed_call_is_not_met_however_fast(self) -> None:
        assert not within_target(step(150, [1.0] * 100, [1.0] * 99, commit_ALREADY_EXISTS=1))
        assert not within_target(step(150, [], [], begin_UNIMPLEMENTED=100))

    def test_no_step_at_the_target_rate_or_no_claims_is_said(self) -> None:
        assert "not measured (no step at 150" in verdict([step(50, [1.0], [1.0])])
        assert "not measured (--calls getcells" in verdict([step(150, [1.0], [1.0])], calls="getcells")


class TestTables:
    def test_one_row_per_step_with_quantiles_counts_and_lag(self) -> None:
        s1 = step(50, [float(v) for v in range(1, 101)], [2.0] * 100, begin_RESOURCE_EXHAUSTED=3)
        s1.probe = [0.001, 0.002]
        s1.lag = 0.0042
        lines = step_table([s1])
        assert len(lines) == 3 and lines[1].startswith("|---")
        assert lines[2] == ("| 50 pairs/s | 50.0 / 99.0 / 100 | 2.0 / 2.0 / 2.0 | 1.0 / 2.0 / 2.0 | "
                            "100 / 0 / 3 / 0 / 0 / 0 | 100 / 0 / 0 / 0 / 0 / 0 | – | 4.2 |")

    def test_json_round_trip(self) -> None:
        s1 = step(150, [1.0, 2.0], [3.0], commit_UNAVAILABLE=1)
        s1.messages = {"commit UNAVAILABLE": "broker away"}
        s1.client_cpu_s, s1.wall_s = 0.5, 10.0
        back = Step.from_json(s1.label, s1.rate, s1.to_json())
        assert back == s1
        assert back.answered == 4 and back.failed == 1


# --- the load client against a stub server -----------------------------------------------------------


@pytest.fixture
async def stub() -> AsyncIterator[tuple[str, dict[str, list[object]]]]:
    """BeginUpdate answers a lease (ALREADY_EXISTS for every third user, else RESOURCE_EXHAUSTED for
    every fifth), CommitUpdate OK,
    LivenessProbe OK; every request received is kept, parsed."""
    seen: dict[str, list[object]] = {"begin": [], "commit": [], "metadata": []}

    async def begin(request: s.BeginUpdateRequest, context: grpc.aio.ServicerContext) -> s.BeginUpdateResponse:
        seen["begin"].append(request)
        seen["metadata"].append(dict(context.invocation_metadata()).get("authorization"))
        user = request.create_records[0].subject.id
        if user % 3 == 0:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "has already been taken")
        if user % 5 == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "shed")
        return s.BeginUpdateResponse(cell_id=request.cell_id,
                                     lease_uuid=uuid_pb2.UUID(value=f"lease-{request.create_records[0].subject.id}"))

    async def commit(request: s.CommitUpdateRequest, context: grpc.aio.ServicerContext) -> s.CommitUpdateResponse:
        seen["commit"].append(request)
        return s.CommitUpdateResponse()

    async def live(request: object, context: grpc.aio.ServicerContext) -> health_service_pb2.LivenessProbeResponse:
        return health_service_pb2.LivenessProbeResponse()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(CLAIMS, {
            "BeginUpdate": grpc.unary_unary_rpc_method_handler(
                begin, request_deserializer=s.BeginUpdateRequest.FromString,
                response_serializer=s.BeginUpdateResponse.SerializeToString),
            "CommitUpdate": grpc.unary_unary_rpc_method_handler(
                commit, request_deserializer=s.CommitUpdateRequest.FromString,
                response_serializer=s.CommitUpdateResponse.SerializeToString),
        }),
        grpc.method_handlers_generic_handler(HEALTH, {
            "LivenessProbe": grpc.unary_unary_rpc_method_handler(
                live, request_deserializer=health_service_pb2.LivenessProbeRequest.FromString,
                response_serializer=health_service_pb2.LivenessProbeResponse.SerializeToString),
        }),
    ])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", seen
    finally:
        await server.stop(grace=None)


class TestCommands:
    def test_pairs_are_sign_ups_of_the_users_asked_for_and_commits(self) -> None:
        calls = pair_calls("pairs", first_user=7, count=2, cell_id=4)
        assert (calls.first, calls.second) == (BEGIN, COMMIT)
        assert [s.BeginUpdateRequest.FromString(r).create_records[0].subject.id for r in calls.requests] == [7, 8]
        assert calls.suffix == commit_suffix(4)

    def test_getcells_pairs_have_empty_requests(self) -> None:
        calls = pair_calls("getcells", first_user=1, count=3, cell_id=1)
        assert (calls.first, calls.second, calls.requests) == (GET_CELLS, GET_CELLS, [])
        with pytest.raises(ValueError):
            pair_calls("nothing", 1, 1, 1)

    def test_the_step_command_carries_the_bytes_as_base64(self) -> None:
        calls = pair_calls("pairs", first_user=1, count=2, cell_id=1)
        command = json.loads(json.dumps(step_command(calls, 150.0, 2, 30.0, 0.05)))
        assert [base64.b64decode(r) for r in command["requests"]] == calls.requests
        assert base64.b64decode(command["suffix"]) == calls.suffix
        assert (command["op"], command["rate"], command["count"], command["first"]) == ("step", 150.0, 2, BEGIN)


USERS = 12
# Users 1..12: 3, 6, 9, 12 taken (4), 5 and 10 shed (2), the other 6 begun and committed.
EXPECTED = Counter({"begin OK": 6, "begin ALREADY_EXISTS": 4, "begin RESOURCE_EXHAUSTED": 2, "commit OK": 6})


def check_pairs(result: Step, seen: dict[str, list[object]]) -> None:
    assert result.statuses == EXPECTED
    assert result.messages == {"begin ALREADY_EXISTS": "has already been taken", "begin RESOURCE_EXHAUSTED": "shed"}
    assert len(result.begin) == len(result.commit) == len(result.pair) == 6
    assert len(result.shed) == 2
    assert all(p >= b for p, b in zip(result.pair, result.begin, strict=True))
    assert sorted(r.create_records[0].subject.id for r in seen["begin"]) == list(range(1, USERS + 1))  # type: ignore[attr-defined]
    committed = sorted((c.cell_id, c.lease_uuid.value) for c in seen["commit"])  # type: ignore[attr-defined]
    assert committed == sorted((5, f"lease-{n}") for n in range(1, USERS + 1) if n % 3 and n % 5)
    assert set(seen["metadata"]) == {"Bearer secret"}
    assert result.probe, "the floor is probed beside the step"
    assert result.wall_s > 0 and result.client_cpu_s > 0


class TestClient:
    async def test_offers_every_pair_and_commits_each_lease_it_got(
            self, stub: tuple[str, dict[str, list[object]]]) -> None:
        target, seen = stub
        client = Client(target, "secret", channels=2)
        try:
            result = await client.offer(pair_calls("pairs", 1, USERS, cell_id=5), rate=200.0, count=USERS,
                                        deadline_s=5.0, probe_every_s=0.01)
        finally:
            await client.close()
        check_pairs(result, seen)

    async def test_floor_and_an_unanswered_method_count_as_other(
            self, stub: tuple[str, dict[str, list[object]]]) -> None:
        target, _ = stub
        client = Client(target, "secret", channels=1)
        try:
            assert len(await client.floor(5)) == 5
            result = await client.offer(pair_calls("getcells", 1, 3, 1), rate=100.0, count=3, deadline_s=5.0,
                                        probe_every_s=0)
        finally:
            await client.close()
        assert result.statuses == Counter({"begin UNIMPLEMENTED": 3})  # the stub serves no GetCells
        assert tally(result.statuses, "begin") == [0, 0, 0, 0, 0, 3]
        assert not result.begin


@pytest.mark.skipif(go_tool() is None, reason="the Go toolchain is not installed")
class TestGoClient:
    """bench/grpcload speaks the Python client's protocol and counts alike."""

    async def test_same_answers_as_the_python_client(self, stub: tuple[str, dict[str, list[object]]],
                                                      tmp_path: Path) -> None:
        target, seen = stub
        binary = await asyncio.to_thread(build_grpcload, tmp_path)
        process = await asyncio.create_subprocess_exec(str(binary), target, "secret", "2",
                                                       stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None

        async def ask(command: dict[str, object]) -> object:
            process.stdin.write(json.dumps(command).encode() + b"\n")  # type: ignore[union-attr]
            await process.stdin.drain()  # type: ignore[union-attr]
            return json.loads(await asyncio.wait_for(process.stdout.readline(), 30))  # type: ignore[union-attr]

        try:
            floor = await ask({"op": "floor", "count": 5})
            assert isinstance(floor, list) and len(floor) == 5
            answer = await ask(step_command(pair_calls("pairs", 1, USERS, cell_id=5), 200.0, USERS, 5.0, 0.01))
            assert isinstance(answer, dict)
            check_pairs(Step.from_json("", 200.0, answer), seen)
            other = await ask(step_command(pair_calls("getcells", 1, 3, 1), 100.0, 3, 5.0, 0))
            assert isinstance(other, dict)
            assert other["statuses"] == {"begin UNIMPLEMENTED": 3}
        finally:
            process.stdin.close()
            assert await asyncio.wait_for(process.wait(), 30) == 0
