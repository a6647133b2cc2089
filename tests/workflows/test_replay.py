"""Recorded histories (tests/workflows/histories/) replay on today's workflow code.

The patch lifecycle of temporalio/samples-python's `patching/`: once a release has runs in the
field, a change to a workflow's commands goes behind `workflow.patched("id")`, and histories
of every path are recorded *from the build before the change* as `before-<id>-*.json` (run
`FEDAGENT_RECORD_HISTORIES=before-<id> pytest tests/workflows` on that build). They replay
here, so the patched code is proven to replay what the field ran. `0.1.0-*` are the histories
of the first release (recorded the same way from its build).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

import workflows
from tests.workflows.peer import HISTORIES
from worker.main import workflow_runner
from workflows.agent_run import AgentRunWorkflow
from workflows.end_runs import EndConnectionRunsWorkflow
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

RECORDED = sorted(HISTORIES.glob("*.json"))
WORKFLOW_CODE = sorted(Path(workflows.__file__).parent.glob("*.py"))


def patch_ids(sources: list[Path]) -> set[str]:
    """Every id given to `workflow.patched(...)` or `workflow.deprecate_patch(...)`, whether
    as a literal or as a module-level constant of the workflows package."""
    constants: dict[str, str] = {}
    calls: list[ast.expr] = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                        constants[target.id] = node.value.value
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("patched", "deprecate_patch")
                and node.args
            ):
                calls.append(node.args[0])
    ids = set()
    for arg in calls:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            ids.add(arg.value)
        elif isinstance(arg, ast.Name):
            ids.add(constants.get(arg.id, f"<unresolved {arg.id}>"))
        else:
            ids.add(f"<not a constant: {ast.unparse(arg)}>")
    return ids


def test_histories_of_every_path_of_the_release_are_recorded() -> None:
    names = {path.stem.split("-", 1)[1] for path in RECORDED if path.stem.startswith("0.1.0-")}
    assert {
        "requester-completed",
        "requester-killed-running",
        "executor-completed",
        "executor-killed-running",
    } <= names


def test_every_patch_has_histories_recorded_before_it(tmp_path: Path) -> None:
    for patch in patch_ids(WORKFLOW_CODE):
        assert list(HISTORIES.glob(f"before-{patch}-*.json")), (
            f"workflow.patched({patch!r}) has no history recorded before it: record "
            f"FEDAGENT_RECORD_HISTORIES=before-{patch} from the build before the change"
        )
    # The check sees a patch however its id is written (it fails on one without histories).
    probe = tmp_path / "probe.py"
    probe.write_text(
        'PATCH = "probe-1"\nworkflow.patched(PATCH)\nworkflow.deprecate_patch("probe-2")\n'
    )
    assert patch_ids([probe]) == {"probe-1", "probe-2"}


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
async def test_recorded_history_replays_on_todays_code(path: Path) -> None:
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(path.stem, data)
    # The worker's own sandbox: what replays here is what a worker of this build runs.
    replayer = Replayer(
        workflows=[
            RemoteAgentWorkflow,
            AgentRunWorkflow,
            KillDeliveryWorkflow,
            EndConnectionRunsWorkflow,
        ],
        workflow_runner=workflow_runner(),
    )
    await replayer.replay_workflow(history)
