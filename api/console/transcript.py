"""The agent's transcript as the console shows it: the requester's copy, one line per entry."""

from __future__ import annotations

import uuid
from typing import Any

from federation.store import conversations
from federation.users import User
from operations import Services, agents

SHOWN = 2000
SHOWN_BYTES = 4 * 1024 * 1024


def _text(entry: dict[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "tool_call":
        args = entry.get("input") or {}
        if entry.get("name") == "run_command":
            return f"$ {args.get('command', '')}"
        return f"{entry.get('name')} {args.get('path', '')}".strip()
    if kind == "tool_result":
        code = entry.get("exitCode")
        tail = f"\n[exit {code}]" if code is not None else ""
        return f"{entry.get('output', '')}{tail}"
    return str(entry.get("text") or "")


async def agent_transcript(
    services: Services, user: User, agent_id: uuid.UUID
) -> list[dict[str, Any]]:
    """Transcript entries of the run, oldest first (at most the first SHOWN), each with the
    `role` and `text` the agent page shows; the live page appends `event: transcript` entries
    of the event stream to it."""
    await agents.get(services, user, agent_id)
    entries = await conversations.received_after(
        services.pool, agent_id, 0, SHOWN, max_bytes=SHOWN_BYTES
    )
    return [{**e, "role": e.get("kind", "note"), "text": _text(e)} for e in entries]
