"""What each worker's sandboxes cannot enforce (`agents.sandbox.report`), as the workers
found it at their start: written by the workers, read by /readyz."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class WorkerSandbox:
    worker: str
    host: str
    sandbox: str
    gaps: list[dict[str, str]]  # {"limit", "severity", "detail"}
    seen_at: datetime


async def record_sandbox(
    db: Any, *, worker: str, host: str, sandbox: str, gaps: list[dict[str, str]]
) -> None:
    await db.execute(
        "INSERT INTO worker_sandboxes (worker, host, sandbox, gaps) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (worker) DO UPDATE SET host = EXCLUDED.host,"
        " sandbox = EXCLUDED.sandbox, gaps = EXCLUDED.gaps, seen_at = now()",
        worker,
        host,
        sandbox,
        gaps,
    )


async def touch(db: Any, worker: str, *, forget_after: float) -> None:
    """The worker still runs; rows of workers not seen for `forget_after` seconds go."""
    await db.execute("UPDATE worker_sandboxes SET seen_at = now() WHERE worker = $1", worker)
    await db.execute(
        "DELETE FROM worker_sandboxes WHERE seen_at < now() - make_interval(secs => $1)",
        forget_after,
    )


async def forget(db: Any, worker: str) -> None:
    await db.execute("DELETE FROM worker_sandboxes WHERE worker = $1", worker)


async def with_gaps(db: Any, *, seen_within: float) -> list[WorkerSandbox]:
    """Workers seen lately whose sandboxes do not hold every limit."""
    rows = await db.fetch(
        "SELECT worker, host, sandbox, gaps, seen_at FROM worker_sandboxes"
        " WHERE seen_at >= now() - make_interval(secs => $1) AND gaps <> '[]'::jsonb"
        " ORDER BY host, worker",
        seen_within,
    )
    return [WorkerSandbox(**dict(row)) for row in rows]
