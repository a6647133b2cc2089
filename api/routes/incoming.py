"""Public endpoints for peers: every request is a signed envelope, every answer a signed RESPONSE.

A refused message gets problem+json with its own code, is written to the audit log, and
leaves nothing else behind: the checks run in one transaction that a refusal rolls back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from temporalio.client import Client
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from api import metrics
from api.deps import IdentityDep, KeyRefresherDep, PoolDep, SettingsDep, TemporalDep
from api.limits import source_key
from federation import tracing
from federation.connections import apply_peer_change
from federation.envelope import Envelope, MessageType, format_timestamp, sign_envelope
from federation.errors import (
    AgentEnded,
    AgentNotFound,
    ArtifactNotFound,
    CapacityExceeded,
    ConnectionStateConflict,
    FederationError,
    InvalidPayload,
    MalformedEnvelope,
    RateLimited,
    TooManyPendingForHost,
    TooManyPendingFromSource,
    TooManyPendingRequests,
    UnsupportedCommand,
)
from federation.identity import Identity
from federation.models import (
    AgentArtifactPayload,
    AgentEventPayload,
    AgentRefPayload,
    ConnectChangePayload,
    ConnectRequestPayload,
    SpawnPayload,
    TranscriptEventPayload,
    TranscriptPullPayload,
)
from federation.peer import CardKeyRefresher, fetch_card
from federation.settings import Settings
from federation.states import TERMINAL_STATES, AgentState, ConnectionStatus
from federation.store import artifacts, conversations, notifications, pending, repos
from federation.transcripts import reported_total
from federation.trust import (
    RUN_ENDING_COMMANDS,
    SAFE_INSTANCE_ID,
    check_card_matches,
    check_peer_command,
    check_peer_concurrency,
    refresh_keys_first,
    require_active_or_ending,
    verify_connection_request,
    verify_incoming,
)
from operations.connections import start_ending_runs
from operations.hosted import stop_run
from workflows.agent_run import AgentRunWorkflow
from workflows.models import (
    AgentEvent,
    AgentRunInput,
    agent_run_workflow_id,
    agent_search_attributes,
    remote_agent_workflow_id,
)
from workflows.remote_agent import RemoteAgentWorkflow

router = APIRouter(prefix="/api/v1/federation/incoming", tags=["federation (peers)"])


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        err = MalformedEnvelope("body is not JSON")
        await _refused(request, None, err, request.url.path.rsplit("/", 1)[-1])
        raise err from exc


def _payload(model: type[BaseModel], envelope: Envelope) -> Any:
    try:
        return model.model_validate(envelope.payload)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise InvalidPayload(
            f"payload of {envelope.commandType} is invalid: {', '.join(fields)}", fields=fields
        ) from exc


def _reply(identity: Identity, request: Envelope, payload: dict[str, Any]) -> dict[str, Any]:
    return sign_envelope(
        identity.signing_key,
        type=MessageType.RESPONSE,
        sender_id=identity.instance_id,
        recipient_id=request.senderId,
        payload=payload,
        command_type=request.commandType,
        correlation_id=request.messageId,
    ).to_wire()


def _scalar(value: Any, limit: int = 256) -> str | None:
    """A field of a refused message worth keeping: a short string, or nothing at all."""
    if isinstance(value, str) and len(value) <= limit:
        return value
    return None


async def _refused(request: Request, body: Any, err: FederationError, endpoint: str) -> None:
    """Audit a refusal with only validated scalars (each <= 256 chars, <= 2 KiB in all).

    Past the per-address limit the refusal becomes a 429 `rate_limited`, counted, not audited.
    """
    address = request.client.host if request.client else "unknown"
    if not request.app.state.refusal_limiter.take(address):
        metrics.REFUSALS_RATE_LIMITED.inc()
        raise RateLimited("too many refused messages from this address; slow down") from err
    fields = body if isinstance(body, dict) else {}
    sender = _scalar(fields.get("senderId"), 64)
    if sender is not None and not SAFE_INSTANCE_ID.fullmatch(sender):
        sender = None
    details = {
        "code": err.code,
        "reason": err.detail[:256],
        "messageId": _scalar(fields.get("messageId"), 128),
        "commandType": _scalar(fields.get("commandType"), 64),
        "source": address[:64],
    }
    await repos.audit(
        request.app.state.pool,
        actor=f"peer:{sender}" if sender else "peer:unknown",
        action=f"incoming.{endpoint}",
        outcome="refused",
        **{k: v for k, v in details.items() if v is not None},
    )


async def _audit_accepted(db: Any, envelope: Envelope, agent_id: str, **details: Any) -> None:
    await repos.audit(
        db,
        actor=f"peer:{envelope.senderId}",
        action=str(envelope.commandType),
        agentId=agent_id,
        messageId=envelope.messageId,
        **details,
    )


def _event_payload(row: dict[str, Any]) -> dict[str, Any]:
    return {**repos.agent_report(row), "workflowId": row["workflow_id"]}


# --- CONNECT -------------------------------------------------------------------------------


@router.post("/connect")
async def incoming_connect(
    request: Request,
    pool: PoolDep,
    identity: IdentityDep,
    settings: SettingsDep,
    refresher: KeyRefresherDep,
    temporal: TemporalDep,
) -> dict[str, Any]:
    body = await _body(request)
    try:
        return await _connect(request, body, pool, identity, settings, refresher, temporal)
    except FederationError as err:
        await _refused(request, body, err, "connect")
        raise


@dataclass(frozen=True)
class StrangerRequest:
    """A stranger's verified connection.request, the card read from its URL, and where the
    request came from (`source_key` of the sender) and which host it named."""

    payload: ConnectRequestPayload
    card: dict[str, Any]
    source: str
    host: str


async def expire_pending_requests(db: Any, settings: Settings) -> None:
    """End the connection requests nobody answered within FEDAGENT_PENDING_REQUEST_TTL."""
    for row in await pending.expire(db, settings.pending_request_ttl):
        await repos.audit(
            db,
            actor="instance",
            action="connection.request_expired",
            connectionId=str(row["connection_id"]),
            peer=row["remote_instance_id"],
        )


async def _check_waiting(db: Any, settings: Settings, source: str, host: str) -> None:
    """Anyone can mint a key and a card: without caps, strangers fill the admin's list."""
    now = await pending.waiting(db, source=source, host=host)
    if now.total >= settings.max_pending_requests:
        raise TooManyPendingRequests(
            f"{now.total} connection requests already wait for this instance's admin;"
            " try again later"
        )
    if now.from_source >= settings.max_pending_per_source:
        raise TooManyPendingFromSource(
            f"{now.from_source} connection requests from this address already wait"
        )
    if now.for_host >= settings.max_pending_per_host:
        raise TooManyPendingForHost(
            f"{now.for_host} connection requests naming this host already wait"
        )


