"""The kill update, asked the same way by every caller (the requester's kill, the executor's
stop of a hosted run)."""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode
from temporalio.workflow import UpdateMethodMultiParam

from workflows.models import KillRequest, KillResult

# A workflow's kill update, by method: `RemoteAgentWorkflow.kill` or `AgentRunWorkflow.kill`.
KillUpdate = UpdateMethodMultiParam[[Any, KillRequest], KillResult]

# Temporal drops an update whose workflow task failed (e.g. the task that answered it also
# ended the workflow while an event came in: an unhandled command) and answers
# FAILED_PRECONDITION ("workflow task failure"); the same update asked again is safe.
ATTEMPTS = 4


async def execute_kill(
    handle: WorkflowHandle[Any, Any],
    kill: KillUpdate,
    request: KillRequest,
    *,
    dropped_before: bool = False,
) -> KillResult | None:
    """Ask the workflow's kill update and wait for its answer.

    A fixed update id: a retried kill is the same update, not a second one. Raises what the
    update raises: `WorkflowUpdateFailedError`, or `RPCError` (NOT_FOUND when there is no such
    workflow, or it closed before the update was taken). Returns when the workflow closed
    after Temporal dropped the update: the caller reads the final state where it is recorded
    (`dropped_before`: an update-with-start of this kill was dropped already).
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await handle.execute_update(kill, request, id="kill")
        except RPCError as exc:
            dropped = dropped_before or attempt > 1
            if dropped and exc.status == RPCStatusCode.NOT_FOUND:
                return None  # closed after the dropped update: its final state is recorded
            if not dropped_by_a_failed_task(exc) or attempt == ATTEMPTS:
                raise
            await asyncio.sleep(0.1 * attempt)
    return None


def dropped_by_a_failed_task(exc: RPCError) -> bool:
    return exc.status == RPCStatusCode.FAILED_PRECONDITION
