"""run_agent_task end to end with the scripted provider: the workspace it prepares, the result
it reports, and what cancelling or timing out leaves on the machine (nothing)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agents.errors import AgentSetupError
from agents.loop import AgentRunReport
from agents.runtime import RuntimeConfig, run_agent_task
from agents.sandbox.base import Limits
from tests.agents.conftest import git, pid_alive
from tests.agents.contract import wait_until
from tests.e2e.helpers import processes_in

SANDBOX = "bwrap" if shutil.which("bwrap") else "process"
LIMITS = Limits(memory_bytes=256 * 1024 * 1024, pids=64, cpus=1.0, command_timeout=30)


async def scripted(
    workspace: Path,
    instructions: str,
    *,
    repository: str | None = None,
    branch: str | None = None,
    roots: tuple[Path, ...] = (),
    resume: bool = False,
    progress: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> AgentRunReport:
    options: dict[str, Any] = {"sandbox": SANDBOX, "limits": LIMITS, "repo_roots": roots}
    options.update(overrides)
    return await run_agent_task(
        workspace=workspace,
        agent_type="worker",
        context={"repository": repository, "branch": branch, "instructions": instructions},
        config=RuntimeConfig(**options),
        on_progress=progress.append if progress is not None else None,
        resume=resume,
    )


async def test_the_repository_is_cloned_at_its_branch(source_repo: Path, tmp_path: Path) -> None:
    workspace = tmp_path / "runs" / "a1"
    report = await scripted(
        workspace,
        "$ cat FEATURE\n$ echo change >> README.md",
        repository=str(source_repo),
        branch="feature",
        roots=(source_repo.parent,),
    )
    assert report.success, report.summary
    assert "on the feature branch" in report.log_tail
    feature_head = git("rev-parse", "feature", cwd=source_repo).strip()
    assert report.workspace["startCommit"] == feature_head
    assert report.workspace["source"] == "clone"
    assert report.changed_files == ["README.md"]
    # the source repository is left as it was
    assert git("status", "--porcelain", cwd=source_repo) == ""


async def test_a_local_path_outside_the_allowed_roots_is_refused(
    source_repo: Path, tmp_path: Path
) -> None:
    workspace = tmp_path / "runs" / "a2"
    with pytest.raises(AgentSetupError, match="FEDAGENT_AGENT_REPO_ROOTS") as refused:
        await scripted(workspace, "$ true", repository=str(source_repo))
    assert refused.value.invalid
    assert not workspace.exists()


async def test_a_branch_that_does_not_exist_fails_the_setup(
    source_repo: Path, tmp_path: Path
) -> None:
    with pytest.raises(AgentSetupError, match="could not prepare the workspace") as failed:
        await scripted(
            tmp_path / "runs" / "a3",
            "$ true",
            repository=str(source_repo),
            branch="no-such-branch",
            roots=(source_repo.parent,),
        )
    assert not failed.value.invalid


async def test_without_a_git_source_the_workspace_is_an_empty_repository(tmp_path: Path) -> None:
    report = await scripted(
        tmp_path / "runs" / "a4", "$ mkdir -p src && echo x > src/new.txt", repository="owner/repo"
    )
    assert report.success
    assert report.workspace["source"] == "empty"
    assert "neither a git URL nor a local path" in report.workspace["note"]
    assert report.changed_files == ["src/new.txt"]
    assert "+x" in report.diff


async def test_what_the_agent_puts_in_the_workspace_git_is_not_trusted(tmp_path: Path) -> None:
    workspace = tmp_path / "runs" / "a5"
    report = await scripted(
        workspace,
        "$ git config core.fsmonitor 'touch /workspace/FSMONITOR_RAN; false'\n"
        "$ printf '#!/bin/sh\\ntouch /workspace/HOOK_RAN\\n' > .git/hooks/pre-commit\n"
        "$ chmod +x .git/hooks/pre-commit\n"
        "$ echo new > new.txt\n"
        "$ echo ignored > debug.log && echo '*.log' > .gitignore",
    )
    assert report.success, report.summary
    assert report.changed_files == [".gitignore", "new.txt"]
    assert not (workspace / "FSMONITOR_RAN").exists()
    assert not (workspace / "HOOK_RAN").exists()


async def test_a_resumed_run_keeps_the_workspace_and_its_starting_point(tmp_path: Path) -> None:
    workspace = tmp_path / "runs" / "a6"
    first = await scripted(workspace, "$ echo one >> log.txt")
    second = await scripted(workspace, "$ echo two >> log.txt", resume=True)
    assert (workspace / "log.txt").read_text() == "one\ntwo\n"
    assert second.workspace["source"] == "resumed"
    assert second.workspace["startCommit"] == first.workspace["startCommit"]
    assert "+one\n+two\n" in second.diff
    fresh = await scripted(workspace, "$ echo three >> log.txt")
    assert (workspace / "log.txt").read_text() == "three\n"
    assert fresh.workspace["source"] == "empty"


async def test_a_diff_over_its_cap_is_cut_and_its_hash_and_size_are_what_is_kept(
    tmp_path: Path,
) -> None:
    report = await scripted(
        tmp_path / "runs" / "a7", "$ seq 1 5000 > numbers.txt", diff_max_bytes=2048
    )
    assert report.diff_truncated
    kept = Path(report.diff_path).read_bytes()
    assert len(kept) == report.diff_bytes == 2048
    assert hashlib.sha256(kept).hexdigest() == report.diff_sha256
    assert report.changed_files == ["numbers.txt"]
    assert report.as_result()["diffPreview"] == kept[:16384].decode()


async def test_a_file_over_the_size_cap_is_listed_not_inlined(tmp_path: Path) -> None:
    workspace = tmp_path / "runs" / "a9"
    report = await scripted(
        workspace,
        "$ head -c 300000 /dev/urandom | base64 > big.txt\n$ echo small > small.txt",
        diff_file_max_bytes=100_000,
        preview_bytes=1024,
    )
    assert report.success, report.summary
    assert report.changed_files == ["big.txt", "small.txt"]
    big = (workspace / "big.txt").stat().st_size
    assert report.diff_omitted_files == [{"path": "big.txt", "bytes": big}]
    assert "+small" in report.diff and "big.txt" not in report.diff
    assert not report.diff_truncated
    assert len(report.as_result()["diffPreview"].encode()) <= 1024
    assert "diff" not in report.as_result()  # the whole diff travels by reference only


async def test_progress_carries_turn_last_tool_and_tokens(tmp_path: Path) -> None:
    progress: list[dict[str, Any]] = []
    await scripted(tmp_path / "runs" / "a8", "$ echo a\n$ echo b", progress=progress)
    assert progress == [
        {"turn": 1, "lastTool": "run_command", "tokens": 0, "command": "echo a"},
        {"turn": 2, "lastTool": "run_command", "tokens": 0, "command": "echo b"},
        {"turn": 3, "lastTool": "finish", "tokens": 0},
    ]


async def test_cancelling_the_run_kills_the_sandbox(tmp_path: Path) -> None:
    workspace = tmp_path / "runs" / "a9"
    progress: list[dict[str, Any]] = []
    task = asyncio.create_task(
        scripted(workspace, "$ echo start\n$ sleep 300 & sleep 301", progress=progress)
    )
    assert await wait_until(
        lambda: (
            bool(progress)
            and progress[-1].get("command") == "sleep 300 & sleep 301"
            and len(processes_in(workspace)) >= 2
        )
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert processes_in(workspace) == []


async def test_a_run_over_its_timeout_is_killed(tmp_path: Path) -> None:
    workspace = tmp_path / "runs" / "a10"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(2):
            await scripted(workspace, "$ sleep 300 & sleep 301")
    assert processes_in(workspace) == []
    assert (workspace / ".git").is_dir()  # the workspace stays for a look afterwards


async def test_a_resumed_try_does_not_walk_what_the_earlier_try_wrote(tmp_path: Path) -> None:
    """The next try's sandbox starts over the workspace its agents wrote without the executor
    walking it (a tree deeper than a recursive walk could go ended that try before it ran)."""
    workspace = tmp_path / "runs" / "deep-resume"
    deep = "i=0; while [ $i -lt 1500 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done"
    try:
        first = await scripted(workspace, f"$ {deep}")
        assert first.success, first.log_tail
        second = await scripted(workspace, "$ echo two > two.txt", resume=True)
        assert second.success, second.summary
        assert second.workspace["source"] == "resumed"
        assert "two.txt" in second.changed_files
    finally:  # pytest's own clean-up of tmp_path recurses once per level
        subprocess.run(["rm", "-rf", str(workspace / "d")], check=False)


@pytest.mark.skipif(SANDBOX != "bwrap", reason="the fence finds bwrap sandboxes by their argv")
async def test_a_new_attempt_first_ends_the_commands_an_earlier_attempt_still_runs(
    tmp_path: Path,
) -> None:
    # Temporal gave attempt 1 up (a stalled loop, a cut from Temporal) while its command
    # still writes the workspace; attempt 2 starts on the same workspace.
    workspace = tmp_path / "runs" / "a11"
    ticks = workspace / "ticks"
    first = asyncio.create_task(
        scripted(workspace, "$ while true; do echo tick >> ticks; sleep 0.02; done")
    )
    assert await wait_until(lambda: ticks.exists() and len(ticks.read_text().split()) >= 3)
    earlier = processes_in(workspace)
    assert earlier
    second = await scripted(
        workspace,
        "$ wc -l < ticks; sleep 1; wc -l < ticks\n$ echo scratch > /tmp/mine; cat /tmp/mine",
        resume=True,
    )
    # Its first command saw no more ticks written: attempt 1's loop ended before it ran.
    before, after = (int(n) for n in re.findall(r"^\s*(\d+)\s*$", second.log_tail, re.M)[:2])
    assert before == after
    assert [pid for pid in earlier if pid_alive(pid)] == []
    # Attempt 1 learnt its command was killed, ended and cleaned up (during attempt 2's
    # sleep) without taking attempt 2's /tmp away from it.
    await first
    assert second.success, second.summary
    assert "scratch" in second.log_tail
    assert processes_in(workspace) == []


async def test_each_empty_workspace_is_its_own_whatever_an_earlier_one_wrote_in_its_git(
    tmp_path: Path,
) -> None:
    """Empty workspaces are laid from one template per branch: what an agent writes in its
    `.git` (config, hooks, commits) stays in its own workspace."""
    first = await scripted(
        tmp_path / "runs" / "e1",
        "$ git config core.pager 'touch /workspace/PAGER_RAN'\n"
        "$ printf '#!/bin/sh\\nexit 1\\n' > .git/hooks/pre-commit\n"
        "$ chmod +x .git/hooks/pre-commit\n"
        "$ echo '*.txt' >> .git/info/exclude\n"
        "$ git commit -q --allow-empty --no-verify -m mine",
        branch="feature/x",
    )
    assert first.success, first.summary
    second = await scripted(
        tmp_path / "runs" / "e2",
        "$ git config --get core.pager || echo no-pager\n"
        "$ ls -A .git/hooks; cat .git/info/exclude 2>/dev/null; echo listed\n"
        "$ git log --format=%s; git symbolic-ref HEAD\n"
        "$ echo kept > kept.txt",
        branch="feature/x",
    )
    assert second.success, second.summary
    assert second.workspace["startCommit"] == first.workspace["startCommit"]
    outputs = second.log
    assert "no-pager" in outputs and "PAGER_RAN" not in outputs
    assert "pre-commit" not in outputs and "*.txt" not in outputs
    assert "fedagent: empty workspace\nrefs/heads/feature/x\n" in outputs
    assert "mine" not in outputs
    assert second.changed_files == ["kept.txt"]
    main = await scripted(tmp_path / "runs" / "e3", "$ git symbolic-ref HEAD")
    assert "refs/heads/main" in main.log


async def test_an_empty_workspace_on_a_branch_name_git_refuses_fails_the_setup(
    tmp_path: Path,
) -> None:
    with pytest.raises(AgentSetupError, match="could not prepare the workspace"):
        await scripted(tmp_path / "runs" / "bad", "$ true", branch="two..dots")
    assert not (tmp_path / "runs" / "bad").exists()
