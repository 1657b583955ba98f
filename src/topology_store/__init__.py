"""topology-store: an event-sourced topology store for cell-based platforms (adr/0015).

Each sub-package is a top folder of the repository, linked here; the layers run top to
bottom, and imports point only down (the import-linter contracts in pyproject.toml):

- ``cli``        the ``topology`` command: every subcommand, the dev stack.
- ``query_api``  the HTTP door: snapshots, deltas, lookups, audit, health, claims.
- ``grpc_api``   the gRPC door: GitLab's Topology Service contract (cells, classify, health).
- ``router``     the router client and the ``topology router`` sidecar.
- ``projector``  consumes the log into PostgreSQL; archive, dead letters, replay, rebuild.
- ``producer``   publishes events; the transactional outbox and its relay.
- ``service``    the application service every door calls (claims).
- ``runtime``    settings, logging, tracing, topics, the database engine, retry.
- ``core``       pure functions: cells, the claim decider, the fold, audit keys.
- ``schemas``    the contract: Avro schemas, codec, models, the router sync wire format.
"""
