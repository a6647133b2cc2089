"""How many connection requests from strangers wait for this instance's admin."""

from __future__ import annotations

from typing import Any


async def count_pending_inbound(db: Any) -> int:
    """PENDING connections other instances asked for (each a stranger until accepted)."""
    count = await db.fetchval(
        "SELECT count(*) FROM connections WHERE direction = 'inbound' AND status = 'PENDING'"
    )
    return int(count or 0)
