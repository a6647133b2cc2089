"""Faults on a stack of its own: the network drops requests, Temporal and PostgreSQL restart,
and a peer that answers slowly, with garbage or with a bad signature cannot wedge anything."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from cli.devstack import DevStack
from federation.store.db import create_pool
from tests.conftest import Instance, free_port_block
from tests.e2e.helpers import hosted_state, processes_in, spawn_body, workflow_state
from tests.e2e.proxy import ControlledProxy
from tests.e2e.rogue_peer import RoguePeer
from tests.e2e.signing import craft, instance_key, post_command, spawn_payload
from worker.reconciler import Reconciler

pytestmark = pytest.mark.e2e
NAMES = ["alpha", "beta"]


class FaultWorld:
    def __init__(
        self, stack: DevStack, alpha: Instance, beta: Instance, proxies: dict[str, ControlledProxy]
    ) -> None:
        self.stack, self.alpha, self.beta, self.proxies = stack, alpha, beta, proxies
        self.connection_id = ""

    def drop(self, on: bool) -> None:
        for proxy in self.proxies.values():
            proxy.rules.drop = on


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, http: httpx.AsyncClient
) -> AsyncIterator[FaultWorld]:
    ports = free_port_block(len(NAMES) + 2)
    proxies = {
        name: ControlledProxy(ports + len(NAMES) + i, ports + i) for i, name in enumerate(NAMES)
    }
    for proxy in proxies.values():
        await proxy.start()
    temporal = free_port_block(2)
    stack = DevStack(
        NAMES,
        tmp_path_factory.mktemp("faults"),
        base_port=ports,
        temporal_port=temporal,
        ui_port=temporal + 1,
        extra_env={
            "FEDAGENT_STATUS_POLL_INTERVAL": "2",
            "FEDAGENT_SPAWN_DEADLINE": "15",
            "FEDAGENT_PEER_REQUEST_TIMEOUT": "3",
            # Runs left without a workflow while Temporal is away stay as the tests left them
            # (the reconciler would record them failed after this quiet spell).
            "FEDAGENT_RECONCILE_INTERVAL": "600",
            # A test reads what a killed run left in its workspace.
            "FEDAGENT_WORKSPACE_RETENTION": "86400",
        },
        # Every message between the two crosses a proxy the tests control.
        public_urls={name: proxy.url for name, proxy in proxies.items()},
    )
    try:
        await stack.start()
        # dataDir: where the master key files live (tests/e2e/signing.py opens the keys).
        alpha, beta = (
            Instance({**stack.instances[n].info, "dataDir": str(stack.data_dir)}, http)
            for n in NAMES
        )
        made = FaultWorld(stack, alpha, beta, proxies)
        response = await alpha.call("POST", "/connections", json={"remoteUrl": proxies["beta"].url})
        assert response.status_code == 201, response.text
        made.connection_id = response.json()["connectionId"]
        accepted = await beta.call("POST", f"/connections/{made.connection_id}/accept")
        assert accepted.status_code == 200, accepted.text
        yield made
    finally:
        stack.stop()
        for proxy in proxies.values():
            await proxy.stop()


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def test_dropped_network_delays_spawn_events_and_kill_but_each_arrives_once(
    world: FaultWorld,
) -> None:
    alpha, beta = world.alpha, world.beta
    body = spawn_body(world.connection_id, "$ echo ran >> runs.txt\n$ sleep 120", timeout=300)
    world.drop(True)
    try:
        assert (await alpha.call("POST", "/agents/spawn", json=body)).status_code == 202
        await asyncio.sleep(5)
        assert (await alpha.call("GET", f"/agents/{body['agentId']}")).json()["state"] == "spawning"
    finally:
        world.drop(False)
    await alpha.wait_agent(body["agentId"], {"running"}, timeout=60)
    workspace = world.stack.data_dir / "workspaces" / "beta" / alpha.id / body["agentId"]
    await wait_until(lambda: _value(bool(processes_in(workspace))), 30, "the sleep")

    world.drop(True)
    kill = asyncio.create_task(alpha.call("POST", f"/agents/{body['agentId']}/kill"))
    await asyncio.sleep(4)
    assert not kill.done()  # it cannot be acknowledged while nothing gets through
    world.drop(False)
    response = await kill
    assert (response.status_code, response.json()["state"]) == (200, "killed")
    assert processes_in(workspace) == []
    assert (workspace / "runs.txt").read_text() == "ran\n"
    assert await beta.count_workflows(f"AgentId = '{body['agentId']}'") == 1
    dropped = sum(len(p.refused) for p in world.proxies.values())
    assert dropped > 0
    events = await alpha.fetch(
        "SELECT seq, state FROM agent_events WHERE agent_id = $1 ORDER BY id",
        uuid.UUID(body["agentId"]),
    )
    assert [e["state"] for e in events].count("killed") == 1
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    print(f"network faults: {dropped} requests dropped, spawn and kill each took effect once")


async def _value(value: Any) -> Any:
    return value


async def test_temporal_restart_while_agents_run(world: FaultWorld) -> None:
    alpha = world.alpha
    bodies = [
        spawn_body(world.connection_id, f"$ sleep 3\n$ echo agent-{i}", task_id=f"tr-{i}")
        for i in range(3)
    ]
    for body in bodies:
        assert (await alpha.call("POST", "/agents/spawn", json=body)).status_code == 202
    for body in bodies:
        await alpha.wait_agent(body["agentId"], {"running"}, timeout=60)
    world.stack.stop_temporal()
    await asyncio.sleep(2)
    await world.stack.start_temporal()
    for i, body in enumerate(bodies):
        agent = await alpha.wait_agent(body["agentId"], timeout=120)
        assert agent["state"] == "completed", agent
        assert f"agent-{i}" in agent["result"]["logTail"]
    print(f"temporal restart: {len(bodies)} running agents finished, 0 lost")


async def test_postgres_restart_answers_503_then_everything_finishes(world: FaultWorld) -> None:
    alpha = world.alpha
    body = spawn_body(world.connection_id, "$ sleep 4\n$ echo after-restart", task_id="pg-1")
    assert (await alpha.call("POST", "/agents/spawn", json=body)).status_code == 202
    await alpha.wait_agent(body["agentId"], {"running"}, timeout=60)
    world.stack.stop_postgres()
    try:
        response = await alpha.call("GET", f"/agents/{body['agentId']}")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "database_unavailable"
        ready = await alpha.http.get(f"{alpha.url}/readyz")
        assert ready.status_code == 503
        await asyncio.sleep(3)
    finally:
        await world.stack.start_postgres()
    agent = await alpha.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", agent
    assert "after-restart" in agent["result"]["logTail"]
    print("postgres restart: API answered 503 problem+json while down; 0 agents lost")


@pytest.fixture(scope="module")
async def rogue(world: FaultWorld) -> AsyncIterator[tuple[RoguePeer, str]]:
    peer = RoguePeer(free_port_block(1))
    await peer.start()
    try:
        response = await world.alpha.call("POST", "/connections", json={"remoteUrl": peer.url})
        assert response.status_code == 201, response.text
        cid = response.json()["connectionId"]
        card = (await world.alpha.http.get(f"{world.alpha.url}/api/v1/federation/instance")).json()
        await peer.accept(world.alpha.url, card, cid)
        listed = await world.alpha.call("GET", f"/connections/{cid}")
        assert listed.json()["status"] == "ACTIVE"
        yield peer, cid
    finally:
        await peer.stop()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("garbage", "peer_response_invalid"),
        ("badsig", "peer_response_invalid"),
        ("slow", "timeout"),
    ],
)
async def test_a_misbehaving_peer_cannot_wedge_the_requester(
    world: FaultWorld, rogue: tuple[RoguePeer, str], mode: str, reason: str
) -> None:
    peer, cid = rogue
    peer.mode = mode
    alpha = world.alpha
    bad = spawn_body(cid, "$ echo never", task_id=f"rogue-{mode}")
    started = time.monotonic()
    assert (await alpha.call("POST", "/agents/spawn", json=bad)).status_code == 202
    # Meanwhile the good peer is served as usual.
    good = spawn_body(world.connection_id, "$ echo fine", task_id=f"good-{mode}")
    assert (await alpha.call("POST", "/agents/spawn", json=good)).status_code == 202
    assert (await alpha.wait_agent(good["agentId"], timeout=60))["state"] == "completed"

    agent = await alpha.wait_agent(bad["agentId"], timeout=60)
    assert agent["state"] == "failed"
    assert reason in agent["error"].lower(), agent["error"]
    assert time.monotonic() - started < 45  # bounded by the spawn deadline (15 s here)
    print(f"rogue peer ({mode}): failed after {time.monotonic() - started:.1f} s: {agent['error']}")


async def test_a_spawn_accepted_while_temporal_is_down_runs_when_it_is_back(
    world: FaultWorld,
) -> None:
    alpha = world.alpha
    world.stack.stop_temporal()
    try:
        body = spawn_body(world.connection_id, "$ echo from-the-outbox", task_id="outbox-1")
        response = await alpha.call("POST", "/agents/spawn", json=body)
        assert response.status_code == 202, response.text
        rows = await alpha.fetch(
            "SELECT workflow_started FROM agents WHERE agent_id = $1", uuid.UUID(body["agentId"])
        )
        assert rows[0]["workflow_started"] is False
        await asyncio.sleep(2)
    finally:
        await world.stack.start_temporal()
    agent = await alpha.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", agent
    assert "from-the-outbox" in agent["result"]["logTail"]
    assert await alpha.count_workflows(f"AgentId = '{body['agentId']}'") == 1
    print("temporal down at spawn: 202 from the outbox, the sweeper started the run later")


async def reconcile_round(instance: Instance) -> None:
    """A round of the instance's reconciler, as one of its workers works it."""
    pool = await create_pool(instance.info["databaseUrl"])
    try:
        await Reconciler(pool, await instance.temporal(), interval=0.01).reconcile_once()
    finally:
        await pool.close()


