"""Bulk statements inside the caller's transaction, on its own connection.

Append-only rows (decisions, the archive, the audit index) are the bulk of what a
batch writes, and a replay writes nothing else (projector/replay.py); COPY moves
them several times faster than any INSERT, and it runs on the same connection, so
it commits or rolls back with the rest of the transaction. :func:`copy_rows` is the
one COPY of the code base.

Set-based statements take whole columns as array parameters (``unnest``). psycopg
dumps arrays in the text format by default, quoting and escaping every element in
Python: 1.3 to 3.6 µs per uuid, timestamp or JSON element, measured. In the binary
format the same arrays cost about 0.15 µs an element, so the hot statements use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncConnection


async def _driver(conn: AsyncConnection | psycopg.AsyncConnection[Any]) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection of the transaction (SQLAlchemy's, or psycopg's own)."""
    if isinstance(conn, psycopg.AsyncConnection):
        return conn
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    return driver  # type: ignore[no-any-return]


async def copy_rows(
    conn: AsyncConnection | psycopg.AsyncConnection[Any],
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    schema: str | None = None,
) -> None:
    """COPY ``rows`` into ``table`` (of ``schema``; None: the search path)."""
    name = sql.Identifier(schema, table) if schema is not None else sql.Identifier(table)
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(name, sql.SQL(", ").join(map(sql.Identifier, columns)))
    async with (await _driver(conn)).cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            await copy.write_row(row)


async def execute_binary(
    conn: AsyncConnection, query: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Run ``query`` with psycopg placeholders (``%(name)b`` sends that parameter in
    the binary format) on the transaction's connection; the rows it returns, if any."""
    async with (await _driver(conn)).cursor() as cursor:
        await cursor.execute(query, params)  # type: ignore[arg-type]  # a query built from constants
        return await cursor.fetchall() if cursor.description is not None else []
