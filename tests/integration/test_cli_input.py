"""Bad input and unacknowledged events on the producer side (README "Reliability").

- ``topology emit`` and ``topology claim ...``: malformed JSON, unknown event types,
  missing fields, oversize values, bytes that are not UTF-8 → a message naming the
  problem, exit status 2, and nothing sent (checked by reading every topic from the
  beginning, never by broker end offsets).
- The CLI and the library never report success for an event the broker did not
  acknowledge: a broker that is missing or frozen gives a clear failure, and every
  success reported is in the log at the reported offset.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import settings_env
from tests.servers import PrivateBroker
from topology_store.cli.devstack import free_port
from topology_store.cli.main import main
from topology_store.producer.publisher import EventPublisher, Published, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import ClaimBucket, ClaimCreated, OwnerType

pytestmark = pytest.mark.integration

CELL = {"type": "CellRegistered", "source": "ops", "cell_id": "cell-8", "address": "https://c8.example.com",
        "session_prefix": "c8", "region": "eu"}
CLAIM = {"type": "ClaimCreated", "source": "cell-8", "bucket": "NAMESPACE", "value": "acme", "cell_id": "cell-8",
         "owner_type": "GROUP", "owner_id": 1}


async def everything_in(settings: Settings, idle_ms: int = 1500) -> list[object]:
    """Every record of every topic of ``settings``, read from the beginning until the
    topics stay quiet (the embedded broker's end offsets are not to be trusted)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in (*settings.topics, settings.claim_decisions_topic)
                      for p in (await consumer._client.fetch_all_metadata()).partitions_for_topic(topic) or ()]  # noqa: SLF001
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[object] = []
        while batch := await consumer.getmany(timeout_ms=idle_ms):
            records += [r for rs in batch.values() for r in rs]
        return records
    finally:
        await consumer.stop()


@pytest.fixture
def cli(topics: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    """``topology ...`` in this process, configured through the environment."""
    for key, value in settings_env(topics).items():
        if key.startswith("TOPOLOGY_"):
            monkeypatch.setenv(key, value)

    def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", _Stdin(stdin))
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse refuses its own way: usage and exit 2
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return status, out, err

    yield run


class _Stdin:
    def __init__(self, data: bytes) -> None:
        import io

        self.buffer = io.BytesIO(data)

    def read(self) -> str:
        return self.buffer.read().decode("utf-8")


EMIT_CASES = {
    "malformed JSON": ('{"type": "ClaimCreated", "source": ', "not JSON: Expecting value"),
    "not an object": ("[1, 2, 3]", "an event must be a JSON object"),
    "no type": (json.dumps({"source": "ops"}), "type: missing; one of"),
    "unknown event type": (json.dumps({**CLAIM, "type": "ClaimStolen"}), "unknown event type 'ClaimStolen'"),
    "missing fields": (json.dumps({k: v for k, v in CLAIM.items() if k not in ("owner_id", "cell_id")}),
                       "owner_id: Field required"),
    "unknown field": (json.dumps({**CLAIM, "colour": "red"}), "colour: Extra inputs are not permitted"),
    "oversize source": (json.dumps({**CLAIM, "source": "s" * 256}), "source: String should have at most 255"),
    "oversize claim value": (json.dumps({**CLAIM, "bucket": "KEY", "value": "k" * 300}), "at most 255 characters"),
    "oversize address": (json.dumps({**CELL, "address": "https://" + "a" * 3000}), "address: String should have"),
    "oversize number": (json.dumps({**CLAIM, "owner_id": 2**64}), "owner_id: Input should be less than or equal"),
    "too many claims": (json.dumps({"type": "ClaimsRequested", "source": "c", "cell_id": "cell-8",
                                    "owner_type": "USER", "owner_id": 1,
                                    "claims": [{"bucket": "USERNAME", "value": f"u{n}"} for n in range(101)]}),
                        "claims: Tuple should have at most 100 items"),
    "NUL character": (json.dumps({**CLAIM, "value": "ac\u0000me"}), "must not contain NUL"),
    "lone surrogate": ('{"type": "ClaimCreated", "source": "cell-8", "bucket": "KEY", "value": "\\ud800", '
                       '"cell_id": "cell-8", "owner_type": "GROUP", "owner_id": 1}', "no lone surrogates"),
    "a nested path": (json.dumps({**CLAIM, "value": "acme/project"}), "one path segment"),
}


@pytest.mark.parametrize("case", list(EMIT_CASES))
def test_emit_refuses_bad_input_with_a_clear_message_and_sends_nothing(cli, case: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       topics: Settings) -> None:
    line, message = EMIT_CASES[case]
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(CELL) + "\n" + line + "\n", encoding="utf-8")  # one good line first
    status, out, err = cli("emit", "-f", str(events))
    assert status == 2 and out == ""
    assert "line 2: " in err and message in err and "nothing was sent" in err, err  # names the line
    # The same refusal for one event given as an argument.
    status, out, err = cli("emit", line)
    assert (status, out) == (2, "") and message in err
    assert asyncio.run(everything_in(topics, idle_ms=500)) == []


