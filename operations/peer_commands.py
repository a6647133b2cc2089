"""What a connected peer may ask of this executor: one handler per command type (`HANDLERS`).

A handler runs in two steps. It is called inside the transaction that verified the envelope:
there it checks, reserves and records, and a refusal it raises rolls all of that back. It
returns the step that answers once the transaction has committed (Temporal is asked, a long-poll
is held, a run is stopped), so no lock or transaction is held across an RPC.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from federation.envelope import Envelope, format_timestamp
from federation.errors import (
    AgentNotFound,
    ArtifactNotFound,
    CapacityExceeded,
    UnsupportedCommand,
)
from federation.models import (
    AgentArtifactPayload,
    AgentRefPayload,
    SpawnPayload,
    TranscriptPullPayload,
    payload_of,
)
from federation.states import TERMINAL_STATES, AgentState
from federation.store import artifacts, conversations, notifications, repos
from federation.trust import (
    RUN_ENDING_COMMANDS,
    check_peer_command,
    check_peer_concurrency,
    require_active_or_ending,
)
from operations import Services
from operations.hosted import stop_run
from workflows.agent_run import AgentRunWorkflow
from workflows.models import AgentRunInput, agent_run_workflow_id, agent_search_attributes

# The step that answers the peer, run after the admitting transaction committed.
Answer = Callable[[], Awaitable[dict[str, Any]]]

LONG_POLL_MAX = 25.0  # seconds an agent.status long-poll is held at most


@dataclass(frozen=True, kw_only=True)
class PeerCommand:
    """A verified COMMAND inside its transaction `conn`, over the sender's `connection`."""

    services: Services
    conn: asyncpg.Connection
    envelope: Envelope
    connection: dict[str, Any]
    received_at: datetime


Handler = Callable[[PeerCommand], Awaitable[Answer]]


async def admit_command(
    services: Services,
    conn: asyncpg.Connection,
    envelope: Envelope,
    connection: dict[str, Any] | None,
    *,
    received_at: datetime,
    offered_agent_types: list[str] | None,
) -> Answer:
    """Check a verified command against its connection and grants and hand it to its handler."""
    command = envelope.commandType or ""
    # An ended connection still hears a kill or a status ask of a run it had.
    live = require_active_or_ending(connection, ending=command in RUN_ENDING_COMMANDS)
    handler = HANDLERS.get(command)
    if handler is None:
        raise UnsupportedCommand(f"unknown command {command!r}")
    check_peer_command(
        live,
        command,
        envelope.payload,
        max_timeout=services.settings.max_agent_timeout,
        offered_agent_types=offered_agent_types,
    )
    return await handler(
        PeerCommand(
            services=services,
            conn=conn,
            envelope=envelope,
            connection=live,
            received_at=received_at,
        )
    )


def event_payload(row: dict[str, Any]) -> dict[str, Any]:
    """What a peer hears of its run: the shared report and the executor's workflow id."""
    return {**repos.agent_report(row), "workflowId": row["workflow_id"]}


async def audit_accepted(db: Any, envelope: Envelope, agent_id: str, **details: Any) -> None:
    await repos.audit(
        db,
        actor=f"peer:{envelope.senderId}",
        action=str(envelope.commandType),
        agentId=agent_id,
        messageId=envelope.messageId,
        **details,
    )


async def _record(cmd: PeerCommand, agent_id: uuid.UUID) -> None:
    await repos.record_message(cmd.conn, cmd.envelope.to_wire(), direction="in", agent_id=agent_id)


async def _own_run(cmd: PeerCommand, agent_id: uuid.UUID) -> dict[str, Any]:
    """The sender's run `agent_id` on this executor. Runs belong to the connection they came
    over, not to a reused instanceId: another connection's run is no run of this sender."""
    row = await repos.get_executed_agent(cmd.conn, cmd.envelope.senderId, agent_id)
    if row is None or row["connection_id"] != cmd.connection["connection_id"]:
        raise AgentNotFound(f"no agent {agent_id} of this requester")
    return row