async def _stranger_request(
    request: Request, body: Any, identity: Identity, settings: Settings
) -> StrangerRequest:
    """Its signature is checked with the keys it sent and the caps of waiting requests and
    fetches before anything is fetched; then the card at its own URL (read through the
    strangers' own client) must list the same key and the same URL."""
    payload = verify_connection_request(
        body, instance_id=identity.instance_id, window_seconds=settings.timestamp_window
    )
    source = source_key(request.client.host if request.client else "unknown")
    host = (payload.url.host or "").lower().rstrip(".")
    state = request.app.state
    await expire_pending_requests(state.pool, settings)
    await _check_waiting(state.pool, settings, source, host)
    with state.stranger_fetches.slot(source, host):
        card = await fetch_card(
            state.stranger_http, str(payload.url), timeout=settings.stranger_fetch_timeout
        )
    check_card_matches(card, body, payload)
    return StrangerRequest(payload, card, source, host)


async def _insert_request(
    conn: asyncpg.Connection, settings: Settings, stranger: StrangerRequest, sender: str
) -> dict[str, Any]:
    existing = await repos.connection_for_peer(conn, sender)
    if existing is not None and existing["status"] != ConnectionStatus.DISCONNECTED:
        raise ConnectionStateConflict(
            f"a connection with this peer is already {existing['status']}"
        )
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:pending'))")
    await _check_waiting(conn, settings, stranger.source, stranger.host)
    card, payload = stranger.card, stranger.payload
    row = await repos.insert_connection(
        conn,
        connection_id=payload.connectionId,
        remote_instance_id=card["instanceId"],
        remote_name=str(card.get("name") or payload.name),
        remote_url=str(card.get("url") or payload.url),
        remote_keys=card["keys"],
        direction="inbound",
    )
    await pending.remember_origin(
        conn, payload.connectionId, source=stranger.source, host=stranger.host
    )
    return row


