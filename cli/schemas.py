"""``topology schemas check``: the command line of ``schemas/compatibility.py`` (adr/0001)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from topology_store.runtime.settings import Settings
from topology_store.schemas.compatibility import SCHEMA_DIR, check


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    schema_dir = Path(args.dir) if args.dir else SCHEMA_DIR
    report = check(schema_dir, update_lock=args.update_lock)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    count = sum(len(family) for family in report.versions.values())
    if not report.ok:
        print(f"{len(report.problems)} problem(s) in {count} schema versions of {len(report.versions)} event types",
              file=sys.stderr)
        return 1
    print(f"{count} schema versions of {len(report.versions)} event types: every pair readable both ways; "
          f"fingerprints {'recorded' if report.lock_updated else 'match the lock'}")
    return 0


def add_schemas_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    schemas = commands.add_parser("schemas", help="schema evolution checks")
    actions = schemas.add_subparsers(dest="schemas_action", required=True, metavar="ACTION")
    checking = actions.add_parser(
        "check", help="fail when a schema change breaks reading old data (backward) or new data (forward)"
    )
    checking.add_argument("--update-lock", action="store_true",
                          help="record new schema versions in schemas/fingerprints.json (never removes one)")
    checking.add_argument("--dir", help="schema directory (default: the installed schemas/)")
    checking.set_defaults(run=_cmd_check, needs_settings=False)
