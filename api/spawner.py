"""Starting requester workflows from the spawn outbox.

`POST /agents/spawn` commits the agent's row with `workflow_started = false` and answers 202 at
once; the starter then starts `RemoteAgentWorkflow` in the background. Because the start uses
USE_EXISTING / REJECT_DUPLICATE, starting twice is harmless, and the sweeper (every API process)
starts whatever an API crash or a Temporal outage left unstarted.

No database lock or transaction is held while Temporal answers: the sweeper claims a few due
rows in one short transaction (counting the attempt and setting when the next one is due), then
starts each row on its own and marks it started, so a row Temporal keeps refusing backs off
(`start_attempts`, `next_start_at`, `start_error`) and never holds up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

import asyncpg
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from federation import tracing
from federation.settings import Settings
from federation.store import repos
from workflows.models import (
    TRANSPORT_FEDAGENT,
    KillRequest,
    KillResult,
    SpawnAgentInput,
    agent_search_attributes,
)
from workflows.remote_agent import RemoteAgentWorkflow

log = logging.getLogger(__name__)
SWEEP_EVERY = 1.0
SWEEP_AFTER = "2 seconds"  # give the in-process start a head start before sweeping a row
SWEEP_BATCH = 50
BACKOFF_MAX_SECONDS = 300  # a row that keeps failing is tried again at most every 5 minutes

# Claims the due unstarted rows: counts the attempt and pushes the next one out (2^n s, capped),
# so another sweeper (or this one, after a crash mid-start) takes the row only once that is due.
CLAIM_DUE_ROWS = f"""
UPDATE agents SET start_attempts = start_attempts + 1,
       next_start_at = now() + make_interval(secs => least({BACKOFF_MAX_SECONDS},
                                                          power(2, start_attempts + 1)))
 WHERE role = 'requester' AND agent_id IN (
       SELECT agent_id FROM agents
        WHERE role = 'requester' AND NOT workflow_started
          AND created_at < now() - interval '{SWEEP_AFTER}'
          AND (next_start_at IS NULL OR next_start_at <= now())
        ORDER BY coalesce(next_start_at, created_at)
        LIMIT {SWEEP_BATCH} FOR UPDATE SKIP LOCKED)
RETURNING *
"""


class SpawnStarter:
    def __init__(self, pool: asyncpg.Pool, temporal: Client, settings: Settings) -> None:
        self.pool = pool
        self.temporal = temporal
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def _start_arguments(
        self, row: dict[str, Any], db: Any
    ) -> tuple[SpawnAgentInput, dict[str, Any]]:
        connection = await repos.get_connection(db, row["connection_id"])
        peer = connection["remote_name"] if connection else row["peer_instance_id"]
        inp = SpawnAgentInput(
            agent_id=str(row["agent_id"]),
            connection_id=str(row["connection_id"]),
            peer_instance_id=row["peer_instance_id"],
            peer_name=peer,
            task_id=row["task_id"],
            agent_type=row["agent_type"],
            context=row["context"],
            options=row["options"],
            spawn_deadline_seconds=self.settings.spawn_deadline,
            status_poll_seconds=self.settings.status_poll_interval,
            poll_after_quiet_seconds=self.settings.poll_after_quiet,
            status_check_max_seconds=self.settings.status_check_max,
            peer_timeout_seconds=self.settings.peer_request_timeout,
            traceparent=row.get("traceparent") or "",
            transport=str(connection["kind"]) if connection else TRANSPORT_FEDAGENT,
        )
        options: dict[str, Any] = {
            "id": row["workflow_id"],
            "task_queue": self.settings.task_queue,
            "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
            "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
            "static_summary": f"{row['agent_type']} agent for task {row['task_id']} on {peer}",
            "search_attributes": agent_search_attributes(
                agent_id=str(row["agent_id"]),
                task_id=row["task_id"],
                peer=peer,
                agent_type=row["agent_type"],
            ),
        }
        return inp, options

    async def _mark_started(self, row: dict[str, Any], db: Any) -> None:
        await db.execute(
            "UPDATE agents SET workflow_started = true, start_error = NULL"
            " WHERE role = 'requester' AND agent_id = $1",
            row["agent_id"],
        )

    async def start_workflow(self, row: dict[str, Any]) -> None:
        """Start the row's workflow, then mark it started (no transaction around the RPC)."""
        db = self.pool
        inp, options = await self._start_arguments(row, db)
        # The run's trace, also when the sweeper starts it long after the request.
        with tracing.trace(inp.traceparent), contextlib.suppress(WorkflowAlreadyStartedError):
            await self.temporal.start_workflow(
                RemoteAgentWorkflow.run,
                inp,
                # Bounded: while Temporal is away the sweeper retries, nobody waits forever.
                rpc_timeout=timedelta(seconds=5),
                **options,
            )  # WorkflowAlreadyStartedError: closed already, it started long ago
        await self._mark_started(row, db)

    async def kill_with_start(self, row: dict[str, Any], request: KillRequest) -> KillResult:
        """Kill a spawn whose workflow may not have started: one update-with-start, so the
        workflow starts already killed and never sends the spawn (or, started meanwhile, is
        killed like any other). The update id is fixed: a retried kill is the same kill."""
        inp, options = await self._start_arguments(row, self.pool)
        start = WithStartWorkflowOperation(RemoteAgentWorkflow.run, inp, **options)
        # The workflow it may start is the spawn's: in the spawn's stored trace (like the
        # sweeper's start), not the kill request's, or the whole run would hang under the kill.
        with tracing.trace(inp.traceparent):
            result = await self.temporal.execute_update_with_start_workflow(
                RemoteAgentWorkflow.kill, request, start_workflow_operation=start, id="kill"
            )
        await self._mark_started(row, self.pool)
        return result

    def kick(self, row: dict[str, Any]) -> None:
        """Start the workflow of a just-committed spawn without making its caller wait."""

        async def start() -> None:
            try:
                await self.start_workflow(row)
            except Exception as exc:  # noqa: BLE001 - the sweeper tries again
                log.warning("starting workflow of agent %s failed: %r", row["agent_id"], exc)

        task = asyncio.create_task(start())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sweep_once(self) -> int:
        """Start the due unstarted rows, each on its own; returns how many started."""
        rows = await self.pool.fetch(CLAIM_DUE_ROWS)  # one statement: its own transaction
        started = 0
        for row in rows:
            try:
                await self.start_workflow(dict(row))
            except Exception as exc:  # noqa: BLE001 - this row backs off, the others go on
                log.warning(
                    "starting workflow of agent %s failed (attempt %d): %r",
                    row["agent_id"],
                    row["start_attempts"],
                    exc,
                )
                await self.pool.execute(
                    "UPDATE agents SET start_error = $2 WHERE role = 'requester' AND agent_id = $1",
                    row["agent_id"],
                    f"{exc.__class__.__name__}: {exc}"[:500],
                )
                continue
            started += 1
        return started

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                if count := await self.sweep_once():
                    log.info("started %d workflow(s) left unstarted", count)
            except Exception as exc:  # noqa: BLE001 - Temporal or the database is away
                log.warning("spawn sweep failed: %r", exc)

    def run(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
