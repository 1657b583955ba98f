"""Alembic migrations of the projection schema (run with ``topology migrate``)."""