# --- agent.spawn ---------------------------------------------------------------------------


async def _spawn(cmd: PeerCommand) -> Answer:
    settings = cmd.services.settings
    await check_peer_concurrency(
        cmd.conn,
        cmd.connection,
        cmd.envelope.payload,
        default_limit=settings.peer_max_running_agents,
        queue_cap=settings.peer_max_queued_agents,
    )
    spawn = await _reserve_spawn(cmd)
    await audit_accepted(cmd.conn, cmd.envelope, str(spawn.agentId))
    await _record(cmd, spawn.agentId)

    async def answer() -> dict[str, Any]:
        # The slot is reserved and committed before Temporal is asked. The start is idempotent
        # by workflow id: a failed start (Temporal away: 503) is repaired by the requester's
        # retry of the same spawn.
        return event_payload(await _start_run(cmd, spawn))

    return answer


async def _reserve_spawn(cmd: PeerCommand) -> SpawnPayload:
    """Check capacity and insert the run's row, inside the caller's transaction (no RPC)."""
    conn, envelope, limit = cmd.conn, cmd.envelope, cmd.services.settings.max_running_agents
    spawn = payload_of(SpawnPayload, envelope)
    known = await repos.get_executed_agent(conn, envelope.senderId, spawn.agentId)
    if known is None and not spawn.options.queue:
        # Serialise capacity checks so concurrent spawns cannot overshoot together.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:capacity'))")
        running = await repos.count_running_executed(conn)
        if running >= limit:
            raise CapacityExceeded(
                f"{running} agents are running here (limit {limit});"
                " retry later or spawn with options.queue=true",
                running=running,
                limit=limit,
            )
    await repos.insert_agent(
        conn,
        agent_id=spawn.agentId,
        role="executor",
        connection_id=cmd.connection["connection_id"],
        peer_instance_id=envelope.senderId,
        task_id=spawn.taskId,
        agent_type=spawn.agentType,
        context=spawn.context.model_dump(),
        options=spawn.options.model_dump(),
        workflow_id=agent_run_workflow_id(envelope.senderId, str(spawn.agentId)),
        state=AgentState.SPAWNING,
    )
    return spawn


async def _start_run(cmd: PeerCommand, spawn: SpawnPayload) -> dict[str, Any]:
    """Start the reserved run's workflow, holding no database connection while Temporal answers."""
    pool, envelope, peer = cmd.services.pool, cmd.envelope, cmd.connection["remote_name"]
    agent_id = str(spawn.agentId)
    ended = await repos.get_executed_agent(pool, envelope.senderId, spawn.agentId)
    if ended is not None and ended["state"] in TERMINAL_STATES:
        return ended  # killed or repaired while its workflow did not exist: it stays ended
    try:
        await cmd.services.temporal.start_workflow(
            AgentRunWorkflow.run,
            AgentRunInput(
                envelope=envelope.to_wire(), received_at=format_timestamp(cmd.received_at)
            ),
            id=agent_run_workflow_id(envelope.senderId, agent_id),
            task_queue=cmd.services.settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=f"{spawn.agentType} agent for task {spawn.taskId} from {peer}",
            search_attributes=agent_search_attributes(
                agent_id=agent_id, task_id=spawn.taskId, peer=peer, agent_type=spawn.agentType
            ),
        )
    except WorkflowAlreadyStartedError:
        pass  # the run exists and is closed: the same agentId never runs twice
    row = await repos.get_executed_agent(pool, envelope.senderId, spawn.agentId)
    assert row is not None
    return row


# --- agent.status and agent.kill -----------------------------------------------------------


async def _status(cmd: PeerCommand) -> Answer:
    ref = payload_of(AgentRefPayload, cmd.envelope)
    row = await _own_run(cmd, ref.agentId)
    await _record(cmd, ref.agentId)

    async def answer() -> dict[str, Any]:
        if ref.afterSeq is None:
            return event_payload(row)
        return event_payload(await _wait_for_change(cmd.services, row, ref, ref.afterSeq))

    return answer


