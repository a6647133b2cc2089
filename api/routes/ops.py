"""Operations: liveness, readiness and Prometheus metrics (no token: keep them off the public
internet, e.g. expose only /api/v1/federation/instance and /incoming/* through the proxy)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import asyncpg
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client

from agents.sandbox.report import FIX
from api.deps import PoolDep, SettingsDep, TemporalDep
from api.liveness import queue_pollers, unpolled
from api.metrics import REGISTRY, STORE, STORED
from federation.settings import Settings
from federation.store import workers as worker_sandboxes

router = APIRouter(tags=["operations"])


class NoWorker(Exception):
    """No worker polls one of the instance's task queues."""


class SandboxWarning(Exception):
    """A worker's sandboxes do not hold every run limit (the instance still serves)."""


CHECK_TIMEOUT = 3.0  # seconds each readiness check may take


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving requests."""
    return {"status": "ok"}


async def _postgres(pool: asyncpg.Pool, temporal: Client, settings: Settings) -> None:
    await pool.fetchval("SELECT 1")


async def _temporal_server(pool: asyncpg.Pool, temporal: Client, settings: Settings) -> None:
    await temporal.workflow_service.get_system_info(
        GetSystemInfoRequest(), timeout=timedelta(seconds=CHECK_TIMEOUT)
    )


async def _workers(pool: asyncpg.Pool, temporal: Client, settings: Settings) -> None:
    found = await queue_pollers(
        temporal, settings.temporal_namespace, settings.task_queue, timeout=CHECK_TIMEOUT
    )
    if missing := unpolled(found):
        raise NoWorker(f"error: no worker polls {', '.join(missing)}")


async def _sandboxes(pool: asyncpg.Pool, temporal: Client, settings: Settings) -> None:
    # Workers seen within a few reconcile passes: a dead worker's gaps do not linger.
    found = await worker_sandboxes.with_gaps(pool, seen_within=3 * settings.reconcile_interval + 30)
    if found:
        raise SandboxWarning(
            "warning: "
            + "; ".join(
                f"worker {w.worker} ({w.sandbox}): " + ", ".join(gap["detail"] for gap in w.gaps)
                for w in found
            )
            + f". To fix: {FIX}"
        )


# In order: the workers are asked of Temporal only once it answers.
READINESS_CHECKS = (
    ("postgres", _postgres),
    ("temporal", _temporal_server),
    ("workers", _workers),
    ("sandboxes", _sandboxes),
)


async def _outcome(check: Awaitable[None]) -> str:
    """ "ok", or what failed (readiness reports, it does not raise)."""
    try:
        await asyncio.wait_for(check, timeout=CHECK_TIMEOUT)
        return "ok"
    except (NoWorker, SandboxWarning) as exc:
        return str(exc)
    except TimeoutError:
        return f"error: no answer within {CHECK_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - readiness reports, it does not raise
        return f"error: {exc.__class__.__name__}"


@router.get(
    "/readyz",
    response_model=None,
    responses={503: {"content": {"application/problem+json": {}}}},
)
async def readyz(
    request: Request, pool: PoolDep, temporal: TemporalDep, settings: SettingsDep
) -> dict[str, Any] | JSONResponse:
    """Ready when PostgreSQL and Temporal answer and a worker polls each of the instance's task
    queues (workflows, agent runs); otherwise 503 problem+json saying which. A worker whose
    sandboxes cannot hold every run limit shows as a `sandboxes` warning (still ready)."""
    checks: dict[str, str] = {}
    for name, check in READINESS_CHECKS:
        if name == "workers" and checks.get("temporal") != "ok":
            checks[name] = "error: temporal is not reachable"
            continue
        checks[name] = await _outcome(check(pool, temporal, settings))
    failing = sorted(
        name for name, result in checks.items() if result != "ok" and name != "sandboxes"
    )
    if not failing:
        return {"status": "ready", "checks": checks}
    return JSONResponse(
        {
            "type": "urn:fedagent:problem:not_ready",
            "title": "Not ready",
            "status": 503,
            "detail": f"not ready: {', '.join(f'{n} ({checks[n]})' for n in failing)}",
            "code": "not_ready",
            "instance": request.url.path,
            "checks": checks,
        },
        status_code=503,
        media_type="application/problem+json",
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(pool: PoolDep) -> Response:
    """Prometheus text format; agent figures come from the store, at most 2 s old (what it
    keeps per kind: at most a minute old)."""
    await STORE.refresh(pool)
    await STORED.refresh(pool)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
