"""Which cell holds a committed claim, for GitLab's Classify by claims other than routes
(a project id, a service desk e-mail: what GitLab's mail router asks; adr/0022).

One indexed read of the projector's ``claims`` table (its primary key) per claim asked;
a claim under a lease that is still creating it routes nowhere yet.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


class ClaimOwners:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def cell_of(self, bucket: str, stored_value: str) -> str | None:
        async with self._engine.connect() as conn:
            return (await conn.execute(
                text("SELECT cell_id FROM claims WHERE bucket = :bucket AND value = :value AND status = 'COMMITTED'"),
                {"bucket": bucket, "value": stored_value},
            )).scalar_one_or_none()
