"""Agents this instance spawns on peers: spawn, list, read and kill."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from federation import tracing
from federation.errors import (
    AgentIdConflict,
    AgentNotFound,
    ConnectionNotFound,
    KillNotDelivered,
    LocalConnectionNotActive,
)
from federation.models import (
    AgentKillPublic,
    AgentSpawnAccepted,
    AgentSpawnCreate,
    SpawnPayload,
)
from federation.states import TERMINAL_STATES, AgentState, ConnectionStatus
from federation.store import notifications, repos
from federation.trust import check_grants
from federation.users import User
from operations import Services, local_runs
from operations.updates import dropped_by_a_failed_task, execute_kill
from workflows.models import KillRequest, KillResult, remote_agent_workflow_id
from workflows.remote_agent import RemoteAgentWorkflow


async def spawn(
    services: Services, user: User, body: AgentSpawnCreate, *, traceparent: str = ""
) -> AgentSpawnAccepted:
    """Spawn an agent on the peer of an ACTIVE connection (none: a local run, on this
    instance); the same agentId runs once.

    Answers once the spawn is committed: the outbox starts the workflow right after (or its
    sweeper does, if Temporal is down now). `traceparent` is the caller's W3C trace, if any.
    """
    pool = services.pool
    agent_id = body.agentId or uuid.uuid4()
    trace = tracing.begin(traceparent)
    tracing.bind(trace)
    if body.connectionId is None:
        return await local_runs.spawn(services, user, body, agent_id, trace)
    connection = await _spawnable_connection(services, body, body.connectionId, agent_id)
    workflow_id = remote_agent_workflow_id(str(agent_id))
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
            context=body.context.model_dump(),
            options=body.options.model_dump(),
            workflow_id=workflow_id,
            state=AgentState.SPAWNING,
            workflow_started=False,
            traceparent=trace,
        )
        if not inserted:
            existing = await _same_spawn(conn, user, body, agent_id)
            return AgentSpawnAccepted(
                agentId=agent_id, state=existing["state"], workflowId=workflow_id
            )
        await repos.add_agent_event(conn, agent_id, seq=0, state=AgentState.SPAWNING)
        await repos.audit(
            conn,
            actor=user.actor,
            action="agent.spawn",
            agentId=str(agent_id),
            connectionId=str(body.connectionId),
        )
        row = await repos.get_requested_agent(conn, agent_id)
        assert row is not None
    # Committed: the outbox makes sure the workflow starts; don't make the caller wait for it.
    services.starter.kick(row)
    return AgentSpawnAccepted(agentId=agent_id, state=AgentState.SPAWNING, workflowId=workflow_id)


async def _spawnable_connection(
    services: Services, body: AgentSpawnCreate, connection_id: uuid.UUID, agent_id: uuid.UUID
) -> dict[str, Any]:
    """The ACTIVE connection a spawn goes over, whose peer's grants (if it told them) allow it."""
    connection = await repos.get_connection(services.pool, connection_id)
    if connection is None:
        raise ConnectionNotFound(f"no connection {connection_id}")
    if connection["status"] != ConnectionStatus.ACTIVE:
        raise LocalConnectionNotActive(
            f"connection {connection_id} is {connection['status']}; spawn needs ACTIVE"
        )
    if connection.get("peer_grants") is not None:
        # What the peer told us it allows: refuse now, with its code, what it would refuse later.
        spawn_payload = SpawnPayload(
            agentId=agent_id,
            taskId=body.taskId,
            agentType=body.agentType,
            context=body.context,
            options=body.options,
        )
        check_grants(
            {"grants": connection["peer_grants"]},
            "agent.spawn",
            spawn_payload.model_dump(mode="json"),
        )
    return connection


async def _same_spawn(
    conn: Any, user: User, body: AgentSpawnCreate, agent_id: uuid.UUID
) -> dict[str, Any]:
    """The earlier spawn of `agent_id`, if it asked the very same (a retry): else 409."""
    existing = await repos.get_requested_agent(conn, agent_id)
    same = existing is not None and (
        existing["connection_id"] == body.connectionId
        and existing["task_id"] == body.taskId
        and existing["agent_type"] == body.agentType
        and existing["context"] == body.context.model_dump()
        and existing["options"] == body.options.model_dump()
    )
    if not same or user.visible(existing) is None:
        raise AgentIdConflict(f"agentId {agent_id} is already used by another spawn")
    assert existing is not None
    return existing