async def _connect(
    request: Request,
    body: Any,
    pool: asyncpg.Pool,
    identity: Identity,
    settings: Settings,
    refresher: CardKeyRefresher,
    temporal: Client,
) -> dict[str, Any]:
    window = settings.timestamp_window
    is_request = isinstance(body, dict) and body.get("commandType") == "connection.request"
    stranger: StrangerRequest | None = None
    if is_request:
        stranger = await _stranger_request(request, body, identity, settings)
    else:
        await refresh_keys_first(
            pool, body, refresher, instance_id=identity.instance_id, window_seconds=window
        )
    ended: list[dict[str, Any]] = []  # the connection, if this change ended it
    async with pool.acquire() as conn, conn.transaction():
        verified = await verify_incoming(
            conn,
            body,
            instance_id=identity.instance_id,
            window_seconds=window,
            sender_keys=stranger.card["keys"] if stranger else None,
            refresh_keys=refresher,
        )
        envelope = verified.envelope
        tracing.bind(envelope.traceparent)
        if envelope.type is not MessageType.CONNECT:
            raise MalformedEnvelope("this endpoint takes CONNECT messages")
        if stranger is not None:
            row = await _insert_request(conn, settings, stranger, envelope.senderId)
        else:
            change = _payload(ConnectChangePayload, envelope)
            connection = verified.connection
            assert connection is not None
            if connection["connection_id"] != change.connectionId:
                raise ConnectionStateConflict("connectionId does not match the live connection")
            row = await apply_peer_change(
                conn,
                connection,
                envelope.commandType,
                change.grants,
                on_end=ended.append,
            )
        await repos.record_message(conn, envelope.to_wire(), direction="in")
        await repos.audit(
            conn,
            actor=f"peer:{envelope.senderId}",
            action=str(envelope.commandType),
            connectionId=str(row["connection_id"]),
            status=row["status"],
            suspendedBy=row.get("suspended_by"),
        )
    for connection in ended:  # committed: its runs end, durably, before the peer hears back
        await start_ending_runs(temporal, settings, connection)
    return _reply(
        identity,
        envelope,
        {"connectionId": str(row["connection_id"]), "status": row["status"]},
    )


# --- COMMAND -------------------------------------------------------------------------------


