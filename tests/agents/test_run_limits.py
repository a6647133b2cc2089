"""What a run may not do to its executor, through the real runtime and sandbox: change the
workspace when it is a reviewer, fill the disk, or blow a file up with one edit."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from agents.errors import AgentSetupError
from agents.loop import AgentRunReport
from agents.models import ToolCall
from agents.runtime import RuntimeConfig, run_agent_task
from agents.sandbox.base import PEER_DISK_BUDGET, Limits, peer_disk_usage
from agents.sandbox.bwrap import BwrapSandbox
from agents.sandbox.process import ProcessSandbox
from agents.tools import EDIT_LIMIT, ToolRunner, tools_for
from tests.agents.conftest import git

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap is not installed (scripts/install-system-deps.sh installs it)",
)
LIMITS = Limits(memory_bytes=256 * 1024 * 1024, pids=64, cpus=1.0, command_timeout=60)


async def scripted(
    workspace: Path,
    instructions: str,
    *,
    agent_type: str = "worker",
    repository: str | None = None,
    roots: tuple[Path, ...] = (),
    **overrides: Any,
) -> AgentRunReport:
    options: dict[str, Any] = {"sandbox": "bwrap", "limits": LIMITS, "repo_roots": roots}
    options.update(overrides)
    return await run_agent_task(
        workspace=workspace,
        agent_type=agent_type,
        context={"repository": repository, "instructions": instructions},
        config=RuntimeConfig(**options),
    )


@pytest.fixture
def calc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repos" / "calc"
    repo.mkdir(parents=True)
    git("init", "-q", "--initial-branch", "main", cwd=repo)
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "calc", cwd=repo)
    return repo


@needs_bwrap
async def test_a_reviewer_cannot_write_the_workspace_with_a_command(
    calc_repo: Path, tmp_path: Path
) -> None:
    report = await scripted(
        tmp_path / "runs" / "r1",
        '$ cat calc.py\n$ echo "# reviewed" >> calc.py',
        agent_type="reviewer",
        repository=str(calc_repo),
        roots=(calc_repo.parent,),
    )
    assert [c["exitCode"] for c in report.commands][0] == 0
    assert report.commands[1]["exitCode"] != 0
    assert "Read-only file system" in report.log_tail
    assert report.diff == "" and report.changed_files == []
    assert report.sandbox["enforced"]["workspace"] == "read-only"
    assert "# reviewed" not in (tmp_path / "runs" / "r1" / "calc.py").read_text()


async def test_a_reviewer_is_refused_by_the_process_sandbox(tmp_path: Path) -> None:
    # It could not keep the reviewer's commands from writing, so it does not run them.
    with pytest.raises(AgentSetupError, match="read-only workspace"):
        await scripted(
            tmp_path / "runs" / "r2", "$ echo hi > x", agent_type="reviewer", sandbox="process"
        )
    assert not (tmp_path / "runs" / "r2" / "x").exists()


@needs_bwrap
async def test_a_worker_over_the_disk_quota_fails_with_disk_quota(tmp_path: Path) -> None:
    limits = Limits(
        memory_bytes=LIMITS.memory_bytes, pids=64, command_timeout=60, disk_bytes=2 * 1024**2
    )
    report = await scripted(
        tmp_path / "runs" / "q1",
        "$ head -c 3000000 /dev/urandom > /tmp/blob\n$ echo never > after.txt",
        limits=limits,
    )
    assert not report.success
    assert report.stop_reason == "disk_quota"
    assert report.summary.startswith("disk_quota:")
    assert len(report.commands) == 1  # the run ended after the command that filled it
    assert report.sandbox["limits"]["diskBytes"] == 2 * 1024**2


@needs_bwrap
async def test_a_command_that_keeps_filling_the_disk_is_stopped_while_it_runs(
    tmp_path: Path,
) -> None:
    limits = Limits(
        memory_bytes=LIMITS.memory_bytes, pids=64, command_timeout=60, disk_bytes=4 * 1024**2
    )
    fill = "i=0; while :; do i=$((i+1)); head -c 262144 /dev/urandom > /tmp/f$i; done"
    report = await scripted(tmp_path / "runs" / "q2", f"$ {fill}", limits=limits)
    assert report.stop_reason == "disk_quota"
    assert report.commands[0]["timedOut"] is False  # stopped by the quota, not the timeout
    # killed soon after the quota was passed: far from the 60 s of the command timeout
    assert not (tmp_path / "runs" / ".q2.tmp").exists()


@needs_bwrap
async def test_replace_all_refuses_an_edit_that_would_outgrow_its_limit(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    original = b"a" * (1024 * 1024)
    (workspace / "big.txt").write_bytes(original)
    sandbox = BwrapSandbox(workspace, LIMITS)
    await sandbox.start()
    try:
        runner = ToolRunner(sandbox, tools_for("worker"))
        args = {"path": "big.txt", "old_string": "a", "new_string": "b" * 64, "replace_all": True}
        outcome, _ = await runner.run(ToolCall("t1", "edit_file", args))
        assert outcome.is_error
        assert f"above edit_file's limit of {EDIT_LIMIT} bytes" in outcome.content
        assert (workspace / "big.txt").read_bytes() == original
        # an edit that fits still works
        small = {"path": "big.txt", "old_string": "a", "new_string": "bb", "replace_all": True}
        done, _ = await runner.run(ToolCall("t2", "edit_file", small))
        assert not done.is_error, done.content
        assert (workspace / "big.txt").stat().st_size == 2 * len(original)
    finally:
        await sandbox.kill()


@needs_bwrap
async def test_a_read_only_path_that_would_show_the_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "secrets").mkdir(parents=True)
    (data_dir / "secrets" / "hub.key").write_text("the master key\n")
    for entry in (str(tmp_path), str(data_dir / "secrets"), "/"):
        with pytest.raises(AgentSetupError, match="FEDAGENT_SANDBOX_RO_PATHS") as refused:
            await scripted(
                tmp_path / "runs" / "p1",
                "$ cat " + str(data_dir / "secrets" / "hub.key"),
                sandbox_ro_paths=(entry,),
                private_paths=(data_dir, Path.home()),
                data_dir=data_dir,
            )
        assert str(data_dir) in str(refused.value) or str(Path.home()) in str(refused.value)
    # A toolchain directory next to it is fine.
    report = await scripted(
        tmp_path / "runs" / "p2",
        "$ true",
        sandbox_ro_paths=("/usr/share",),
        private_paths=(data_dir, Path.home()),
        data_dir=data_dir,
    )
    assert report.success, report.summary


@needs_bwrap
async def test_the_run_that_takes_its_peer_past_the_disk_budget_is_stopped(tmp_path: Path) -> None:
    """Runs of one peer share a disk budget: the run whose command adds past it ends
    `peer_disk_budget`, the one that wrote first and now waits goes on, and a new try of the
    peer does not start while its runs hold the whole budget."""
    limits = Limits(
        memory_bytes=LIMITS.memory_bytes, pids=64, command_timeout=60, peer_disk_bytes=5 * 1024**2
    )
    peer = tmp_path / "workspaces" / "peer-a"
    first = asyncio.create_task(
        scripted(
            peer / "a1",
            "$ head -c 3000000 /dev/urandom > blob\n$ touch written\n$ sleep 4",
            limits=limits,
        )
    )
    for _ in range(200):
        if (peer / "a1" / "written").exists():
            break
        await asyncio.sleep(0.05)
    second = await scripted(
        peer / "a2", "$ head -c 3000000 /dev/urandom > blob\n$ echo never > after", limits=limits
    )
    assert second.stop_reason == "peer_disk_budget", second.summary
    assert second.summary.startswith("peer_disk_budget:")
    assert not (peer / "a2" / "after").exists()
    done = await first
    assert done.success  # it added nothing while the other passed the budget
    # Both diffs are taken (the budget is not the diff's): what each run wrote is kept.
    for report in (done, second):
        assert "diffError" not in report.workspace, report.workspace
        assert report.changed_files and report.diff_sha256

    with pytest.raises(AgentSetupError, match="^peer_disk_budget:"):
        await scripted(peer / "a3", "$ echo hi", limits=limits)
    # Another peer's runs have a budget of their own.
    other = await scripted(tmp_path / "workspaces" / "peer-b" / "b1", "$ echo hi", limits=limits)
    assert other.success


async def test_a_try_start_may_count_other_runs_as_seen_lately_but_a_run_that_grew_counts_them_now(
    tmp_path: Path,
) -> None:
    """A try's start looks at its peer's other runs as this process saw them lately (each
    walked at most every few seconds, so hundreds of starts do not each walk hundreds of
    runs), its own files now; the check of a run whose command grew walks every run now."""
    peer = tmp_path / "workspaces" / "peer-a"
    first, second = peer / "a1", peer / "a2"
    for workspace in (first, second):
        workspace.mkdir(parents=True)
    assert peer_disk_usage(second, 60) < 1024 * 1024  # a start: the first run seen now
    (first / "blob").write_bytes(os.urandom(3 * 1024 * 1024))
    assert peer_disk_usage(second, 60) < 1024 * 1024  # seen lately: not walked again
    (second / "own").write_bytes(os.urandom(1024 * 1024))
    assert peer_disk_usage(second, 60) >= 1024 * 1024  # its own files: now
    assert peer_disk_usage(second) >= 4 * 1024 * 1024  # every run now

    (first / "more").write_bytes(os.urandom(2 * 1024 * 1024))
    sandbox = ProcessSandbox(second, Limits(peer_disk_bytes=5 * 1024 * 1024))
    _, over = await sandbox.check_disk(grown_since=0)
    assert over is not None and over.code == PEER_DISK_BUDGET, over


async def test_a_run_whose_usage_stays_the_same_is_walked_less_often_and_again_once_it_grew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ended or idle run of the peer is trusted longer at each walk that finds it unchanged
    (up to a minute); a change found brings it back to every few seconds."""
    from types import SimpleNamespace

    from agents.sandbox import base

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(base, "time", SimpleNamespace(monotonic=lambda: clock.now))
    peer = tmp_path / "workspaces" / "peer-b"
    other, own = peer / "b1", peer / "b2"
    for workspace in (other, own):
        workspace.mkdir(parents=True)
    mb = 1024 * 1024

    def seen_at(now: float) -> int:
        clock.now = now
        return peer_disk_usage(own, base.PEER_USAGE_MAX_AGE)

    assert seen_at(1000) < mb  # walked: first seen
    assert seen_at(1006) < mb  # walked again, unchanged: now trusted for 10 s
    (other / "blob").write_bytes(os.urandom(2 * mb))
    assert seen_at(1012) < mb  # 6 s after: still trusted
    assert seen_at(1017) >= 2 * mb  # 11 s after: walked, grown: back to every 5 s
    (other / "more").write_bytes(os.urandom(mb))
    assert seen_at(1020) < 3 * mb
    assert seen_at(1023) >= 3 * mb
    assert peer_disk_usage(own) >= 3 * mb  # the check of a run that grew: now, always


async def test_a_call_that_writes_nothing_does_not_walk_the_peers_other_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each call the run's disk is checked; its peer's other runs are walked only when
    the run grew, its first call included."""
    from agents.sandbox import files

    peer = tmp_path / "workspaces" / "peer-c"
    (peer / "c1").mkdir(parents=True)
    (peer / "c1" / "blob").write_bytes(os.urandom(1024))
    walked: list[str] = []
    real = files.disk_usage

    def counting(paths: list[Path]) -> int:
        walked.extend(path.name for path in paths)
        return real(paths)

    monkeypatch.setattr(files, "disk_usage", counting)
    sandbox = ProcessSandbox(peer / "c2", Limits(peer_disk_bytes=64 * 1024 * 1024))
    await sandbox.start()
    try:
        runner = ToolRunner(sandbox, tools_for("worker"))
        await runner.run(ToolCall("t1", "run_command", {"command": "true"}))
        assert await runner.check_disk() is None
        assert "c1" not in walked, walked
        await runner.run(ToolCall("t2", "run_command", {"command": "echo grown > new.txt"}))
        assert await runner.check_disk() is None
        assert "c1" in walked, walked
    finally:
        await sandbox.kill()
