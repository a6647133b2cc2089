"""A kill the requester decided without the executor's word ends with both sides agreeing, and
its delivery is never lost nor retried when no retry can help (issue 20, point 2). The real
deliver_kill and record_requester_final run against the real store; only the executor's answer
to the signed agent.kill is scripted (at `_command`, where the network would be)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

import workflows.models as m
from activities.federation import FederationActivities, as_activity_error
from federation.errors import AgentNotFound, FederationError, PeerRefused, PeerUnreachable
from federation.settings import Settings
from federation.states import ConnectionStatus
from federation.store import reconcile, repos
from tests.workflows.peer import ScriptedPeer, spawn_input
from tests.workflows.test_paths import final_status
from tests.workflows.test_races import kill, wait_for
from tests.workflows.test_reconciler import walk_from_the_start
from worker.reconciler import Reconciler
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

Answer = dict[str, Any] | FederationError


class ScriptedExecutor(FederationActivities):
    """The requester's real activities; the executor's answer to each command is scripted."""

    def __init__(self, pool: asyncpg.Pool, http: httpx.AsyncClient) -> None:
        # A spawn in flight may reach the executor for 5 + 1 s after the requester's end.
        super().__init__(pool, http, Settings(timestamp_window=5, peer_request_timeout=1.0))
        self.answer: Answer = PeerUnreachable("connect refused")
        self.kills: list[str] = []
        # Set once a final is recorded; while `hold_record` is clear the record's local
        # activity does not return (the workflow is stopped right after its record).
        self.recorded = asyncio.Event()
        self.hold_record = asyncio.Event()
        self.hold_record.set()

    async def _command(
        self,
        connection: dict[str, Any],
        agent_id: str,
        command_type: str,
        payload: dict[str, Any],
        *,
        timeout: float,
    ) -> m.AgentEvent:
        self.kills.append(agent_id)
        if isinstance(self.answer, FederationError):
            raise as_activity_error(self.answer)
        return await self._apply_reply(agent_id, self.answer)

    @activity.defn(name=m.RECORD_REQUESTER_FINAL)
    async def record_and_hold(self, final: m.RequesterFinal) -> m.RecordedFinal:
        kept = await self.record_requester_final(final)
        self.recorded.set()
        await self.hold_record.wait()
        return kept


@pytest.fixture
async def executor(pool: asyncpg.Pool) -> AsyncIterator[ScriptedExecutor]:
    async with httpx.AsyncClient() as http:
        yield ScriptedExecutor(pool, http)


@pytest.fixture
async def queue(
    client: Client, peer: ScriptedPeer, executor: ScriptedExecutor
) -> AsyncIterator[str]:
    name = f"kill-{uuid.uuid4()}"
    real = {m.DELIVER_KILL, m.RECORD_REQUESTER_FINAL}
    scripted = [a for a in peer.activities() if a.__temporal_activity_definition.name not in real]  # type: ignore[attr-defined]
    async with Worker(
        client,
        task_queue=name,
        workflows=[RemoteAgentWorkflow, KillDeliveryWorkflow],
        activities=[*scripted, executor.deliver_kill, executor.record_and_hold],
        max_heartbeat_throttle_interval=timedelta(seconds=0.1),
        default_heartbeat_throttle_interval=timedelta(seconds=0.1),
    ):
        yield name


async def requested_run(pool: asyncpg.Pool, *, state: str = "running") -> str:
    """A requester's row of a run on a peer, over an ACTIVE connection."""
    connection = await repos.insert_connection(
        pool,
        connection_id=uuid.uuid4(),
        remote_instance_id=f"spoke-{uuid.uuid4().hex[:8]}",
        remote_name="spoke",
        remote_url="http://127.0.0.1:9",
        remote_keys=[],
        direction="outbound",
        status=ConnectionStatus.ACTIVE,
    )
    agent_id = str(uuid.uuid4())
    await repos.insert_agent(
        pool,
        agent_id=uuid.UUID(agent_id),
        role="requester",
        connection_id=connection["connection_id"],
        peer_instance_id=connection["remote_instance_id"],
        task_id="t",
        agent_type="coder",
        context={},
        options={},
        workflow_id=m.remote_agent_workflow_id(agent_id),
        state=state,
    )
    await pool.execute(
        "UPDATE agents SET workflow_started = true, seq = 1 WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )
    return agent_id


async def row_of(pool: asyncpg.Pool, agent_id: str) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT * FROM agents WHERE role = 'requester' AND agent_id = $1", uuid.UUID(agent_id)
    )
    assert row is not None
    return dict(row)


