"""``topology dlq list | show | replay | discard``: the command line of projector/dead_letters.py.

Kept apart, and importing the dead-letter code only when a ``dlq`` command runs, so
that every other ``topology`` command starts as fast as before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from topology_store.runtime.settings import Settings

STATUSES = ("open", "resolved", "discarded")



def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.dead_letters import list_dead_letters

    for line in list_dead_letters(settings, args.status, args.limit, args.topic):
        print(json.dumps(line))
    return 0


def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.dead_letters import DeadLetterError, show

    try:
        document = show(settings, args.id, pii=args.pii)
    except DeadLetterError as exc:
        print(f"topology dlq show: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2, default=str))
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.dead_letters import DeadLetterError, open_ids, operator, redrive

    if bool(args.ids) == bool(args.all):
        print("topology dlq replay: give dead letter ids or --all", file=sys.stderr)
        return 2
    try:
        ids = open_ids(settings) if args.all else args.ids
        results = asyncio.run(redrive(settings, ids, args.by or operator()))
    except DeadLetterError as exc:
        print(f"topology dlq replay: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(json.dumps({k: v for k, v in asdict(result).items() if v is not None}))
    failing = [r for r in results if r.status != "resolved"]
    if failing:
        print(f"{len(failing)} of {len(results)} dead letter(s) not resolved", file=sys.stderr)
    return 1 if failing else 0


def _cmd_discard(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.dead_letters import DeadLetterError, discard, operator

    try:
        discard(settings, args.id, args.reason, args.by or operator())
    except DeadLetterError as exc:
        print(f"topology dlq discard: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"id": args.id, "status": "discarded", "reason": args.reason.strip()}))
    return 0


def add_dlq_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dlq = commands.add_parser("dlq", help="dead letters: list, show, re-drive or discard them")
    actions = dlq.add_subparsers(dest="dlq_action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="one JSON line per dead letter")
    listing.add_argument("--status", choices=(*STATUSES, "all"), default="open")
    listing.add_argument("--topic")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(run=_cmd_list)

    showing = actions.add_parser("show", help="one dead letter, and whether the current code reads it now")
    showing.add_argument("id", type=int)
    showing.add_argument("--pii", action="store_true", help="show e-mails and the raw bytes in clear")
    showing.set_defaults(run=_cmd_show)

    replay = actions.add_parser("replay", help="decode again with the current schemas and apply if valid")
    replay.add_argument("ids", type=int, nargs="*", metavar="ID")
    replay.add_argument("--all", action="store_true", help="every open dead letter, in log order")
    replay.add_argument("--by", help="who re-drives (default: login@host)")
    replay.set_defaults(run=_cmd_replay)

    discarding = actions.add_parser("discard", help="mark a dead letter discarded, with a reason (never deleted)")
    discarding.add_argument("id", type=int)
    discarding.add_argument("--reason", required=True)
    discarding.add_argument("--by", help="who discards (default: login@host)")
    discarding.set_defaults(run=_cmd_discard)
