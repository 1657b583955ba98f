"""Retention of the routing change log (``routing_changes``), for snapshot deltas.

Every version bump records its number in ``routing_versions`` in the batch's own
transaction, so the versions the log covers completely are exactly the rows of
``routing_versions``: a delta from ``since`` is servable when every version in
``(since, target]`` has its row (the read API checks this, adr/0009). Versions that
changed no namespace or cell write no ``routing_changes`` rows but still get their
``routing_versions`` row, which is why ``min(routing_changes.version)`` could not
serve as the floor.

Pruning happens in the same statement: versions more than ``keep_versions`` behind
the new one, or committed more than ``keep_seconds`` ago, lose both their
``routing_versions`` row and their changes. Either limit at 0 is off. The newest
version is never pruned.

The policy comes from ``TOPOLOGY_CHANGELOG_KEEP_VERSIONS`` /
``TOPOLOGY_CHANGELOG_KEEP_SECONDS`` (read once, when the first batch commits), or
from :func:`configure_retention`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True, slots=True)
class Retention:
    keep_versions: int  # 0: no limit by count
    keep_seconds: float  # 0: no limit by age


_retention: Retention | None = None


def configure_retention(retention: Retention | None) -> None:
    """Set the policy for this process (``None``: read it from the settings again)."""
    global _retention
    _retention = retention


def current_retention() -> Retention:
    global _retention
    if _retention is None:
        from topology_store.runtime.settings import Settings

        settings = Settings()
        _retention = Retention(settings.changelog_keep_versions, settings.changelog_keep_seconds)
    return _retention


_RECORD_AND_PRUNE = text(
    """
    WITH recorded AS (
        INSERT INTO routing_versions (version) VALUES (CAST(:version AS bigint))
    ), cut AS (
        SELECT least(
            CAST(:version AS bigint) - 1,
            greatest(
                CASE WHEN CAST(:keep_versions AS bigint) > 0
                     THEN CAST(:version AS bigint) - CAST(:keep_versions AS bigint) ELSE 0 END,
                CASE WHEN CAST(:keep_seconds AS double precision) > 0
                     THEN coalesce((SELECT max(version) FROM routing_versions
                                    WHERE committed_at < now() - make_interval(secs => CAST(:keep_seconds AS double precision))), 0)
                     ELSE 0 END
            )
        ) AS version
    ), pruned_changes AS (
        DELETE FROM routing_changes WHERE version <= (SELECT version FROM cut)
    ), pruned_versions AS (
        DELETE FROM routing_versions WHERE version <= (SELECT version FROM cut)
    )
    SELECT version FROM cut
    """
)


async def prune_routing_changes(conn: AsyncConnection, version: int, retention: Retention | None = None) -> int:
    """Record that ``version``'s routing changes are complete, and prune what the
    retention no longer keeps. Call in the transaction that bumped the version.
    Returns the newest pruned version (0: none)."""
    policy = retention or current_retention()
    cut = (
        await conn.execute(
            _RECORD_AND_PRUNE,
            {"version": version, "keep_versions": policy.keep_versions, "keep_seconds": policy.keep_seconds},
        )
    ).scalar_one()
    return max(0, int(cut))
