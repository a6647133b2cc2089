"""A checkpoint read back is the conversation that was saved; transcript entries are bounded."""

from __future__ import annotations

import json

from agents.conversation import ConversationState, head_tail, result_entry, turn_entries
from agents.models import ModelTurn, ToolCall, ToolOutcome


def test_a_checkpoint_read_back_is_the_conversation_that_was_saved() -> None:
    call = ToolCall("toolu_1", "run_command", {"command": "pytest -q"})
    turn = ModelTurn(
        text="Running the tests.",
        tool_calls=(call,),
        usage={"input": 1200, "output": 40, "cacheRead": 900},
        model="claude-test-1",
        stop_reason="tool_use",
        raw=({"type": "text", "text": "Running the tests."}, {"type": "tool_use", "id": "toolu_1"}),
    )
    state = ConversationState(
        turns=[(turn, [ToolOutcome("toolu_1", "1 failed\n[exit code 1]", True, 1)])],
        turn_count=1,
        usage={"claude-test-1": {"input": 1200, "output": 40}},
        commands=[{"command": "pytest -q", "exitCode": 1, "timedOut": False}],
        running_call="toolu_2",
        model_calls=1,
        resumes=2,
    )
    # Through JSON, as PostgreSQL keeps it.
    back = ConversationState.from_json(json.loads(json.dumps(state.to_json())))
    assert back == state
    assert back.tokens == 1240


def test_long_tool_output_keeps_its_head_and_tail_in_the_transcript() -> None:
    output = "\n".join(str(n) for n in range(1, 20_001))
    call = ToolCall("toolu_1", "run_command", {"command": "seq 1 20000"})
    entry = result_entry(3, call, ToolOutcome("toolu_1", output, False, 0))
    assert entry["outputCut"] and entry["outputChars"] == len(output)
    assert entry["output"].startswith("1\n2\n") and entry["output"].endswith("19999\n20000")
    assert len(entry["output"]) < 5000 and entry["exitCode"] == 0
    text, cut = head_tail("short", 100)
    assert (text, cut) == ("short", False)
    entries = turn_entries(1, ModelTurn(text="x" * 50_000, tool_calls=(call,)))
    assert [e["kind"] for e in entries] == ["assistant", "tool_call"]
    assert entries[0]["textCut"] and len(entries[0]["text"]) < 17_000
