"""Repairs runs whose workflow closed without recording a final state.

Workflows record their final state before they close; one that was terminated, reset past its
recording, or cut off by a history limit leaves its row `running` for ever, and on an executor
that row keeps a slot of its capacity. Every worker looks now and then at open rows nobody
touched lately, asks Temporal (`describe()`) and records what the closed workflow says.
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

from federation.states import TERMINAL_STATES, AgentState
from federation.store import reconcile
from workflows.agent_run import AgentRunWorkflow
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.models import AgentStatus, KillDelivery, kill_delivery_workflow_id
from workflows.remote_agent import RemoteAgentWorkflow

log = logging.getLogger(__name__)

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
        sweeps: Sequence[Callable[[], Awaitable[object]]] = (),
        task_queue: str = "fedagent",
    ) -> None:
        """`sweeps` run after each pass too: this host's own leftovers (sandbox containers)."""
        self.pool = pool
        self.client = client
        self.interval = interval
        self.sweeps = tuple(sweeps)
        self.task_queue = task_queue

    async def reconcile_once(self) -> int:
        """Repair what can be repaired now; returns how many rows were repaired."""
        rows = await reconcile.unfinished_runs(self.pool, quiet_seconds=self.interval)
        repaired = 0
        for row in rows:
            verdict = await self._verdict(row)
            if verdict is None:
                continue
            state, why = verdict
            await reconcile.repair(
                self.pool, row, state=state, error=f"{why} without recording a final state"
            )
            log.warning("agent %s (%s): %s; recorded %s", row["agent_id"], row["role"], why, state)
            if row["role"] == "requester":
                await self.tell_executor(row)
            repaired += 1
        return repaired

    async def tell_executor(self, row: dict[str, Any]) -> None:
        """A requester's run ended here without the executor's word: the executor is told to
        kill it, durably (one KillDeliveryWorkflow per run, whoever starts it)."""
        agent_id = str(row["agent_id"])
        try:
            await self.client.start_workflow(
                KillDeliveryWorkflow.run,
                KillDelivery(agent_id=agent_id, traceparent=row.get("traceparent") or ""),
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
            if exc.status == RPCStatusCode.NOT_FOUND:
                return AgentState.FAILED, "its workflow does not exist"
            raise
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
