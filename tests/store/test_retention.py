"""Retention on a real PostgreSQL: what ended runs leave goes after its time, nothing of a run
that has not ended goes, and shared artifact content goes only once no run refers to it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from federation.settings import Settings
from federation.store import artifacts, retention
from federation.store.jobs import instance_job
from operations.retention import STORE_JOB, collect_store, run_periodically, sweep_workspaces

if TYPE_CHECKING:
    from tests.store.conftest import NewDatabase

HOUR = 3600.0
POLICY = retention.Retention(run_data=HOUR, artifacts=HOUR, runs=HOUR)
CHUNK = 4096


@pytest.fixture
async def pool(server: Any, new_database: NewDatabase) -> AsyncIterator[asyncpg.Pool]:
    async with new_database(server, "retention") as pool:  # a database per test
        yield pool


@dataclass(frozen=True)
class Run:
    role: str
    peer: str
    agent_id: uuid.UUID


async def add_run(
    pool: asyncpg.Pool, *, role: str, state: str, ended_ago: float | None, age: float = 2 * HOUR
) -> Run:
    """A run with a row of every kind, all written `age` seconds ago; ended `ended_ago`."""
    run = Run(role, f"peer-{uuid.uuid4().hex[:6]}", uuid.uuid4())
    when = f"now() - make_interval(secs => {age})"
    ended = f"now() - make_interval(secs => {ended_ago})" if ended_ago is not None else "NULL"
    await pool.execute(
        "INSERT INTO agents (agent_id, role, connection_id, peer_instance_id, task_id, agent_type,"
        " context, options, workflow_id, state, created_at, updated_at, finished_at)"
        f" VALUES ($1, $2, $3, $4, 't', 'worker', '{{}}', '{{}}', 'wf', $5, {when}, {when},"
        f" {ended})",
        run.agent_id,
        role,
        uuid.uuid4(),
        run.peer,
        state,
    )
    payload = json.dumps({"agentId": str(run.agent_id), "pad": "x" * 200})
    await pool.execute(
        "INSERT INTO messages (message_id, direction, type, sender_id, recipient_id, agent_id,"
        f" payload, created_at) VALUES ($1, 'in', 'COMMAND', 'a', 'b', $2, $3, {when})",
        uuid.uuid4().hex,
        run.agent_id,
        payload,
    )
    if role == "requester":
        await pool.execute(
            f"INSERT INTO agent_events (agent_id, seq, state, at) VALUES ($1, 1, $2, {when})",
            run.agent_id,
            state,
        )
        await pool.execute(
            "INSERT INTO requested_transcript (agent_id, seq, entry, received_at)"
            f" VALUES ($1, 1, '{{}}', {when})",
            run.agent_id,
        )
    else:
        await pool.execute(
            "INSERT INTO agent_transcript (requester_id, agent_id, seq, attempt, entry, bytes)"
            " VALUES ($1, $2, 1, 1, '{}', 2)",
            run.peer,
            run.agent_id,
        )
        await pool.execute(
            "INSERT INTO agent_conversations (requester_id, agent_id, attempt, state, updated_at)"
            f" VALUES ($1, $2, 1, '{{}}', {when})",
            run.peer,
            run.agent_id,
        )
    return run


async def link(pool: asyncpg.Pool, run: Run, kind: str, data: bytes, age: float = 2 * HOUR) -> str:
    stored = await artifacts.put_bytes(pool, data, max_bytes=1 << 20, chunk_bytes=CHUNK)
    await artifacts.link(
        pool,
        role=run.role,
        peer_instance_id=run.peer,
        agent_id=run.agent_id,
        kind=kind,
        artifact=stored,
    )
    for table in ("artifacts", "agent_artifacts"):
        await pool.execute(
            f"UPDATE {table} SET created_at = now() - make_interval(secs => $2) WHERE sha256 = $1",
            stored.sha256,
            age,
        )
    return stored.sha256


async def rows_of(pool: asyncpg.Pool, run: Run) -> dict[str, int]:
    """How many rows of each kind the run still has."""
    found = {}
    for kind, sql in {
        "runs": "SELECT count(*) FROM agents WHERE agent_id = $1",
        "messages": "SELECT count(*) FROM messages WHERE agent_id = $1",
        "events": "SELECT count(*) FROM agent_events WHERE agent_id = $1",
        "transcripts": "SELECT (SELECT count(*) FROM agent_transcript WHERE agent_id = $1)"
        " + (SELECT count(*) FROM requested_transcript WHERE agent_id = $1)",
        "checkpoints": "SELECT count(*) FROM agent_conversations WHERE agent_id = $1",
        "artifacts": "SELECT count(*) FROM agent_artifacts WHERE agent_id = $1",
    }.items():
        found[kind] = int(await pool.fetchval(sql, run.agent_id))
    return found


async def content(pool: asyncpg.Pool, sha256: str) -> tuple[int, int]:
    return (
        int(await pool.fetchval("SELECT count(*) FROM artifacts WHERE sha256 = $1", sha256)),
        int(await pool.fetchval("SELECT count(*) FROM artifact_chunks WHERE sha256 = $1", sha256)),
    )


async def test_ended_runs_rows_go_after_their_time_and_open_runs_keep_theirs(
    pool: asyncpg.Pool,
) -> None:
    ended = [
        await add_run(pool, role="executor", state="completed", ended_ago=2 * HOUR),
        await add_run(pool, role="requester", state="killed", ended_ago=2 * HOUR),
    ]
    # Open for days (quiet, old rows), and one that ended a minute ago: all of theirs stays.
    kept = [
        await add_run(pool, role="executor", state="running", ended_ago=None, age=9 * 24 * HOUR),
        await add_run(pool, role="requester", state="pending", ended_ago=None, age=9 * 24 * HOUR),
        await add_run(pool, role="executor", state="failed", ended_ago=60),
    ]
    before = {run.agent_id: await rows_of(pool, run) for run in ended + kept}
    shared = os.urandom(3 * CHUNK)
    only_ended = os.urandom(2 * CHUNK)
    shared_sha = await link(pool, ended[0], "diff", shared)
    await link(pool, kept[0], "diff", shared)
    gone_sha = await link(pool, ended[1], "log", only_ended)

    deleted = await collect_store(pool, retention_policy=POLICY)

    for run in ended:
        assert set((await rows_of(pool, run)).values()) == {0}, run
    for run in kept:
        assert await rows_of(pool, run) == {**before[run.agent_id], "artifacts": 0} | (
            {"artifacts": 1} if run == kept[0] else {}
        ), run
    assert await content(pool, shared_sha) == (1, 3)  # a running run still refers to it
    assert await content(pool, gone_sha) == (0, 0)
    assert deleted["runs"].rows == 2
    assert deleted["messages"].rows == 2
    assert deleted["events"].rows == 1
    assert deleted["transcripts"].rows == 2
    assert deleted["checkpoints"].rows == 1
    assert deleted["artifacts"].rows == 2
    assert deleted["artifact_content"] == retention.Amount(rows=1, bytes=len(only_ended))
    # Nothing more to do: a second pass deletes nothing.
    again = await collect_store(pool, retention_policy=POLICY)
    assert {kind: amount.rows for kind, amount in again.items()} == dict.fromkeys(again, 0)


async def test_a_dry_run_deletes_nothing_and_counts_what_a_run_deletes(
    pool: asyncpg.Pool,
) -> None:
    for role in ("executor", "requester"):
        run = await add_run(pool, role=role, state="completed", ended_ago=2 * HOUR)
        await link(pool, run, "log", os.urandom(CHUNK + 1))
    await add_run(pool, role="executor", state="running", ended_ago=None)
    stored_before = await retention.stored(pool)

    dry = await collect_store(pool, retention_policy=POLICY, dry_run=True)

    assert await retention.stored(pool) == stored_before
    assert dry["runs"].rows == 2
    # Content that only expired links refer to is counted as the real pass deletes it.
    assert dry["artifact_content"] == retention.Amount(rows=2, bytes=2 * (CHUNK + 1))
    real = await collect_store(pool, retention_policy=POLICY)
    assert real == dry
    assert await retention.stored(pool) != stored_before
    nothing = await collect_store(pool, retention_policy=POLICY, dry_run=True)
    assert {kind: amount.rows for kind, amount in nothing.items()} == dict.fromkeys(nothing, 0)


async def test_content_stored_again_is_not_taken_for_unreferenced(pool: asyncpg.Pool) -> None:
    """A run stores its diff, then links it: content already kept, no longer referred to and
    old, stored again by a new run, survives a pass between the two steps."""
    data = os.urandom(CHUNK)
    old = await add_run(pool, role="executor", state="completed", ended_ago=2 * HOUR)
    sha = await link(pool, old, "diff", data)
    await pool.execute("DELETE FROM agent_artifacts WHERE sha256 = $1", sha)
    again = await artifacts.put_bytes(pool, data, max_bytes=1 << 20, chunk_bytes=CHUNK)
    await collect_store(pool, retention_policy=POLICY)
    assert await content(pool, again.sha256) == (1, 1)
    assert hashlib.sha256(data).hexdigest() == sha


async def test_the_periodic_job_runs_only_where_it_holds_the_instance_lock(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    run = await add_run(pool, role="executor", state="completed", ended_ago=2 * HOUR)
    settings = Settings(
        data_dir=tmp_path,
        run_data_retention=HOUR,
        artifact_retention=HOUR,
        run_retention=HOUR,
        retention_interval=0.2,
    )
    stop = asyncio.Event()
    async with instance_job(pool, STORE_JOB) as held:  # another process of the instance runs it
        assert held
        job = asyncio.create_task(run_periodically(pool, settings, stop))
        await asyncio.sleep(1.0)
        assert (await rows_of(pool, run))["runs"] == 1
    try:
        for _ in range(100):  # freed: this process takes the job on its next pass
            if (await rows_of(pool, run))["runs"] == 0:
                break
            await asyncio.sleep(0.1)
        assert set((await rows_of(pool, run)).values()) == {0}
    finally:
        stop.set()
        await job


async def test_workspaces_go_once_their_run_ended_and_never_while_it_runs(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, instance_name="doer")
    running = await add_run(pool, role="executor", state="running", ended_ago=None)
    ended = await add_run(pool, role="executor", state="completed", ended_ago=5)
    just_ended = await add_run(pool, role="executor", state="failed", ended_ago=1)
    unknown = Run("executor", running.peer, uuid.uuid4())  # its record went (retention)
    made: dict[uuid.UUID, list[Path]] = {}
    for run in (running, ended, just_ended, unknown):
        peer = settings.workspaces_dir / run.peer
        peer.mkdir(parents=True, exist_ok=True)
        name = str(run.agent_id)
        paths = [peer / name, peer / f".{name}.baseline.git", peer / f".{name}.tmp"]
        for path in paths:
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "data").write_bytes(os.urandom(64 * 1024))
        (peer / f".{name}.diff").write_bytes(b"diff --git")
        made[run.agent_id] = [*paths, peer / f".{name}.diff"]
    other = settings.workspaces_dir / running.peer / "not-a-run"
    other.write_text("left alone")

    kept_for_3s = settings.model_copy(update={"workspace_retention": 3.0})
    dry = await sweep_workspaces(pool, kept_for_3s, dry_run=True)
    assert all(path.exists() for paths in made.values() for path in paths)
    swept = await sweep_workspaces(pool, kept_for_3s)

    assert swept.rows == dry.rows == 2 and swept.bytes == dry.bytes >= 2 * 3 * 64 * 1024
    for run in (ended, unknown):
        assert not any(path.exists() for path in made[run.agent_id]), run
    for run in (running, just_ended):
        assert all(path.exists() for path in made[run.agent_id]), run
    assert other.read_text() == "left alone"


async def test_commands_users_sent_go_after_their_time(pool: asyncpg.Pool) -> None:
    """`POST /federation/command` keeps each command with its payload and answer: without a
    rule of their own they would only ever grow."""

    async def command(age: float) -> uuid.UUID:
        command_id = uuid.uuid4()
        await pool.execute(
            "INSERT INTO commands (command_id, workspace, actor, connection_id,"
            " peer_instance_id, command_type, payload, message_id, status, response, created_at)"
            " VALUES ($1, 'default', 'alice', $2, 'spoke', 'agent.status', '{\"pad\": 1}', $3,"
            " 'answered', '{}', now() - make_interval(secs => $4))",
            command_id,
            uuid.uuid4(),
            uuid.uuid4().hex,
            age,
        )
        return command_id

    old, recent = await command(2 * HOUR), await command(60)
    dry = await collect_store(pool, retention_policy=POLICY, dry_run=True)
    await collect_store(pool, retention_policy=POLICY)
    left = {r["command_id"] for r in await pool.fetch("SELECT command_id FROM commands")}
    assert left == {recent}
    assert old not in left
    assert dry["messages"].rows == 1


async def test_a_run_whose_kill_is_still_being_delivered_keeps_its_record(
    pool: asyncpg.Pool,
) -> None:
    """The delivery of a kill the requester decided reads the run's record on each try, and
    ends ("no such run") once it is gone: the record stays while a delivery may still try,
    and goes once no delivery can (it gives up after a week)."""
    delivering = await add_run(pool, role="requester", state="killed", ended_ago=2 * HOUR)
    given_up = await add_run(pool, role="requester", state="killed", ended_ago=8 * 24 * HOUR)
    confirmed = await add_run(pool, role="requester", state="killed", ended_ago=2 * HOUR)
    for run, flag in ((delivering, False), (given_up, False), (confirmed, True)):
        await pool.execute(
            "UPDATE agents SET kill_confirmed = $2 WHERE agent_id = $1", run.agent_id, flag
        )
    await collect_store(pool, retention_policy=POLICY)
    assert (await rows_of(pool, delivering))["runs"] == 1
    assert (await rows_of(pool, given_up))["runs"] == 0
    assert (await rows_of(pool, confirmed))["runs"] == 0
