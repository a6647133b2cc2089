"""KillDeliveryWorkflow: a kill the requester decided, delivered to the executor until it
confirms (id `deliver-kill/{agentId}`, so it runs once per run whoever starts it)."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.federation import FederationActivities
    from workflows.models import KillDelivery, KillResult


@workflow.defn
class KillDeliveryWorkflow:
    """Started by the requester's workflow (a kill the executor did not confirm, its own
    time-out), or by the reconciler (a requester's workflow that closed without recording a
    final; or a kill still pending that nothing delivers). Its activity sends agent.kill, with
    backoff, across restarts, until the executor answers; the answer settles the kill
    (`killDelivery`, `killConfirmed`), and a refusal no retry can fix fails it for good."""

    @workflow.run
    async def run(self, inp: KillDelivery) -> KillResult:
        workflow.set_current_details(f"telling the executor to kill agent **{inp.agent_id}**")
        return await workflow.execute_activity_method(
            FederationActivities.deliver_kill,
            inp,
            start_to_close_timeout=timedelta(seconds=90),
            schedule_to_close_timeout=timedelta(seconds=inp.give_up_after_seconds),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=inp.first_retry_seconds),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=inp.max_retry_seconds),
            ),
            summary="deliver agent.kill",
        )