async def get(services: Services, user: User, agent_id: uuid.UUID) -> dict[str, Any]:
    """The agent's row, if this user may see it (members: their workspace's only): one it
    spawned on a peer, or a local run."""
    row = user.visible(await repos.get_user_agent(services.pool, agent_id))
    if row is None:
        raise AgentNotFound(f"no agent {agent_id}")
    return row


async def list_(
    services: Services,
    user: User,
    *,
    state: str | list[str] | None = None,
    connection_id: uuid.UUID | None = None,
    agent_type: str | None = None,
    task_id: str | None = None,
    updated_after: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
    count: bool = False,
) -> list[dict[str, Any]]:
    """Agents this instance's users spawned (on peers and local runs), newest first; members
    see their workspace's only. `updated_after`: those whose state changed after it."""
    return await repos.list_agents(
        services.pool,
        role="requester",
        with_local=True,
        workspace=None if user.is_admin else user.workspace,
        state=state,
        connection_id=connection_id,
        agent_type=agent_type,
        task_id=task_id,
        updated_after=updated_after,
        limit=limit,
        offset=offset,
        count=count,
    )


async def wait_for_change(
    services: Services, user: User, agent_id: uuid.UUID, known: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """The agent's row once its state is not `known`'s, or after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    key = notifications.agent_key(known["role"], known["peer_instance_id"], agent_id)
    row = known
    while row["state"] == known["state"] and (left := deadline - loop.time()) > 0:
        if services.listener is not None:  # woken by the state trigger; re-read on a bound
            await services.listener.wait(notifications.AGENT_STATE, key, min(left, 2.0))
        else:
            await asyncio.sleep(min(left, 0.5))
        row = await get(services, user, agent_id)
    return row


async def events_after(
    services: Services, user: User, agent_id: uuid.UUID, after: int, limit: int = 500
) -> list[dict[str, Any]]:
    """The agent's log of states and progress after log id `after` (as its event stream)."""
    await get(services, user, agent_id)
    return await repos.agent_events_after(services.pool, agent_id, after, limit)


async def kill(services: Services, user: User, agent_id: uuid.UUID) -> AgentKillPublic:
    """Answers once the remote sandbox is gone; a finished agent keeps its final state.

    `confirmed` is False when the executor could not be told: the run is killed here and the
    kill is delivered in the background until the executor confirms (`killConfirmed`)."""
    row = await get(services, user, agent_id)
    if row["role"] == "executor":
        return await local_runs.kill(services, user, row)
    answer: KillResult | None = None
    if row["state"] not in TERMINAL_STATES:
        answer = await _ask_kill(services, row)
        await repos.audit(
            services.pool, actor=user.actor, action="agent.kill", agentId=str(agent_id)
        )
        row = await get(services, user, agent_id)
    confirmed = answer.confirmed if answer is not None else row.get("kill_confirmed") is not False
    return AgentKillPublic(agentId=agent_id, state=row["state"], confirmed=confirmed)


async def _ask_kill(services: Services, row: dict[str, Any]) -> KillResult | None:
    """Only the workflow writes the final state: this asks it for the kill and its answer."""
    handle = services.temporal.get_workflow_handle(row["workflow_id"])
    try:
        if not row["workflow_started"]:
            try:
                started: KillResult | None = await services.starter.kill_with_start(
                    row, KillRequest()
                )
                return started
            except RPCError as exc:
                if not dropped_by_a_failed_task(exc):
                    raise
                # It had started meanwhile, and Temporal dropped the kill: ask again.
                return await execute_kill(
                    handle, RemoteAgentWorkflow.kill, KillRequest(), dropped_before=True
                )
        return await execute_kill(handle, RemoteAgentWorkflow.kill, KillRequest())
    except WorkflowUpdateFailedError as exc:
        fresh = await repos.get_requested_agent(services.pool, row["agent_id"])
        if fresh is None or fresh["state"] not in TERMINAL_STATES:
            cause = exc.cause.__cause__ or exc.cause
            raise KillNotDelivered(
                f"the kill did not reach the executor: {cause}",
                state=fresh["state"] if fresh else row["state"],
            ) from None
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
    return None
