"""A connected peer's agents against the executor's sandbox, through whole runs on the real
stack: a reviewer that writes, and a worker that reaches for the kernel interfaces Docker's
default profile denies, change nothing and end with a reason."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.helpers import processes_in, spawn_body

pytestmark = pytest.mark.e2e

# Each exits 0 only if the kernel let it through.
ESCAPES = {
    "ptrace": "import ctypes, sys; sys.exit(ctypes.CDLL(None).ptrace(0, 0, None, None) != 0)",
    "keyctl": "import ctypes, sys; sys.exit(ctypes.CDLL(None).syscall(250, 1, None) < 0)",
    "userfaultfd": "import ctypes, sys; sys.exit(ctypes.CDLL(None).syscall(323, 0) < 0)",
}


async def test_a_reviewer_that_writes_and_a_worker_that_reaches_for_the_kernel_are_stopped(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    import platform

    reviewer = spawn_body(
        hub_spoke,
        '$ ls\n$ echo "# reviewed" >> calc.py',
        task_id="escape-reviewer",
        agent_type="reviewer",
    )
    workers = {}
    if platform.machine() == "x86_64":
        workers = {
            name: spawn_body(hub_spoke, f'$ /usr/bin/python3 -c "{code}"', task_id=f"escape-{name}")
            for name, code in ESCAPES.items()
        }
    for body in (reviewer, *workers.values()):
        response = await hub.call("POST", "/agents/spawn", json=body)
        assert response.status_code == 202, response.text

    agent = await hub.wait_agent(reviewer["agentId"], timeout=120)
    assert agent["state"] == "failed", agent
    assert "a command failed" in agent["error"]
    result = agent["result"] or {}
    assert not result.get("diffBytes") and result.get("changedFiles", []) == []
    assert result["exitCodes"][-1] != 0
    workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / reviewer["agentId"]
    assert not (workspace / "calc.py").exists()

    for name, body in workers.items():
        agent = await hub.wait_agent(body["agentId"], timeout=120)
        assert agent["state"] == "failed", (name, agent)
        assert agent["result"]["exitCodes"] == [1], (name, agent["result"])
        workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / body["agentId"]
        for _ in range(50):
            if not processes_in(workspace):
                break
            await asyncio.sleep(0.1)
        assert processes_in(workspace) == [], name


async def test_a_filter_planted_in_a_submodule_never_runs_on_the_executor_host(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    """The reproduced hole: a repository whose starting commit holds a submodule; the agent
    makes the submodule a repository whose clean filter writes outside the sandbox, and
    stages a file whose stat no longer matches. Taking the diff must not run it."""
    repo = stack.data_dir / "repos" / f"submodule-{uuid.uuid4().hex[:8]}"
    repo.mkdir(parents=True)
    for args in (
        ["init", "-q", "--initial-branch", "main"],
        ["config", "user.email", "t@t"],
        ["config", "user.name", "t"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "app.py").write_text("print('hi')\n")
    subprocess.run(["git", "add", "app.py"], cwd=repo, check=True)
    gitlink = f"160000,{'1' * 40},vendor/lib"
    subprocess.run(["git", "update-index", "--add", "--cacheinfo", gitlink], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "submodule"], cwd=repo, check=True)
    outside = stack.data_dir / f"outside-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    mark = outside / "ran-on-the-host"
    body = spawn_body(
        hub_spoke,
        "\n".join(
            [
                "$ mkdir -p vendor/lib && cd vendor/lib && git init -q && echo x > f && git add f",
                f"$ git -C vendor/lib config filter.x.clean \"sh -c 'touch {mark}; cat'\"",
                "$ echo '* filter=x' > vendor/lib/.git/info/attributes",
                "$ touch -d 2000-01-01 vendor/lib/f",
                "$ echo changed >> app.py",
            ]
        ),
        task_id="escape-submodule",
    )
    body["context"]["repository"] = str(repo)
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    agent = await hub.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", agent
    assert not mark.exists(), "the planted filter ran on the executor host"
    assert list(outside.iterdir()) == []
    assert agent["result"]["changedFiles"] == ["app.py"]
    diff = await hub.call("GET", f"/agents/{body['agentId']}/diff")
    assert diff.status_code == 200, diff.text
    assert "+changed" in diff.text
