"""Session fixtures: one real embedded stack (Temporal dev server, PostgreSQL, uvicorn APIs and
worker processes) shared by the end-to-end tests; each test uses its own agents and ids."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from temporalio.client import Client

from cli.devstack import DevStack, free_port_block
from federation.states import TERMINAL_STATES
from tests.e2e.proxy import ControlledProxy

ALL_COMMANDS = ["agent.spawn", "agent.status", "agent.kill", "agent.artifact"]
ALL_TYPES = ["worker", "reviewer", "tester"]
INSTANCES = ["hub", "spoke", "edge", "far"]
# `far` is reached by its peers only through a proxy the tests control (lost events, outages),
# and runs at most one agent at a time for everyone (capacity tests).
FAR_ENV = {"FEDAGENT_MAX_RUNNING_AGENTS": "1", "FEDAGENT_MAX_CONCURRENT_AGENTS": "1"}
# `edge` keeps small per-peer defaults (hostile tests of fairness) and the default refusal
# limit (the other instances get many refusals from 127.0.0.1 in a whole run of the suite), and
# a small cap of connection requests waiting for its admin, in all, per sending address and
# per named host; strangers' cards may be served from 127.0.0.128/25 as well (one host each).
EDGE_ENV = {
    "FEDAGENT_PEER_MAX_RUNNING_AGENTS": "1",
    "FEDAGENT_PEER_MAX_QUEUED_AGENTS": "1",
    "FEDAGENT_REFUSAL_BURST": "60",
    "FEDAGENT_MAX_PENDING_REQUESTS": "20",
    "FEDAGENT_MAX_PENDING_PER_SOURCE": "3",
    "FEDAGENT_MAX_PENDING_PER_HOST": "3",
    "FEDAGENT_OUTBOUND_ALLOWLIST": "127.0.0.1,127.0.0.128/25",
    # Local runs (issue 23): one unfinished per workspace, workers and reviewers only, short
    # timeouts, no repository but the tests' own.
    "FEDAGENT_LOCAL_MAX_RUNNING_PER_WORKSPACE": "1",
    "FEDAGENT_LOCAL_AGENT_TYPES": "worker,reviewer",
    "FEDAGENT_LOCAL_MAX_TIMEOUT": "600",
    "FEDAGENT_LOCAL_REPOSITORIES": "https://example.test/*",
}


class Instance:
    """One running instance as a test drives it: its REST API and its own database."""

    def __init__(self, info: dict[str, Any], http: httpx.AsyncClient) -> None:
        self.info = info
        self.name: str = info["name"]
        self.id: str = info["instanceId"]
        self.url: str = info["apiUrl"]
        self.http = http
        self.auth = {"Authorization": f"Bearer {info['adminToken']}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return await self.http.request(
            method, f"{self.url}/api/v1/federation{path}", headers=headers, **kwargs
        )

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.info["databaseUrl"])

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.db()
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def temporal(self) -> Client:
        return await Client.connect(self.info["temporalAddress"], namespace=self.info["namespace"])

    async def count_workflows(self, query: str) -> int:
        client = await self.temporal()
        return (await client.count_workflows(query)).count

    async def wait_agent(
        self, agent_id: str, states: Collection[str] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        states = states or TERMINAL_STATES
        deadline = time.monotonic() + timeout
        while True:
            response = await self.call("GET", f"/agents/{agent_id}")
            assert response.status_code == 200, response.text
            agent: dict[str, Any] = response.json()
            if agent["state"] in states:
                return agent
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {agent_id} still {agent['state']}: {agent}")
            await asyncio.sleep(0.1)


# Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), each test module runs whole on
# one worker (its module fixtures start once), and the modules that share the console's stack or
# the workflow tests' Temporal environment run together; each worker starts its own 4-instance
# `stack` when it first needs it. The longest modules go first, so that none of them is left for
# the end while the other worker is idle.
SHARED_GROUPS = {"console_stack": "console", "temporal_env": "workflows"}
LONG_MODULES = (
    "tests/test_image.py",
    "tests/e2e/test_retention.py",
    "tests/e2e/test_faults.py",
    "tests/e2e/test_load_balancer.py",
    "tests/e2e/test_many_hosts.py",
    "tests/e2e/test_whole_shape.py",
    "tests/e2e/test_traces.py",
)


def _shared_group(item: pytest.Item) -> str | None:
    for fixture, group in SHARED_GROUPS.items():
        if fixture in getattr(item, "fixturenames", ()):
            return group
    return "workflows" if item.nodeid.startswith("tests/workflows/") else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A module goes whole to the group of the first shared stack one of its tests uses.
    Without workers (`PYTEST_WORKERS=0`; `make test` runs 2) the order stays the files' own."""
    if not getattr(config.option, "numprocesses", None):
        return
    groups: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        shared = _shared_group(item)
        if shared is not None and groups.get(module, module) == module:
            groups[module] = shared
        groups.setdefault(module, module)
    order = list(LONG_MODULES)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid.split("::", 1)[0]]))
    items.sort(
        key=lambda item: (
            order.index(g) if (g := groups[item.nodeid.split("::", 1)[0]]) in order else len(order)
        )
    )


