"""`fedagent demo`: the whole product once, offline: hub spawns a scripted agent on spoke."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx

from cli.devstack import DevStack, until_signal
from cli.options import StackOptions
from federation.states import TERMINAL_STATES, AgentState, ConnectionStatus

DEMO_INSTRUCTIONS = """Write a greeting into the workspace and show it.
$ echo "hello from the spoke" > hello.txt
$ cat hello.txt
$ sleep 2
$ wc -c hello.txt
"""


def say(text: str) -> None:
    print(text, flush=True)


async def connect(http: httpx.AsyncClient, hub: dict[str, Any], spoke: dict[str, Any]) -> str:
    hub_auth = {"Authorization": f"Bearer {hub['adminToken']}"}
    spoke_auth = {"Authorization": f"Bearer {spoke['adminToken']}"}
    existing = (
        await http.get(f"{hub['apiUrl']}/api/v1/federation/connections", headers=hub_auth)
    ).json()
    for conn in existing:
        if (
            conn["remoteInstanceId"] == spoke["instanceId"]
            and conn["status"] == ConnectionStatus.ACTIVE
        ):
            say(f"hub is already connected to spoke (connection {conn['connectionId']})")
            return str(conn["connectionId"])
    response = await http.post(
        f"{hub['apiUrl']}/api/v1/federation/connections",
        json={"remoteUrl": spoke["apiUrl"]},
        headers=hub_auth,
    )
    response.raise_for_status()
    connection_id = response.json()["connectionId"]
    say(f"hub asked spoke for a connection: {connection_id} is PENDING")
    response = await http.post(
        f"{spoke['apiUrl']}/api/v1/federation/connections/{connection_id}/accept",
        headers=spoke_auth,
    )
    response.raise_for_status()
    say(f"spoke accepted: connection is {response.json()['status']} on both sides")
    return str(connection_id)


async def run_demo(args: StackOptions, *, exit_at_end: bool = False) -> int:
    names = args.names
    if len(names) < 2:
        say("the demo needs two instances, e.g. --instances hub,spoke")
        return 2
    stack = DevStack(
        names,
        args.data_dir,
        base_port=args.base_port,
        temporal_port=args.temporal_port,
        ui_port=args.ui_port,
        workers_per_instance=args.workers,
    )
    started = time.monotonic()
    try:
        say("starting Temporal dev server, PostgreSQL and two instances ...")
        doc = await stack.start()
        hub, spoke = doc["instances"][names[0]], doc["instances"][names[1]]
        say(f"stack up in {time.monotonic() - started:.1f} s; Temporal UI at {stack.ui_url}")
        for name in names:
            info = doc["instances"][name]
            say(f"console of {name}: {info['apiUrl']}/console (sign in with {info['adminToken']})")
        async with httpx.AsyncClient(timeout=120.0) as http:
            connection_id = await connect(http, hub, spoke)
            agent_id = str(uuid.uuid4())
            auth = {"Authorization": f"Bearer {hub['adminToken']}"}
            response = await http.post(
                f"{hub['apiUrl']}/api/v1/federation/agents/spawn",
                json=_demo_spawn(agent_id, connection_id),
                headers=auth,
            )
            response.raise_for_status()
            say(f"spawned agent {agent_id} on {names[1]}: {response.json()['state']}")
            agent = await follow(http, hub, agent_id, auth)
            _say_outcome(agent)
            _say_where_to_look(stack.ui_url, names, hub["instanceId"], agent_id)
        say(f"instances.json: {stack.data_dir / 'instances.json'}")
        if not exit_at_end:
            say("the stack keeps running; Ctrl-C stops it")
            await until_signal()
        return 0 if agent["state"] == AgentState.COMPLETED else 1
    finally:
        say("stopping ...")
        stack.stop()
        say("stopped")


def _demo_spawn(agent_id: str, connection_id: str) -> dict[str, Any]:
    return {
        "agentId": agent_id,
        "connectionId": connection_id,
        "taskId": "demo-1",
        "agentType": "worker",
        "context": {
            "repository": "demo",
            "branch": "main",
            "workItems": ["write hello.txt"],
            "instructions": DEMO_INSTRUCTIONS,
        },
        "options": {"timeout": 120, "maxRetries": 1},
    }


def _say_outcome(agent: dict[str, Any]) -> None:
    result = agent.get("result") or {}
    say(f"final state: {agent['state']}")
    if agent.get("error"):
        say(f"error: {agent['error']}")
    if not result:
        return
    say("result summary:\n  " + str(result.get("summary", "")).replace("\n", "\n  "))
    say("log tail:\n  " + str(result.get("logTail", "")).strip().replace("\n", "\n  "))
    if result.get("changedFiles") is not None:
        sandbox = (result.get("sandbox") or {}).get("kind", "?")
        say(
            f"changed files: {', '.join(result['changedFiles']) or '(none)'}"
            f" (diff sha256 {str(result.get('diffSha256', ''))[:12]}...,"
            f" sandbox {sandbox})"
        )


def _say_where_to_look(ui_url: str, names: list[str], hub_id: str, agent_id: str) -> None:
    say("where to look in the Temporal Web UI:")
    say(
        f"  requester: {ui_url}/namespaces/{names[0]}/workflows/"
        f"{quote('remote-agent/' + agent_id, safe='')}"
    )
    say(
        f"  executor:  {ui_url}/namespaces/{names[1]}/workflows/"
        f"{quote('agent-run/' + hub_id + '/' + agent_id, safe='')}"
    )
    say(f"  (filter with: AgentId = '{agent_id}')")


async def follow(
    http: httpx.AsyncClient, hub: dict[str, Any], agent_id: str, auth: dict[str, str]
) -> dict[str, Any]:
    last: tuple[Any, ...] = ()
    while True:
        response = await http.get(
            f"{hub['apiUrl']}/api/v1/federation/agents/{agent_id}", headers=auth
        )
        agent: dict[str, Any] = response.json()
        progress = agent.get("progress") or {}
        seen = (agent["state"], progress.get("turn"), progress.get("lastTool"))
        if seen != last:
            last = seen
            step = ""
            if progress:
                step = f"  turn {progress.get('turn')} {progress.get('lastTool')}"
                if progress.get("command"):
                    step += f": {progress['command']}"
            say(f"[{time.strftime('%H:%M:%S')}] {agent['state']}{step}")
        if agent["state"] in TERMINAL_STATES:
            return agent
        await asyncio.sleep(0.2)
