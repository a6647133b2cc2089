"""Any bytes an agent produces reach the store, and come back, as readable text: command output,
files it reads, file names, what the model sends (real PostgreSQL: the checkpoint, the
transcript and the run's record, written and read the way the activities do)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activities.conversation import StoreSink
from agents.conversation import (
    TRANSCRIPT_OUTPUT,
    ConversationState,
    head_tail,
    result_entry,
    turn_entries,
)
from agents.loop import AgentRunReport
from agents.models import ModelTurn, ToolCall, ToolOutcome
from agents.sandbox.base import BoundedBuffer
from agents.sandbox.process import ProcessSandbox
from agents.text import clean, clean_json, text_of
from agents.tools import ToolRunner, tools_for
from federation.envelope import canonical_bytes
from federation.store import conversations, repos

OUTPUT_LIMIT = 2048
# Bytes that tend to break text: NUL, bytes that are not UTF-8, cut characters, UTF-8 encoded
# surrogates, what looks like an escape already, terminal escapes.
ODD_BYTES = st.sampled_from(
    [b"\x00", b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xed\xb3\xbf", "é".encode()]
    + ["😀".encode(), "😀".encode()[:3], b"\\x00", b"\\", b"\n", b"a", b"\x1b[31m", b"\t"]
)
RAW = st.one_of(
    st.binary(max_size=3000),
    st.lists(ODD_BYTES, max_size=300).map(b"".join),
    # Long UTF-8 text of multi-byte characters: head and tail are cut inside characters.
    st.text(st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), min_size=1100).map(
        str.encode
    ),
)
# What a model's JSON or a name decoded with surrogateescape can hold: any code point.
MODEL_TEXT = st.text(
    st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.just("\x00")),
    max_size=200,
)
CHUNKS = st.lists(st.integers(1, 700), max_size=8)


def unescape(text: str) -> bytes:
    """The rule undone (for bytes that held no backslash of their own)."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode())


def is_plain_text(raw: bytes) -> bool:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return False
    return "\x00" not in text and "\\" not in text


def output_of(raw: bytes, chunks: list[int]) -> str:
    """A command's output as the sandboxes read it: in pieces, head and tail kept."""
    buffer = BoundedBuffer(OUTPUT_LIMIT)
    at = 0
    for size in chunks:
        buffer.feed(raw[at : at + size])
        at += size
    buffer.feed(raw[at:])
    return buffer.text()


def assert_travels(value: Any) -> None:
    """Fit for every channel: UTF-8 JSON (REST, SSE, events), canonical JSON (signatures),
    and readable (no NUL, no lone surrogate)."""
    wire = json.dumps(value, ensure_ascii=False)
    assert "\x00" not in wire
    wire.encode("utf-8")
    canonical_bytes(value)


async def executor_row(pool: asyncpg.Pool, requester: str, agent_id: uuid.UUID) -> None:
    await repos.insert_agent(
        pool,
        agent_id=agent_id,
        role="executor",
        connection_id=uuid.uuid4(),
        peer_instance_id=requester,
        task_id="t",
        agent_type="worker",
        context={},
        options={},
        workflow_id=f"agent-run/{requester}/{agent_id}",
        state="running",
    )


async def through_the_store(pool: asyncpg.Pool, raw: bytes, chunks: list[int], said: str) -> None:
    """One run's step with these bytes as a command's output and `said` as what the model
    sent: checkpointed with its transcript, then recorded as the run's final result."""
    agent_id = uuid.uuid4()
    output = output_of(raw, chunks)
    call = ToolCall("toolu_1", "run_command", {"command": said})
    raw_block = {"type": "tool_use", "id": "toolu_1", "name": "run_command", "input": call.input}
    turn = ModelTurn(text=said, tool_calls=(call,), model="m", raw=(raw_block,))
    outcome = ToolOutcome("toolu_1", f"{output}\n[exit code 0]", False, 0)
    state = ConversationState(
        turns=[(turn, [outcome])],
        turn_count=1,
        commands=[{"command": said, "exitCode": 0, "timedOut": False}],
        log_tail=output,
    )
    sink = StoreSink(pool, requester_id="hub", agent_id=agent_id, attempt=1, transcript_limit=10**7)
    await sink.save(state, [*turn_entries(1, turn), result_entry(1, call, outcome)])

    saved = await conversations.load_checkpoint(pool, "hub", agent_id, 1)
    assert saved is not None
    back = ConversationState.from_json(saved["state"])
    # The output became text once, by the rule: the store keeps that text exactly.
    assert back.turns[0][1][0].content == outcome.content and back.log_tail == output
    # What the model sent is kept by the same rule.
    assert back == ConversationState.from_json(clean_json(state.to_json()))
    assert back.turns[0][0].tool_calls[0].input["command"] == clean(said)
    entries = await conversations.transcript_after(pool, "hub", agent_id, 0)
    assert [e["kind"] for e in entries] == ["assistant", "tool_call", "tool_result"]
    assert entries[2]["output"] == head_tail(outcome.content, TRANSCRIPT_OUTPUT)[0]
    assert_travels(saved["state"])
    assert_travels(entries)
    if len(raw) <= OUTPUT_LIMIT and b"\\" not in raw:
        assert unescape(output) == raw  # readable, and nothing lost
    if is_plain_text(raw):
        assert "\\x" not in output  # text stays text, also where head and tail were cut

    report = AgentRunReport(
        success=True,
        summary=said,
        commands=state.commands,
        log_tail=output,
        diff_preview=text_of(raw),
        changed_files=[os.fsdecode(raw[:200] or b"x"), said],
    )
    result = report.as_result()
    await executor_row(pool, "hub", agent_id)
    row = await repos.update_executed_agent(
        pool, "hub", agent_id, state="completed", result=result, error=said
    )
    assert row is not None
    assert row["result"] == result  # already safe: kept as it is
    assert row["error"] == clean(said)
    assert_travels(repos.agent_report(row))  # the final event's payload