@pytest.fixture(scope="session")
async def far_proxy() -> AsyncIterator[ControlledProxy]:
    ports = free_port_block(len(INSTANCES) + 1)
    proxy = ControlledProxy(ports + len(INSTANCES), ports + INSTANCES.index("far"))
    proxy.base_port = ports  # type: ignore[attr-defined]
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture(scope="session")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, far_proxy: ControlledProxy
) -> AsyncIterator[DevStack]:
    data_dir: Path = tmp_path_factory.mktemp("stack")
    base: int = far_proxy.base_port  # type: ignore[attr-defined]
    temporal = free_port_block(2)
    dev = DevStack(
        INSTANCES,
        data_dir,
        base_port=base,
        temporal_port=temporal,
        ui_port=temporal + 1,
        # Fall back to polling quickly so tests of lost events stay short.
        extra_env={
            "FEDAGENT_STATUS_POLL_INTERVAL": "3",
            "FEDAGENT_LOG_LEVEL": "info",
            # Small enough that a test can hit it quickly.
            "FEDAGENT_SANDBOX_FILE_MB": "16",
            # Production rules for peer addresses, with the stack's own loopback address
            # allowed (the hostile tests use other loopback addresses to be refused).
            "FEDAGENT_ENVIRONMENT": "production",
            "FEDAGENT_OUTBOUND_ALLOWLIST": "127.0.0.1",
            # As many per peer as the instance runs at all: the load tests use one peer.
            "FEDAGENT_PEER_MAX_RUNNING_AGENTS": "64",
            "FEDAGENT_PEER_MAX_QUEUED_AGENTS": "64",
            "FEDAGENT_REFUSAL_BURST": "100000",
            # Local repositories the tests make (e.g. one with a submodule) may be cloned.
            "FEDAGENT_AGENT_REPO_ROOTS": str(data_dir / "repos"),
            # Every test peer asks from and is served on 127.0.0.1: only edge keeps the caps.
            "FEDAGENT_MAX_PENDING_PER_SOURCE": "1000",
            "FEDAGENT_MAX_PENDING_PER_HOST": "1000",
            # Tests look at what agents left in their workspaces after their runs ended
            # (tests/e2e/test_retention.py has a stack that removes them at once).
            "FEDAGENT_WORKSPACE_RETENTION": "86400",
        },
        instance_env={"far": FAR_ENV, "edge": EDGE_ENV},
        public_urls={"far": far_proxy.url},
    )
    try:
        await dev.start()
        yield dev
    finally:
        dev.stop()
        if os.environ.get("CI"):
            for log in sorted(dev.logs.glob("*.log")):
                text = log.read_text(errors="replace")
                if "Traceback" in text:
                    print(f"--- {log.name} (tail) ---\n{text[-4000:]}")


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=90.0) as client:
        yield client


@pytest.fixture(scope="session")
def instances(stack: DevStack, http: httpx.AsyncClient) -> dict[str, Instance]:
    # dataDir: where the instance's master key file lives (tests/e2e/signing.py opens its keys).
    return {
        name: Instance({**stack.instances[name].info, "dataDir": str(stack.data_dir)}, http)
        for name in INSTANCES
    }


@pytest.fixture(scope="session")
def hub(instances: dict[str, Instance]) -> Instance:
    return instances["hub"]


@pytest.fixture(scope="session")
def spoke(instances: dict[str, Instance]) -> Instance:
    return instances["spoke"]


@pytest.fixture(scope="session")
def edge(instances: dict[str, Instance]) -> Instance:
    return instances["edge"]


@pytest.fixture(scope="session")
def far(instances: dict[str, Instance]) -> Instance:
    return instances["far"]


async def ensure_connection(one: Instance, other: Instance) -> str:
    """The ACTIVE connection between two instances (either side may have asked), or a new one."""
    listed = (await one.call("GET", "/connections")).json()
    for conn in listed:
        if conn["remoteInstanceId"] == other.id and conn["status"] == "ACTIVE":
            connection_id = str(conn["connectionId"])
            if conn["direction"] == "inbound":
                # `other` asked for it: it grants `one` nothing until its admin says so.
                response = await other.call(
                    "PATCH",
                    f"/connections/{connection_id}",
                    json={
                        "grants": {
                            "commandTypes": ALL_COMMANDS,
                            "agentTypes": ALL_TYPES,
                            "repositories": ["*"],
                        }
                    },
                )
                assert response.status_code == 200, response.text
            return connection_id
    return await connect(one, other)


async def connect(requester: Instance, executor: Instance) -> str:
    """requester asks executor for a connection and executor accepts; returns its id."""
    response = await requester.call("POST", "/connections", json={"remoteUrl": executor.url})
    assert response.status_code == 201, response.text
    connection_id: str = response.json()["connectionId"]
    response = await executor.call("POST", f"/connections/{connection_id}/accept")
    assert response.status_code == 200, response.text
    return connection_id


@pytest.fixture(scope="session")
async def hub_spoke(hub: Instance, spoke: Instance) -> str:
    return await connect(hub, spoke)
