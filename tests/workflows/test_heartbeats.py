"""A running agent heartbeats at a bounded rate, however often it makes progress: each
heartbeat is a write in Temporal's store, so a run of many quick steps must not send one per
step (the real run_agent activity, the scripted model, the process sandbox, a real PostgreSQL
and the real dev server)."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import (
    ActivityInboundInterceptor,
    ActivityOutboundInterceptor,
    Interceptor,
    Worker,
)

import workflows.models as m
from activities.agents import AgentActivities
from federation.identity import ensure_identity
from federation.settings import Settings
from federation.store import repos
from tests.workflows.peer import ScriptedPeer
from tests.workflows.test_agent_bytes import ExecutedRun, closed, executed  # noqa: F401
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

STEPS = 40


class CountHeartbeats(Interceptor):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        counts = self.counts

        class Outbound(ActivityOutboundInterceptor):
            def heartbeat(self, *details: Any) -> None:
                counts[activity.info().activity_type] += 1
                super().heartbeat(*details)

        class Inbound(ActivityInboundInterceptor):
            def init(self, outbound: ActivityOutboundInterceptor) -> None:
                super().init(Outbound(outbound))

        return Inbound(next)


async def test_a_run_of_many_quick_steps_heartbeats_at_a_bounded_rate_not_per_step(
    client: Client,
    pool: asyncpg.Pool,
    peer: ScriptedPeer,
    executed: ExecutedRun,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        instance_name="unit", data_dir=tmp_path, sandbox="process"
    )
    counter = CountHeartbeats()
    await ensure_identity(pool, name="unit", public_url="http://127.0.0.1:9")
    envelope = executed.envelope("\n".join(f"$ echo step {n}" for n in range(STEPS)))
    envelope.envelope["payload"]["options"]["heartbeatInterval"] = settings.heartbeat_interval
    async with httpx.AsyncClient() as http:
        agents = AgentActivities(pool, http, settings)
        scripted = [fn for fn in peer.activities() if fn.__name__ != "run_agent"]
        queue = f"wf-heartbeats-{uuid.uuid4()}"
        async with Worker(
            client,
            task_queue=queue,
            workflows=[RemoteAgentWorkflow, AgentRunWorkflow],
            activities=[*scripted, agents.run_agent],
            interceptors=[counter],
        ):
            handle = await client.start_workflow(
                AgentRunWorkflow.run,
                envelope,
                id=m.agent_run_workflow_id(executed.requester, str(executed.agent_id)),
                task_queue=queue,
            )
            assert await closed(handle) is None
            status = await handle.query(AgentRunWorkflow.status)
    assert status.state == "completed", status
    row = await repos.get_executed_agent(pool, executed.requester, executed.agent_id)
    assert row is not None and row["progress"]["turn"] == STEPS + 1  # it made progress
    print(f"{STEPS} steps: {counter.counts[m.RUN_AGENT]} heartbeats")
    assert counter.counts[m.RUN_AGENT] < STEPS // 4
