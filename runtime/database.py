"""The database connection every process opens, and the NOTIFY channels they share.

The projector writes (adr/0002) and NOTIFYs; the read API and the claims door LISTEN.
The channel names live here, below both, so neither imports the other.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

VERSION_CHANNEL = "topology_version"  # a batch bumped the routing version; payload: the version
DECISIONS_CHANNEL = "topology_decisions"  # a batch decided claim requests; payload empty

# A PostgreSQL host that drops packets (rather than refusing) would otherwise hold a
# connection attempt for the kernel's TCP timeout, minutes, and every request behind it.
CONNECT_TIMEOUT_S = 10


def create_engine(sqlalchemy_url: str, pool_size: int = 5, connect_timeout_s: int = CONNECT_TIMEOUT_S) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url, pool_size=pool_size, pool_pre_ping=True, connect_args={"connect_timeout": connect_timeout_s}
    )