async def ended_here(pool: asyncpg.Pool, state: str) -> str:
    """A requester's run this side ended (`state`) without the executor's word: kill pending."""
    agent_id = await requested_run(pool)
    await repos.force_requester_final(
        pool, uuid.UUID(agent_id), state=state, result=None, error="x", tell_executor=True
    )
    return agent_id


async def start_delivery(client: Client, queue: str, agent_id: str, **options: Any) -> Any:
    return await client.start_workflow(
        KillDeliveryWorkflow.run,
        m.KillDelivery(agent_id=agent_id, **{"first_retry_seconds": 0.2, **options}),
        id=m.kill_delivery_workflow_id(agent_id),
        task_queue=queue,
    )


async def completed_there(pool: asyncpg.Pool, agent_id: str) -> None:
    """The executor's final event (completed, seq 5) applied here, as the ingress does."""
    await repos.apply_requester_update(
        pool,
        uuid.UUID(agent_id),
        seq=5,
        state="completed",
        progress=None,
        result={"summary": "did it"},
        error=None,
    )


async def event_states(pool: asyncpg.Pool, agent_id: str) -> list[str]:
    """The states of the run's event log, in order."""
    events = await pool.fetch(
        "SELECT state FROM agent_events WHERE agent_id = $1 ORDER BY id", uuid.UUID(agent_id)
    )
    return [e["state"] for e in events]


def delivery(client: Client, agent_id: str) -> Any:
    return client.get_workflow_handle_for(
        KillDeliveryWorkflow.run, m.kill_delivery_workflow_id(agent_id)
    )


async def start_run(client: Client, queue: str, agent_id: str) -> Any:
    return await client.start_workflow(
        RemoteAgentWorkflow.run,
        spawn_input(agent_id, kill_deadline_seconds=2),
        id=m.remote_agent_workflow_id(agent_id),
        task_queue=queue,
    )


