"""Projectors: consume events from Kafka and keep the routing tables in PostgreSQL.

- ``domain``   what an event does to the topology: pure functions, no I/O.
- ``tables``   the projection's PostgreSQL tables (SQLAlchemy Core), migrated by ``migrations``.
- ``store``    the PostgreSQL adapter: one transaction per batch, offsets and fencing.
- ``consumer`` the Kafka adapter: a consumer-group member that feeds batches to the store.
"""
