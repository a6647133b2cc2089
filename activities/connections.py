"""Activities that act on this instance's runs when a connection ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from federation.settings import Settings
from federation.states import ConnectionStatus
from federation.store import repos
from operations.hosted import stop_run
from operations.updates import execute_kill
from workflows.models import END_CONNECTION_RUNS, EndConnectionRuns, KillRequest
from workflows.remote_agent import RemoteAgentWorkflow

log = logging.getLogger(__name__)


async def end_peer_runs(
    pool: Any, temporal: Client, settings: Settings, connection: dict[str, Any]
) -> int:
    """Kill the runs of a connection that ended, unless FEDAGENT_ON_CONNECTION_END=finish:
    those this instance executes for the peer (running and queued) and those it asked of the
    peer (through their workflow, which tells the executor until it confirms). Runs already
    final are left alone, so running this again kills only what is left. Returns how many
    were told to stop."""
    if settings.on_connection_end != "kill":
        return 0
    connection_id = connection["connection_id"]
    hosted = await repos.unfinished_runs_of_connection(pool, connection_id, "executor")
    asked = await repos.unfinished_runs_of_connection(pool, connection_id, "requester")
    gate = asyncio.Semaphore(8)
    reason = f"connection {connection['status'].lower()}"
    not_stopped: list[str] = []

    async def kill(row: dict[str, Any]) -> None:
        async with gate:
            try:
                if row["role"] == "executor":
                    await stop_run(pool, temporal, row, reason)
                else:
                    await _kill_asked(temporal, row, reason)
            except (RPCError, WorkflowUpdateFailedError) as exc:
                log.warning("could not kill %s: %s", row["workflow_id"], exc)
                not_stopped.append(str(row["workflow_id"]))

    await asyncio.gather(*(kill(r) for r in hosted + asked))
    if hosted or asked:
        await repos.audit(
            pool,
            actor="system",
            action="connection.runs_killed",
            connectionId=str(connection_id),
            count=len(hosted) + len(asked) - len(not_stopped),
        )
    if not_stopped:
        # Failed now (Temporal away, a kill not confirmed yet): the activity is retried, and
        # its next attempt kills what is still not final. Returning would close the workflow,
        # which runs once per change: nothing would ever try these again.
        raise RuntimeError(
            f"{len(not_stopped)} runs of the connection not stopped yet: "
            + ", ".join(sorted(not_stopped)[:5])
        )
    return len(hosted) + len(asked)


async def _kill_asked(temporal: Client, row: dict[str, Any], reason: str) -> None:
    """A run this instance asked of the peer: its workflow kills it as a user's kill would."""
    handle = temporal.get_workflow_handle(row["workflow_id"])
    try:
        await execute_kill(handle, RemoteAgentWorkflow.kill, KillRequest(reason=reason))
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise  # no workflow: the spawn outbox or the reconciler ends the row


async def _heartbeat_every(seconds: float) -> None:
    while True:
        activity.heartbeat()
        await asyncio.sleep(seconds)


class ConnectionActivities:
    def __init__(self, pool: asyncpg.Pool, temporal: Client, settings: Settings) -> None:
        self.pool = pool
        self.temporal = temporal
        self.settings = settings

    @activity.defn(name=END_CONNECTION_RUNS)
    async def end_connection_runs(self, inp: EndConnectionRuns) -> int:
        """Kill what is left of the runs of a connection that ended (a retry after a crash
        finds the runs killed already final, and kills the rest)."""
        connection = await repos.get_connection(self.pool, uuid.UUID(inp.connection_id))
        if connection is None or connection["status"] == ConnectionStatus.ACTIVE:
            return 0  # resumed meanwhile: its runs (and those spawned since) go on
        ticker = asyncio.create_task(_heartbeat_every(5.0))
        try:
            return await end_peer_runs(
                self.pool, self.temporal, self.settings, {**connection, "status": inp.status}
            )
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