async def test_an_unconfirmed_kill_of_a_run_the_executor_had_completed_ends_completed_on_both(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """The kill could not reach the executor (answered `killed`, unconfirmed); meanwhile the
    run completed there. Once the delivery reaches it, the executor answers `completed` with
    its result: the requester records that (the kill came too late), not `killed` for ever."""
    peer.kill_error = ApplicationError("connect refused", type="peer_unreachable")
    agent_id = await requested_run(pool)
    handle = await start_run(client, queue, agent_id)
    await wait_for(lambda: peer.status_checks >= 1)
    answer = await kill(handle)
    assert (answer.state, answer.confirmed) == ("killed", False)
    assert (await final_status(handle)).state == "killed"
    assert (await row_of(pool, agent_id))["kill_delivery"] == "pending"

    executor.answer = {"state": "completed", "seq": 9, "result": {"summary": "did it"}}
    delivered = await asyncio.wait_for(delivery(client, agent_id).result(), 60)
    assert delivered.state == "completed"
    row = await row_of(pool, agent_id)
    assert (row["state"], row["result"], row["error"]) == (
        "completed",
        {"summary": "did it"},
        None,
    ), row
    assert (row["kill_delivery"], row["kill_confirmed"]) == ("too_late", True)
    assert "before the kill reached it" in row["kill_delivery_note"]
    events = await event_states(pool, agent_id)
    assert events[-1] == "completed"


async def test_a_kill_the_executor_confirms_keeps_the_requesters_end(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    peer.kill_error = ApplicationError("connect refused", type="peer_unreachable")
    agent_id = await requested_run(pool)
    handle = await start_run(client, queue, agent_id)
    await wait_for(lambda: peer.status_checks >= 1)
    assert (await kill(handle)).confirmed is False
    await final_status(handle)  # closed: its delivery has started
    executor.answer = {"state": "killed", "seq": 9, "error": "killed on request"}
    assert (await asyncio.wait_for(delivery(client, agent_id).result(), 60)).state == "killed"
    row = await row_of(pool, agent_id)
    assert row["state"] == "killed" and "not confirmed by spoke" in row["error"]
    assert (row["kill_delivery"], row["kill_confirmed"]) == ("confirmed", True)


async def test_a_requester_stopped_between_its_record_and_the_delivery_still_has_it_delivered(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """The workflow records `killed` (unconfirmed) and is terminated before it starts the
    delivery: the record marked the kill pending in the same statement, so the reconciler
    starts the delivery and the executor is told."""
    peer.kill_error = ApplicationError("connect refused", type="peer_unreachable")
    executor.hold_record.clear()
    agent_id = await requested_run(pool)
    handle = await start_run(client, queue, agent_id)
    await wait_for(lambda: peer.status_checks >= 1)
    killing = asyncio.create_task(kill(handle))
    await asyncio.wait_for(executor.recorded.wait(), 30)
    await handle.terminate("operator, right after the record")
    killing.cancel()
    executor.hold_record.set()
    assert (await row_of(pool, agent_id))["state"] == "killed"

    executor.answer = {"state": "killed", "seq": 9}
    await pool.execute(
        "UPDATE agents SET updated_at = now() - interval '1 minute' WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )
    await walk_from_the_start(pool)
    reconciler = Reconciler(pool, client, interval=0.01, batch=10_000, task_queue=queue)
    await reconciler.reconcile_once()
    assert (await asyncio.wait_for(delivery(client, agent_id).result(), 60)).state == "killed"
    assert agent_id in executor.kills
    assert (await row_of(pool, agent_id))["kill_delivery"] == "confirmed"


@pytest.mark.parametrize(
    "refusal",
    [
        PeerRefused("refused: sender_unknown", peer_code="sender_unknown", peer_status=401),
        PeerRefused("refused", peer_code="connection_not_active", peer_status=403),
    ],
    ids=["sender-unknown", "connection-not-active"],
)
async def test_a_kill_the_executor_refuses_for_good_is_settled_undeliverable_at_once(
    client: Client,
    queue: str,
    pool: asyncpg.Pool,
    executor: ScriptedExecutor,
    refusal: PeerRefused,
) -> None:
    """A refusal no retry can fix is not retried for 7 days: the kill is recorded as not
    deliverable, with the reason, and its delivery fails for an operator to see."""
    agent_id = await ended_here(pool, "killed")
    executor.answer = refusal
    handle = await start_delivery(client, queue, agent_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 30)
    assert executor.kills == [agent_id]  # asked once, not again
    row = await row_of(pool, agent_id)
    assert (row["state"], row["kill_delivery"], row["kill_confirmed"]) == (
        "killed",
        "undeliverable",
        False,
    )
    assert str(refusal.peer_code) in row["kill_delivery_note"]


async def test_a_kill_whose_connection_is_gone_is_settled_undeliverable(
    client: Client, queue: str, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    agent_id = await ended_here(pool, "timed_out")
    await pool.execute(
        "UPDATE agents SET connection_id = $2 WHERE agent_id = $1",
        uuid.UUID(agent_id),
        uuid.uuid4(),
    )
    handle = await start_delivery(client, queue, agent_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 30)
    row = await row_of(pool, agent_id)
    assert row["kill_delivery"] == "undeliverable"
    assert "connection" in row["kill_delivery_note"]
    assert executor.kills == []


async def test_a_delivery_that_ended_without_an_answer_is_settled_by_the_reconciler(
    client: Client, queue: str, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """Its delivery terminated (or given up) leaves the kill pending no longer: the reconciler
    says it is undeliverable and stops walking it (nothing is walked for ever)."""
    agent_id = await ended_here(pool, "killed")
    handle = await start_delivery(client, queue, agent_id, first_retry_seconds=5)
    await wait_for(lambda: executor.kills == [agent_id])
    await handle.terminate("operator")
    assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED
    await pool.execute(
        "UPDATE agents SET updated_at = now() - interval '1 minute' WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )
    await walk_from_the_start(pool)
    await Reconciler(pool, client, interval=0.01, batch=10_000, task_queue=queue).reconcile_once()
    row = await row_of(pool, agent_id)
    assert row["kill_delivery"] == "undeliverable"
    assert "terminated" in row["kill_delivery_note"]


async def test_a_cancel_whose_kill_the_executor_answered_not_final_is_still_delivered(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """Cancelling the requester's workflow kills the run; the executor answers the kill with a
    state not final (still `running`). The requester ends `killed` all the same, so the kill
    is still owed to the executor: it is marked pending and delivered (by the reconciler)."""

    async def still_running() -> m.KillResult:
        return m.KillResult(agent_id=agent_id, state=m.AgentState.RUNNING, seq=3)

    peer.kill_answer = still_running
    agent_id = await requested_run(pool)
    handle = await start_run(client, queue, agent_id)
    await wait_for(lambda: peer.status_checks >= 1)
    await handle.cancel()
    await final_status(handle)
    row = await row_of(pool, agent_id)
    assert (row["state"], row["kill_delivery"]) == ("killed", "pending"), row

    executor.answer = {"state": "killed", "seq": 9}
    await pool.execute(
        "UPDATE agents SET updated_at = now() - interval '1 minute' WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )
    await walk_from_the_start(pool)
    await Reconciler(pool, client, interval=0.01, batch=10_000, task_queue=queue).reconcile_once()
    assert (await asyncio.wait_for(delivery(client, agent_id).result(), 60)).state == "killed"
    assert (await row_of(pool, agent_id))["kill_delivery"] == "confirmed"


async def test_a_delivery_of_a_kill_settled_meanwhile_sends_nothing(
    client: Client, queue: str, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """The executor's own final event settled the kill (it had completed) while its delivery
    waited for the executor: the delivery's next try ends, telling it nothing."""
    agent_id = await ended_here(pool, "killed")
    await repos.settle_kill_delivery(
        pool,
        uuid.UUID(agent_id),
        outcome="too_late",
        note="by the event",
        answer={"state": "completed", "seq": 4, "result": {"summary": "s"}},
    )
    handle = await start_delivery(client, queue, agent_id)
    assert (await asyncio.wait_for(handle.result(), 30)).state == "completed"
    assert executor.kills == []
    assert (await row_of(pool, agent_id))["kill_delivery"] == "too_late"


async def test_no_such_run_on_the_executor_is_final_only_once_no_spawn_can_still_reach_it(
    client: Client, queue: str, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """The requester gave up on a spawn ("spawn not delivered"), but its last try was still in
    flight: the executor has no such run when the kill first reaches it, and takes the spawn
    just after. "No such run" is not the last word while a spawn may still arrive (its
    envelope's timestamp window), so the next try kills the run the late spawn started."""
    late, lost = await ended_here(pool, "failed"), await ended_here(pool, "failed")
    executor.answer = AgentNotFound("no such run here")
    handle = await start_delivery(client, queue, late, max_retry_seconds=0.5)
    await wait_for(lambda: executor.kills.count(late) >= 1)
    executor.answer = {"state": "killed", "seq": 2}  # the late spawn arrived, then the kill
    assert (await asyncio.wait_for(handle.result(), 30)).state == "killed"
    assert (await row_of(pool, late))["kill_delivery"] == "confirmed"

    # No spawn ever came: once the window is past, "no such run" settles the kill.
    executor.answer = AgentNotFound("no such run here")
    gone = await asyncio.wait_for(
        (await start_delivery(client, queue, lost, max_retry_seconds=1)).result(), 60
    )
    assert gone.confirmed is False
    row = await row_of(pool, lost)
    assert (row["state"], row["kill_delivery"]) == ("failed", "not_found")
    assert executor.kills.count(lost) >= 2  # asked again while a spawn could still arrive


async def test_a_run_that_completed_while_the_reconciler_looked_owes_the_executor_nothing(
    client: Client, queue: str, peer: ScriptedPeer, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """A round reads a run still open; before it asks Temporal, the executor's final event is
    applied and the workflow closes completed. The round's repair keeps that end (the store
    keeps the first final) and must not tell the executor to kill a run it completed: a kill
    delivered then came back `too_late` and recorded `completed` a second time in the run's
    event log (seen in tests/e2e/test_load.py: "an agent completed twice")."""
    agent_id = await requested_run(pool)
    handle = await start_run(client, queue, agent_id)
    await wait_for(lambda: peer.status_checks >= 1)
    await pool.execute(
        "UPDATE agents SET updated_at = now() - interval '1 minute' WHERE agent_id = $1",
        uuid.UUID(agent_id),
    )
    rows = await reconcile.open_runs(
        pool, after=None, quiet_seconds=0.01, start_grace=60, limit=100_000
    )
    stale = [r for r in rows if str(r["agent_id"]) == agent_id]
    assert [r["state"] for r in stale] == ["running"]

    done = m.AgentEvent(seq=5, state=m.AgentState.COMPLETED, result={"summary": "did it"})
    await completed_there(pool, agent_id)
    await handle.signal(RemoteAgentWorkflow.on_event, done)
    assert (await final_status(handle)).state == "completed"

    executor.answer = {"state": "completed", "seq": 5, "result": {"summary": "did it"}}
    reconciler = Reconciler(pool, client, interval=0.01, batch=10_000, task_queue=queue)
    assert await reconciler._repair(stale) == 0  # nothing to repair: it recorded its end
    with pytest.raises(RPCError) as started:
        await delivery(client, agent_id).describe()  # no kill delivery was started
    assert started.value.status == RPCStatusCode.NOT_FOUND
    events = await event_states(pool, agent_id)
    assert events.count("completed") == 1, events
    row = await row_of(pool, agent_id)
    assert (row["state"], row["kill_delivery"]) == ("completed", None)


async def test_a_delivery_of_a_run_that_owes_no_kill_sends_nothing(
    client: Client, queue: str, pool: asyncpg.Pool, executor: ScriptedExecutor
) -> None:
    """A delivery started for a run whose end came from the executor (no kill pending: one
    raced that end) tells the executor nothing and leaves the run as it is."""
    agent_id = await requested_run(pool)
    await completed_there(pool, agent_id)
    executor.answer = {"state": "completed", "seq": 5, "result": {"summary": "did it"}}
    handle = await start_delivery(client, queue, agent_id)
    assert (await asyncio.wait_for(handle.result(), 30)).state == "completed"
    assert executor.kills == []
    row = await row_of(pool, agent_id)
    assert (row["state"], row["kill_delivery"]) == ("completed", None)
    events = await event_states(pool, agent_id)
    assert events == ["completed"]


async def test_a_kill_settled_too_late_with_the_same_end_logs_no_second_event(
    pool: asyncpg.Pool,
) -> None:
    """The requester gave up on the spawn (`failed`, kill pending); the executor's answer is
    that the run had failed there on its own: its end is adopted (its error, its seq), and the
    event log does not say `failed` twice."""
    agent_id = await ended_here(pool, "failed")
    settled = await repos.settle_kill_delivery(
        pool,
        uuid.UUID(agent_id),
        outcome="too_late",
        note="ended there first",
        answer={"state": "failed", "seq": 4, "error": "the model refused"},
    )
    assert settled is not None and "state_before" not in settled
    assert (settled["state"], settled["error"], settled["seq"]) == (
        "failed",
        "the model refused",
        4,
    )
    events = await event_states(pool, agent_id)
    assert events == ["failed"]
