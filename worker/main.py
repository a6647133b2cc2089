"""Worker entry point: one process polls its instance's task queue for both workflows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from datetime import timedelta

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError
from temporalio.worker import Worker, WorkerDeploymentConfig
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.a2a_peer import A2APeerActivities
from activities.agents import AgentActivities
from activities.connections import ConnectionActivities
from activities.federation import FederationActivities
from federation import keystore, telemetry
from federation.identity import ensure_identity
from federation.netpolicy import peer_client
from federation.settings import Settings
from federation.store import notifications, workers
from federation.store.db import create_pool, migrate
from federation.temporal import connect_temporal, metrics_runtime
from operations import retention
from operations.connections import end_runs_of_ended_connections
from worker.interceptor import AgentRunInterceptor
from worker.reconciler import Reconciler
from worker.sandboxes import report_sandbox_limits, sweep_sandboxes, worker_name
from workflows.agent_run import AgentRunWorkflow
from workflows.end_runs import EndConnectionRunsWorkflow
from workflows.kill_delivery import KillDeliveryWorkflow
from workflows.models import SEARCH_ATTRIBUTES
from workflows.remote_agent import RemoteAgentWorkflow

log = logging.getLogger(__name__)
WORKER_FORGOTTEN_AFTER = 24 * 3600.0  # seconds: rows of workers that died without a word


async def _connect_with_retry(settings: Settings, stop: asyncio.Event) -> Client:
    """Temporal may be restarting when a worker starts: keep trying (up to 2 minutes)."""
    runtime = metrics_runtime(settings)
    delay, waited = 0.5, 0.0
    while True:
        try:
            return await connect_temporal(settings, runtime=runtime)
        except RuntimeError as exc:
            if waited >= 120 or stop.is_set():
                raise
            log.warning("Temporal not reachable yet (%s); retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    # OpenTelemetry, when the OTEL_* settings turn it on: before the clients it traces.
    telemetry.setup("worker", settings.instance_name)
    pool = await create_pool(settings.database_url)
    await migrate(pool)
    # A process whose settings contradict the instance's identity, or that cannot open its
    # keys (no FEDAGENT_SECRET_KEY on this host), refuses to start: see `ensure_identity`.
    try:
        cipher = keystore.load_cipher(settings)
        keystore.configure(cipher)
        await ensure_identity(
            pool, name=settings.instance_name, public_url=settings.public_url, cipher=cipher
        )
    except BaseException:
        await pool.close()
        raise
    # Peers named every URL this worker sends to: the outbound address policy applies.
    http = telemetry.instrument_client(peer_client(settings, timeout=settings.peer_request_timeout))
    # Temporal SDK metrics (Prometheus) are served when FEDAGENT_METRICS_PORT is set.
    client = await _connect_with_retry(settings, stop)
    a2a = A2APeerActivities(pool, http, settings, cipher)
    federation = FederationActivities(pool, http, settings, a2a_cancel=a2a.cancel_task)
    agents = AgentActivities(pool, http, settings)
    connections = ConnectionActivities(pool, client, settings)
    await ensure_search_attributes(client, settings.temporal_namespace)
    grace = timedelta(seconds=settings.worker_shutdown_grace)
    deployment = deployment_config(settings)
    # Containers of sandboxes whose worker died here (kill -9, OOM) go before new runs start.
    await sweep_sandboxes(settings)
    # Which limits the sandboxes cannot hold: logged with the fix, and shown by /readyz.
    worker = worker_name()
    await report_sandbox_limits(settings, pool, worker)
    kills = notifications.Listener(settings.database_url, (notifications.KILL,))
    await kills.start()
    main_worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[
            RemoteAgentWorkflow,
            AgentRunWorkflow,
            KillDeliveryWorkflow,
            EndConnectionRunsWorkflow,
        ],
        activities=[
            federation.send_spawn,
            federation.check_status,
            federation.send_kill,
            federation.deliver_kill,
            federation.record_requester_final,
            federation.admit_run,
            federation.record_run_final,
            federation.notify_requester,
            connections.end_connection_runs,
            a2a.send_message,
            a2a.get_task,
            a2a.cancel_task,
        ],
        graceful_shutdown_timeout=grace,
        deployment_config=deployment,
        workflow_runner=workflow_runner(),
    )
    agent_worker = Worker(
        client,
        task_queue=settings.agent_task_queue,
        activities=[agents.run_agent],
        interceptors=[AgentRunInterceptor(kills)],
        deployment_config=deployment,
        max_concurrent_activities=settings.max_concurrent_agents,
        # Kill arrives through heartbeats: let them through often.
        max_heartbeat_throttle_interval=timedelta(seconds=0.5),
        default_heartbeat_throttle_interval=timedelta(seconds=0.5),
        graceful_shutdown_timeout=grace,
    )
    log.info(
        "worker for %s (%s %s) polling %s and %s (at most %d agents)",
        settings.instance_name,
        deployment.version.deployment_name,
        deployment.version.build_id,
        settings.task_queue,
        settings.agent_task_queue,
        settings.max_concurrent_agents,
    )
    reconciler = Reconciler(
        pool,
        client,
        interval=settings.reconcile_interval,
        start_grace=settings.reconcile_start_grace,
        task_queue=settings.task_queue,
        sweeps=[
            lambda: sweep_sandboxes(settings),
            lambda: workers.touch(pool, worker, forget_after=WORKER_FORGOTTEN_AFTER),
            lambda: end_runs_of_ended_connections(pool, client, settings),
        ],
    )
    try:
        async with main_worker, agent_worker:
            repairs = asyncio.create_task(reconciler.run_forever(stop))
            # Workspaces of ended runs, and what the store keeps past its retention.
            cleanup = asyncio.create_task(retention.run_periodically(pool, settings, stop))
            await stop.wait()
            log.info("stopping: no new tasks; running agents get %s to finish", grace)
            await repairs
            await cleanup
    finally:
        await kills.close()
        await http.aclose()
        with contextlib.suppress(Exception):  # the row would be forgotten in time anyway
            await workers.forget(pool, worker)
        await pool.close()
        telemetry.flush()


def workflow_runner() -> SandboxedWorkflowRunner:
    """Temporal's sandbox over fedagent's workflow code, which it imports once per run and
    checks for non-deterministic calls; only the frozen dataclasses the workflows exchange
    (`workflows.models`) pass through."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("workflows.models")
    )


