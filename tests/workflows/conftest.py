"""One real Temporal dev server for the workflow tests; each test gets its own task queue."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from cli.devstack import temporal_binary
from federation.store.db import create_pool, migrate
from tests.workflows.peer import ScriptedPeer
from workflows.agent_run import AgentRunWorkflow
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.models import (
    SA_AGENT_ID,
    SA_AGENT_STATE,
    SA_AGENT_TYPE,
    SA_PEER_INSTANCE,
    SA_TASK_ID,
)
from workflows.remote_agent import RemoteAgentWorkflow


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=[
            SA_AGENT_ID,
            SA_TASK_ID,
            SA_PEER_INSTANCE,
            SA_AGENT_TYPE,
            SA_AGENT_STATE,
        ],
        dev_server_extra_args=[
            "--dynamic-config-value",
            "history.transferProcessorMaxPollRPS=1000",
        ],
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture
async def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def peer() -> ScriptedPeer:
    return ScriptedPeer()


@pytest.fixture
async def task_queue(client: Client, peer: ScriptedPeer) -> AsyncIterator[str]:
    queue = f"wf-{uuid.uuid4()}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[RemoteAgentWorkflow, AgentRunWorkflow, KillDeliveryWorkflow],
        activities=peer.activities(),
        max_heartbeat_throttle_interval=timedelta(seconds=0.1),
        default_heartbeat_throttle_interval=timedelta(seconds=0.1),
    ):
        yield queue


@pytest.fixture(scope="session")
async def database(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server: Any = await asyncio.to_thread(
            pgserver.get_server,  # type: ignore[attr-defined]
            Path(tmp_path_factory.mktemp("pg")),
            cleanup_mode="stop",
        )
    try:
        yield server.get_uri()
    finally:
        await asyncio.to_thread(server.cleanup)


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database)
    await migrate(pool)
    try:
        yield pool
    finally:
        await pool.close()
