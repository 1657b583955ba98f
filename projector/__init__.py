"""Projectors: consume events from Kafka and keep the routing tables in PostgreSQL.

The live projector (the pure fold is ``core.fold``):

- ``consumer``       the Kafka adapter: a consumer-group member that feeds batches to the store.
- ``store``          the PostgreSQL adapter: one transaction per batch, offsets and fencing.
- ``registry_store`` loads and writes the claim registry rows a batch touches.
- ``archive``        every consumed record byte for byte (``RawRecord``), and the audit index.
- ``bulk``           COPY and binary-array statements inside the caller's transaction.
- ``changelog``      retention of the routing change log.
- ``poison``         records that cannot be applied: isolated and dead-lettered.
- ``ticks``          the log's clock for lease expiry.
- ``observe``        a batch's apply span and log lines.
- ``metrics``        the projector's Prometheus metrics.
- ``health``         ``/readyz`` and ``/healthz``: the broker and PostgreSQL as last seen.
- ``main``           ``topology project``.

The one replay pipeline (adr/0013):

- ``sources``        the log read back in resumable chunks: the archive or Kafka, up to a cut.
- ``replay``         the pipeline into a schema of its own: ``topology replay``, ``topology verify``.
- ``rebuild``        the pipeline into a shadow schema, then the switch: ``topology rebuild``.

Operations:

- ``dead_letters``   ``topology dlq``: inspect, re-drive, discard.
- ``compaction``     retention: ``topology compact`` and the projector's scheduled run, table sizes.
- ``tables``         the projection's tables (SQLAlchemy Core).
- ``migrations``     their Alembic migrations; ``migrate`` runs them (``topology migrate``).
- ``migrate``        brings a database to the newest migration.
"""