async def _wait_for_change(
    services: Services, row: dict[str, Any], ref: AgentRefPayload, after_seq: int
) -> dict[str, Any]:
    """Hold agent.status until the record moves past what the requester knows, or a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(ref.waitSeconds or 20.0, LONG_POLL_MAX)
    key = notifications.agent_key("executor", row["peer_instance_id"], row["agent_id"])
    while True:
        if row["seq"] > after_seq and (
            ref.knownState is None
            or row["state"] != ref.knownState
            or row["state"] in TERMINAL_STATES
        ):
            return row
        remaining = deadline - loop.time()
        if remaining <= 0:
            return row
        # Woken by the state trigger's NOTIFY; re-read on a bound in case one is lost.
        if services.listener is not None:
            await services.listener.wait(notifications.AGENT_STATE, key, min(remaining, 2.0))
        else:
            await asyncio.sleep(min(remaining, 2.0))
        fresh = await repos.get_executed_agent(
            services.pool, row["peer_instance_id"], row["agent_id"]
        )
        if fresh is None:
            return row
        row = fresh


async def _kill(cmd: PeerCommand) -> Answer:
    ref = payload_of(AgentRefPayload, cmd.envelope)
    row = await _own_run(cmd, ref.agentId)
    await _record(cmd, ref.agentId)
    pool, temporal = cmd.services.pool, cmd.services.temporal

    async def answer() -> dict[str, Any]:
        # The answer carries the final state: the workflow need not send it as an event too.
        stopped = await stop_run(pool, temporal, row, "killed on request", answered=True)
        await audit_accepted(pool, cmd.envelope, str(stopped["agent_id"]), state=stopped["state"])
        return event_payload(stopped)

    return answer


# --- agent.artifact and agent.transcript ---------------------------------------------------


async def _artifact(cmd: PeerCommand) -> Answer:
    """One bounded piece of an artifact of the sender's own run, with the whole one's hash."""
    ask = payload_of(AgentArtifactPayload, cmd.envelope)
    await _own_run(cmd, ask.agentId)
    artifact = await artifacts.of_agent(
        cmd.conn,
        role="executor",
        peer_instance_id=cmd.envelope.senderId,
        agent_id=ask.agentId,
        kind=ask.kind,
        sha256=ask.sha256,
    )
    if artifact is None:
        what = ask.kind or ask.sha256
        raise ArtifactNotFound(f"agent {ask.agentId} has no artifact {what} here")
    chunk = cmd.services.settings.artifact_chunk_bytes
    length = min(ask.length or chunk, chunk)
    data = await artifacts.read_range(cmd.conn, artifact, ask.offset, length)
    await _record(cmd, ask.agentId)
    piece = {
        "agentId": str(ask.agentId),
        "kind": ask.kind,
        "sha256": artifact.sha256,
        "bytes": artifact.bytes,
        "offset": ask.offset,
        "data": base64.b64encode(data).decode(),
    }

    async def answer() -> dict[str, Any]:
        return piece

    return answer


async def _transcript(cmd: PeerCommand) -> Answer:
    pull = payload_of(TranscriptPullPayload, cmd.envelope)
    await _own_run(cmd, pull.agentId)
    await _record(cmd, pull.agentId)
    pool, sender = cmd.services.pool, cmd.envelope.senderId

    async def answer() -> dict[str, Any]:
        entries = await conversations.transcript_after(
            pool, sender, pull.agentId, pull.after, limit=pull.limit
        )
        summary = await conversations.transcript_summary(pool, sender, pull.agentId)
        return {
            "agentId": str(pull.agentId),
            "entries": entries,
            "total": summary["entries"],
            "truncated": summary["truncated"],
        }

    return answer


HANDLERS: dict[str, Handler] = {
    "agent.spawn": _spawn,
    "agent.status": _status,
    "agent.kill": _kill,
    "agent.artifact": _artifact,
    "agent.transcript": _transcript,
}
