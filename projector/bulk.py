"""COPY into a table inside the batch's transaction.

Append-only rows (decisions, the archive, the audit index) are the bulk of what a
batch writes; COPY moves them several times faster than any INSERT, and it runs on
the same connection, so it commits or rolls back with the rest of the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncConnection


async def copy_rows(
    conn: AsyncConnection, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection  # the psycopg AsyncConnection of this transaction
    assert driver is not None
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    async with driver.cursor() as cursor:
        async with cursor.copy(statement) as copy:
            for row in rows:
                await copy.write_row(row)
