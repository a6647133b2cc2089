"""Repairs runs whose workflow closed without recording a final state.

Workflows record their final state before they close; one that was terminated, reset past its
recording, or cut off by a history limit leaves its row `running` for ever, and on an executor
that row keeps a slot of its capacity. The instance looks now and then at open rows nobody
touched lately, asks Temporal (`describe()`) and records what the closed workflow says.

Every worker runs a `Reconciler`, but a round is worked once per instance and interval: by the
process that holds the job's advisory lock, if no round started less than an interval ago. Each
round looks at the next batch of open runs in key order after where the last round stopped (the
cursor is kept in the store), wrapping around at the end, so every open run is looked at in turn
however many quiet ones there are.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.federation import kill_settlement
from federation import tracing
from federation.states import TERMINAL_STATES, AgentState
from federation.store import jobs, reconcile, repos
from workflows.agent_run import AgentRunWorkflow
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.models import AgentStatus, KillDelivery, KillResult, kill_delivery_workflow_id
from workflows.remote_agent import RemoteAgentWorkflow

log = logging.getLogger(__name__)
JOB = "reconciler"
BATCH = 100  # open runs looked at in one round


CLOSED = {
    WorkflowExecutionStatus.TERMINATED: (AgentState.KILLED, "its workflow was terminated"),
    WorkflowExecutionStatus.CANCELED: (AgentState.KILLED, "its workflow was cancelled"),
    WorkflowExecutionStatus.TIMED_OUT: (AgentState.TIMED_OUT, "its workflow timed out"),
    WorkflowExecutionStatus.FAILED: (AgentState.FAILED, "its workflow failed"),
    WorkflowExecutionStatus.COMPLETED: (AgentState.FAILED, "its workflow closed"),
}


class Reconciler:
    def __init__(
        self,
        pool: asyncpg.Pool,
        client: Client,
        *,
        interval: float,
        start_grace: float = 900.0,
        batch: int = BATCH,
        sweeps: Sequence[Callable[[], Awaitable[object]]] = (),
        task_queue: str = "fedagent",
    ) -> None:
        """`sweeps` run after each pass too: this host's own leftovers (sandbox containers).
        `start_grace`: how long a run whose workflow was never started may wait for its
        requester's retry of the spawn before it is recorded failed."""
        self.pool = pool
        self.client = client
        self.interval = interval
        self.start_grace = start_grace
        self.batch = batch
        self.sweeps = tuple(sweeps)
        self.task_queue = task_queue

    async def reconcile_once(self) -> int | None:
        """Work the instance's next round, if it is this process's turn; returns how many rows
        were repaired, or None when another process works the round (or just did)."""
        async with jobs.instance_job(self.pool, JOB) as held:
            if not held:
                return None
            due, cursor = await jobs.claim_round(self.pool, JOB, every=self.interval)
            if not due:
                return None
            rows = await reconcile.open_runs(
                self.pool,
                after=cursor,
                quiet_seconds=self.interval,
                start_grace=self.start_grace,
                limit=self.batch,
            )
            repaired = await self._repair(rows)
            # A short batch reached the end: the next round starts again from the first.
            last = reconcile.cursor_of(rows[-1]) if len(rows) == self.batch else None
            await jobs.save_cursor(self.pool, JOB, last)
            return repaired

    async def _repair(self, rows: list[dict[str, Any]]) -> int:
        """Each row on its own: one that fails (Temporal or the store refusing it, a bad row)
        is logged and left to the next walk; the others are repaired all the same."""
        repaired = 0
        for row in rows:
            try:
                repaired += await self._repair_one(row)
            except Exception as exc:  # noqa: BLE001 - one row never stops the round
                log.warning(
                    "reconcile agent %s (%s) failed, left to a later round: %r",
                    row.get("agent_id"),
                    row.get("role"),
                    exc,
                )
        return repaired

    async def _repair_one(self, row: dict[str, Any]) -> int:
        if row.get("kill_pending"):
            await self.deliver_pending_kill(row)
            return 0
        verdict = await self._verdict(row)
        if verdict is None:
            return 0
        state, why = verdict
        # A requester's run ended here without the executor's word: recorded with its kill
        # pending (one statement), delivered below or, if that cannot start now (Temporal
        # away), by a later round. Only if this repair wrote the final: a run that recorded
        # its end after this round read it (its workflow closed meanwhile) owes nothing.
        written = await reconcile.repair(
            self.pool, row, state=state, error=f"{why} without recording a final state"
        )
        if not written:
            return 0  # it ended meanwhile: the store keeps the first final
        log.warning("agent %s (%s): %s; recorded %s", row["agent_id"], row["role"], why, state)
        if row["role"] == "requester":
            await self.tell_executor(row)
        return 1

    async def deliver_pending_kill(self, row: dict[str, Any]) -> None:
        """A requester's run final here whose kill is still pending: its delivery is started
        if none was (its workflow was terminated between its record and the start, Temporal
        was away); one that closed without settling it (terminated, gave up) settles it
        `undeliverable`, so the run is not walked for ever."""
        agent_id = str(row["agent_id"])
        handle = self.client.get_workflow_handle(kill_delivery_workflow_id(agent_id))
        try:
            described = await handle.describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            await self.tell_executor(row)
            return
        if described.status in (None, WorkflowExecutionStatus.RUNNING):
            return
        if described.status == WorkflowExecutionStatus.COMPLETED:
            # It settles the kill before it completes; settled again from its answer in case
            # it did not (a settle of a kill settled already changes nothing).
            answer: KillResult = await handle.result()
            await repos.settle_kill_delivery(self.pool, row["agent_id"], **kill_settlement(answer))
            return
        name = described.status.name.lower().replace("_", " ")
        await repos.settle_kill_delivery(
            self.pool,
            row["agent_id"],
            outcome="undeliverable",
            note=f"its delivery ended {name} before the executor answered",
        )
        log.warning("agent %s: kill delivery %s, kill not confirmed", agent_id, name)

    async def tell_executor(self, row: dict[str, Any]) -> None:
        """A requester's run ended here without the executor's word: the executor is told to
        kill it, durably (one KillDeliveryWorkflow per run, whoever starts it)."""
        agent_id = str(row["agent_id"])
        traceparent = row.get("traceparent") or ""
        try:
            # In the spawn's trace: this round has no span of its own to hang it on.
            with tracing.trace(traceparent):
                await self.client.start_workflow(
                    KillDeliveryWorkflow.run,
                    KillDelivery(agent_id=agent_id, traceparent=traceparent),
                    id=kill_delivery_workflow_id(agent_id),
                    task_queue=self.task_queue,
                    id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                )
        except WorkflowAlreadyStartedError:
            pass  # delivered already

    async def _verdict(self, row: dict[str, Any]) -> tuple[AgentState, str] | None:
        handle = self.client.get_workflow_handle(row["workflow_id"])
        try:
            described = await handle.describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            if _may_still_start(row):
                return None
            return AgentState.FAILED, "its workflow does not exist"
        if described.status is None or described.status not in CLOSED:
            return None  # running (or continued as new: describe shows the newest run)
        if described.status == WorkflowExecutionStatus.COMPLETED:
            # It answered: take its own word if it has one.
            try:
                query = (
                    RemoteAgentWorkflow.status
                    if row["role"] == "requester"
                    else AgentRunWorkflow.status
                )
                status: AgentStatus = await handle.query(query)
                if status.state in TERMINAL_STATES:
                    return status.state, "its workflow closed"
            except Exception:  # noqa: BLE001 - fall back to the closed status
                pass
        return CLOSED[described.status]

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
                return
            except TimeoutError:
                pass
            try:
                await self.reconcile_once()
            except Exception as exc:  # noqa: BLE001 - Temporal or the database is away
                log.warning("reconcile failed: %r", exc)
            for sweep in self.sweeps:
                try:
                    await sweep()
                except Exception as exc:  # noqa: BLE001 - the next pass tries again
                    log.warning("sweep failed: %r", exc)


def _may_still_start(row: dict[str, Any]) -> bool:
    """The executor commits a run's row before it asks Temporal to start its workflow; a start
    refused there (503: Temporal away) leaves the row `spawning` with no workflow until the
    requester retries the same spawn, which starts it. Failed only once no retry can come."""
    return (
        row["role"] == "executor"
        and row["state"] == AgentState.SPAWNING
        and not row["start_overdue"]
    )
