"""The States list of an agent's page: each change once, and a retried run's tries apart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from api.console.progress import progress_facts, state_changes

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _event(n: int, state: str, attempt: int | None, **progress: Any) -> dict[str, Any]:
    return {
        "id": n,
        "seq": n,
        "state": state,
        "attempt": attempt,
        "progress": progress or None,
        "error": None,
        "at": T0 + timedelta(seconds=n),
    }


def test_a_retried_run_lists_running_once_per_try_and_says_which_try() -> None:
    log = [
        _event(1, "spawning", None),
        _event(2, "running", 1),
        _event(3, "running", 1, turn=1),
        _event(4, "running", 1, turn=2),
        _event(5, "running", 2, turn=0),
        _event(6, "running", None, turn=1),  # a report that names no try: the same try
        _event(7, "completed", 2),
    ]
    shown = [(c["state"], c["try"], c["id"]) for c in state_changes(log)]
    assert shown == [
        ("spawning", None, 1),
        ("running", 1, 2),
        ("running", 2, 5),
        ("completed", 2, 7),
    ]


def test_a_run_with_one_try_says_no_try() -> None:
    log = [_event(1, "spawning", None), _event(2, "running", 1), _event(3, "running", 1)]
    assert [(c["state"], c["try"]) for c in state_changes(log)] == [
        ("spawning", None),
        ("running", None),
    ]


def test_progress_reads_in_words_known_keys_first() -> None:
    facts = progress_facts(
        {"transcriptEntries": 4, "lastTool": "run_command", "turn": 2, "modelName": "x"}
    )
    assert facts == [
        ("Turn", "2"),
        ("Last tool", "run_command"),
        ("Transcript entries", "4"),
        ("Model name", "x"),
    ]
