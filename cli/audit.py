"""``topology audit history``, ``topology replay``, ``topology rebuild``, ``topology verify``, ``topology export``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from pydantic import ValidationError

from topology_store.runtime.settings import Settings


def _cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.core.audit import audit_key
    from topology_store.query_api.audit_api import key_history
    from topology_store.runtime.database import create_engine

    try:
        kind, key = audit_key(args.kind, args.value, settings.claim_secret)
    except (ValueError, ValidationError) as exc:
        raise SystemExit(f"topology audit history: {exc}") from None

    async def run() -> list:  # type: ignore[type-arg]
        engine = create_engine(settings.sqlalchemy_url)
        try:
            async with engine.connect() as conn:
                return await key_history(conn, kind, key, settings.claim_secret, pii=args.pii)
        finally:
            await engine.dispose()

    entries = asyncio.run(run())
    for entry in entries:
        line = {
            "position": f"{entry.topic}[{entry.partition}]@{entry.offset}",
            "log_time": entry.log_time.isoformat() if entry.log_time else None,
            "event_type": entry.event_type,
            "source": entry.source,
            "outcome": entry.outcome,
            "reason": entry.reason,
            "payload": entry.payload,
            "decisions": [d.get("type") for d in entry.decisions],
        }
        print(json.dumps(line, default=str))
    if not entries:
        print(f"no history for {kind} {key}", file=sys.stderr)
        return 1
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.replay import replay
    from topology_store.projector.sources import Cut, ReplayError

    try:
        projection = replay(settings, args.into, Cut.parse(args.until), source=args.source, replace=args.replace)
    except ReplayError as exc:
        raise SystemExit(f"topology replay: {exc}") from None
    print(json.dumps({"schema": args.into, "cells": len(projection.cells), "claims": len(projection.registry.claims),
                      "leases": len(projection.registry.leases)}))
    return 0


def _cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.replay import verify

    result = verify(settings)
    print(json.dumps({"equal": result.equal, "live_digest": result.live_digest, "replay_digest": result.replay_digest}))
    for table, rows in result.unexpected.items():
        for row in rows:
            print(f"live only   {table}: {row}", file=sys.stderr)
    for table, rows in result.missing.items():
        for row in rows:
            print(f"replay only {table}: {row}", file=sys.stderr)
    return 0 if result.equal else 1


def _cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.rebuild import RebuildError, drop_retired, rebuild, result_json

    try:
        if args.drop_retired:
            dropped = drop_retired(settings, args.retired_schema)
            print(json.dumps({"retired_schema": args.retired_schema, "dropped": dropped}))
            return 0
        result = rebuild(settings, schema=args.schema, source=args.source, restart=args.restart, switch=args.switch,
                         chunk_events=args.chunk_events, max_tail=args.max_tail, lock_timeout_s=args.lock_timeout,
                         tail_timeout_s=args.tail_timeout, switch_attempts=args.switch_attempts,
                         retired_schema=args.retired_schema)
    except RebuildError as exc:
        raise SystemExit(f"topology rebuild: {exc}") from None
    print(result_json(result))
    return 0


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.replay import export_rows
    from topology_store.projector.sources import ReplayError

    try:
        count = export_rows(settings, args.schema, args.table, args.format, sys.stdout)
    except ReplayError as exc:
        raise SystemExit(f"topology export: {exc}") from None
    print(f"{count} rows", file=sys.stderr)
    return 0


def add_audit_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = commands.add_parser("audit", help="what happened to a key, from the log")
    audit_actions = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    history = audit_actions.add_parser("history", help="every event that touched a key, in log order")
    history.add_argument("kind", help="ROUTE (a path), CELL, LEASE, OWNER (cell/TYPE/id), or a claim bucket")
    history.add_argument("value")
    history.add_argument("--pii", action="store_true", help="show e-mails in clear where the log has them")
    history.set_defaults(run=_cmd_history)

    replay = commands.add_parser("replay", help="rebuild the projection from the log into another schema")
    replay.add_argument("--into", required=True, help="target schema (created; never the live one)")
    replay.add_argument("--until", help="ISO timestamp with zone, version:N, or topic:partition@next_offset,...")
    replay.add_argument("--source", choices=("archive", "kafka"), default="archive")
    replay.add_argument("--replace", action="store_true", help="drop and rebuild the target schema if it exists")
    replay.set_defaults(run=_cmd_replay)

    rebuild = commands.add_parser(
        "rebuild", help="rebuild the projection from the log into a shadow schema, resumably, then switch to it "
        "with no downtime (adr/0013)",
        description="Replay the log from offset 0 into a shadow schema while the projector and the read API keep "
        "running; a killed run resumes where it stopped. Once caught up, switch the live tables over in one "
        "transaction: the projector's next commit waits, routers get one ordinary delta. Progress on stderr, "
        "the result as one JSON line on stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rebuild.add_argument("--source", choices=("archive", "kafka"), default="archive")
    rebuild.add_argument("--schema", default="topology_shadow",
                         help="the shadow schema (resumed when it holds a rebuild)")
    rebuild.add_argument("--restart", action="store_true", help="drop the shadow schema and start from offset 0")
    rebuild.add_argument("--switch", action=argparse.BooleanOptionalAction, default=True,
                         help="once caught up, exchange the shadow for the live tables (default) or only build it")
    rebuild.add_argument("--chunk-events", type=int, default=50_000, help="events per committed chunk")
    rebuild.add_argument("--max-tail", type=int, default=10_000,
                         help="switch when at most this many events are left to apply under the lock")
    rebuild.add_argument("--lock-timeout", type=float, default=5.0,
                         help="seconds the switch may wait for its locks before it backs off and retries")
    rebuild.add_argument("--tail-timeout", type=float, default=5.0,
                         help="kafka source: seconds to wait under the lock for the relay's last decisions")
    rebuild.add_argument("--switch-attempts", type=int, default=5)
    rebuild.add_argument("--retired-schema", default="topology_retired",
                         help="where the switch moves the old live tables (kept for inspection)")
    rebuild.add_argument("--drop-retired", action="store_true", help="only drop the retired schema, then exit")
    rebuild.set_defaults(run=_cmd_rebuild)

    verify = commands.add_parser("verify", help="digest the live projection and a fresh replay; list differences")
    verify.set_defaults(run=_cmd_verify)

    export = commands.add_parser("export", help="export a projection table as JSON lines or CSV")
    export.add_argument("--schema", default="public")
    export.add_argument("--table", default="claims", help="cells, claims, leases or sequence_ranges")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.set_defaults(run=_cmd_export)