@router.post("/command")
async def incoming_command(
    request: Request,
    pool: PoolDep,
    temporal: TemporalDep,
    identity: IdentityDep,
    settings: SettingsDep,
    refresher: KeyRefresherDep,
) -> dict[str, Any]:
    body = await _body(request)
    received_at = datetime.now(UTC)
    try:
        await refresh_keys_first(
            pool,
            body,
            refresher,
            instance_id=identity.instance_id,
            window_seconds=settings.timestamp_window,
        )
        async with pool.acquire() as conn, conn.transaction():
            verified = await verify_incoming(
                conn,
                body,
                instance_id=identity.instance_id,
                window_seconds=settings.timestamp_window,
                now=received_at,
                refresh_keys=refresher,
            )
            envelope = verified.envelope
            tracing.bind(envelope.traceparent)
            if envelope.type is not MessageType.COMMAND:
                raise MalformedEnvelope("this endpoint takes COMMAND messages")
            command = envelope.commandType or ""
            # An ended connection still hears a kill or a status ask of a run it had.
            connection = require_active_or_ending(
                verified.connection, ending=command in RUN_ENDING_COMMANDS
            )
            if command not in (
                "agent.spawn",
                "agent.status",
                "agent.kill",
                "agent.artifact",
                "agent.transcript",
            ):
                raise UnsupportedCommand(f"unknown command {command!r}")
            check_peer_command(
                connection,
                command,
                envelope.payload,
                max_timeout=settings.max_agent_timeout,
                offered_agent_types=identity.capabilities.get("agentTypes"),
            )
            if command == "agent.spawn":
                await check_peer_concurrency(
                    conn,
                    connection,
                    envelope.payload,
                    default_limit=settings.peer_max_running_agents,
                    queue_cap=settings.peer_max_queued_agents,
                )
                spawn = await _reserve_spawn(conn, settings, envelope, connection)
                await _audit_accepted(conn, envelope, str(spawn.agentId))
                await repos.record_message(
                    conn, envelope.to_wire(), direction="in", agent_id=spawn.agentId
                )
            elif command == "agent.artifact":
                answer = await _artifact(conn, settings, envelope, connection)
                await repos.record_message(
                    conn, envelope.to_wire(), direction="in", agent_id=uuid.UUID(answer["agentId"])
                )
                return _reply(identity, envelope, answer)
            else:
                if command == "agent.transcript":
                    ref = pull = _payload(TranscriptPullPayload, envelope)
                else:
                    ref = _payload(AgentRefPayload, envelope)
                row = await _own_run(conn, envelope, connection, ref.agentId)
                await repos.record_message(
                    conn, envelope.to_wire(), direction="in", agent_id=ref.agentId
                )
    except FederationError as err:
        await _refused(request, body, err, "command")
        raise
    if command == "agent.spawn":
        # The slot is reserved and committed before Temporal is asked (no lock or transaction
        # is held across the RPC). The start is idempotent by workflow id: a failed start
        # (Temporal away: 503) is repaired by the requester's retry of the same spawn.
        row = await _start_run(pool, temporal, settings, envelope, connection, received_at)
    elif command == "agent.status" and ref.afterSeq is not None:
        row = await _wait_for_change(request, pool, row, ref)
    elif command == "agent.kill":
        # The answer carries the final state: the workflow need not send it as an event too.
        row = await stop_run(pool, temporal, row, "killed on request", answered=True)
        await _audit_accepted(pool, envelope, str(row["agent_id"]), state=row["state"])
    elif command == "agent.transcript":
        return _reply(identity, envelope, await _transcript_page(pool, envelope, pull))
    return _reply(identity, envelope, _event_payload(row))


async def _transcript_page(
    pool: asyncpg.Pool, envelope: Envelope, pull: TranscriptPullPayload
) -> dict[str, Any]:
    entries = await conversations.transcript_after(
        pool, envelope.senderId, pull.agentId, pull.after, limit=pull.limit
    )
    summary = await conversations.transcript_summary(pool, envelope.senderId, pull.agentId)
    return {
        "agentId": str(pull.agentId),
        "entries": entries,
        "total": summary["entries"],
        "truncated": summary["truncated"],
    }


async def _reserve_spawn(
    conn: asyncpg.Connection,
    settings: Settings,
    envelope: Envelope,
    connection: dict[str, Any],
) -> SpawnPayload:
    """Check capacity and insert the run's row, inside the caller's transaction (no RPC)."""
    spawn: SpawnPayload = _payload(SpawnPayload, envelope)
    workflow_id = agent_run_workflow_id(envelope.senderId, str(spawn.agentId))
    known = await repos.get_executed_agent(conn, envelope.senderId, spawn.agentId)
    if known is None and not spawn.options.queue:
        # Serialise capacity checks so concurrent spawns cannot overshoot together.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fedagent:capacity'))")
        running = await repos.count_running_executed(conn)
        if running >= settings.max_running_agents:
            raise CapacityExceeded(
                f"{running} agents are running here (limit {settings.max_running_agents});"
                " retry later or spawn with options.queue=true",
                running=running,
                limit=settings.max_running_agents,
            )
    await repos.insert_agent(
        conn,
        agent_id=spawn.agentId,
        role="executor",
        connection_id=connection["connection_id"],
        peer_instance_id=envelope.senderId,
        task_id=spawn.taskId,
        agent_type=spawn.agentType,
        context=spawn.context.model_dump(),
        options=spawn.options.model_dump(),
        workflow_id=workflow_id,
        state=AgentState.SPAWNING,
    )
    return spawn


