"""Checkpoints append what a turn added: a 50-turn conversation writes (PostgreSQL WAL, the
bytes the store really wrote) at most twice the bytes of its final checkpoint, not the
conversation again at every step (real PostgreSQL, the real agent loop and checkpoint sink,
the process sandbox)."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import asyncpg

from activities.conversation import StoreSink
from agents.conversation import ConversationState
from agents.models import ModelTurn, ToolCall, ToolOutcome
from agents.runtime import RuntimeConfig, run_agent_task
from federation.store import conversations

TURNS = 50


async def wal_bytes(pool: asyncpg.Pool) -> int:
    """Bytes PostgreSQL has written to its write-ahead log so far."""
    return int(await pool.fetchval("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint"))


async def test_a_50_turn_conversation_writes_at_most_twice_its_final_checkpoint(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    agent_id = uuid.uuid4()
    sink = StoreSink(
        pool, requester_id="hub-bytes", agent_id=agent_id, attempt=1, transcript_limit=10**8
    )
    await sink.load()
    # Each command prints ~1 KB that does not compress: what a turn adds is about that.
    instructions = "\n".join(f"$ echo {secrets.token_hex(500)}" for _ in range(TURNS - 1))
    await pool.execute("CHECKPOINT")  # full-page images of touched pages come once, now
    before = await wal_bytes(pool)
    report = await run_agent_task(
        workspace=tmp_path / "ws",
        agent_type="worker",
        context={"instructions": instructions},
        config=RuntimeConfig(sandbox="process"),
        sink=sink,
    )
    written = await wal_bytes(pool) - before
    assert report.success and report.turns == TURNS, report.summary
    saved = await conversations.load_checkpoint(pool, "hub-bytes", agent_id, 1)
    assert saved is not None and len(saved["state"]["messages"]) == 2 * TURNS
    transcript = await conversations.transcript_after(
        pool, "hub-bytes", agent_id, 0, limit=10_000, max_bytes=10**9
    )
    final = len(json.dumps(saved["state"]).encode()) + sum(
        len(json.dumps(e).encode()) for e in transcript
    )
    print(f"{TURNS} turns: {written:,} bytes written, final checkpoint {final:,} bytes")
    assert written <= 2 * final


async def test_a_checkpoint_saved_step_by_step_loads_as_the_conversation_it_was(
    pool: asyncpg.Pool,
) -> None:
    """What each save left out (items saved before, the log before the step) is put back:
    the loaded state is the state last saved, also after a resumed try's sink saves it."""
    agent_id = uuid.uuid4()
    first = StoreSink(
        pool, requester_id="hub", agent_id=agent_id, attempt=1, transcript_limit=10**6
    )
    state = ConversationState()
    log = ""
    for turn in range(1, 8):
        call = ToolCall(f"call-{turn}", "run_command", {"command": f"echo {turn}"})
        outcomes: list[ToolOutcome] = []
        state.turns.append((ModelTurn(text=f"turn {turn}", tool_calls=(call,)), outcomes))
        state.turn_count = turn
        await first.save(state, [{"kind": "assistant", "turn": turn}])
        outcomes.append(ToolOutcome(call.id, f"{turn}\n" * 300, exit_code=0))  # changes a message
        state.commands.append({"command": f"echo {turn}", "exitCode": 0})
        log += f"$ echo {turn}\n" + f"{turn}\n" * 300
        state.log_tail, state.log_length = log[-1000:], len(log)
        await first.save(state, [])
    expected = state.to_json()
    saved = await conversations.load_checkpoint(pool, "hub", agent_id, 1)
    assert saved is not None
    assert {k: v for k, v in saved["state"].items() if k != "writer"} == expected

    # A later attempt takes the try over: its sink's first save writes the lists whole.
    claimed = await conversations.claim_checkpoint(pool, "hub", agent_id, 1, writer=2)
    assert claimed is not None
    resumed = ConversationState.from_json(claimed["state"])
    assert resumed.to_json() == expected
    resumed.turns.pop()  # shorter lists are saved shorter
    resumed.commands.pop()
    resumed.log_tail, resumed.log_length = "new log", 7
    second = StoreSink(
        pool, requester_id="hub", agent_id=agent_id, attempt=1, transcript_limit=10**6, writer=2
    )
    await second.save(resumed, [])
    saved = await conversations.load_checkpoint(pool, "hub", agent_id, 1)
    assert saved is not None
    assert {k: v for k, v in saved["state"].items() if k != "writer"} == resumed.to_json()
