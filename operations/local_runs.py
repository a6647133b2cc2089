"""Local runs: agents this instance runs for its own users (issue 23, point 1).

A local run is the executor's durable run (`AgentRunWorkflow`: sandbox, model loop, tries,
kill, transcript, diff) that no peer asked for: one `agents` row, role `executor`, whose
requester is `LOCAL_REQUESTER` and whose workspace is the user's. Its users see it through the
same views as an agent spawned on a peer (`operations.agents`: get, list, kill, events,
transcript, diff); its limits are grants-like settings (`federation.local_runs`).
"""

from __future__ import annotations

import uuid
from typing import Any

from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from federation.errors import AgentIdConflict, CapacityExceeded, ServiceUnavailable
from federation.local_runs import check_local_spawn
from federation.models import AgentKillPublic, AgentSpawnAccepted, AgentSpawnCreate
from federation.states import LOCAL_CONNECTION_ID, LOCAL_REQUESTER, TERMINAL_STATES, AgentState
from federation.store import repos
from federation.users import User
from operations import Services
from operations.hosted import stop_run
from workflows.agent_run import AgentRunWorkflow
from workflows.models import AgentRunInput, agent_run_workflow_id, agent_search_attributes


def _spawn(body: AgentSpawnCreate, agent_id: uuid.UUID) -> dict[str, Any]:
    return {
        "agentId": str(agent_id),
        "taskId": body.taskId,
        "agentType": body.agentType,
        "context": body.context.model_dump(),
        "options": body.options.model_dump(),
    }


async def _reserve(
    services: Services, user: User, spawn: dict[str, Any], trace: str
) -> dict[str, Any] | None:
    """Check the limits and insert the run's row in one transaction; None: the id exists."""
    settings = services.settings
    agent_id = uuid.UUID(spawn["agentId"])
    async with services.pool.acquire() as conn, conn.transaction():
        # Serialised with the executor's own capacity checks: no two spawns overshoot together.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:capacity'))")
        if await repos.get_user_agent(conn, agent_id) is not None:
            return None
        running = await repos.count_local_running(conn, user.workspace)
        if running >= settings.local_max_running_per_workspace:
            raise CapacityExceeded(
                f"workspace {user.workspace!r} has {running} local runs unfinished (limit"
                f" {settings.local_max_running_per_workspace}); retry later",
                running=running,
                limit=settings.local_max_running_per_workspace,
            )
        total = await repos.count_running_executed(conn)
        if total >= settings.max_running_agents:
            raise CapacityExceeded(
                f"{total} agents are running here (limit {settings.max_running_agents})",
                running=total,
                limit=settings.max_running_agents,
            )
        inserted = await repos.insert_agent(
            conn,
            agent_id=agent_id,
            role="executor",
            connection_id=uuid.UUID(LOCAL_CONNECTION_ID),
            peer_instance_id=LOCAL_REQUESTER,
            workspace=user.workspace,
            task_id=spawn["taskId"],
            agent_type=spawn["agentType"],
            context=spawn["context"],
            options=spawn["options"],
            workflow_id=agent_run_workflow_id(LOCAL_REQUESTER, spawn["agentId"]),
            state=AgentState.SPAWNING,
            traceparent=trace,
        )
        if not inserted:
            return None
        await repos.add_agent_event(conn, agent_id, seq=0, state=AgentState.SPAWNING)
        await repos.audit(
            conn, actor=user.actor, action="agent.spawn", agentId=str(agent_id), local=True
        )
        row = await repos.get_user_agent(conn, agent_id)
        assert row is not None
        return row


def _same_spawn(row: dict[str, Any], spawn: dict[str, Any]) -> bool:
    asked = (spawn["taskId"], spawn["agentType"], spawn["context"], spawn["options"])
    kept = (row["task_id"], row["agent_type"], row["context"], row["options"])
    return row["role"] == "executor" and kept == asked


async def spawn(
    services: Services, user: User, body: AgentSpawnCreate, agent_id: uuid.UUID, trace: str
) -> AgentSpawnAccepted:
    """Admit a local run (limits, then one row) and start its workflow; the same agentId of
    the same user and spawn is the same run (a retry also starts a workflow a failed start
    left unstarted)."""
    spawn = _spawn(body, agent_id)
    identity = await services.identity()
    check_local_spawn(services.settings, spawn, identity.capabilities.get("agentTypes"))
    row = await _reserve(services, user, spawn, trace)
    if row is None:
        existing = user.visible(await repos.get_user_agent(services.pool, agent_id))
        if existing is None or not _same_spawn(existing, spawn):
            raise AgentIdConflict(f"agentId {agent_id} is already used by another spawn")
        row = existing
    await _start(services, row, trace)
    return AgentSpawnAccepted(agentId=agent_id, state=row["state"], workflowId=row["workflow_id"])


async def _start(services: Services, row: dict[str, Any], trace: str) -> None:
    """Start the run's workflow (idempotent by its id); no transaction is held meanwhile."""
    if row["state"] != AgentState.SPAWNING:
        return
    spawn = {**_spawn_of(row), "traceparent": row.get("traceparent") or trace}
    try:
        await services.temporal.start_workflow(
            AgentRunWorkflow.run,
            AgentRunInput(envelope={}, received_at="", local=spawn),
            id=row["workflow_id"],
            task_queue=services.settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=f"{row['agent_type']} agent for task {row['task_id']} (local run)",
            search_attributes=agent_search_attributes(
                agent_id=str(row["agent_id"]),
                task_id=row["task_id"],
                peer=LOCAL_REQUESTER,
                agent_type=row["agent_type"],
            ),
        )
    except WorkflowAlreadyStartedError:
        pass  # it ran already: the same agentId never runs twice
    except RPCError as exc:  # Temporal away: the same spawn again starts it
        raise ServiceUnavailable(
            f"the run is recorded but its workflow did not start ({exc}); spawn it again"
            " with the same agentId"
        ) from exc


def _spawn_of(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "agentId": str(row["agent_id"]),
        "taskId": row["task_id"],
        "agentType": row["agent_type"],
        "context": row["context"],
        "options": row["options"],
    }


async def kill(services: Services, user: User, row: dict[str, Any]) -> AgentKillPublic:
    """Answers once the sandbox is gone; a finished run keeps its final state."""
    if row["state"] not in TERMINAL_STATES:
        row = await stop_run(services.pool, services.temporal, row, f"killed by {user.actor}")
        await repos.audit(
            services.pool, actor=user.actor, action="agent.kill", agentId=str(row["agent_id"])
        )
    return AgentKillPublic(agentId=row["agent_id"], state=row["state"])
