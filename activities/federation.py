"""Activities that talk to peers and keep the store: verify, sign and send, record."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

import asyncpg
import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from federation import tracing
from federation.envelope import MessageType, parse_timestamp
from federation.errors import (
    FederationError,
    PeerRefused,
    PeerResponseInvalid,
    PeerUnreachable,
    ReplayedMessage,
)
from federation.identity import Identity, load_identity
from federation.local_runs import check_local_spawn
from federation.peer import send_signed
from federation.settings import Settings
from federation.states import LOCAL_CONNECTION_ID, LOCAL_REQUESTER
from federation.store import repos
from federation.trust import (
    check_peer_command,
    require_active,
    require_active_or_ending,
    verify_incoming,
)
from workflows.models import (
    ADMIT_RUN,
    CHECK_STATUS,
    DELIVER_KILL,
    NOTIFY_REQUESTER,
    RECORD_REQUESTER_FINAL,
    RECORD_RUN_FINAL,
    SEND_KILL,
    SEND_SPAWN,
    STORE_REFUSED,
    TERMINAL_STATES,
    AgentEvent,
    AgentRunInput,
    AgentState,
    FinishRun,
    KillDelivery,
    KillResult,
    PeerCall,
    RecordedFinal,
    RequesterFinal,
    RunTask,
    SpawnAgentInput,
    agent_run_workflow_id,
)

T = TypeVar("T")


# Peer answers that a retry may fix.
TRANSIENT_PEER_STATUSES = {408, 425, 429}
# Refusals of a kill's delivery that are final for other commands but that an operator may
# still fix within the delivery's days (a clock set right, keys refreshed, a peer that answered
# garbage through a proxy): retried like an unreachable peer. Any other refusal is final.
KILL_REFUSALS_RETRIED = {
    "timestamp_out_of_window",
    "key_unknown",
    "key_expired",
    "key_not_endorsed",
    "peer_response_invalid",
}
KILL_UNDELIVERABLE = "kill_undeliverable"


def as_activity_error(err: FederationError) -> Exception:
    """Map a domain error to what Temporal should do with it: retry or give up."""
    if isinstance(err, PeerUnreachable):
        return ApplicationError(err.detail, type=err.code)
    if isinstance(err, PeerRefused) and err.peer_status in TRANSIENT_PEER_STATUSES:
        return ApplicationError(err.detail, type=err.peer_code)
    if isinstance(err, PeerRefused) and err.peer_code == ReplayedMessage.code:
        # The peer saw this very message, but its answer never came back (a balancer sent
        # it again after the replica that took it died): the next attempt signs a new one,
        # which the peer handles as the same request (every command is idempotent).
        return ApplicationError(err.detail, type=err.peer_code)
    code = err.peer_code if isinstance(err, PeerRefused) else err.code
    return ApplicationError(err.detail, type=code, non_retryable=True)


def event_from_payload(payload: dict[str, Any]) -> AgentEvent:
    """A peer's report as an event; a state outside the vocabulary is refused before it is
    stored or reaches a workflow."""
    try:
        state = AgentState(payload.get("state") or AgentState.SPAWNING)
    except ValueError:
        raise PeerResponseInvalid(f"unknown agent state {payload.get('state')!r}") from None
    return AgentEvent(
        seq=int(payload.get("seq") or 0),
        state=state,
        progress=payload.get("progress"),
        result=payload.get("result"),
        error=payload.get("error"),
        attempt=payload.get("attempt"),
    )


class PeerMessenger:
    """Signs and sends messages to the peer of a connection (shared by activities)."""

    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient, settings: Settings) -> None:
        self.pool = pool
        self.http = http
        self.settings = settings

    async def identity(self) -> Identity:
        return await load_identity(self.pool)

    async def send(
        self,
        connection: dict[str, Any],
        *,
        type: MessageType,
        command_type: str,
        payload: dict[str, Any],
        agent_id: uuid.UUID | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        envelope, reply = await send_signed(
            self.http,
            await self.identity(),
            url=connection["remote_url"],
            recipient_id=connection["remote_instance_id"],
            recipient_keys=connection["remote_keys"],
            type=type,
            command_type=command_type,
            payload=payload,
            window_seconds=self.settings.timestamp_window,
            timeout=timeout or self.settings.peer_request_timeout,
            connection_id=str(connection["connection_id"]),
        )
        await repos.record_message(
            self.pool, envelope.to_wire(), direction="out", agent_id=agent_id
        )
        return reply

    async def notify_requester(self, row: dict[str, Any], *, timeout: float | None = None) -> None:
        """Send the executor's current record of a run to its requester as a signed EVENT,
        over the connection the run came by; once that connection ended (suspended,
        disconnected), only the run's final state still goes. A local run's requester is this
        instance: its users read the row itself."""
        if row["peer_instance_id"] == LOCAL_REQUESTER:
            return
        connection = await repos.get_connection(self.pool, row["connection_id"])
        connection = require_active_or_ending(connection, ending=row["state"] in TERMINAL_STATES)
        await self.send(
            connection,
            type=MessageType.EVENT,
            command_type="agent.state",
            payload=repos.agent_report(row),
            agent_id=row["agent_id"],
            timeout=timeout,
        )


# Store failures no retry can fix: a value PostgreSQL refuses (SQLSTATE class 22) or one past
# its limits (class 54). Retried, a final record would keep a finished run open for ever;
# outages (lost connections, timeouts, a failover) raise other errors and stay retried.
UNSTORABLE = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)
Final = TypeVar("Final", RequesterFinal, FinishRun)


def unstored(final: Final, err: Exception) -> Final:
    """The final to keep instead of one the store refuses: `failed`, with the store's reason,
    without the result it could not take."""
    reason = (
        f"the run ended {final.state} but the store refused its final record "
        f"({type(err).__name__}: {err}); its result is not kept"
    )
    summary = {"success": False, "stopReason": "store_refused", "summary": reason}
    return dataclasses.replace(final, state=AgentState.FAILED, result=summary, error=reason)


async def refused_for_good(write: Awaitable[T]) -> T:
    """`write`, with a refusal of the store made a failure Temporal does not retry."""
    try:
        return await write
    except UNSTORABLE as err:
        raise ApplicationError(
            f"the store refuses this final record: {type(err).__name__}: {err}",
            type=STORE_REFUSED,
            non_retryable=True,
        ) from None


def _recorded(
    row: dict[str, Any], *, written: bool, final: RequesterFinal | FinishRun
) -> RecordedFinal:
    """What a final record answers its workflow: the final the store keeps. When that is the
    workflow's own (written now, or the same one before) the result is left out: the workflow
    has it, and it stays once in its history."""
    kept = (row["state"], row["result"], row["error"])
    own = written or kept == (final.state, final.result, final.error)
    return RecordedFinal(
        state=AgentState(row["state"]),
        result=None if own else row["result"],
        error=row["error"],
        seq=int(row["seq"]),
        written=own,
    )


def kill_settlement(answer: KillResult) -> dict[str, Any]:
    """How the executor's final answer to a delivered kill settles it (`settle_kill_delivery`):
    `not_found` (no such run there), `confirmed` (it stopped the run), or `too_late` (the run
    had ended there on its own first: that end is recorded here too)."""
    if not answer.confirmed:
        return {"outcome": "not_found", "note": "the executor has no such run"}
    if answer.state == AgentState.KILLED:
        return {"outcome": "confirmed", "note": "the executor stopped the run"}
    return {
        "outcome": "too_late",
        "note": f"the run had ended {answer.state} on the executor before the kill reached it",
        "answer": {
            "state": str(answer.state),
            "result": answer.result,
            "error": answer.error,
            "seq": answer.seq,
        },
    }


class FederationActivities:
    def __init__(
        self,
        pool: asyncpg.Pool,
        http: httpx.AsyncClient,
        settings: Settings,
        a2a_cancel: Callable[[PeerCall], Awaitable[KillResult]] | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.messenger = PeerMessenger(pool, http, settings)
        # The kill of a run on an A2A agent (CancelTask), for deliver_kill.
        self.a2a_cancel = a2a_cancel

    async def _active_connection(self, connection_id: str) -> dict[str, Any]:
        connection = await repos.get_connection(self.pool, uuid.UUID(connection_id))
        try:
            return require_active(connection)
        except FederationError as err:
            raise as_activity_error(err) from None

    async def _requester_connection(self, agent_id: str) -> dict[str, Any]:
        """The connection a run was asked over: a kill or a status ask of the run still goes
        once it ended (suspended, disconnected), so both sides agree on how the run ends."""
        row = await repos.get_requested_agent(self.pool, uuid.UUID(agent_id))
        if row is None:
            raise ApplicationError(
                f"no agent {agent_id}", type="agent_not_found", non_retryable=True
            )
        connection = await repos.get_connection(self.pool, row["connection_id"])
        try:
            return require_active_or_ending(connection, ending=True)
        except FederationError as err:
            raise as_activity_error(err) from None

    # --- requester side ----------------------------------------------------------------

    async def _apply_reply(self, agent_id: str, reply: dict[str, Any]) -> AgentEvent:
        """The executor's answer is a report like an event: apply it to the projection."""
        try:
            event = event_from_payload(reply)
        except FederationError as err:
            raise as_activity_error(err) from None
        await repos.apply_requester_update(
            self.pool,
            uuid.UUID(agent_id),
            seq=event.seq,
            state=event.state,
            progress=event.progress,
            result=event.result,
            error=event.error,
            attempt=event.attempt,
        )
        return event

    async def _command(
        self,
        connection: dict[str, Any],
        agent_id: str,
        command_type: str,
        payload: dict[str, Any],
        *,
        timeout: float,
    ) -> AgentEvent:
        """Send one signed command about an agent; its answer is applied like an event."""
        try:
            reply = await self.messenger.send(
                connection,
                type=MessageType.COMMAND,
                command_type=command_type,
                payload=payload,
                agent_id=uuid.UUID(agent_id),
                timeout=timeout,
            )
        except FederationError as err:
            raise as_activity_error(err) from None
        return await self._apply_reply(agent_id, reply)

    @activity.defn(name=SEND_SPAWN)
    async def send_spawn(self, inp: SpawnAgentInput) -> AgentEvent:
        with tracing.trace(inp.traceparent):
            payload = {
                "agentId": inp.agent_id,
                "taskId": inp.task_id,
                "agentType": inp.agent_type,
                "context": inp.context,
                "options": inp.options,
            }
            return await self._command(
                await self._active_connection(inp.connection_id),
                inp.agent_id,
                "agent.spawn",
                payload,
                timeout=inp.peer_timeout_seconds,
            )

    @activity.defn(name=SEND_KILL)
    async def send_kill(self, call: PeerCall) -> KillResult:
        with tracing.trace(call.traceparent):
            # The executor answers once the sandbox is gone and the final state recorded.
            event = await self._command(
                await self._requester_connection(call.agent_id),
                call.agent_id,
                "agent.kill",
                {"agentId": call.agent_id},
                timeout=60.0,
            )
        if event.state in TERMINAL_STATES:
            await repos.note_kill_confirmed(self.pool, uuid.UUID(call.agent_id))
        return KillResult(
            agent_id=call.agent_id,
            state=event.state,
            seq=event.seq,
            result=event.result,
            error=event.error,
        )

    @activity.defn(name=DELIVER_KILL)
    async def deliver_kill(self, inp: KillDelivery) -> KillResult:
        """Tell the executor to kill a run this side ended without its word. A failure a retry
        may fix is retried (by the workflow's policy, with backoff); a refusal no retry can fix
        (the connection is gone here, the peer refuses the kill for good) settles the kill as
        `undeliverable` with the reason and fails for good. The executor's answer settles it:
        `confirmed` (it stopped the run), `too_late` (the run had ended there on its own: this
        side then records that end, so both agree), `not_found` (no such run there)."""
        agent_id = uuid.UUID(inp.agent_id)
        row = await repos.get_requested_agent(self.pool, agent_id)
        if row is None:
            raise ApplicationError(
                f"no agent {agent_id}", type="agent_not_found", non_retryable=True
            )
        if row["kill_delivery"] == "undeliverable":  # a try before this one settled it so
            raise ApplicationError(
                f"the kill cannot be delivered: {row['kill_delivery_note']}",
                type=KILL_UNDELIVERABLE,
                non_retryable=True,
            )
        if row["kill_delivery"] != "pending":
            # Settled meanwhile (the executor's final event came), or never owed: a final
            # decided here is recorded with its kill pending in the same statement (and rows of
            # builds before that mark by migration 0024); a final without the mark is the
            # executor's own (a delivery started for it raced that end).
            return KillResult(
                agent_id=inp.agent_id,
                state=row["state"],
                seq=int(row["seq"]),
                confirmed=bool(row["kill_confirmed"]),
            )
        connection = await repos.get_connection(self.pool, row["connection_id"])
        a2a = self.a2a_cancel if connection and connection["kind"] == "a2a" else None
        try:
            answer = await (a2a or self.send_kill)(
                PeerCall(agent_id=inp.agent_id, connection_id="", traceparent=inp.traceparent)
            )
        except ApplicationError as err:
            if err.type != "agent_not_found":
                if err.non_retryable and err.type not in KILL_REFUSALS_RETRIED:
                    await self._undeliverable(row, f"{err.type}: {err.message}")
                raise ApplicationError(err.message, type=err.type) from None  # retried
            if a2a is None and self._spawn_may_still_arrive(row):
                # A spawn this side gave up on may still be on its way (its answers lost, a
                # request in flight): the executor would take it after this "no such run",
                # and run it unseen. Its signed envelope is refused once older than the
                # timestamp window, so "no such run" is final only after that.
                raise ApplicationError(
                    f"{err.message} (yet: a spawn sent before may still reach it)",
                    type="agent_not_found_yet",
                ) from None
            # The executor has no such run: nothing runs there.
            answer = KillResult(agent_id=inp.agent_id, state=row["state"], confirmed=False)
        if answer.state not in TERMINAL_STATES:
            raise ApplicationError(f"the executor answered {answer.state}", type="kill_pending")
        # A run that had ended there on its own before the kill reached it ended so: this side
        # records that end too (the kill came too late), so both agree.
        await repos.settle_kill_delivery(self.pool, agent_id, **kill_settlement(answer))
        await self._audit_delivery(row, answer)
        return answer

    def _spawn_may_still_arrive(self, row: dict[str, Any]) -> bool:
        """Whether a spawn of this run signed before this side ended it may still be taken by
        the executor: until the timestamp window (and a request's time) after the end."""
        ended = row["finished_at"] or row["updated_at"]
        if ended is None:
            return False
        settled = ended + timedelta(
            seconds=self.settings.timestamp_window + self.settings.peer_request_timeout
        )
        return bool(datetime.now(UTC) < settled)

    async def _undeliverable(self, row: dict[str, Any], reason: str) -> NoReturn:
        """A kill no retry can deliver: said so on the run (unconfirmed, with the reason), and
        its delivery fails for good, for an operator to see."""
        await repos.settle_kill_delivery(
            self.pool, row["agent_id"], outcome="undeliverable", note=reason
        )
        activity.logger.warning("agent %s: kill not deliverable: %s", row["agent_id"], reason)
        await repos.audit(
            self.pool,
            actor="system",
            action="agent.kill_undeliverable",
            agentId=str(row["agent_id"]),
            state=str(row["state"]),
            reason=reason,
        )
        raise ApplicationError(
            f"the kill cannot be delivered: {reason}", type=KILL_UNDELIVERABLE, non_retryable=True
        )

    async def _audit_delivery(self, row: dict[str, Any], answer: KillResult) -> None:
        """Say what the executor answered; when it differs from what this side recorded (it
        had ended the run otherwise before the kill reached it), log it as well."""
        executor_state = answer.state if answer.confirmed else "unknown there"
        if executor_state != row["state"]:
            activity.logger.warning(
                "agent %s: ended %s here, the executor says %s",
                row["agent_id"],
                row["state"],
                executor_state,
            )
        await repos.audit(
            self.pool,
            actor="system",
            action="agent.kill_delivered",
            agentId=str(row["agent_id"]),
            state=str(row["state"]),
            executorState=str(executor_state),
        )

    @activity.defn(name=CHECK_STATUS)
    async def check_status(self, call: PeerCall) -> AgentEvent:
        """Ask the executor once for its record of the run (agent.status, answered at once),
        applied to the projection like an event.

        Short by design: a run held for hours costs no activity slot and no connection between
        two checks (the workflow waits on a durable timer). A failure a retry may fix raises;
        Temporal retries it later, holding nothing meanwhile.
        """
        with tracing.trace(call.traceparent):
            return await self._command(
                await self._requester_connection(call.agent_id),
                call.agent_id,
                "agent.status",
                {"agentId": call.agent_id},
                timeout=call.peer_timeout_seconds,
            )

    @activity.defn(name=RECORD_REQUESTER_FINAL)
    async def record_requester_final(self, final: RequesterFinal) -> RecordedFinal:
        """Record the run's final state here; answers the final the store keeps (the first:
        a record run again, or after an event the workflow had not heard yet, keeps it).
        A final the store refuses is kept `failed` instead (`unstored`), which the workflow
        adopts; one refused even so fails the activity for good (STORE_REFUSED)."""

        async def write(kept: RequesterFinal) -> dict[str, Any] | None:
            return await repos.force_requester_final(
                self.pool,
                uuid.UUID(kept.agent_id),
                state=kept.state,
                result=kept.result,
                error=kept.error,
                tell_executor=kept.tell_executor,
            )

        try:
            row = await write(final)
            written = bool(row and row["written"])
        except UNSTORABLE as err:
            activity.logger.warning(
                "final of agent %s refused by the store: %s", final.agent_id, err
            )
            row, written = await refused_for_good(write(unstored(final, err))), False
        if row is None:  # no row (removed meanwhile): nothing to keep but this final
            return RecordedFinal(state=final.state, error=final.error)
        return _recorded(row, written=written, final=final)

    # --- executor side -----------------------------------------------------------------

    @activity.defn(name=ADMIT_RUN)
    async def admit_run(self, inp: AgentRunInput) -> RunTask:
        """Verify the signed command again, against the connection and grants as they are now
        (a local run: against this instance's limits of local runs as they are now)."""
        identity = await load_identity(self.pool)
        if inp.local is not None:
            return self._admit_local(inp.local, identity)
        try:
            verified = await verify_incoming(
                self.pool,
                inp.envelope,
                instance_id=identity.instance_id,
                window_seconds=self.settings.timestamp_window,
                check_replay=False,
                now=parse_timestamp(inp.received_at),
            )
            connection = require_active(verified.connection)
            check_peer_command(
                connection,
                "agent.spawn",
                verified.envelope.payload,
                max_timeout=self.settings.max_agent_timeout,
                offered_agent_types=identity.capabilities.get("agentTypes"),
            )
        except FederationError as err:
            raise as_activity_error(err) from None
        envelope = verified.envelope
        payload = envelope.payload
        options = payload.get("options") or {}
        return RunTask(
            agent_id=str(payload["agentId"]),
            requester_id=envelope.senderId,
            connection_id=str(connection["connection_id"]),
            task_id=str(payload["taskId"]),
            agent_type=str(payload["agentType"]),
            context=dict(payload.get("context") or {}),
            timeout_seconds=int(options.get("timeout", 3600)),
            max_retries=int(options.get("maxRetries", 0)),
            workflow_id=agent_run_workflow_id(envelope.senderId, str(payload["agentId"])),
            heartbeat_interval=self.settings.heartbeat_interval,
            agent_task_queue=self.settings.agent_task_queue,
            traceparent=envelope.traceparent or "",
        )

    def _admit_local(self, spawn: dict[str, Any], identity: Identity) -> RunTask:
        try:
            asked = {
                k: spawn.get(k) for k in ("agentId", "taskId", "agentType", "context", "options")
            }
            check_local_spawn(self.settings, asked, identity.capabilities.get("agentTypes"))
        except FederationError as err:
            raise as_activity_error(err) from None
        options = spawn.get("options") or {}
        return RunTask(
            agent_id=str(spawn["agentId"]),
            requester_id=LOCAL_REQUESTER,
            connection_id=LOCAL_CONNECTION_ID,
            task_id=str(spawn["taskId"]),
            agent_type=str(spawn["agentType"]),
            context=dict(spawn.get("context") or {}),
            timeout_seconds=int(options.get("timeout", 3600)),
            max_retries=int(options.get("maxRetries", 0)),
            workflow_id=agent_run_workflow_id(LOCAL_REQUESTER, str(spawn["agentId"])),
            heartbeat_interval=self.settings.heartbeat_interval,
            agent_task_queue=self.settings.agent_task_queue,
            traceparent=str(spawn.get("traceparent") or ""),
        )

    @activity.defn(name=RECORD_RUN_FINAL)
    async def record_run_final(self, finish: FinishRun) -> RecordedFinal:
        """Record the run's final state on the executor; answers the final the store keeps.

        Terminal states are final: a second record (a retry, a kill racing completion) keeps
        the first, and answers it with its sequence number. A final the store refuses is kept
        `failed` instead (`unstored`), which the workflow adopts; one refused even so fails
        the activity for good (STORE_REFUSED): the run closes, the reconciler repairs its row.
        """
        agent_id = uuid.UUID(finish.agent_id)

        async def write(kept: FinishRun) -> dict[str, Any] | None:
            return await repos.update_executed_agent(
                self.pool,
                kept.requester_id,
                agent_id,
                state=kept.state,
                result=kept.result,
                error=kept.error,
                attempt=kept.attempt,
            )

        try:
            row = await write(finish)
            written = row is not None
        except UNSTORABLE as err:
            activity.logger.warning("final of agent %s refused by the store: %s", agent_id, err)
            row, written = await refused_for_good(write(unstored(finish, err))), False
        if row is None:
            row = await repos.get_executed_agent(self.pool, finish.requester_id, agent_id)
        if row is None:  # no row (removed meanwhile): nothing to keep but this final
            return RecordedFinal(state=finish.state, error=finish.error)
        return _recorded(row, written=written, final=finish)

    @activity.defn(name=NOTIFY_REQUESTER)
    async def notify_requester(self, finish: FinishRun) -> None:
        """Tell the requester what was recorded (best effort: it also long-polls)."""
        row = await repos.get_executed_agent(
            self.pool, finish.requester_id, uuid.UUID(finish.agent_id)
        )
        if row is None:
            return
        try:
            with tracing.trace(finish.traceparent):
                await self.messenger.notify_requester(row)
        except FederationError as err:
            raise as_activity_error(err) from None