def test_emit_refuses_bytes_that_are_not_utf8_from_a_file_or_stdin(cli, tmp_path: Path, topics: Settings) -> None:  # type: ignore[no-untyped-def]
    raw = json.dumps(CELL).encode().replace(b'"eu"', b'"\xff\xfe"')
    events = tmp_path / "latin.jsonl"
    events.write_bytes(raw + b"\n")
    status, out, err = cli("emit", "-f", str(events))
    assert (status, out) == (2, "") and "is not UTF-8 text" in err and "nothing was sent" in err
    status, out, err = cli("emit", stdin=raw + b"\n")
    assert (status, out) == (2, "") and "stdin is not UTF-8 text" in err
    assert asyncio.run(everything_in(topics)) == []


CLAIM_CASES = {
    "owner without id": (["begin", "--cell", "cell-1", "--owner", "USER", "--claim", "USERNAME=ada"],
                         "--owner must look like USER:42"),
    "unknown owner type": (["begin", "--cell", "cell-1", "--owner", "ALIEN:4", "--claim", "USERNAME=ada"],
                           "owner_type: Input should be"),
    "owner id too large": (["begin", "--cell", "cell-1", "--owner", f"USER:{2**64}", "--claim", "USERNAME=ada"],
                           "owner_id: Input should be less than or equal"),
    "claim without value": (["begin", "--cell", "cell-1", "--owner", "USER:4", "--claim", "USERNAME"],
                            "--claim must look like BUCKET=value"),
    "unknown bucket": (["begin", "--cell", "cell-1", "--owner", "USER:4", "--claim", "PLANET=earth"],
                       "claims.0.bucket: Input should be"),
    "a nested path": (["begin", "--cell", "cell-1", "--owner", "GROUP:4", "--claim", "NAMESPACE=a/b"],
                      "one path segment"),
    "oversize value": (["begin", "--cell", "cell-1", "--owner", "USER:4", "--claim", "USERNAME=" + "a" * 300],
                       "at most 255 characters"),
    "the same claim twice": (["begin", "--cell", "cell-1", "--owner", "USER:4", "--claim", "USERNAME=ada",
                              "--claim", "username=ADA"], "names each (bucket, value) once"),
    "too many claims": (["begin", "--cell", "cell-1", "--owner", "USER:4",
                         *[arg for n in range(101) for arg in ("--claim", f"USERNAME=u{n}")]],
                        "claims: Tuple should have at most 100 items"),
    "lease too short": (["begin", "--cell", "cell-1", "--owner", "USER:4", "--claim", "USERNAME=ada",
                         "--ttl-ms", "999"], "lease_ttl_ms is 0 (no server-side expiry) or at least 1000"),
    "bad cell id": (["begin", "--cell", "Cell_1", "--owner", "USER:4", "--claim", "USERNAME=ada"],
                    "cell_id: String should match pattern"),
    "empty range": (["sequence", "projects.id", "--cell", "cell-1", "--size", "0"], "size: Input should be greater"),
    "oversize range": (["sequence", "projects.id", "--cell", "cell-1", "--size", str(2**40 + 1)],
                       "size: Input should be less than or equal"),
    "transfer to itself": (["transfer", "--owner", "USER:1", "--from", "cell-1", "--to", "cell-1"],
                           "to_cell_id must differ from from_cell_id"),
    "lease id not a uuid": (["commit", "not-a-uuid", "--cell", "cell-1"], "invalid UUID value"),
    "size not a number": (["sequence", "ids", "--cell", "cell-1", "--size", "many"], "invalid int value"),
}