async def _all_executed(beta: Instance, payloads: list[dict[str, Any]], state: str) -> bool:
    rows = await beta.fetch(
        "SELECT state FROM agents WHERE role = 'executor' AND agent_id = ANY($1::uuid[])",
        [uuid.UUID(p["agentId"]) for p in payloads],
    )
    return len(rows) == len(payloads) and all(r["state"] == state for r in rows)


async def test_the_executor_commits_a_spawn_before_temporal_answers_and_holds_nothing_meanwhile(
    world: FaultWorld,
) -> None:
    """Issue 10 point 7, the ingress half: the capacity check and the run's row commit before
    Temporal is asked to start the run, so a start that hangs holds no lock nor transaction
    and the next spawn is admitted meanwhile. A start that failed (503) keeps its reservation,
    and the requester's retry of the same spawn starts the run, once; a reconciler round
    before the retry (issue 20 point 5) leaves the reservation for it."""
    alpha, beta = world.alpha, world.beta
    key = await instance_key(alpha)
    payloads = [spawn_payload(instructions=f"$ echo {name}") for name in ("first", "meanwhile")]
    world.stack.stop_temporal()
    try:
        # Temporal is away: the client retries its start for a while, then the ingress says 503.
        posts = [
            asyncio.create_task(post_command(beta, craft(key, alpha, beta, p))) for p in payloads
        ]
        await wait_until(
            lambda: _all_executed(beta, payloads, "spawning"), 8, "both rows committed"
        )
        # Both rows are committed (visible here) while their starts still wait on Temporal;
        # a second on, no lock nor transaction of this database is held meanwhile.
        await asyncio.sleep(1.5)
        assert not any(post.done() for post in posts)
        held = await beta.fetch(
            "SELECT count(*) FILTER (WHERE l.locktype = 'advisory') AS locks,"
            " count(DISTINCT a.pid) FILTER (WHERE a.state LIKE 'idle in transaction%')"
            "  AS open_transactions"
            " FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid"
            " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
            " AND now() - a.xact_start > interval '1 second'"
        )
        assert (held[0]["locks"], held[0]["open_transactions"]) == (0, 0)
        for answer in await asyncio.gather(*posts):
            assert answer.status_code == 503, answer.text
            assert answer.json()["code"] == "temporal_unavailable"
        assert await _all_executed(beta, payloads, "spawning")  # the reservations are kept
    finally:
        await world.stack.start_temporal()
    await reconcile_round(beta)  # their workflows are not found: a retry may still come
    assert await _all_executed(beta, payloads, "spawning")
    # The requester retries the same spawns (new messages): the reserved runs start, once each.
    for payload in payloads:
        retried = await post_command(beta, craft(key, alpha, beta, payload))
        assert retried.status_code == 200, retried.text
    await wait_until(lambda: _all_executed(beta, payloads, "completed"), 60, "both runs")
    for payload in payloads:
        assert await beta.count_workflows(f"AgentId = '{payload['agentId']}'") == 1
    print("executor start refused: the run stayed reserved, the retry ran it once")


