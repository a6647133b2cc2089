"""EndConnectionRunsWorkflow: the runs of a connection that ended (suspended or disconnected)
are killed by a workflow (id `end-runs/{connectionId}/{change}`, started once per change), so a
process that dies mid-way leaves nothing undone: the activity is retried and kills the rest."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.connections import ConnectionActivities
    from workflows.models import EndConnectionRuns


@workflow.defn
class EndConnectionRunsWorkflow:
    @workflow.run
    async def run(self, inp: EndConnectionRuns) -> int:
        workflow.set_current_details(
            f"ending the runs of connection **{inp.connection_id}** ({inp.status})"
        )
        return await workflow.execute_activity_method(
            ConnectionActivities.end_connection_runs,
            inp,
            start_to_close_timeout=timedelta(minutes=30),
            heartbeat_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=60)
            ),
            summary=f"kill the runs of a {inp.status.lower()} connection",
        )
