"""``topology claim ...``: claim requests from the command line, a door of the claims
service (``service/claims.py``, adr/0015).

Each subcommand builds one command event, publishes it (the broker's
acknowledgement is printed), and with ``--wait`` prints the projector's decision,
read from the projection database. Exit status: 0 granted or unchanged,
1 rejected, 2 invalid input, 3 no decision within the wait, 4 not acknowledged
by the broker (it may or may not be in the log: retry with the same --request-id),
5 refused by admission control before anything was published (adr/0018: retry later),
6 the request id was used for another command (adr/0017: send it under a new one; found
only with ``--wait``, which reads the decisions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import TextIO

from aiokafka.errors import KafkaError
from pydantic import ValidationError

from topology_store.producer.publisher import EventPublisher, PublishFailed
from topology_store.query_api.decisions import DecisionWaiter
from topology_store.runtime.database import create_engine
from topology_store.runtime.settings import Settings
from topology_store.schemas.models import Event
from topology_store.service import commands
from topology_store.service.admission import Admission, Budget, Overloaded
from topology_store.service.claims import (
    Acknowledgement,
    ClaimsService,
    Decided,
    DecisionUnreadable,
    NotPublished,
    Pending,
    RequestReused,
    Submission,
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
    request = {"request_id": args.request_id, "source": args.source}
    if args.action == "begin":
        owner_type, owner_id = parse_owner(args.owner)
        return commands.begin(**request, lease_id=args.lease_id, cell_id=args.cell, owner_type=owner_type,
                              owner_id=owner_id, claims=[parse_claim(c) for c in args.claim], lease_ttl_ms=args.ttl_ms)
    if args.action in ("commit", "rollback"):
        build = commands.commit if args.action == "commit" else commands.rollback
        return build(**request, lease_id=args.lease_id, cell_id=args.cell)
    if args.action == "destroy":
        owner_type, owner_id = parse_owner(args.owner)
        return commands.destroy(**request, cell_id=args.cell, owner_type=owner_type, owner_id=owner_id,
                                claims=[parse_claim(c) for c in args.claim])
    if args.action == "transfer":
        owner_type, owner_id = parse_owner(args.owner)
        return commands.transfer(**request, owner_type=owner_type, owner_id=owner_id, from_cell_id=args.from_cell,
                                 to_cell_id=args.to_cell, to_owner_id=args.to_owner_id)
    if args.action == "sequence":
        return commands.sequence(**request, cell_id=args.cell, sequence_name=args.name, size=args.size)
    raise RequestInputError(f"unknown action {args.action}")


class _NoDecisions:
    """Without --wait the CLI only publishes: nothing is looked up."""

    listening = False  # hears nothing; the CLI sends its own request ids anyway

    async def find(self, request_id: object) -> None:
        return None

    async def wait(self, request_id: object, timeout_s: float, check_first: bool = True) -> None:
        return None


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

    def acknowledged(ack: Acknowledgement) -> None:
        line: dict[str, object] = {"request_id": str(command.event_id), "type": command.EVENT_TYPE,
                                   "status": "acknowledged", "topic": ack.topic,
                                   "partition": ack.partition, "offset": ack.offset}
        if hasattr(command, "lease_id"):
            line["lease_id"] = str(command.lease_id)
        print(json.dumps(line), file=out, flush=True)

    engine = create_engine(settings.sqlalchemy_url, pool_size=1) if args.wait else None
    waiter = DecisionWaiter(engine, settings.libpq_url, poll_interval_s=0.2) if engine is not None else None
    listening = asyncio.create_task(waiter.run()) if waiter is not None else None
    try:
        async with EventPublisher(settings) as publisher:
            # The CLI always publishes (and prints the broker's acknowledgement), then waits.
            admission = Admission(Budget(settings.claims_max_in_flight, settings.claims_max_wait_age_ms / 1000))
            service = ClaimsService(lambda: publisher, waiter or _NoDecisions(), wait_s=args.wait or 0,
                                    admission=admission, secret=settings.claim_secret)
            result = await service.submit(command, reuse_decided=False, on_published=acknowledged)
    except KafkaError as exc:  # the producer could not even start
        result = NotPublished(command.event_id, exc)
    finally:
        if listening is not None:
            listening.cancel()
        if engine is not None:
            await engine.dispose()
    return report(result, command, settings, args, out, err)


def report(result: Submission, command: Event, settings: Settings, args: argparse.Namespace, out: TextIO,
           err: TextIO) -> int:
    """Print what the submission came to; the exit status (module docstring)."""
    match result:
        case Overloaded(retry_after_s=retry_after_s, reason=reason):
            print(f"request {command.event_id} refused, not published: too many claim requests wait for a decision "
                  f"({reason}); retry in {retry_after_s}s (with --request-id {command.event_id})", file=err)
            return 5
        case NotPublished(cause=cause):
            # Never a success line for an unacknowledged request; the same request id
            # makes the retry safe (a duplicate is absorbed by event_id).
            cause = cause.cause if isinstance(cause, PublishFailed) else cause
            print(f"request {command.event_id} not acknowledged by the broker at {settings.kafka_bootstrap} "
                  f"({type(cause).__name__}); retry with --request-id {command.event_id}", file=err)
            return 4
        case Pending() if not args.wait:
            return 0
        case Pending() | DecisionUnreadable():
            print(f"no decision within {args.wait}s; it may still come", file=err)
            return 3
        case RequestReused(recorded_type=recorded_type, same_type=same_type):
            what = f"another {recorded_type} (other content)" if same_type else f"a {recorded_type}"
            print(f"request_id_reused: request {command.event_id} was used for {what}; this {command.EVENT_TYPE} was "
                  "not decided; send it again without --request-id (or with a new one)", file=err)
            return 6
        case Decided(decision=decision):
            print(json.dumps({"request_id": str(decision.request_id), "outcome": decision.outcome,
                              "reason": decision.reason, "decisions": decision.decisions}), file=out)
            return 1 if decision.outcome == "rejected" else 0
    raise AssertionError(result)


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
    begin.add_argument("--ttl-ms", type=int, default=60_000, help="lease lifetime in log time (default 60000); 0: no server-side expiry, the lease waits for a commit or rollback (GitLab's model, adr/0022)")
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
