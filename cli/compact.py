"""``topology compact``: remove what is past its retention (adr/0020, projector/compaction.py).

Progress lines go to stderr; one JSON line per rule to stdout (``deleted`` or, with
``--dry-run``, ``would_delete``). Exit 0 when every rule ran to the end, 1 when the
compaction could not run or stopped part way (another one holds the lock, a database
error, the wrong database), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys

from topology_store.runtime.settings import Settings


def _cmd_compact(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from topology_store.projector.compaction import (
        CompactionError,
        compact,
        outbox_rules,
        print_outcomes,
        projection_rules,
    )

    if args.source and not args.outbox:
        print("topology compact: --source names a producer's outbox database; give --outbox too", file=sys.stderr)
        return 2
    if args.batch_blocks < 1:
        print("topology compact: --batch-blocks is at least 1", file=sys.stderr)
        return 2
    if args.outbox:
        url = args.source or settings.relay_source_url
        if not url:
            print("topology compact: --outbox needs --source or TOPOLOGY_RELAY_SOURCE_URL", file=sys.stderr)
            return 2
        rules = outbox_rules(settings)
    else:
        url, rules = settings.libpq_url, projection_rules(settings)

    def say(line: str) -> None:
        print(f"topology compact: {line}", file=sys.stderr, flush=True)

    try:
        outcomes = compact(url, rules, outbox=args.outbox, dry_run=args.dry_run, batch_blocks=args.batch_blocks,
                           progress=say)
    except KeyboardInterrupt:
        say("interrupted; what was deleted so far stays deleted, the rest goes next run")
        return 1
    except CompactionError as exc:
        say(str(exc))
        return 1
    except psycopg.Error as exc:
        say(f"database error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")
        return 1
    print_outcomes(outcomes, sys.stdout)
    if not rules:
        say("every retention of this kind is 0 (keep forever): nothing to do")
    return 0 if all(o.complete for o in outcomes) else 1


def add_compact_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    compacting = commands.add_parser(
        "compact", help="remove what is past its retention: old no-op lease ticks, ended leases, re-driven dead "
        "letters; --outbox: a producer's published outbox rows (adr/0020)")
    compacting.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    compacting.add_argument("--outbox", action="store_true",
                            help="compact a producer's outbox (the relay's source) instead of the projection")
    compacting.add_argument("--source", help="libpq URL of that outbox database (default TOPOLOGY_RELAY_SOURCE_URL)")
    compacting.add_argument("--batch-blocks", type=int, default=1000,
                            help="heap blocks (8 KiB) read per delete transaction (default 1000)")
    compacting.set_defaults(run=_cmd_compact)
