"""One instance as two API replicas behind a real load balancer (HAProxy, from Debian's
packages): REST, peer ingress, event streams and console sessions work through it, whichever
replica answers, and losing a replica (kill -9) loses nothing.

`hub` runs two API processes (its own port, and a second on another port with the same
settings) and names HAProxy's address as its public URL, so `spoke` reaches it through the
balancer too (its connection answers and every event of a run)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.console.auth import csrf_token
from cli.devstack import DevStack
from federation.states import TERMINAL_STATES
from tests.conftest import Instance, free_port_block
from tests.e2e.helpers import (
    balancer_reaches,
    spawn_body,
    start_api_replica,
    start_haproxy,
    wait_ready,
)

pytestmark = pytest.mark.e2e
NAMES = ["hub", "spoke"]


class Balanced:
    """The hub as its users and peers reach it (`lb`) and each replica on its own port."""

    def __init__(self, stack: DevStack, http: httpx.AsyncClient, ports: dict[str, int]) -> None:
        self.stack, self.http, self.ports = stack, http, ports
        info = {**stack.instances["hub"].info, "dataDir": str(stack.data_dir)}
        self.lb = Instance({**info, "apiUrl": f"http://127.0.0.1:{ports['lb']}"}, http)
        self.spoke = Instance(
            {**stack.instances["spoke"].info, "dataDir": str(stack.data_dir)}, http
        )
        self.replica_b: subprocess.Popen[bytes] | None = None
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.connection_id = ""

    def start_replica_b(self) -> None:
        self.replica_b = start_api_replica(self.stack, "hub", self.ports["b"], "api-b")

    def start_haproxy(self, directory: Path) -> None:
        log = self.stack.log_path("hub", "haproxy")
        servers = {"a": self.ports["a"], "b": self.ports["b"]}
        self.haproxy = start_haproxy(directory, log, self.ports["lb"], servers)

    async def ready(self, url: str, timeout: float = 120.0) -> None:
        await wait_ready(self.http, url, timeout)

    async def both_up(self) -> None:
        """Until the balancer has sent requests to both replicas again."""
        await balancer_reaches(self.http, self.lb.url, {"a", "b"})

    def stop(self) -> None:
        for proc in (self.haproxy, self.replica_b):
            DevStack.stop_process(proc, grace=10)


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, http: httpx.AsyncClient
) -> AsyncIterator[Balanced]:
    base = free_port_block(4)
    ports = {"a": base, "spoke": base + 1, "b": base + 2, "lb": base + 3}
    temporal = free_port_block(2)
    directory = tmp_path_factory.mktemp("balanced")
    stack = DevStack(
        NAMES,
        directory,
        base_port=base,
        temporal_port=temporal,
        ui_port=temporal + 1,
        extra_env={"FEDAGENT_STATUS_POLL_INTERVAL": "2"},
        public_urls={"hub": f"http://127.0.0.1:{ports['lb']}"},
    )
    made: Balanced | None = None
    try:
        await stack.start()
        made = Balanced(stack, http, ports)
        made.start_replica_b()
        made.start_haproxy(directory)
        await made.ready(f"http://127.0.0.1:{ports['b']}")
        await made.both_up()
        # The hub asks through the balancer; the spoke's answer comes back through it too.
        asked = await made.lb.call("POST", "/connections", json={"remoteUrl": made.spoke.url})
        assert asked.status_code == 201, asked.text
        made.connection_id = asked.json()["connectionId"]
        accepted = await made.spoke.call("POST", f"/connections/{made.connection_id}/accept")
        assert accepted.status_code == 200, accepted.text
        await wait_for(made.lb, f"/connections/{made.connection_id}", "status", "ACTIVE")
        yield made
    finally:
        if made is not None:
            made.stop()
        stack.stop()


async def wait_for(inst: Instance, path: str, key: str, value: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (body := (await inst.call("GET", path)).json()).get(key) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: {key} is {body.get(key)!r}, not {value!r}")
        await asyncio.sleep(0.2)


async def settled(world: Balanced, agent_id: str, timeout: float = 120) -> tuple[str, str]:
    """The run's final state as the hub (through the balancer) and the spoke each tell it."""
    hub = await world.lb.wait_agent(agent_id, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        rows = await world.spoke.fetch(
            "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1",
            uuid.UUID(agent_id),
        )
        if rows and rows[0]["state"] in TERMINAL_STATES:
            return hub["state"], rows[0]["state"]
        if time.monotonic() > deadline:
            raise AssertionError(f"the spoke's run {agent_id} did not end: {rows}")
        await asyncio.sleep(0.2)


async def test_rest_and_peer_ingress_work_through_the_balancer_on_both_replicas(
    world: Balanced,
) -> None:
    served: set[str] = set()
    ids = []
    for n in range(4):
        body = spawn_body(world.connection_id, f"$ echo {n} > n.txt")
        answer = await world.lb.call("POST", "/agents/spawn", json=body)
        assert answer.status_code == 202, answer.text
        served.add(answer.headers["x-served-by"])
        ids.append(body["agentId"])
    for agent_id in ids:
        # Every event of the run reached the hub through the balancer (its public URL).
        assert await settled(world, agent_id) == ("completed", "completed")
        diff = await world.lb.call("GET", f"/agents/{agent_id}/diff")
        served.add(diff.headers["x-served-by"])
        assert diff.status_code == 200 and b"n.txt" in diff.content
    assert served == {"a", "b"}


async def read_events(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], stop_after: int | None
) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """(id, data) of the events of one stream, until `stop_after` of them or its end."""
    events: list[tuple[str, dict[str, Any]]] = []
    event_id, data = "", ""
    headers = {**headers, "Accept": "text/event-stream"}
    async with http.stream("GET", url, headers=headers, timeout=60) as answer:
        assert answer.status_code == 200
        served = answer.headers.get("x-served-by", "")
        async for line in answer.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif not line and data:
                events.append((event_id, json.loads(data)))
                data = ""
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events, served


