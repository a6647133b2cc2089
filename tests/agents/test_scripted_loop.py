"""The scripted agent in the process sandbox, without Temporal."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agents.loop import AgentLoop
from agents.models import ScriptedProvider
from agents.sandbox.process import ProcessSandbox


async def run(tmp_path: Path, instructions: str) -> tuple[Any, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    sandbox = ProcessSandbox(tmp_path / "ws")
    await sandbox.start()
    loop = AgentLoop(ScriptedProvider(instructions), sandbox, on_progress=seen.append)
    report = await loop.run("worker", {"instructions": instructions})
    return report, seen


async def test_commands_run_in_order_in_the_workspace(tmp_path: Path) -> None:
    report, progress = await run(tmp_path, "intro text\n$ echo a > f\n$ echo b >> f\n$ cat f")
    assert report.success
    assert report.as_result()["exitCodes"] == [0, 0, 0]
    assert (tmp_path / "ws" / "f").read_text() == "a\nb\n"
    assert "a\nb" in report.log_tail
    assert [p["turn"] for p in progress] == [1, 2, 3, 4]
    assert progress[-1]["lastTool"] == "finish"


async def test_a_failing_command_fails_the_run_and_stops_it(tmp_path: Path) -> None:
    report, _ = await run(tmp_path, "$ echo one\n$ false\n$ touch never")
    assert not report.success
    assert report.as_result()["exitCodes"] == [0, 1]
    assert not (tmp_path / "ws" / "never").exists()


async def test_kill_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    sandbox = ProcessSandbox(tmp_path / "ws")
    await sandbox.start()
    task = asyncio.create_task(sandbox.run("sleep 300 & sleep 300 & wait"))
    for _ in range(100):
        if len(sandbox.alive_pids()) >= 3:
            break
        await asyncio.sleep(0.02)
    assert len(sandbox.alive_pids()) >= 3
    await sandbox.kill()
    result = await task
    assert result.killed and result.exit_code != 0
    assert sandbox.alive_pids() == []