def build_id(settings: Settings) -> str:
    """The setting, or the package version and a hash of the workflow code: a change to a
    workflow makes a new build id."""
    if settings.worker_build_id:
        return settings.worker_build_id
    import hashlib
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        package = version("fedagent")
    except PackageNotFoundError:
        package = "0"
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent.parent / "workflows").glob("*.py")):
        digest.update(path.read_bytes())
    return f"{package}+{digest.hexdigest()[:12]}"


def deployment_config(settings: Settings) -> WorkerDeploymentConfig:
    return WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(
            deployment_name=settings.worker_deployment, build_id=build_id(settings)
        ),
        use_worker_versioning=settings.worker_versioning,
        # Running workflows move to the new version: changes to their commands are patched.
        default_versioning_behavior=(
            VersioningBehavior.AUTO_UPGRADE
            if settings.worker_versioning
            else VersioningBehavior.UNSPECIFIED
        ),
    )


async def ensure_search_attributes(client: Client, namespace: str) -> None:
    """Register fedagent's search attributes on a real cluster (the dev server has them)."""
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = {
            name: IndexedValueType.Value(f"INDEXED_VALUE_TYPE_{kind.upper()}")
            for name, kind in SEARCH_ATTRIBUTES.items()
            if name not in existing.custom_attributes
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
            )
            log.info("registered search attributes %s", sorted(missing))
    except RPCError as exc:  # e.g. Temporal Cloud, where an admin registers them
        log.warning("could not check or register search attributes: %s", exc)


def main(settings: Settings) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop=stop)

    asyncio.run(runner())