async def test_random_bytes_from_an_agent_are_stored_and_read_back_readably(
    pool: asyncpg.Pool,
) -> None:
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(raw=RAW, chunks=CHUNKS, said=MODEL_TEXT)
    def property_holds(raw: bytes, chunks: list[int], said: str) -> None:
        step = through_the_store(pool, raw, chunks, said)
        asyncio.run_coroutine_threadsafe(step, loop).result(timeout=60)

    # Hypothesis drives from a thread; each example runs on this loop, against the pool.
    await asyncio.to_thread(property_holds)


async def test_a_file_with_a_late_nul_and_a_name_not_utf8_are_read_and_checkpointed(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # Text for its first 8 KiB (so not refused as binary), then a NUL and a byte not UTF-8.
    (workspace / "data.txt").write_bytes(b"x" * 9000 + b"\x00\xffend\n")
    (workspace / os.fsdecode(b"bad\xffname")).write_bytes(b"odd\n")
    sandbox = ProcessSandbox(workspace)
    await sandbox.start()
    runner = ToolRunner(sandbox, tools_for("worker"))
    read, _ = await runner.run(ToolCall("toolu_1", "read_file", {"path": "data.txt"}))
    listed, _ = await runner.run(ToolCall("toolu_2", "list_files", {}))
    assert read.content.endswith("x\\x00\\xffend\n") and not read.is_error
    assert "bad\\xffname" in listed.content.splitlines()

    agent_id = uuid.uuid4()
    calls = (
        ToolCall("toolu_1", "read_file", {"path": "data.txt"}),
        ToolCall("toolu_2", "list_files", {}),
    )
    state = ConversationState(turns=[(ModelTurn(tool_calls=calls), [read, listed])], turn_count=1)
    sink = StoreSink(pool, requester_id="hub", agent_id=agent_id, attempt=1, transcript_limit=10**7)
    await sink.save(state, [result_entry(1, calls[0], read), result_entry(1, calls[1], listed)])
    saved = await conversations.load_checkpoint(pool, "hub", agent_id, 1)
    assert saved is not None
    assert ConversationState.from_json(saved["state"]) == state


async def test_numbers_json_has_no_text_for_in_what_the_model_sent_are_checkpointed(
    pool: asyncpg.Pool,
) -> None:
    """A model's tool input is parsed by Python's json, which reads 1e999 as infinity (and
    NaN, Infinity as such); PostgreSQL's jsonb refuses those tokens, so the checkpoint of
    every later step would fail."""
    agent_id = uuid.uuid4()
    odd = {"path": "a", "limit": float("inf"), "offset": float("-inf"), "x": [float("nan")]}
    call = ToolCall("toolu_1", "read_file", odd)
    raw_block = {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": odd}
    turn = ModelTurn(tool_calls=(call,), model="m", raw=(raw_block,))
    outcome = ToolOutcome("toolu_1", "refused", True)
    state = ConversationState(turns=[(turn, [outcome])], turn_count=1)
    sink = StoreSink(pool, requester_id="hub", agent_id=agent_id, attempt=1, transcript_limit=10**7)
    await sink.save(state, [*turn_entries(1, turn), result_entry(1, call, outcome)])
    saved = await conversations.load_checkpoint(pool, "hub", agent_id, 1)
    assert saved is not None
    back = ConversationState.from_json(saved["state"])
    assert back.turns[0][0].tool_calls[0].input["limit"] == "Infinity"
    assert_travels(saved["state"])
    assert_travels(await conversations.transcript_after(pool, "hub", agent_id, 0))


async def test_a_tool_call_with_an_infinite_number_is_answered_with_an_error(
    tmp_path: Path,
) -> None:
    """read_file's limit of 1e999 (infinity once parsed) raised OverflowError out of the
    tool runner: the run failed, and each retry re-ran the same call."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("one\ntwo\n")
    sandbox = ProcessSandbox(workspace)
    await sandbox.start()
    runner = ToolRunner(sandbox, tools_for("worker"))
    call = ToolCall("toolu_1", "read_file", {"path": "a.txt", "limit": float("inf")})
    outcome, _ = await runner.run(call)
    assert outcome.is_error and "read_file a.txt failed" in outcome.content, outcome
