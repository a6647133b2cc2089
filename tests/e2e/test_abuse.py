"""Resource abuse through whole runs: instructions that read outside the workspace, reach the
network, fill the disk, print forever or fork-bomb are contained and end with a clear reason."""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse

import pytest

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.helpers import processes_in, spawn_body

pytestmark = pytest.mark.e2e


async def test_abusive_instructions_are_contained(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    port = urlparse(hub.url).port
    cases = {
        "read outside": ("$ cat /etc/shadow", 30, {"failed"}),
        "network": (f"$ bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}'", 30, {"failed"}),
        "fill the disk": ("$ dd if=/dev/zero of=big bs=1M count=64", 30, {"failed"}),
        "print forever": ("$ yes", 4, {"timed_out"}),
        "fork bomb": ("$ bomb() { bomb | bomb; }; bomb", 6, {"failed", "timed_out"}),
    }
    bodies = {
        name: spawn_body(hub_spoke, instructions, task_id=f"abuse-{i}", timeout=timeout)
        for i, (name, (instructions, timeout, _)) in enumerate(cases.items())
    }
    for body in bodies.values():
        assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    outcomes = {}
    for name, body in bodies.items():
        agent = await hub.wait_agent(body["agentId"], timeout=120)
        outcomes[name] = (agent["state"], agent["error"])
        assert agent["state"] in cases[name][2], (name, agent)
        assert agent["error"], (name, "no reason given")
        workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / body["agentId"]
        for _ in range(50):
            if not processes_in(workspace):
                break
            await asyncio.sleep(0.1)
        assert processes_in(workspace) == [], name
    big = stack.data_dir / "workspaces" / "spoke" / hub.id / bodies["fill the disk"]["agentId"]
    assert (big / "big").stat().st_size <= 16 * 1024 * 1024
    print(
        "\nabuse contained: " + "; ".join(f"{n}: {s} ({e[:60]})" for n, (s, e) in outcomes.items())
    )
