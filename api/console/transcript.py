"""The agent's transcript as the console shows it: the requester's copy, one line per entry."""

from __future__ import annotations

import uuid
from typing import Any

from federation.store import conversations
from federation.users import User
from operations import Services, agents

SHOWN = 2000
SHOWN_BYTES = 4 * 1024 * 1024
MAX_CALLS_NAMED = 10
# What each kind of entry is, as a reader says it; other kinds (notes) show as they are.
KIND_LABELS = {"assistant": "model", "tool_call": "tool call", "tool_result": "output"}


def _text(entry: dict[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "tool_call":
        args = entry.get("input") or {}
        if entry.get("name") == "run_command":
            return f"$ {args.get('command', '')}"
        return f"{entry.get('name')} {args.get('path', '')}".strip()
    if kind == "tool_result":
        output = str(entry.get("output", ""))
        code = entry.get("exitCode")
        # The shell tool's output ends with its exit code already (agents/tools.py).
        said = code is None or output.rstrip().endswith(f"[exit code {code}]")
        return output if said else f"{output}\n[exit {code}]"
    return str(entry.get("text") or "")


def _silent_turn(entries: list[dict[str, Any]], at: int) -> str:
    """What the model turn at `at`, which has no text, did: the tools it called (the entries
    right after it, of the same turn), or that it said nothing."""
    calls = []
    for other in entries[at + 1 : at + 1 + MAX_CALLS_NAMED]:
        if other.get("kind") != "tool_call" or other.get("turn") != entries[at].get("turn"):
            break
        calls.append(str(other.get("name") or "a tool"))
    return f"(no text; it called {', '.join(calls)})" if calls else "(no text)"


def _shown(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    shown = []
    for i, entry in enumerate(entries):
        text = _text(entry)
        if not text.strip() and entry.get("kind") == "assistant":
            text = _silent_turn(entries, i)
        kind = str(entry.get("kind", "note"))
        shown.append({**entry, "role": kind, "label": KIND_LABELS.get(kind, kind), "text": text})
    return shown


async def agent_transcript(
    services: Services, user: User, agent_id: uuid.UUID
) -> list[dict[str, Any]]:
    """Transcript entries of the run, oldest first (at most the first SHOWN), each with the
    `role` (its kind), `label` and `text` the agent page shows; the live page fetches them
    again on each `event: transcript` of the event stream."""
    row = await agents.get(services, user, agent_id)
    entries = await conversations.entries_of(services.pool, row, 0, SHOWN, max_bytes=SHOWN_BYTES)
    return _shown(entries)
