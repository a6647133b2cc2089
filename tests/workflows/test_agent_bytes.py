"""No byte an agent produces and no size of its output breaks a run, and a final the store can
never take closes the run instead of keeping it open for ever (the real workflows on the real
Temporal dev server, the real run and record activities, a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

import workflows.models as m
from activities.agents import AgentActivities
from activities.federation import FederationActivities
from federation.identity import ensure_identity
from federation.settings import Settings
from federation.store import artifacts, repos
from tests.agents.conftest import MessagesAPI, message, serve_messages_api, tool
from tests.workflows.peer import ScriptedPeer, spawn_input
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

# What a requester takes in one event; a result must stay well below it.
EVENT_LIMIT = 1024 * 1024
HANG_GUARD = 60.0  # seconds: a run still open after this never closes on its own


@dataclass
class ExecutedRun:
    requester: str
    agent_id: uuid.UUID

    def envelope(self, instructions: str) -> m.AgentRunInput:
        return m.AgentRunInput(
            envelope={
                "senderId": self.requester,
                "messageId": str(uuid.uuid4()),
                "payload": {
                    "agentId": str(self.agent_id),
                    "taskId": "t-bytes",
                    "agentType": "worker",
                    "context": {"instructions": instructions},
                    "options": {"timeout": 120, "maxRetries": 0},
                },
            },
            received_at="2026-12-01T00:00:00Z",
        )


@pytest.fixture
async def executed(pool: asyncpg.Pool) -> AsyncIterator[ExecutedRun]:
    """An executor's record of a run for a peer whose connection is ACTIVE (its address
    answers nothing: events are best effort); removed afterwards, as other tests count the
    runs of this database."""
    run = ExecutedRun(f"hub-{uuid.uuid4().hex[:8]}", uuid.uuid4())
    connection_id = uuid.uuid4()
    await repos.insert_connection(
        pool,
        connection_id=connection_id,
        remote_instance_id=run.requester,
        remote_name="hub",
        remote_url="http://127.0.0.1:9",
        remote_keys=[],
        direction="inbound",
        status="ACTIVE",
        grants={"commandTypes": ["agent.spawn", "agent.status"], "agentTypes": ["worker"]},
    )
    await repos.insert_agent(
        pool,
        agent_id=run.agent_id,
        role="executor",
        connection_id=connection_id,
        peer_instance_id=run.requester,
        task_id="t-bytes",
        agent_type="worker",
        context={},
        options={},
        workflow_id=m.agent_run_workflow_id(run.requester, str(run.agent_id)),
        state="spawning",
    )
    yield run
    await pool.execute("DELETE FROM agents WHERE peer_instance_id = $1", run.requester)


@dataclass
class RealActivities:
    federation: FederationActivities
    agents: AgentActivities


@pytest.fixture
def messages_api() -> Iterator[MessagesAPI]:
    with serve_messages_api() as api:
        yield api


@pytest.fixture
async def real(
    pool: asyncpg.Pool, tmp_path: Path, messages_api: MessagesAPI
) -> AsyncIterator[RealActivities]:
    """The real activities, running agents in the process sandbox with the Anthropic provider
    talking to a local server that speaks the Messages API (`messages_api`)."""
    settings = Settings(  # type: ignore[call-arg]
        instance_name="unit",
        data_dir=tmp_path,
        sandbox="process",
        heartbeat_interval=0.5,
        model_provider="anthropic",
        anthropic_api_key="test-key",
        anthropic_base_url=messages_api.url,
    )
    # Each try checks the spawn against the instance's own card (the agent types it offers).
    await ensure_identity(pool, name="unit", public_url="http://127.0.0.1:9")
    async with httpx.AsyncClient() as http:
        yield RealActivities(
            FederationActivities(pool, http, settings), AgentActivities(pool, http, settings)
        )


@asynccontextmanager
async def worker(
    client: Client, peer: ScriptedPeer, *real: Callable[..., Any]
) -> AsyncIterator[str]:
    """A task queue served by both workflows, these real activities and the scripted peer
    for the other activities."""
    names = {fn.__name__ for fn in real}
    scripted = [fn for fn in peer.activities() if fn.__name__ not in names]
    queue = f"wf-bytes-{uuid.uuid4()}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[RemoteAgentWorkflow, AgentRunWorkflow],
        activities=[*scripted, *real],
        max_heartbeat_throttle_interval=timedelta(seconds=0.1),
        default_heartbeat_throttle_interval=timedelta(seconds=0.1),
    ):
        yield queue


async def closed(handle: Any) -> BaseException | None:
    """Wait for the workflow to close; the failure it closed with, if any. One still open
    after HANG_GUARD is terminated (so its worker can stop) and the test fails."""
    try:
        async with asyncio.timeout(HANG_GUARD):
            await handle.result()
    except WorkflowFailureError as exc:
        return exc.cause
    except TimeoutError:
        await handle.terminate("the test gave up waiting")
        raise AssertionError(f"{handle.id} did not close within {HANG_GUARD} s") from None
    return None


async def run_executor(client: Client, queue: str, run: ExecutedRun, instructions: str) -> Any:
    return await client.start_workflow(
        AgentRunWorkflow.run,
        run.envelope(instructions),
        id=m.agent_run_workflow_id(run.requester, str(run.agent_id)),
        task_queue=queue,
    )


async def test_a_run_with_megabytes_of_commands_and_summary_completes_with_a_bounded_result(
    client: Client,
    pool: asyncpg.Pool,
    peer: ScriptedPeer,
    real: RealActivities,
    executed: ExecutedRun,
    messages_api: MessagesAPI,
) -> None:
    # The model writes 22 files of 100,000 characters with heredocs (2.2 MB of commands, past
    # Temporal's 2 MiB) and finishes with a summary quoting all of them.
    heredocs = [f"cat > f{n:02d} <<'EOF'\n{n:02d}{'x' * 100_000}\nEOF" for n in range(22)]
    summary = "Wrote 22 files:\n" + "\n".join(heredocs)
    messages_api.script(
        *(message(tool("run_command", f"toolu_{n}", command=c)) for n, c in enumerate(heredocs)),
        message(tool("finish", "toolu_end", summary=summary, success=True)),
    )
    async with worker(
        client, peer, real.agents.run_agent, real.federation.record_run_final
    ) as queue:
        handle = await run_executor(client, queue, executed, "write the files")
        assert await closed(handle) is None
    row = await repos.get_executed_agent(pool, executed.requester, executed.agent_id)
    assert row is not None and row["state"] == "completed", row
    result = row["result"]
    assert len(json.dumps(result, ensure_ascii=False).encode()) < EVENT_LIMIT // 4
    assert result["exitCodes"] == [0] * 22
    last = result["commands"][-1]
    assert last["commandTruncated"] and last["commandChars"] == len(heredocs[-1])
    assert last["command"].startswith("cat > f21 <<'EOF'\n21xxx")
    assert "the whole is in the run's log" in last["command"]
    assert result["summaryTruncated"] and result["summaryChars"] == len(summary)
    assert result["summary"].startswith("Wrote 22 files:\ncat > f00")
    # The whole of each is kept: the log artifact holds every command and the whole summary.
    stored = await artifacts.get(pool, result["logSha256"])
    assert stored is not None
    log = (await artifacts.read_all(pool, stored)).decode()
    assert log.count("x" * 100_000) == 44


async def test_a_final_the_store_refuses_ends_the_run_failed_with_the_reason(
    client: Client,
    pool: asyncpg.Pool,
    peer: ScriptedPeer,
    real: RealActivities,
    executed: ExecutedRun,
) -> None:
    peer.release_run.set()
    peer.run_outcome = m.AgentOutcome(summary="done", result={"summary": "done", "poison": 1})
    async with (
        refusing_poisoned_results(pool),
        worker(client, peer, real.federation.record_run_final) as queue,
    ):
        handle = await run_executor(client, queue, executed, "$ true")
        assert await closed(handle) is not None  # Failed in Temporal too, with the reason
        status = await handle.query(AgentRunWorkflow.status)
    row = await repos.get_executed_agent(pool, executed.requester, executed.agent_id)
    assert row is not None and row["state"] == "failed", row
    assert "the store refused its final record" in row["error"]
    assert row["result"]["stopReason"] == "store_refused"
    assert (status.state, status.result) == ("failed", row["result"])


async def test_a_store_that_refuses_every_final_record_closes_the_run_instead_of_hanging(
    client: Client,
    pool: asyncpg.Pool,
    peer: ScriptedPeer,
    real: RealActivities,
    executed: ExecutedRun,
) -> None:
    name = f"refuse_{executed.agent_id.hex}"
    await pool.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'no final here' USING ERRCODE = '22023'; END $$;"
        f" CREATE TRIGGER {name} BEFORE UPDATE ON agents FOR EACH ROW"
        f" WHEN (NEW.agent_id = '{executed.agent_id}' AND NEW.state <> 'running')"
        f" EXECUTE FUNCTION {name}()"
    )
    peer.release_run.set()
    try:
        async with worker(client, peer, real.federation.record_run_final) as queue:
            handle = await run_executor(client, queue, executed, "$ true")
            failure = await closed(handle)
    finally:
        await pool.execute(f"DROP TRIGGER {name} ON agents; DROP FUNCTION {name}()")
    assert failure is not None and m.STORE_REFUSED in repr_chain(failure)
    # The row is the reconciler's to repair: its workflow has closed.
    row = await repos.get_executed_agent(pool, executed.requester, executed.agent_id)
    assert row is not None and row["state"] == "spawning"


async def test_a_requester_final_the_store_refuses_ends_the_run_failed_with_the_reason(
    client: Client, pool: asyncpg.Pool, peer: ScriptedPeer, real: RealActivities
) -> None:
    agent_id = str(uuid.uuid4())
    await repos.insert_agent(
        pool,
        agent_id=uuid.UUID(agent_id),
        role="requester",
        connection_id=uuid.uuid4(),
        peer_instance_id="spoke",
        task_id="t-1",
        agent_type="coder",
        context={},
        options={},
        workflow_id=m.remote_agent_workflow_id(agent_id),
        state="spawning",
    )
    peer.spawn_answer = m.AgentEvent(seq=2, state=m.AgentState.COMPLETED, result={"poison": 1})
    async with (
        refusing_poisoned_results(pool),
        worker(client, peer, real.federation.record_requester_final) as queue,
    ):
        handle = await client.start_workflow(
            RemoteAgentWorkflow.run,
            spawn_input(agent_id),
            id=m.remote_agent_workflow_id(agent_id),
            task_queue=queue,
        )
        await closed(handle)
    row = await repos.get_requested_agent(pool, uuid.UUID(agent_id))
    assert row is not None and row["state"] == "failed", row
    assert "the store refused its final record" in row["error"]


@asynccontextmanager
async def refusing_poisoned_results(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """The store refuses (SQLSTATE 22023, a data exception) any agent row whose result holds
    a "poison" key: a value it can never take, as jsonb once refused NaN."""
    name = f"poison_{uuid.uuid4().hex}"
    await pool.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'poisoned result' USING ERRCODE = '22023'; END $$;"
        f" CREATE TRIGGER {name} BEFORE UPDATE ON agents FOR EACH ROW"
        f" WHEN (NEW.result ? 'poison') EXECUTE FUNCTION {name}()"
    )
    try:
        yield
    finally:
        await pool.execute(f"DROP TRIGGER {name} ON agents; DROP FUNCTION {name}()")


def repr_chain(err: BaseException | None) -> str:
    parts = []
    while err is not None:
        parts.append(f"{type(err).__name__}: {getattr(err, 'type', '')} {err}")
        err = err.__cause__ or getattr(err, "cause", None)
    return " <- ".join(parts)
