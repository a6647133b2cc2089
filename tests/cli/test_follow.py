"""`fedagent spawn --follow` and `status --follow` show the agent's conversation as it happens;
`--quiet` keeps today's one line per progress step."""

from __future__ import annotations

import pytest

from cli.devstack import DevStack
from tests.cli.test_cli import fedagent

pytestmark = pytest.mark.e2e


async def test_follow_shows_each_command_with_its_output_tail_and_exit_code(
    stack: DevStack, hub_spoke: str
) -> None:
    data_dir = str(stack.data_dir)
    run = await fedagent(
        "spawn", "-i", "hub", "--data-dir", data_dir, "--connection", hub_spoke,
        "--task-id", "cli-transcript", "-m", "$ seq 1 40", "-m", "$ sh -c 'echo broke >&2; exit 3'",
        "--follow",
    )  # fmt: skip
    assert run.code == 1, run.out + run.err  # the second command failed: so did the run
    out = run.out
    assert "$ seq 1 40" in out and "$ sh -c 'echo broke >&2; exit 3'" in out
    before_result = out.split("log tail", 1)[0]
    # The tail of the output, not all of it, then the exit code.
    assert "  40" in before_result and "  2\n" not in before_result
    assert "[exit 0]" in before_result and "[exit 3]" in before_result
    assert "broke" in before_result
    assert before_result.index("$ seq 1 40") < before_result.index("[exit 0]")
    assert before_result.index("[exit 0]") < before_result.index("$ sh -c")

    agent_id = next(w for w in out.split() if len(w) == 36 and w.count("-") == 4)
    quiet = await fedagent(
        "status", agent_id, "-i", "hub", "--data-dir", data_dir, "--follow", "--quiet"
    )
    assert quiet.code == 0, quiet.err
    progress = quiet.out.split("agent ", 1)[0]
    assert "turn 1  run_command  $ seq 1 40" in progress
    assert "[exit 0]" not in progress and "  40\n" not in progress

    loud = await fedagent("status", agent_id, "-i", "hub", "--data-dir", data_dir, "--follow")
    assert loud.code == 0, loud.err
    assert "[exit 3]" in loud.out.split("agent ", 1)[0]
