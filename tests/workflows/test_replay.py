"""Every recorded history (tests/workflows/histories/) replays on today's workflow code.

A change to a workflow's commands without `workflow.patched()` fails here: the histories were
recorded from real runs of earlier versions (`main-*`: before the durable-core changes).
"""

from __future__ import annotations

import json

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from tests.workflows.peer import HISTORIES
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

RECORDED = sorted(HISTORIES.glob("*.json"))


def test_histories_of_every_path_are_recorded() -> None:
    names = {path.stem.split("-", 1)[1] for path in RECORDED}
    assert {"requester-completed", "executor-completed", "executor-killed-running"} <= names


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
async def test_recorded_history_replays_on_todays_code(path) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(path.stem, data)
    replayer = Replayer(workflows=[RemoteAgentWorkflow, AgentRunWorkflow])
    await replayer.replay_workflow(history)