async def _start_run(
    pool: asyncpg.Pool,
    temporal: Client,
    settings: Settings,
    envelope: Envelope,
    connection: dict[str, Any],
    received_at: datetime,
) -> dict[str, Any]:
    """Start the reserved run's workflow, holding no database connection while Temporal answers."""
    spawn: SpawnPayload = _payload(SpawnPayload, envelope)
    agent_id = str(spawn.agentId)
    workflow_id = agent_run_workflow_id(envelope.senderId, agent_id)
    ended = await repos.get_executed_agent(pool, envelope.senderId, spawn.agentId)
    if ended is not None and ended["state"] in TERMINAL_STATES:
        return ended  # killed or repaired while its workflow did not exist: it stays ended
    try:
        await temporal.start_workflow(
            AgentRunWorkflow.run,
            AgentRunInput(envelope=envelope.to_wire(), received_at=format_timestamp(received_at)),
            id=workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=(
                f"{spawn.agentType} agent for task {spawn.taskId} from {connection['remote_name']}"
            ),
            search_attributes=agent_search_attributes(
                agent_id=agent_id,
                task_id=spawn.taskId,
                peer=connection["remote_name"],
                agent_type=spawn.agentType,
            ),
        )
    except WorkflowAlreadyStartedError:
        pass  # the run exists and is closed: the same agentId never runs twice
    row = await repos.get_executed_agent(pool, envelope.senderId, spawn.agentId)
    assert row is not None
    return row


async def _own_run(
    conn: asyncpg.Connection,
    envelope: Envelope,
    connection: dict[str, Any],
    agent_id: uuid.UUID,
) -> dict[str, Any]:
    """The sender's run `agent_id` on this executor. Runs belong to the connection they came
    over, not to a reused instanceId: another connection's run is no run of this sender."""
    row = await repos.get_executed_agent(conn, envelope.senderId, agent_id)
    if row is None or row["connection_id"] != connection["connection_id"]:
        raise AgentNotFound(f"no agent {agent_id} of this requester")
    return row


async def _artifact(
    conn: asyncpg.Connection,
    settings: Settings,
    envelope: Envelope,
    connection: dict[str, Any],
) -> dict[str, Any]:
    """One bounded piece of an artifact of the sender's own run, with the whole one's hash."""
    ask: AgentArtifactPayload = _payload(AgentArtifactPayload, envelope)
    await _own_run(conn, envelope, connection, ask.agentId)
    artifact = await artifacts.of_agent(
        conn,
        role="executor",
        peer_instance_id=envelope.senderId,
        agent_id=ask.agentId,
        kind=ask.kind,
        sha256=ask.sha256,
    )
    if artifact is None:
        what = ask.kind or ask.sha256
        raise ArtifactNotFound(f"agent {ask.agentId} has no artifact {what} here")
    length = min(ask.length or settings.artifact_chunk_bytes, settings.artifact_chunk_bytes)
    data = await artifacts.read_range(conn, artifact, ask.offset, length)
    return {
        "agentId": str(ask.agentId),
        "kind": ask.kind,
        "sha256": artifact.sha256,
        "bytes": artifact.bytes,
        "offset": ask.offset,
        "data": base64.b64encode(data).decode(),
    }


LONG_POLL_MAX = 25.0  # seconds an agent.status long-poll is held at most


