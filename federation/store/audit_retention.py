"""Audit retention: day partitions made ahead of time, and whole days dropped once expired.

Rows stay append-only (UPDATE, DELETE and TRUNCATE are refused by triggers); only a day
partition whose every row is older than the retention period is detached and dropped.
"""

from __future__ import annotations

from federation.store.repos import Executor


async def prepare_days(db: Executor, ahead: int = 7) -> int:
    """Day partitions from yesterday to `ahead` days on exist; returns how many were made."""
    made = await db.fetchval(
        "SELECT audit_log_ensure_days((now() AT TIME ZONE 'UTC')::date - 1,"
        " (now() AT TIME ZONE 'UTC')::date + $1::int)",
        ahead,
    )
    return int(made or 0)


async def drop_expired(db: Executor, retention_days: int) -> list[str]:
    """Drop the day partitions older than `retention_days` (0: keep everything)."""
    if retention_days <= 0:
        return []
    rows = await db.fetch("SELECT audit_log_drop_expired($1) AS name", retention_days)
    return [str(r["name"]) for r in rows]
