"""Store side of the reconciler: runs still open in the store, and their repair."""

from __future__ import annotations

import uuid
from typing import Any

from federation.states import TERMINAL_STATES
from federation.store.repos import (
    Executor,
    force_requester_final,
    update_executed_agent,
)


async def unfinished_runs(db: Executor, *, quiet_seconds: float, limit: int = 100) -> list[dict]:  # type: ignore[type-arg]
    """Open runs (requester rows whose workflow started, executor rows) not touched lately."""
    rows = await db.fetch(
        "SELECT agent_id, role, peer_instance_id, workflow_id, state FROM agents"
        " WHERE NOT (state = ANY($1::text[]))"
        " AND (role = 'executor' OR workflow_started)"
        " AND updated_at < now() - make_interval(secs => $2)"
        " ORDER BY updated_at LIMIT $3",
        list(TERMINAL_STATES),
        quiet_seconds,
        limit,
    )
    return [dict(r) for r in rows]


async def repair(db: Executor, row: dict[str, Any], *, state: str, error: str) -> None:
    """Record the final state a closed workflow did not record (terminal states stay final)."""
    agent_id: uuid.UUID = row["agent_id"]
    if row["role"] == "requester":
        await force_requester_final(db, agent_id, state=state, result=None, error=error)
    else:
        await update_executed_agent(db, row["peer_instance_id"], agent_id, state=state, error=error)
