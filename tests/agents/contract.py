"""The behaviour every isolating sandbox must show, run against each real backend.

A test module subclasses `SandboxContract` as `Test...` and provides the `make_sandbox`
fixture: an async factory `(workspace, limits) -> started Sandbox` (stopped by the fixture).
The commands used exist both on a Debian host (bwrap) and in a busybox image (docker).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agents.sandbox.base import Limits, Sandbox
from tests.agents.conftest import Listener, pid_alive

MakeSandbox = Callable[..., Awaitable[Sandbox]]
SMALL = Limits(memory_bytes=96 * 1024 * 1024, pids=48, cpus=1.0, command_timeout=30)
MEMORY_HOG = "awk 'BEGIN { s = \"x\"; while (1) s = s s }'"
FORK_BOMB = "bomb() { bomb & bomb & sleep 20; }; bomb"


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def fetch(port: int) -> str:
    """A command that fetches http://127.0.0.1:port/ and fails if it cannot connect."""
    return f"wget -q -T 2 -O- http://127.0.0.1:{port}/"


class SandboxContract:
    async def test_runs_in_the_workspace_as_an_unprivileged_user(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        result = await sandbox.run(
            "pwd; id -u; echo made > made.txt; grep CapEff /proc/self/status"
        )
        assert result.exit_code == 0, result.output
        lines = result.output.split()
        assert lines[0] == sandbox.workspace_mount
        assert lines[1] != "0"
        assert "0000000000000000" in result.output  # no effective capability
        assert (tmp_path / "ws" / "made.txt").read_text() == "made\n"
        assert {"memory", "pids", "cpu", "network"} <= set(sandbox.enforced)

    async def test_cannot_reach_a_port_listening_on_the_host_loopback(
        self, make_sandbox: MakeSandbox, tmp_path: Path, host_listener: Listener
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        result = await sandbox.run(fetch(host_listener.port))
        assert result.exit_code != 0
        assert "ok" not in result.output
        assert host_listener.accepted == []

    async def test_writing_outside_the_workspace_fails_and_lands_nowhere(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside"
        outside.mkdir(mode=0o777)
        outside.chmod(0o777)  # only the sandbox may stop the write, not permissions
        marker = f"fedagent-escape-{uuid.uuid4().hex}"
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        for target in (f"{outside}/{marker}", f"/etc/{marker}", f"/usr/{marker}", f"/{marker}"):
            result = await sandbox.run(f"echo escaped > {target}")
            assert result.exit_code != 0, target
        assert list(outside.iterdir()) == []
        assert not Path("/etc", marker).exists() and not Path("/usr", marker).exists()
        # /tmp is the sandbox's own: writable inside, invisible on the host
        result = await sandbox.run(f"echo private > /tmp/{marker} && cat /tmp/{marker}")
        assert result.exit_code == 0 and "private" in result.output
        assert not Path("/tmp", marker).exists()

    async def test_a_memory_hog_is_killed_and_the_sandbox_goes_on(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        result = await sandbox.run(MEMORY_HOG, timeout=20)
        assert not result.timed_out
        assert result.exit_code != 0
        assert (await sandbox.run("echo still here")).output.strip() == "still here"

    async def test_a_fork_bomb_stops_at_the_pids_limit(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        idle = set(sandbox.alive_pids())  # docker: the container's init and its sleep
        bomb = asyncio.create_task(sandbox.run(FORK_BOMB, timeout=4))
        most = 0
        while not bomb.done():
            most = max(most, len(sandbox.alive_pids()))
            await asyncio.sleep(0.05)
        result = bomb.result()
        # it either runs into the timeout, or ends when its own first fork fails
        assert result.timed_out or result.exit_code != 0
        assert "fork" in result.output.lower(), result  # "Cannot fork" / "can't fork"
        # (a bomb that fails at its first fork may be gone before the first sample)
        assert SMALL.pids is not None and most <= SMALL.pids
        # nothing of the bomb is left: at most the idle sandbox (docker: a restarted init)
        assert await wait_until(lambda: len(sandbox.alive_pids()) <= len(idle))
        after = await sandbox.run("echo after")
        assert after.output.strip() == "after", after

    async def test_kill_leaves_no_process_behind(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        idle = len(sandbox.alive_pids())
        running = asyncio.create_task(sandbox.run("sleep 300 & sleep 301 & sleep 302"))
        assert await wait_until(lambda: len(sandbox.alive_pids()) >= idle + 3)
        seen = sandbox.alive_pids()
        await sandbox.kill()
        result = await running
        assert result.killed and result.exit_code != 0
        assert sandbox.alive_pids() == []
        assert [pid for pid in seen if pid_alive(pid)] == []
        assert (await sandbox.run("echo no")).killed  # a killed sandbox runs nothing more

    async def test_a_command_over_its_timeout_is_killed_with_its_children(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        idle = set(sandbox.alive_pids())
        running = asyncio.create_task(sandbox.run("echo started; sleep 300 & sleep 301", timeout=2))
        assert await wait_until(lambda: len(set(sandbox.alive_pids()) - idle) >= 2)
        spawned = set(sandbox.alive_pids()) - idle
        result = await running
        assert result.timed_out and result.exit_code != 0
        assert "started" in result.output
        assert await wait_until(lambda: not [pid for pid in spawned if pid_alive(pid)])
        after = await sandbox.run("echo next")
        assert after.output.strip() == "next", after

    async def test_file_tools_stay_inside_the_workspace(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        sandbox = await make_sandbox(tmp_path / "ws", SMALL)
        mount = sandbox.workspace_mount
        made = await sandbox.run(
            "echo inside > a.txt && mkdir -p sub && ln -s /etc/passwd out && ln -s ../.. up "
            f"&& ln -s a.txt rel && ln -s {mount}/a.txt abs && ln -s /etc etcdir"
        )
        assert made.exit_code == 0, made.output
        assert (await sandbox.read_file("rel"))[0] == b"inside\n"
        assert (await sandbox.read_file("abs"))[0] == b"inside\n"
        assert (await sandbox.read_file(f"{mount}/sub/../a.txt"))[0] == b"inside\n"
        for path in ("out", "up/etc/passwd", "../x", "/etc/passwd", "etcdir/hostname"):
            try:
                await sandbox.read_file(path)
            except (ValueError, OSError) as exc:
                assert "outside the workspace" in str(exc) or "leads outside" in str(exc)
            else:
                raise AssertionError(f"{path} was read")
        passwd = Path("/etc/passwd").read_bytes()
        for path in ("out", "etcdir/fedagent-x"):
            try:
                await sandbox.write_file(path, b"owned\n")
            except ValueError:
                pass
            else:
                raise AssertionError(f"{path} was written")
        assert Path("/etc/passwd").read_bytes() == passwd
        assert not Path("/etc/fedagent-x").exists()
        # What the tools write, the sandbox can change afterwards.
        await sandbox.write_file("new/deep/file.txt", b"one\n")
        changed = await sandbox.run("echo two >> new/deep/file.txt && cat new/deep/file.txt")
        assert changed.output.split() == ["one", "two"], changed.output
        entries, cut = await sandbox.list_files(".", recursive=True)
        assert "new/deep/file.txt" in entries and "sub/" in entries and not cut

    async def test_a_read_only_sandbox_cannot_change_the_workspace(
        self, make_sandbox: MakeSandbox, tmp_path: Path
    ) -> None:
        # A reviewer's sandbox (issue 14): the workspace is there to read, not to change.
        workspace = tmp_path / "ws"
        workspace.mkdir()
        (workspace / "calc.py").write_text("print(1 + 1)\n")
        sandbox = await make_sandbox(workspace, SMALL, read_only=True)
        appended = await sandbox.run('echo "# reviewed" >> calc.py')
        assert appended.exit_code != 0
        assert "read-only" in appended.output.lower()
        created = await sandbox.run("touch new.txt || mkdir sub")
        assert created.exit_code != 0
        with pytest.raises(OSError, match="read-only"):
            await sandbox.write_file("calc.py", b"gone\n")
        assert (workspace / "calc.py").read_text() == "print(1 + 1)\n"
        assert sorted(p.name for p in workspace.iterdir()) == ["calc.py"]
        # reading works, and so does the run's own /tmp
        read = await sandbox.run("cat calc.py && echo scratch > /tmp/notes && cat /tmp/notes")
        assert read.exit_code == 0, read.output
        assert read.output.split() == ["print(1", "+", "1)", "scratch"]
        assert sandbox.enforced["workspace"] == "read-only"
