"""The baseline: a bare Temporal workflow with one trivial activity, nothing else."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_echo")
async def bench_echo(value: int) -> int:
    return value


@workflow.defn(name="BenchBareWorkflow")
class BenchBareWorkflow:
    @workflow.run
    async def run(self, value: int) -> int:
        return await workflow.execute_activity(
            bench_echo, value, start_to_close_timeout=timedelta(seconds=30)
        )
