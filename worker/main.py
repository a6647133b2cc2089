"""Worker entry point: one process polls its instance's task queue for both workflows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities.agents import AgentActivities
from activities.federation import FederationActivities
from federation.identity import ensure_identity
from federation.settings import Settings
from federation.store.db import create_pool, migrate
from workflows.agent_run import AgentRunWorkflow
from workflows.remote_agent import RemoteAgentWorkflow

log = logging.getLogger(__name__)


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    pool = await create_pool(settings.database_url)
    await migrate(pool)
    await ensure_identity(pool, name=settings.instance_name, public_url=settings.public_url)
    http = httpx.AsyncClient(timeout=settings.peer_request_timeout)
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    federation = FederationActivities(pool, http, settings)
    agents = AgentActivities(pool, http, settings)
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[RemoteAgentWorkflow, AgentRunWorkflow],
        activities=[
            federation.send_spawn,
            federation.poll_status,
            federation.send_kill,
            federation.record_requester_final,
            federation.admit_run,
            federation.finish_run,
            agents.run_agent,
        ],
        # Agents plus room for the short federation activities.
        max_concurrent_activities=settings.max_concurrent_agents + 32,
        # Kill arrives through heartbeats: let them through often.
        max_heartbeat_throttle_interval=timedelta(seconds=0.5),
        default_heartbeat_throttle_interval=timedelta(seconds=0.5),
        graceful_shutdown_timeout=timedelta(seconds=10),
    )
    log.info("worker for %s polling %s", settings.instance_name, settings.task_queue)
    try:
        async with worker:
            await stop.wait()
    finally:
        await http.aclose()
        await pool.close()


def main(settings: Settings) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop=stop)

    asyncio.run(runner())