async def test_a_run_waits_out_a_long_database_outage_and_completes_every_step(
    world: FaultWorld,
) -> None:
    """Issue 20 point 4: PostgreSQL away for ~30 s while a run saves a checkpoint every second.
    Its store writes wait for the database (the activity heartbeating meanwhile) instead of
    failing the try, and the run ends as it would have: completed, each step done once."""
    alpha = world.alpha
    steps = 40
    script = "\n".join(f"$ sleep 1; echo step-{i} >> steps.txt" for i in range(steps))
    body = spawn_body(world.connection_id, script, task_id="pg-outage", timeout=600)
    assert (await alpha.call("POST", "/agents/spawn", json=body)).status_code == 202
    await alpha.wait_agent(body["agentId"], {"running"}, timeout=60)
    workspace = world.stack.data_dir / "workspaces" / "beta" / alpha.id / body["agentId"]
    done = workspace / "steps.txt"
    await wait_until(
        lambda: _value(done.is_file() and len(done.read_text().split()) >= 3), 60, "3 steps"
    )
    world.stack.stop_postgres()
    try:
        await asyncio.sleep(30)
    finally:
        await world.stack.start_postgres()
    agent = await alpha.wait_agent(body["agentId"], timeout=240)
    assert agent["state"] == "completed", (agent["error"], agent)
    assert done.read_text().split() == [f"step-{i}" for i in range(steps)]
    assert f"Ran {steps} command(s), all commands succeeded" in agent["result"]["summary"]
    # Waited out within the attempt that was running: not failed and retried from a checkpoint.
    assert await run_agent_attempts(world, body["agentId"]) == [1]
    print("postgres away for 30 s: the run waited it out and completed every step once")


