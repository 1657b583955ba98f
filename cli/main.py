"""The ``topology`` command: the parser of every subcommand, and the one read of the
configuration (``runtime.settings.Settings``) that each of them is given."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from topology_store.runtime.settings import Settings


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.projector.migrate import ensure_database, upgrade_to_head

    if args.create_database and ensure_database(settings.libpq_url):
        print("created database", file=sys.stderr)
    upgrade_to_head(settings.sqlalchemy_url)
    print("schema at head", file=sys.stderr)
    return 0


def _cmd_emit(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.producer.emit import emit

    if args.event is not None and args.file is not None:
        raise SystemExit("topology emit: give one event or --file, not both")
    if args.event is not None:
        lines = [args.event]
    elif args.file in (None, "-"):
        try:
            lines = sys.stdin.buffer.read().decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            print(f"topology emit: stdin is not UTF-8 text (byte {exc.start}); nothing was sent", file=sys.stderr)
            return 2
    else:
        try:
            lines = Path(args.file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"topology emit: cannot read {args.file}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:  # invalid input, like a bad line: exit 2, nothing sent
            print(f"topology emit: {args.file} is not UTF-8 text (byte {exc.start}); nothing was sent",
                  file=sys.stderr)
            return 2
    return asyncio.run(emit(settings, lines))


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.runtime.topics import ensure_topics

    asyncio.run(ensure_topics(settings))
    print(f"topics ready: {', '.join(settings.topics)}", file=sys.stderr)
    return 0


def _cmd_project(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    # Until run_projector installs the event loop's handler: a SIGTERM during the
    # imports and start-up is a clean stop too (nothing is in flight yet), exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    from topology_store.projector.main import run_projector

    asyncio.run(run_projector(settings))
    return 0


def _cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from topology_store.producer.outbox import create_outbox
    from topology_store.producer.relay import OutboxMissing, libpq_url, run_relay

    source = args.source or settings.relay_source_url
    if not source:
        raise SystemExit("topology relay: give --source postgresql://... or set TOPOLOGY_RELAY_SOURCE_URL")
    if args.init_schema:
        try:
            with psycopg.connect(libpq_url(source)) as conn:
                create_outbox(conn)
        except psycopg.Error as exc:
            raise SystemExit(f"topology relay: cannot create the outbox: {exc}") from None
        print("outbox schema ready", file=sys.stderr)
        return 0
    try:
        asyncio.run(run_relay(settings, source, delete_published=True if args.delete_published else None))
    except OutboxMissing as exc:
        raise SystemExit(f"topology relay: {exc}") from None
    return 0


def _cmd_claim(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.cli.claim import run_request

    return asyncio.run(run_request(settings, args))


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.query_api.app import BesideDoor
    from topology_store.query_api.auth import Authorizer, TokenConfigError
    from topology_store.query_api.server import serve

    try:
        beside: list[BesideDoor] = []
        if settings.grpc_port:
            # The gRPC door over the same snapshot, checking the same tokens (adr/0021).
            from topology_store.grpc_api.server import grpc_door

            authorizer = Authorizer.from_settings(settings)
            beside.append(lambda api: grpc_door(settings, api.cache, authorizer.check, authorizer.binding,
                                                api.claims, api.engine))
        serve(settings, beside=beside)
    except TokenConfigError as exc:
        raise SystemExit(f"topology serve: bad configuration: {exc}") from None
    return 0


def _cmd_router(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.router.sidecar import run_router, token_from

    urls = [u.strip() for u in (args.api or settings.router_api_urls).split(",") if u.strip()]
    try:
        token = token_from(settings, args.token_file)
    except OSError as exc:
        raise SystemExit(f"topology router: cannot read {args.token_file}: {exc.strerror}") from None
    if not token:
        raise SystemExit("topology router: set TOPOLOGY_ROUTER_TOKEN or give --token-file")
    from topology_store.runtime.logs import register_secrets

    register_secrets([token])  # never in a log line, also when it came from --token-file
    state_file = Path(args.state_file or settings.router_state_file)
    port = args.port if args.port is not None else settings.router_port
    run_router(settings, urls, token, state_file, port)
    return 0


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from topology_store.cli.up import up

    return up(data_dir=args.data_dir, api_port=args.api_port or settings.api_port, demo=args.demo, tls=args.tls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topology",
        description="Event-sourced topology store: which cell owns this? Configuration: TOPOLOGY_* variables.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="bring the projection schema to the newest migration")
    migrate.add_argument("--create-database", action="store_true", help="create the database first if missing")
    migrate.set_defaults(run=_cmd_migrate)

    emit = commands.add_parser("emit", help="publish events given as JSON; one result line per event")
    emit.add_argument("event", nargs="?", help='one event as JSON, e.g. {"type": "ClaimCreated", ...}')
    emit.add_argument("-f", "--file", help="JSON-lines file of events, or - for stdin (the default)")
    emit.set_defaults(run=_cmd_emit)

    topics = commands.add_parser("topics", help="create the topics if missing and check their layout")
    topics.set_defaults(run=_cmd_topics)

    project = commands.add_parser("project", help="run a projector (consumer group member)")
    project.set_defaults(run=_cmd_project)

    relay = commands.add_parser("relay", help="publish a PostgreSQL transactional outbox to Kafka (adr/0008)")
    relay.add_argument("--source", help="libpq URL of the outbox database (default TOPOLOGY_RELAY_SOURCE_URL)")
    relay.add_argument("--delete-published", action="store_true",
                       help="delete rows once published instead of marking them (TOPOLOGY_RELAY_DELETE_PUBLISHED)")
    relay.add_argument("--init-schema", action="store_true",
                       help="create or update the outbox table and triggers (producer/outbox.sql), then exit")
    relay.set_defaults(run=_cmd_relay)

    from topology_store.cli.audit import add_audit_parsers
    from topology_store.cli.claim import add_claim_parser

    add_claim_parser(commands).set_defaults(run=_cmd_claim)
    add_audit_parsers(commands)
    from topology_store.cli.dlq import add_dlq_parsers
    from topology_store.cli.schemas import add_schemas_parsers

    add_dlq_parsers(commands)  # topology dlq list | show | replay | discard
    from topology_store.cli.compact import add_compact_parser

    add_compact_parser(commands)  # topology compact (adr/0020)
    add_schemas_parsers(commands)  # topology schemas check

    serve = commands.add_parser("serve", help="run the read API (and the gRPC door when TOPOLOGY_GRPC_PORT is set)")
    serve.set_defaults(run=_cmd_serve)

    router = commands.add_parser("router", help="edge router sidecar: routing table in memory, local /classify")
    router.add_argument("--api", help="read API base URLs, comma-separated (default TOPOLOGY_ROUTER_API_URLS)")
    router.add_argument("--token-file", help="file holding the bearer token (default TOPOLOGY_ROUTER_TOKEN)")
    router.add_argument("--state-file", help="last-known-good table (default TOPOLOGY_ROUTER_STATE_FILE)")
    router.add_argument("--port", type=int, default=None, help="local port (default TOPOLOGY_ROUTER_PORT)")
    router.set_defaults(run=_cmd_router)

    up = commands.add_parser("up", help="run the whole stack (embedded servers unless TOPOLOGY_* name real ones)")
    up.add_argument("--demo", action="store_true", help="emit a small realistic topology")
    up.add_argument("--data-dir", type=Path, default=Path(".topology"), help="embedded servers' data (default .topology)")
    up.add_argument("--api-port", type=int, default=None, help="read API port (default TOPOLOGY_API_PORT or 8080)")
    up.add_argument("--tls", action="store_true",
                    help="mutual TLS on the HTTP and gRPC ports, with the development CA and certificates made under "
                         "<data dir>/tls (made either way)")
    up.set_defaults(run=_cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # JSON for services, text for people, redacted either way (runtime/logs.py, adr/0011).
    from topology_store.runtime.logs import choose_format, configure_logging, register_secrets
    from topology_store.runtime.tracing import configure_tracing

    # The one read of the configuration; every command gets this object.
    try:
        settings: Settings | None = Settings()
        problems = ""
    except ValidationError as exc:
        settings = None
        problems = "; ".join(f"TOPOLOGY_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
    configure_logging(
        choose_format(settings.log_format if settings else "auto", args.command),
        logging.DEBUG if args.verbose else (settings.log_level if settings else logging.INFO),
    )
    if settings is not None:
        register_secrets(_configured_secrets(settings))
    configure_tracing(f"topology-{args.command}")
    if settings is None:
        if getattr(args, "needs_settings", True):
            raise SystemExit(f"topology: bad configuration: {problems}")
        settings = Settings.model_construct()  # never read: the command said so
    return int(args.run(args, settings))


def _configured_secrets(settings: Settings) -> list[str]:
    """Values no log line may show: bearer tokens, the HMAC key (runtime/logs.py)."""
    import json

    values = [settings.router_token, settings.claim_hmac_secret.get_secret_value()]
    sources = [settings.api_tokens]
    if settings.api_tokens_file:
        try:
            sources.append(Path(settings.api_tokens_file).read_text(encoding="utf-8"))
        except OSError:
            pass  # `topology serve` reports it
    for raw in sources:
        try:
            document = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            continue
        if isinstance(document, dict):
            values.extend(str(token) for token in document)
    return values