async def test_an_event_stream_resumes_on_the_other_replica_with_last_event_id(
    world: Balanced,
) -> None:
    steps = "\n".join(f"$ echo {n} >> steps.txt\n$ sleep 0.5" for n in range(8))
    body = spawn_body(world.connection_id, steps)
    assert (await world.lb.call("POST", "/agents/spawn", json=body)).status_code == 202
    path = f"/api/v1/federation/agents/{body['agentId']}/events"
    # The first events arrive through the balancer while the run goes on (nothing buffers).
    first, served = await read_events(world.http, world.lb.url + path, world.lb.auth, 2)
    # The stream is picked up on the other replica from where it was left.
    other = f"http://127.0.0.1:{world.ports['b' if served == 'a' else 'a']}"
    headers = {**world.lb.auth, "Last-Event-ID": first[-1][0]}
    rest, _ = await read_events(world.http, other + path, headers, None)
    ids = [int(i) for i, _ in first + rest if i]
    assert ids == sorted(set(ids)), "an event was repeated or came out of order"
    assert rest and rest[-1][1].get("state") == "completed"


async def test_a_console_session_works_on_either_replica(world: Balanced) -> None:
    token = world.lb.auth["Authorization"].removeprefix("Bearer ")
    async with httpx.AsyncClient(base_url=world.lb.url, timeout=60) as browser:
        signed = await browser.post(
            "/console/sign-in", data={"token": token, "next": "/console/agents"}
        )
        assert signed.status_code == 303
        # Round robin, but peers' events share the balancer: asked until both replicas served.
        pages = await _until_both_serve(lambda: browser.get("/console/agents"))
        assert {p.status_code for p in pages} == {200}
        # A form rendered by one replica is accepted by the other (the CSRF token is the
        # session's, not a process's).
        form = {
            "csrf": csrf_token(token),
            "connectionId": world.connection_id,
            "taskId": "console",
            "agentType": "worker",
            "instructions": "$ true",
        }
        spawned = await _until_both_serve(lambda: browser.post("/console/agents/spawn", data=form))
        assert {s.status_code for s in spawned} == {303}


async def _until_both_serve(
    ask: Callable[[], Awaitable[httpx.Response]], most: int = 12
) -> list[httpx.Response]:
    """The answers to `ask()`, asked until both replicas answered one (at most `most`)."""
    answers: list[httpx.Response] = []
    while len(answers) < most:
        answers.append(await ask())
        if {a.headers["x-served-by"] for a in answers} == {"a", "b"}:
            return answers
    raise AssertionError(f"one replica served all {most}: {answers[0].headers}")


async def test_losing_a_replica_loses_no_run_and_both_sides_agree(world: Balanced) -> None:
    """kill -9 of replica a while runs are spawned and report through the balancer."""
    bodies = [
        spawn_body(world.connection_id, f"$ echo {n} > f.txt\n$ sleep {1 + n % 3}")
        for n in range(12)
    ]

    async def spawn(body: dict[str, Any]) -> None:
        for _ in range(20):  # a request in flight on the killed replica is asked again
            try:
                answer = await world.lb.call("POST", "/agents/spawn", json=body)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code == 202:
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"spawn of {body['agentId']} never accepted")

    await asyncio.gather(*(spawn(b) for b in bodies[:6]))
    replica_a = world.stack.instances["hub"].api
    assert replica_a is not None
    os.kill(replica_a.pid, signal.SIGKILL)
    replica_a.wait()
    await asyncio.gather(*(spawn(b) for b in bodies[6:]))
    outcomes = [await settled(world, b["agentId"]) for b in bodies]
    assert outcomes == [("completed", "completed")] * len(bodies)
    spoke_runs = await world.spoke.fetch(
        "SELECT count(*) AS n FROM agents WHERE role = 'executor' AND agent_id = ANY($1::uuid[])",
        [uuid.UUID(b["agentId"]) for b in bodies],
    )
    assert spoke_runs[0]["n"] == len(bodies)  # each run once
    world.stack.start_api("hub")
    await world.ready(f"http://127.0.0.1:{world.ports['a']}")
    await world.both_up()
