"""Runs peers started on this instance (the executor's side), for its admins: list them by peer
and state, read one, and kill one through its AgentRunWorkflow (the requester hears `killed`
as for a kill it asked for)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from federation.errors import AgentNotFound, ConnectionNotFound, InvalidRequest, KillNotDelivered
from federation.models import AgentKillPublic
from federation.states import TERMINAL_STATES, AgentState
from federation.store import notifications, repos
from federation.store.first_hour import list_hosted
from federation.users import User
from operations import Services
from operations.updates import execute_kill
from workflows.agent_run import AgentRunWorkflow
from workflows.models import KillRequest


async def stop_run(
    pool: asyncpg.Pool,
    temporal: Client,
    row: dict[str, Any],
    reason: str,
    *,
    answered: bool = False,
) -> dict[str, Any]:
    """Ask a hosted run's workflow to kill it; answer its row once the final state is recorded.

    The one way this executor stops a run, whoever asks (the peer's agent.kill, this
    instance's admin, a connection that ends). Only the workflow writes the final state: a
    kill racing completion answers `completed` (with the result), one racing a failure keeps
    the failure's reason. `answered`: the caller gives the requester the final state in its
    answer (the requester's own agent.kill), so the workflow sends no event of a kill.
    """
    if row["state"] not in TERMINAL_STATES:
        # The worker running the agent stops its sandbox now, not at the next heartbeat.
        key = notifications.agent_key("executor", row["peer_instance_id"], row["agent_id"])
        await notifications.send(pool, notifications.KILL, key)
        handle = temporal.get_workflow_handle(row["workflow_id"])
        try:
            await execute_kill(
                handle, AgentRunWorkflow.kill, KillRequest(reason=reason, answered=answered)
            )
        except WorkflowUpdateFailedError:
            pass  # the workflow closed meanwhile: its final state is recorded
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # No workflow to ask (it never started or is long gone): nothing runs.
            await repos.update_executed_agent(
                pool,
                row["peer_instance_id"],
                row["agent_id"],
                state=AgentState.KILLED,
                error=f"{reason}: its workflow does not exist",
            )
    fresh = await repos.get_executed_agent(pool, row["peer_instance_id"], row["agent_id"])
    assert fresh is not None
    return fresh


async def peer_instance_id(services: Services, peer: str | None) -> str | None:
    """A peer named by its instance id or by its name (as our connections know it)."""
    if peer is None:
        return None
    rows = await repos.list_connections(services.pool)
    ids = {
        r["remote_instance_id"] for r in rows if peer in (r["remote_instance_id"], r["remote_name"])
    }
    if len(ids) == 1:
        return str(ids.pop())
    if not ids:
        known = ", ".join(sorted({r["remote_name"] for r in rows})) or "none"
        raise ConnectionNotFound(f"no peer {peer!r} (known peers: {known})")
    raise InvalidRequest(f"several peers are called {peer!r}: name it by its instance id")


async def list_(
    services: Services,
    *,
    peer: str | None = None,
    state: str | None = None,
    agent_type: str | None = None,
    task_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Runs peers started here, newest first (admins only: they span every peer)."""
    return await list_hosted(
        services.pool,
        peer_instance_id=await peer_instance_id(services, peer),
        state=state,
        agent_type=agent_type,
        task_id=task_id,
        limit=limit,
        offset=offset,
    )


async def get(services: Services, agent_id: uuid.UUID, peer: str | None = None) -> dict[str, Any]:
    rows = await list_hosted(
        services.pool, peer_instance_id=await peer_instance_id(services, peer), agent_id=agent_id
    )
    if not rows:
        raise AgentNotFound(f"no run {agent_id} hosted here")
    if len(rows) > 1:
        raise InvalidRequest(
            f"runs of several peers have the id {agent_id}: say which with peer=PEER"
        )
    return rows[0]


async def kill(
    services: Services, user: User, agent_id: uuid.UUID, peer: str | None = None
) -> AgentKillPublic:
    """Stop a hosted run; answers once its sandbox is gone. A finished run keeps its state."""
    row = await get(services, agent_id, peer)
    state = str(row["state"])
    if state not in TERMINAL_STATES:
        try:
            row = await stop_run(
                services.pool,
                services.temporal,
                row,
                f"killed by {user.actor} on this executor",
            )
        except RPCError as exc:
            raise KillNotDelivered(f"the run did not stop: {exc.message}", state=state) from None
        state = str(row["state"])
        await repos.audit(
            services.pool,
            actor=user.actor,
            action="hosted.kill",
            agentId=str(agent_id),
            peerInstanceId=row["peer_instance_id"],
        )
    return AgentKillPublic.model_validate({"agentId": agent_id, "state": state})
