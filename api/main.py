"""The FastAPI ingress of one instance: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from api import a2a_server, console, problems
from api.limits import BodySizeLimit, RefusalLimiter, StrangerFetches
from api.metrics import ObservabilityMiddleware
from api.routes import (
    agents,
    artifacts,
    audit,
    commands,
    connections,
    hosted,
    incoming,
    instance,
    ops,
    peers,
    tokens,
    transcript,
)
from api.spawner import SpawnStarter
from federation import keystore, telemetry
from federation.identity import ensure_identity
from federation.netpolicy import peer_client, stranger_client
from federation.settings import Settings, get_settings
from federation.states import TERMINAL_STATES
from federation.store import audit_retention, notifications, repos, workspaces
from federation.store.db import create_pool, migrate
from federation.store.jobs import instance_job
from federation.temporal import connect_temporal
from federation.transcripts import TranscriptPuller
from operations.peer_connect import expire_pending_requests

log = logging.getLogger(__name__)


async def expire_round(app: FastAPI) -> bool:
    """One round of expiring seen message ids and pending requests, run by one process of the
    instance at a time (False: another replica holds the job now)."""
    async with instance_job(app.state.pool, "expire-messages") as mine:
        if mine:
            await repos.expire_message_ids(app.state.pool)
            await expire_pending_requests(app.state.pool, app.state.settings)
        return mine


async def audit_round(app: FastAPI, retention_days: int) -> bool:
    """Day partitions of the audit log made ahead, days past retention dropped: by one
    process of the instance at a time (False: another replica holds the job now)."""
    async with instance_job(app.state.pool, "audit-partitions") as mine:
        if mine:
            await audit_retention.prepare_days(app.state.pool)
            dropped = await audit_retention.drop_expired(app.state.pool, retention_days)
            if dropped:
                log.info("audit retention dropped %s", ", ".join(dropped))
        return mine


async def snapshots_round(app: FastAPI) -> bool:
    """Workspace snapshots of runs that ended here are forgotten (their files with them, where
    no other run holds them), by one process of the instance at a time."""
    async with instance_job(app.state.pool, "workspace-snapshots") as mine:
        if mine:
            gone = await workspaces.forget_ended(app.state.pool, TERMINAL_STATES)
            if gone:
                log.info("forgot %d workspace snapshot files of ended runs", gone)
        return mine


async def _expire_seen_messages(app: FastAPI, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await expire_round(app)
        except Exception as exc:  # noqa: BLE001 - try again next round
            log.warning("expiring seen message ids or pending requests failed: %r", exc)


async def _keep_audit_partitions(app: FastAPI, retention_days: int, every: float) -> None:
    while True:
        try:
            await audit_round(app, retention_days)
        except Exception as exc:  # noqa: BLE001 - try again next round
            log.warning("audit retention failed: %r", exc)
        try:
            await snapshots_round(app)
        except Exception as exc:  # noqa: BLE001 - try again next round
            log.warning("forgetting workspace snapshots failed: %r", exc)
        await asyncio.sleep(every)


ROUTERS = (
    instance,
    connections,
    peers,
    agents,
    artifacts,
    transcript,
    hosted,
    commands,
    incoming,
    audit,
    ops,
    tokens,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title=f"fedagent ({settings.instance_name})",
        version="0.1.0",
        lifespan=_lifespan(settings),
    )
    app.state.refusal_limiter = RefusalLimiter(settings.refusal_burst, settings.refusal_rate)
    app.state.stranger_fetches = StrangerFetches(
        settings.stranger_fetch_concurrency,
        settings.stranger_fetches_per_source,
        settings.stranger_fetches_per_host,
    )
    problems.install(app)
    for module in ROUTERS:
        app.include_router(module.router)
    app.include_router(a2a_server.router)
    console.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # Outermost: request ids in the logs, latency and refusal metrics (413s included).
    app.add_middleware(ObservabilityMiddleware)
    # A server span per request, the caller's `traceparent` header continued (OTel on).
    telemetry.instrument_app(app)
    return app


def _lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Each part is closed, in the reverse order, by the stack it was opened on.
        async with contextlib.AsyncExitStack() as stack:
            await _open_services(app, settings, stack)
            for job in (
                _expire_seen_messages(app, settings.timestamp_window / 2),
                _keep_audit_partitions(app, settings.audit_retention_days, 3600.0),
            ):
                stack.push_async_callback(_cancel, asyncio.create_task(job))
            yield

    return lifespan


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _open_services(
    app: FastAPI, settings: Settings, stack: contextlib.AsyncExitStack
) -> None:
    """Open what the routes use (`api.deps` hands them on), each closed by `stack`."""
    state = app.state
    state.settings = settings
    # OpenTelemetry, when the OTEL_* settings turn it on: before the clients it traces; its
    # spans flushed last.
    telemetry.setup("api", settings.instance_name)
    stack.callback(telemetry.flush)
    state.pool = await create_pool(settings.database_url)
    stack.push_async_callback(state.pool.close)
    await migrate(state.pool)
    # The master key seals private keys at rest; a wrong or missing one stops the start.
    state.cipher = keystore.load_cipher(settings)
    keystore.configure(state.cipher)
    # Key refreshes run while a request holds a connection of the main pool: their own.
    state.key_pool = await create_pool(settings.database_url, min_size=0, max_size=2)
    stack.push_async_callback(state.key_pool.close)
    await ensure_identity(
        state.pool,
        name=settings.instance_name,
        public_url=settings.public_url,
        cipher=state.cipher,
    )
    state.temporal = await connect_temporal(settings)
    # Every URL a peer named is fetched through the outbound address policy; strangers'
    # cards through a client of their own, so they cannot hold what peers' traffic needs.
    state.http = await stack.enter_async_context(
        telemetry.instrument_client(peer_client(settings, timeout=settings.peer_request_timeout))
    )
    state.stranger_http = await stack.enter_async_context(stranger_client(settings))
    state.spawner = SpawnStarter(state.pool, state.temporal, settings)
    state.spawner.run()
    stack.push_async_callback(state.spawner.close)
    state.transcripts = TranscriptPuller(state.pool, state.http, settings, state.cipher)
    stack.push_async_callback(state.transcripts.close)
    # Wakes agent.status long-polls when a run's state changes (connects at first use).
    # Wakes event streams when an agent's log or transcript grows or a token is revoked.
    state.agent_state_listener = notifications.Listener(
        settings.database_url,
        (notifications.AGENT_STATE, notifications.AGENT_NEWS, notifications.TOKEN),
    )
    stack.push_async_callback(state.agent_state_listener.close)
