"""Spawn, read and kill agents on peers (the requester's side)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query, status
from temporalio.client import WorkflowUpdateFailedError
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import CurrentUser, PoolDep, SettingsDep, TemporalDep, User
from federation.errors import (
    AgentIdConflict,
    AgentNotFound,
    ConnectionNotFound,
    LocalConnectionNotActive,
)
from federation.models import AgentKillPublic, AgentPublic, AgentSpawnAccepted, AgentSpawnCreate
from federation.store import repos
from workflows.models import (
    KillRequest,
    SpawnAgentInput,
    agent_search_attributes,
    remote_agent_workflow_id,
)

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])


def _visible(user: User, row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None or (not user.is_admin and row["workspace"] != user.workspace):
        return None
    return row


@router.post("/spawn", status_code=status.HTTP_202_ACCEPTED)
async def spawn_agent(
    body: AgentSpawnCreate,
    user: CurrentUser,
    pool: PoolDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> AgentSpawnAccepted:
    """Spawn an agent on the peer of an ACTIVE connection; the same agentId runs once."""
    agent_id = body.agentId or uuid.uuid4()
    workflow_id = remote_agent_workflow_id(str(agent_id))
    connection = await repos.get_connection(pool, body.connectionId)
    if connection is None:
        raise ConnectionNotFound(f"no connection {body.connectionId}")
    if connection["status"] != "ACTIVE":
        raise LocalConnectionNotActive(
            f"connection {body.connectionId} is {connection['status']}; spawn needs ACTIVE"
        )
    context = body.context.model_dump()
    options = body.options.model_dump()
    async with pool.acquire() as conn, conn.transaction():
        inserted = await repos.insert_agent(
            conn,
            agent_id=agent_id,
            role="requester",
            connection_id=body.connectionId,
            peer_instance_id=connection["remote_instance_id"],
            workspace=user.workspace,
            task_id=body.taskId,
            agent_type=body.agentType,
            context=context,
            options=options,
            workflow_id=workflow_id,
            state="spawning",
        )
        if not inserted:
            existing = await repos.get_requested_agent(conn, agent_id)
            same = existing is not None and (
                existing["connection_id"] == body.connectionId
                and existing["task_id"] == body.taskId
                and existing["agent_type"] == body.agentType
                and existing["context"] == context
                and existing["options"] == options
            )
            if not same or _visible(user, existing) is None:
                raise AgentIdConflict(f"agentId {agent_id} is already used by another spawn")
            assert existing is not None
            return AgentSpawnAccepted(
                agentId=agent_id, state=existing["state"], workflowId=workflow_id
            )
        try:
            await temporal.start_workflow(
                "RemoteAgentWorkflow",
                SpawnAgentInput(
                    agent_id=str(agent_id),
                    connection_id=str(body.connectionId),
                    peer_instance_id=connection["remote_instance_id"],
                    peer_name=connection["remote_name"],
                    task_id=body.taskId,
                    agent_type=body.agentType,
                    context=context,
                    options=options,
                    spawn_deadline_seconds=settings.spawn_deadline,
                    status_poll_seconds=settings.status_poll_interval,
                    peer_timeout_seconds=settings.peer_request_timeout,
                ),
                id=workflow_id,
                task_queue=settings.task_queue,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=(
                    f"{body.agentType} agent for task {body.taskId} on {connection['remote_name']}"
                ),
                search_attributes=agent_search_attributes(
                    agent_id=str(agent_id),
                    task_id=body.taskId,
                    peer=connection["remote_name"],
                    agent_type=body.agentType,
                ),
            )
        except WorkflowAlreadyStartedError:
            pass
        await repos.audit(
            conn,
            actor=f"user:{user.name}",
            action="agent.spawn",
            agentId=str(agent_id),
            connectionId=str(body.connectionId),
        )
    return AgentSpawnAccepted(agentId=agent_id, state="spawning", workflowId=workflow_id)


@router.get("")
async def list_agents(
    user: CurrentUser,
    pool: PoolDep,
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0),
) -> list[AgentPublic]:
    rows = await repos.list_agents(pool, role="requester", limit=limit, offset=offset)
    return [AgentPublic.from_row(r) for r in rows if _visible(user, r) is not None]


async def _get(pool: Any, user: User, agent_id: uuid.UUID) -> dict[str, Any]:
    row = _visible(user, await repos.get_requested_agent(pool, agent_id))
    if row is None:
        raise AgentNotFound(f"no agent {agent_id}")
    return row


@router.get("/{agent_id}")
async def get_agent(agent_id: uuid.UUID, user: CurrentUser, pool: PoolDep) -> AgentPublic:
    return AgentPublic.from_row(await _get(pool, user, agent_id))


@router.post("/{agent_id}/kill")
async def kill_agent(
    agent_id: uuid.UUID, user: CurrentUser, pool: PoolDep, temporal: TemporalDep
) -> AgentKillPublic:
    """Answers once the remote sandbox is gone; a finished agent keeps its final state."""
    row = await _get(pool, user, agent_id)
    if row["state"] not in repos.TERMINAL_STATES:
        handle = temporal.get_workflow_handle(row["workflow_id"])
        try:
            await handle.execute_update("kill", KillRequest(), result_type=dict)
        except WorkflowUpdateFailedError:
            pass  # the final state is in the projection either way
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
        await repos.audit(
            pool, actor=f"user:{user.name}", action="agent.kill", agentId=str(agent_id)
        )
        row = await _get(pool, user, agent_id)
    return AgentKillPublic(agentId=agent_id, state=row["state"])
