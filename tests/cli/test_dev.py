"""`fedagent dev` fails loudly: ports that collide or are taken are refused before anything starts,
a second stack on the same data dir is refused at once, a part dying at start ends the command
with its log's last lines, and a worker that dies later is reported and started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.devstack import DevStack, free_port_block
from tests.cli.test_cli import ROOT, fedagent

pytestmark = pytest.mark.e2e


def test_the_ui_port_never_lands_on_an_api_port(tmp_path: Path) -> None:
    # The report: --base-port 18500 --temporal-port 17500 put the UI on hub's API port.
    stack = DevStack(["hub", "spoke"], tmp_path, base_port=18500, temporal_port=17500)
    assert stack.ui_port not in (17500, 18500, 18501)


async def test_dev_refuses_colliding_or_taken_ports_before_starting_anything(
    tmp_path: Path,
) -> None:
    base = free_port_block(4)
    collide = await fedagent(
        "dev", "--data-dir", str(tmp_path / "a"), "--base-port", str(base),
        "--temporal-port", str(base + 2), "--ui-port", str(base + 1),
    )  # fmt: skip
    assert collide.code == 1
    assert f"port {base + 1} would serve both" in collide.err
    assert "Traceback" not in collide.err
    assert not (tmp_path / "a" / "postgres").exists()  # nothing was started

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        taken.listen()
        busy = await fedagent(
            "dev", "--data-dir", str(tmp_path / "b"), "--base-port", str(base),
            "--temporal-port", str(base + 2),
        )  # fmt: skip
    assert busy.code == 1
    assert f"port {base} for the API of hub" in busy.err and "already in use" in busy.err
    assert not (tmp_path / "b" / "postgres").exists()


async def test_a_part_that_dies_at_start_ends_dev_with_its_log_tail(tmp_path: Path) -> None:
    base, temporal = free_port_block(1), free_port_block(2)
    run = await fedagent(
        "dev", "--instances", "solo", "--data-dir", str(tmp_path), "--base-port", str(base),
        "--temporal-port", str(temporal), "--ui-port", str(temporal + 1),
        env={"FEDAGENT_MAX_BODY_BYTES": "1"},  # refused by the settings of API and worker
    )  # fmt: skip
    assert run.code == 1, run.out
    assert "of solo exited at start" in run.err
    assert "last lines of" in run.err and "max_body_bytes" in run.err  # the child's own words
    assert "Ctrl-C stops" not in run.out


async def _read_until(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    while True:
        line = (await stream.readline()).decode()
        assert line, "fedagent dev ended: " + "".join(seen)
        seen.append(line)
        if needle in line:
            return


async def test_dev_locks_its_data_dir_and_restarts_a_worker_that_dies(tmp_path: Path) -> None:
    base, temporal = free_port_block(1), free_port_block(2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "dev", "--instances", "solo", "--data-dir",
        str(tmp_path), "--base-port", str(base), "--temporal-port", str(temporal),
        "--ui-port", str(temporal + 1),
        cwd=ROOT, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        await asyncio.wait_for(_read_until(proc.stdout, "Ctrl-C stops", seen), timeout=400)
        doc = json.loads((tmp_path / "instances.json").read_text())
        written = (tmp_path / "instances.json").read_text()

        second = await fedagent("dev", "--instances", "solo", "--data-dir", str(tmp_path))
        assert second.code == 1
        assert f"another fedagent stack (pid {proc.pid}) is running on" in second.err
        assert (tmp_path / "instances.json").read_text() == written  # left alone

        [worker_pid] = doc["instances"]["solo"]["workerPids"]
        os.kill(worker_pid, signal.SIGKILL)
        await asyncio.wait_for(_read_until(proc.stdout, "worker restarted", seen), timeout=60)
        said = "".join(seen)
        assert f"solo worker (pid {worker_pid}) exited (-9); restarting it" in said
        [new_pid] = json.loads((tmp_path / "instances.json").read_text())["instances"]["solo"][
            "workerPids"
        ]
        assert new_pid != worker_pid
        url = doc["instances"]["solo"]["apiUrl"]
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 180
            while (await http.get(f"{url}/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again after the restart"
                await asyncio.sleep(0.5)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), timeout=120)
    assert proc.returncode == 0


async def test_demo_and_dev_write_where_the_other_commands_look() -> None:
    for command in ("dev", "demo", "agents"):
        shown = await fedagent(command, "--help")
        assert shown.code == 0, shown.err
        assert "FEDAGENT_DATA_DIR" in shown.out, command
        assert "[default: .fedagent/dev]" in shown.out, command
