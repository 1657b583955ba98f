"""``topology claim ...``: claim requests from the command line.

Each subcommand builds one command event, publishes it (the broker's
acknowledgement is printed), and with ``--wait`` prints the projector's decision,
read from the projection database. Exit status: 0 granted or unchanged,
1 rejected, 2 invalid input, 3 no decision within the wait, 4 not acknowledged
by the broker (it may or may not be in the log: retry with the same --request-id).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import TextIO

from aiokafka.errors import KafkaError
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import create_async_engine

from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import (
    ClaimsDestroyRequested,
    ClaimsRequested,
    Event,
    LeaseCommitRequested,
    LeaseRollbackRequested,
    OwnerTransferRequested,
    SequenceRangeRequested,
)


class RequestInputError(ValueError):
    pass


def parse_owner(text: str) -> tuple[str, int]:
    """``USER:42`` -> ("USER", 42)."""
    kind, _, number = text.partition(":")
    if not kind or not number.isdigit():
        raise RequestInputError(f"--owner must look like USER:42, not {text!r}")
    return kind.upper(), int(number)


def parse_claim(text: str) -> dict[str, str]:
    """``USERNAME=ada`` -> {"bucket": "USERNAME", "value": "ada"}."""
    bucket, sep, value = text.partition("=")
    if not sep or not bucket or not value:
        raise RequestInputError(f"--claim must look like BUCKET=value, not {text!r}")
    return {"bucket": bucket.upper(), "value": value}


def build_command(args: argparse.Namespace) -> Event:
    request = {"event_id": args.request_id or uuid.uuid4(), "source": args.source}
    if args.action == "begin":
        owner_type, owner_id = parse_owner(args.owner)
        extra = {"lease_id": args.lease_id} if args.lease_id else {}
        return ClaimsRequested(**request, **extra, cell_id=args.cell, owner_type=owner_type, owner_id=owner_id,
                               claims=[parse_claim(c) for c in args.claim], lease_ttl_ms=args.ttl_ms)
    if args.action in ("commit", "rollback"):
        model = LeaseCommitRequested if args.action == "commit" else LeaseRollbackRequested
        return model(**request, lease_id=args.lease_id, cell_id=args.cell)
    if args.action == "destroy":
        owner_type, owner_id = parse_owner(args.owner)
        return ClaimsDestroyRequested(**request, cell_id=args.cell, owner_type=owner_type, owner_id=owner_id,
                                      claims=[parse_claim(c) for c in args.claim])
    if args.action == "transfer":
        owner_type, owner_id = parse_owner(args.owner)
        return OwnerTransferRequested(**request, owner_type=owner_type, owner_id=owner_id, from_cell_id=args.from_cell,
                                      to_cell_id=args.to_cell, to_owner_id=args.to_owner_id)
    if args.action == "sequence":
        return SequenceRangeRequested(**request, cell_id=args.cell, sequence_name=args.name, size=args.size)
    raise RequestInputError(f"unknown action {args.action}")


async def run_request(settings: Settings, args: argparse.Namespace, out: TextIO | None = None,
                      err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr  # the streams of the call, not of the import
    try:
        command = build_command(args)
    except ValidationError as exc:
        for item in exc.errors():
            print(f"{'.'.join(map(str, item['loc'])) or 'request'}: {item['msg']}", file=err)
        return 2
    except RequestInputError as exc:
        print(str(exc), file=err)
        return 2
    from topology_store.query_api.decisions import DecisionWaiter  # the CLI waits the way the HTTP API does

    engine = create_async_engine(settings.sqlalchemy_url) if args.wait else None
    try:
        waiter = DecisionWaiter(engine, settings.libpq_url, poll_interval_s=0.2) if engine is not None else None
        try:
            async with EventPublisher(settings) as publisher:
                published = await publisher.publish(command)
        except (KafkaError, PublishFailed) as exc:
            # Never a success line for an unacknowledged request; the same request id
            # makes the retry safe (a duplicate is absorbed by event_id).
            cause = exc.cause if isinstance(exc, PublishFailed) else exc
            print(f"request {command.event_id} not acknowledged by the broker at {settings.kafka_bootstrap} "
                  f"({type(cause).__name__}); retry with --request-id {command.event_id}", file=err)
            return 4
        line: dict[str, object] = {"request_id": str(command.event_id), "type": command.EVENT_TYPE,
                                   "status": "acknowledged", "topic": published.topic,
                                   "partition": published.partition, "offset": published.offset}
        if hasattr(command, "lease_id"):
            line["lease_id"] = str(command.lease_id)
        print(json.dumps(line), file=out, flush=True)
        if waiter is None:
            return 0
        import asyncio

        task = asyncio.create_task(waiter.run())
        try:
            decision = await waiter.wait(command.event_id, args.wait)
        finally:
            task.cancel()
        if decision is None:
            print(f"no decision within {args.wait}s; it may still come", file=err)
            return 3
        print(json.dumps({"request_id": str(decision.request_id), "outcome": decision.outcome,
                          "reason": decision.reason, "decisions": decision.decisions}), file=out)
        return 1 if decision.outcome == "rejected" else 0
    finally:
        if engine is not None:
            await engine.dispose()


def add_claim_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    claim = commands.add_parser("claim", help="claim requests: begin, commit, rollback, destroy, transfer, sequence")
    actions = claim.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--request-id", type=uuid.UUID, help="idempotency key (default: new)")
        parser.add_argument("--source", default="cli", help="who is asking (default: cli)")
        parser.add_argument("--wait", type=float, nargs="?", const=10.0, default=None, metavar="SECONDS",
                            help="wait for the decision (default 10 s when given without a value)")
        return parser

    begin = common(actions.add_parser("begin", help="reserve claims under a lease, all or none"))
    begin.add_argument("--cell", required=True)
    begin.add_argument("--owner", required=True, help="OWNER_TYPE:ID, e.g. USER:42")
    begin.add_argument("--claim", action="append", required=True, help="BUCKET=value; repeat for several")
    begin.add_argument("--ttl-ms", type=int, default=60_000, help="lease lifetime in log time (default 60000)")
    begin.add_argument("--lease-id", type=uuid.UUID)
    for name, text in (("commit", "make a lease permanent"), ("rollback", "free a lease's claims")):
        parser = common(actions.add_parser(name, help=text))
        parser.add_argument("lease_id", type=uuid.UUID)
        parser.add_argument("--cell", required=True)
    destroy = common(actions.add_parser("destroy", help="free committed claims of an owner"))
    destroy.add_argument("--cell", required=True)
    destroy.add_argument("--owner", required=True)
    destroy.add_argument("--claim", action="append", required=True)
    transfer = common(actions.add_parser("transfer", help="move an owner's claims to another cell"))
    transfer.add_argument("--owner", required=True)
    transfer.add_argument("--from", dest="from_cell", required=True)
    transfer.add_argument("--to", dest="to_cell", required=True)
    transfer.add_argument("--to-owner-id", type=int)
    sequence = common(actions.add_parser("sequence", help="grant a cell the next range of a 64-bit id sequence"))
    sequence.add_argument("name")
    sequence.add_argument("--cell", required=True)
    sequence.add_argument("--size", type=int, required=True)
    return claim