async def _wait_for_change(
    request: Request, pool: asyncpg.Pool, row: dict[str, Any], ref: Any
) -> dict[str, Any]:
    """Hold agent.status until the record moves past what the requester knows, or a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(ref.waitSeconds or 20.0, LONG_POLL_MAX)
    key = notifications.agent_key("executor", row["peer_instance_id"], row["agent_id"])
    listener: notifications.Listener = request.app.state.agent_state_listener
    while True:
        if row["seq"] > ref.afterSeq and (
            ref.knownState is None
            or row["state"] != ref.knownState
            or row["state"] in TERMINAL_STATES
        ):
            return row
        remaining = deadline - loop.time()
        if remaining <= 0:
            return row
        # Woken by the state trigger's NOTIFY; re-read on a bound in case one is lost.
        await listener.wait(notifications.AGENT_STATE, key, min(remaining, 2.0))
        fresh = await repos.get_executed_agent(pool, row["peer_instance_id"], row["agent_id"])
        if fresh is None:
            return row
        row = fresh


# --- EVENT ---------------------------------------------------------------------------------


@router.post("/event")
async def incoming_event(
    request: Request,
    pool: PoolDep,
    temporal: TemporalDep,
    identity: IdentityDep,
    settings: SettingsDep,
    refresher: KeyRefresherDep,
) -> dict[str, Any]:
    body = await _body(request)
    try:
        await refresh_keys_first(
            pool,
            body,
            refresher,
            instance_id=identity.instance_id,
            window_seconds=settings.timestamp_window,
        )
        async with pool.acquire() as conn, conn.transaction():
            verified = await verify_incoming(
                conn,
                body,
                instance_id=identity.instance_id,
                window_seconds=settings.timestamp_window,
                refresh_keys=refresher,
            )
            envelope = verified.envelope
            tracing.bind(envelope.traceparent)
            if envelope.type is not MessageType.EVENT:
                raise MalformedEnvelope("this endpoint takes EVENT messages")
            transcript = (
                _payload(TranscriptEventPayload, envelope)
                if envelope.commandType == "agent.transcript"
                else None
            )
            event = transcript or _payload(AgentEventPayload, envelope)
            # An ended connection still brings the final state of a run it had (checked below).
            connection = require_active_or_ending(
                verified.connection,
                ending=transcript is None and event.state in TERMINAL_STATES,
            )
            row = await repos.get_requested_agent(conn, event.agentId)
            # Runs belong to the connection they were asked over, not to a reused instanceId.
            if (
                row is None
                or row["peer_instance_id"] != envelope.senderId
                or row["connection_id"] != connection["connection_id"]
            ):
                raise AgentNotFound(f"no agent {event.agentId} was spawned on this peer")
            if transcript is not None and row["state"] in TERMINAL_STATES:
                # What is missing then is pulled (up to the count the final reported).
                raise AgentEnded(
                    f"agent {event.agentId} is {row['state']}: its transcript takes no more events"
                )
            applied = transcript is None and await repos.apply_requester_update(
                conn,
                event.agentId,
                seq=event.seq,
                state=event.state,
                progress=event.progress,
                result=event.result,
                error=event.error,
                attempt=event.attempt,
            )
    except FederationError as err:
        await _refused(request, body, err, "event")
        raise
    if transcript is not None:
        return _reply(identity, envelope, await _received_transcript(request, transcript))
    if applied:
        _pull_if_behind(request, event.agentId, event.progress, event.result)
    if applied and event.state != row["state"]:
        # Only state changes wake the workflow; progress lives in the projection.
        handle = temporal.get_workflow_handle(remote_agent_workflow_id(str(event.agentId)))
        try:
            await handle.signal(
                RemoteAgentWorkflow.on_event,
                AgentEvent(
                    seq=event.seq,
                    state=event.state,
                    progress=event.progress,
                    result=event.result,
                    error=event.error,
                    attempt=event.attempt,
                ),
            )
        except Exception:  # noqa: BLE001 - a closed workflow needs no more news
            pass
    return _reply(identity, envelope, {"agentId": str(event.agentId), "applied": applied})


async def _received_transcript(request: Request, event: TranscriptEventPayload) -> dict[str, Any]:
    """Keep the entries that continue the stored transcript; pull when some are missing."""
    settings: Settings = request.app.state.settings
    received = await conversations.store_received(
        request.app.state.pool,
        event.agentId,
        [e.kept() for e in event.entries],
        max_entries=settings.transcript_max_entries,
        max_bytes=settings.transcript_limit,
    )
    if received.gap:
        request.app.state.transcripts.kick(event.agentId)
    return {"agentId": str(event.agentId), "stored": received.stored, "full": received.full}


def _pull_if_behind(request: Request, agent_id: uuid.UUID, progress: Any, result: Any) -> None:
    total = reported_total({"progress": progress, "result": result})
    if total:
        # While the run goes on the entries may simply not have arrived yet: look again later.
        delay = 0.0 if result else 2.0
        request.app.state.transcripts.kick_if_behind(agent_id, total, delay=delay)
