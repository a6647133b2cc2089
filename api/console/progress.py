"""What an agent's page says of its run so far: the state changes, once each, and the latest
progress report in words."""

from __future__ import annotations

import re
from typing import Any

# The keys an executor reports (agents/loop.py, activities/agents.py), in the order shown.
PROGRESS_LABELS = {
    "turn": "Turn",
    "lastTool": "Last tool",
    "command": "Command",
    "path": "Path",
    "message": "Message",
    "tokens": "Tokens",
    "attempt": "Try",
    "retry": "Model retry",
    "error": "Error",
    "transcriptEntries": "Transcript entries",
}


def _label(key: str) -> str:
    """A key no label is known for, as words: `modelName` → `Model name`."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|[_-]+", " ", key).strip().lower()
    return words[:1].upper() + words[1:] if words else key


def progress_facts(progress: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) pairs of a progress report, known keys first."""
    if not progress:
        return []
    known = [k for k in PROGRESS_LABELS if k in progress]
    others = sorted(k for k in progress if k not in PROGRESS_LABELS)
    return [(PROGRESS_LABELS.get(k) or _label(k), _value(progress[k])) for k in known + others]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else str(value) if value is not None else "—"


def state_changes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events where the state or the try changed, oldest first.

    Each progress report is logged as an event carrying the current state, so a run's log
    says `running` once per report; the page shows a state once per try. `try` is set on
    every change when the run had more than one try.
    """
    changes: list[dict[str, Any]] = []
    attempt = None
    for event in events:
        attempt = event.get("attempt") or attempt
        last = changes[-1] if changes else None
        if last is None or (event["state"], attempt) != (last["state"], last["attempt"]):
            changes.append({**event, "attempt": attempt})
    tries = {c["attempt"] for c in changes if c["attempt"]}
    for change in changes:
        change["try"] = change["attempt"] if len(tries) > 1 else None
    return changes
