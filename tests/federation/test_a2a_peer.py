"""What an A2A agent answers is read as hostile (federation/a2a_peer.py), without a stack."""

from __future__ import annotations

import pytest

from federation import a2a_peer
from federation.errors import A2AAnswerInvalid


def task(task_id: str) -> dict[str, object]:
    return {"id": task_id, "contextId": "c", "status": {"state": "TASK_STATE_WORKING"}}


def test_a_task_id_is_kept_as_the_agent_gave_it() -> None:
    assert a2a_peer.parse_task(task("task-1"), None).id == "task-1"
    assert a2a_peer.parse_task(task("task-1"), "task-1").id == "task-1"
    assert a2a_peer.parse_task(task("x" * 256), None).id == "x" * 256


@pytest.mark.parametrize(
    "task_id",
    ["x" * 257, "two\nlines", "bell\x07", "\u202etxt.exe"],
)
def test_a_task_id_too_long_or_not_printable_is_refused(task_id: str) -> None:
    """A run keeps the agent's task id (the row, its result, every later call): an id of
    megabytes or one with control characters is not an A2A answer to keep."""
    with pytest.raises(A2AAnswerInvalid, match="task id"):
        a2a_peer.parse_task(task(task_id), None)