@pytest.mark.parametrize("case", list(CLAIM_CASES))
def test_claim_commands_refuse_bad_input_with_a_clear_message_and_send_nothing(cli, case: str,  # type: ignore[no-untyped-def]
                                                                               topics: Settings) -> None:
    argv, message = CLAIM_CASES[case]
    status, out, err = cli("claim", *argv, "--wait", "1")
    assert (status, out) == (2, "") and message in err, err
    assert asyncio.run(everything_in(topics, idle_ms=500)) == []


def test_a_missing_broker_is_a_clear_failure_never_a_success(topics: Settings, tmp_path: Path) -> None:
    nowhere = topics.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    env = settings_env(nowhere)
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(CELL) + "\n" + json.dumps(CLAIM) + "\n")
    done = subprocess.run([sys.executable, "-m", "topology_store.cli", "emit", "-f", str(events)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert f"cannot reach the broker at {nowhere.kafka_bootstrap}" in done.stderr and "nothing was sent" in done.stderr
    request = str(uuid.uuid4())
    done = subprocess.run([sys.executable, "-m", "topology_store.cli", "claim", "begin", "--cell", "cell-1", "--owner", "USER:1",
                           "--claim", "USERNAME=ada", "--request-id", request], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 4 and done.stdout == ""
    assert "not acknowledged by the broker" in done.stderr and f"--request-id {request}" in done.stderr


# own_broker (tests/conftest.py): a broker of this test alone, of the session's kind, so
# that it can be frozen with SIGSTOP.


@pytest.mark.both_brokers
async def test_the_library_reports_no_success_while_the_broker_does_not_acknowledge(
    topics: Settings, own_broker: PrivateBroker
) -> None:
    from topology_store.runtime.topics import ensure_topics

    settings = topics.model_copy(update={"kafka_bootstrap": own_broker.bootstrap,
                                         "producer_request_timeout_ms": 2000, "producer_idempotence": "off"})
    await ensure_topics(settings)

    def claims(prefix: str, count: int) -> list[ClaimCreated]:
        return [ClaimCreated(source="cell-1", bucket=ClaimBucket.NAMESPACE, value=f"{prefix}-{n}", cell_id="cell-1",
                             owner_type=OwnerType.GROUP, owner_id=n) for n in range(count)]

    async with EventPublisher(settings) as publisher:
        before = [o async for o in publisher.publish_many(claims("before", 50))]
        own_broker.signal(signal.SIGSTOP)
        try:
            during = [o async for o in publisher.publish_many(claims("during", 50))]
        finally:
            own_broker.signal(signal.SIGCONT)
    assert all(isinstance(o, Published) for o in before)
    assert during and all(isinstance(o, PublishFailed) for o in during)  # not one success while frozen

    # Every success reported is in the log, at the reported place. (The failed ones
    # are ambiguous: a frozen broker may still append them once it wakes up.)
    found = {(r.topic, r.partition, r.offset): r.key for r in await everything_in(settings)}  # type: ignore[attr-defined]
    for outcome in before:
        assert isinstance(outcome, Published)
        assert (outcome.topic, outcome.partition, outcome.offset) in found


@pytest.mark.both_brokers
def test_the_emit_cli_reports_no_success_against_a_frozen_broker(topics: Settings, own_broker: PrivateBroker,
                                                                 tmp_path: Path) -> None:
    settings = topics.model_copy(update={"kafka_bootstrap": own_broker.bootstrap,
                                         "producer_request_timeout_ms": 2000})
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(CELL) + "\n")
    own_broker.signal(signal.SIGSTOP)
    try:
        done = subprocess.run([sys.executable, "-m", "topology_store.cli", "emit", "-f", str(events)],
                              env=settings_env(settings), capture_output=True, text=True, timeout=120)
    finally:
        own_broker.signal(signal.SIGCONT)
    assert done.returncode == 1
    assert '"acknowledged"' not in done.stdout
    assert "nothing was sent" in done.stderr or "not acknowledged" in done.stderr, done.stderr[-2000:]