async def run_agent_attempts(world: FaultWorld, agent_id: str) -> list[int]:
    """The activity attempt each try of the run's agent activity ended on, on the executor."""
    client = await world.beta.temporal()
    handle = client.get_workflow_handle(f"agent-run/{world.alpha.id}/{agent_id}")
    history = await handle.fetch_history()
    runs = {
        event.event_id
        for event in history.events
        if event.HasField("activity_task_scheduled_event_attributes")
        and event.activity_task_scheduled_event_attributes.activity_type.name == "run_agent"
    }
    return [
        event.activity_task_started_event_attributes.attempt
        for event in history.events
        if event.HasField("activity_task_started_event_attributes")
        and event.activity_task_started_event_attributes.scheduled_event_id in runs
    ]


async def test_a_spawn_whose_answers_were_all_lost_is_killed_on_the_executor(
    world: FaultWorld,
) -> None:
    """The executor took the spawn, but every answer to it (and every event back) was lost
    until the requester's spawn deadline (15 s here): the requester ends the run `failed`
    ("spawn not delivered"), and the executor, told once the network is back, kills it
    instead of running it on unseen."""
    alpha, beta = world.alpha, world.beta
    body = spawn_body(world.connection_id, "$ sleep 300", task_id="answers-lost", timeout=600)
    agent_id = body["agentId"]
    world.proxies["beta"].rules.lose_answers = True  # alpha -> beta: the answers are lost
    world.proxies["alpha"].rules.drop = True  # beta -> alpha: the events are lost
    try:
        assert (await alpha.call("POST", "/agents/spawn", json=body)).status_code == 202
        mine = await alpha.wait_agent(agent_id, timeout=90)
        assert mine["state"] == "failed" and "spawn not delivered" in mine["error"], mine
        assert await hosted_state(beta, agent_id, {"running"}, 30) == "running"
    finally:
        world.proxies["beta"].rules.lose_answers = False
        world.proxies["alpha"].rules.drop = False
    assert await hosted_state(beta, agent_id, {"killed"}, 90) == "killed"
    assert await workflow_state(alpha, f"remote-agent/{agent_id}") == "failed"
    assert await workflow_state(beta, f"agent-run/{alpha.id}/{agent_id}") == "killed"
    deadline = time.monotonic() + 30
    while not (await alpha.call("GET", f"/agents/{agent_id}")).json().get("killConfirmed"):
        assert time.monotonic() < deadline, "the kill's delivery was never confirmed"
        await asyncio.sleep(0.5)
