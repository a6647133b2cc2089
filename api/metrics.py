"""Prometheus metrics of an instance's API, and the middleware that measures each request.

Served at `GET /metrics` in the Prometheus text format:

- `fedagent_http_request_duration_seconds{method,route,status}`: time until the response
  starts (for the SSE stream: until it opens), by route template.
- `fedagent_problems_total{code,status}`: every problem+json answer, by its `code`.
- `fedagent_refused_messages_total{code}`: signed peer messages (`/incoming/*`) refused.
- `fedagent_spawn_requests_total{outcome}`: `POST /agents/spawn` answers: `accepted` or the code.
- `fedagent_spawns_total{role,outcome}`: agents that ended, by final state (from the store, so
  every API and worker process of the instance counts, and restarts lose nothing).
- `fedagent_agents_running{role}`, `fedagent_agents{role,state}`: agents not yet ended.
- `fedagent_agent_run_duration_seconds{role}`: how long ended agents ran (executor: start of
  the run to its end; requester: spawn to final state).
- `fedagent_stored_rows{kind}`, `fedagent_stored_bytes{kind}`: what the store keeps of runs, by
  retention kind (messages, events, transcripts, checkpoints, artifacts, artifact_content, runs;
  `operations/retention.py`), at most a minute old.

Workers serve the Temporal SDK's own metrics on FEDAGENT_METRICS_PORT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from federation.logs import _log_context, bind_log_context
from federation.states import TERMINAL_STATES, AgentState
from federation.store import retention

log = logging.getLogger("fedagent.access")
disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series

REGISTRY = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RUN_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)

HTTP_LATENCY = Histogram(
    "fedagent_http_request_duration_seconds",
    "Time from request to the start of the response, by route template",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PROBLEMS = Counter(
    "fedagent_problems",
    "problem+json answers by code",
    ["code", "status"],
    registry=REGISTRY,
)
REFUSED = Counter(
    "fedagent_refused_messages",
    "Signed peer messages refused, by error code",
    ["code"],
    registry=REGISTRY,
)
REFUSALS_RATE_LIMITED = Counter(
    "fedagent_refusals_rate_limited",
    "Refused peer messages past the per-address limit: answered 429, counted, not audited",
    registry=REGISTRY,
)
SPAWN_REQUESTS = Counter(
    "fedagent_spawn_requests",
    "Spawn requests by answer: accepted, or the error code",
    ["outcome"],
    registry=REGISTRY,
)

SPAWN_ROUTE = "/api/v1/federation/agents/spawn"
INCOMING_PREFIX = "/api/v1/federation/incoming/"
QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}
_AGENT_PATH = re.compile(r"/agents/([0-9a-fA-F-]{36})(?:/|$)")
_PEEK_LIMIT = 64 * 1024


# --- metrics read from the store ------------------------------------------------------------


@dataclass
class StoreSnapshot:
    counts: list[tuple[str, str, int]] = field(default_factory=list)  # role, state, count
    # role -> (cumulative counts per bucket, sum, count)
    durations: dict[str, tuple[list[int], float, int]] = field(default_factory=dict)
    up: bool = False
    taken_at: float = 0.0


class StoreCollector(Collector):
    """Agent outcomes, running agents and run durations, as of the last `refresh`."""

    def __init__(self, max_age: float = 2.0) -> None:
        self.snapshot = StoreSnapshot()
        self.max_age = max_age
        self._lock = asyncio.Lock()

    async def refresh(self, pool: asyncpg.Pool) -> None:
        if time.monotonic() - self.snapshot.taken_at < self.max_age:
            return
        async with self._lock:
            if time.monotonic() - self.snapshot.taken_at < self.max_age:
                return
            try:
                self.snapshot = await asyncio.wait_for(_read_store(pool), timeout=5.0)
            except Exception as exc:  # noqa: BLE001 - metrics report, they do not fail
                log.warning("reading agent metrics from the store failed: %r", exc)
                self.snapshot = StoreSnapshot(up=False, taken_at=time.monotonic())

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        up = GaugeMetricFamily(
            "fedagent_metrics_store_up", "1 if the agent metrics below could be read"
        )
        up.add_metric([], 1.0 if snap.up else 0.0)
        yield up
        spawns = CounterMetricFamily(
            "fedagent_spawns", "Agents that ended, by final state", labels=["role", "outcome"]
        )
        active = GaugeMetricFamily(
            "fedagent_agents", "Agents not yet ended, by state", labels=["role", "state"]
        )
        running = GaugeMetricFamily(
            "fedagent_agents_running", "Agents running now", labels=["role"]
        )
        running_by_role = {"requester": 0, "executor": 0}
        for role, state, count in snap.counts:
            if state in TERMINAL_STATES:
                spawns.add_metric([role, state], float(count))
            else:
                active.add_metric([role, state], float(count))
            if state == AgentState.RUNNING:
                running_by_role[role] = running_by_role.get(role, 0) + count
        for role, count in sorted(running_by_role.items()):
            running.add_metric([role], float(count))
        yield spawns
        yield active
        yield running
        durations = HistogramMetricFamily(
            "fedagent_agent_run_duration_seconds",
            "How long ended agents ran",
            labels=["role"],
        )
        for role, (cumulative, total, count) in sorted(snap.durations.items()):
            buckets = [
                (_bound(b), float(c)) for b, c in zip(RUN_BUCKETS, cumulative, strict=True)
            ] + [("+Inf", float(count))]
            durations.add_metric([role], buckets, total)
        yield durations


def _bound(value: float) -> str:
    return repr(float(value))


async def _read_store(pool: asyncpg.Pool) -> StoreSnapshot:
    bucket_columns = ", ".join(f"count(*) FILTER (WHERE d <= {float(b)!r})" for b in RUN_BUCKETS)
    async with pool.acquire() as conn:
        counts = await conn.fetch("SELECT role, state, count(*) AS n FROM agents GROUP BY 1, 2")
        rows = await conn.fetch(
            f"""
            SELECT role, {bucket_columns}, coalesce(sum(d), 0) AS total, count(*) AS n
            FROM (
                SELECT role, extract(epoch FROM finished_at - CASE WHEN role = 'executor'
                       THEN coalesce(started_at, created_at) ELSE created_at END)::float8 AS d
                FROM agents WHERE finished_at IS NOT NULL
            ) ended
            GROUP BY role
            """
        )
    durations = {
        r["role"]: ([int(r[i + 1]) for i in range(len(RUN_BUCKETS))], float(r["total"]), r["n"])
        for r in rows
    }
    return StoreSnapshot(
        counts=[(r["role"], r["state"], int(r["n"])) for r in counts],
        durations=durations,
        up=True,
        taken_at=time.monotonic(),
    )


STORE = StoreCollector()
REGISTRY.register(STORE)


class StoredCollector(Collector):
    """What the store keeps of runs, per retention kind, as of the last `refresh` (counting
    reads whole tables: refreshed at most once a minute)."""

    def __init__(self, max_age: float = 60.0) -> None:
        self.amounts: dict[str, retention.Amount] = {}
        self.taken_at = -max_age
        self.max_age = max_age
        self._lock = asyncio.Lock()

    async def refresh(self, pool: asyncpg.Pool) -> None:
        async with self._lock:
            if time.monotonic() - self.taken_at < self.max_age:
                return
            self.taken_at = time.monotonic()
            try:
                async with pool.acquire() as conn:
                    self.amounts = await asyncio.wait_for(retention.stored(conn), timeout=10.0)
            except Exception as exc:  # noqa: BLE001 - metrics report, they do not fail
                log.warning("reading what the store keeps failed: %r", exc)

    def collect(self) -> Iterator[Metric]:
        rows = GaugeMetricFamily(
            "fedagent_stored_rows", "Rows the store keeps of runs, by kind", labels=["kind"]
        )
        size = GaugeMetricFamily(
            "fedagent_stored_bytes",
            "Bytes the store keeps of runs, by kind (artifact content: its bytes)",
            labels=["kind"],
        )
        for kind, amount in self.amounts.items():
            rows.add_metric([kind], float(amount.rows))
            size.add_metric([kind], float(amount.bytes))
        yield rows
        yield size


STORED = StoredCollector()
REGISTRY.register(STORED)


# --- the middleware ---------------------------------------------------------------------------


def _problem_code(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    code = doc.get("code") if isinstance(doc, dict) else None
    return str(code) if code else None


def _ids_from_envelope(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    payload = doc.get("payload")
    agent_id = payload.get("agentId") if isinstance(payload, dict) else None
    message_id = doc.get("messageId")
    return {
        "messageId": message_id if isinstance(message_id, str) else None,
        "agentId": agent_id if isinstance(agent_id, str) else None,
        "peer": doc.get("senderId") if isinstance(doc.get("senderId"), str) else None,
    }


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class ObservabilityMiddleware:
    """Per request: a log context (requestId, agentId, messageId), the latency histogram,
    problem and refusal counters, and one access log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope, receive, send)
        context: dict[str, Any] = {"requestId": exchange.request_id}
        if match := _AGENT_PATH.search(exchange.path):
            context["agentId"] = match.group(1)
        token = _log_context.set({**(_log_context.get() or {}), **context})
        try:
            await self.app(
                scope,
                exchange.peek_receive if exchange.incoming else receive,
                exchange.watch_send,
            )
        finally:
            exchange.record(scope)
            _log_context.reset(token)


class _Exchange:
    """One request and its answer as the middleware watches them go by."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started = time.perf_counter()
        self.path: str = scope.get("path", "")
        self.method: str = scope.get("method", "GET")
        self.request_id = (_header(scope, b"x-request-id") or uuid.uuid4().hex[:16])[:64]
        self.incoming = self.method == "POST" and self.path.startswith(INCOMING_PREFIX)
        self.status = 500
        self.latency: float | None = None
        self.is_problem = False
        self.body = bytearray()
        self.problem = bytearray()
        self._receive = receive
        self._send = send

    async def peek_receive(self) -> Message:
        # Envelopes name their message and agent: log lines of the request carry them.
        message = await self._receive()
        if message["type"] == "http.request" and len(self.body) < _PEEK_LIMIT:
            self.body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                bind_log_context(**_ids_from_envelope(bytes(self.body)))
        return message

    async def watch_send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.latency = time.perf_counter() - self.started
            headers = list(message.get("headers", []))
            for key, value in headers:
                if key == b"content-type" and value.startswith(b"application/problem+json"):
                    self.is_problem = True
            headers.append((b"x-request-id", self.request_id.encode("latin-1")))
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and self.is_problem:
            if len(self.problem) < _PEEK_LIMIT:
                self.problem.extend(message.get("body", b""))
        await self._send(message)

    def record(self, scope: Scope) -> None:
        """The latency, the problem and refusal counters and the access log line."""
        method, path, status = self.method, self.path, self.status
        elapsed = time.perf_counter() - self.started
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        HTTP_LATENCY.labels(method, route, str(status)).observe(
            self.latency if self.latency is not None else elapsed
        )
        code = _problem_code(bytes(self.problem)) if self.is_problem else None
        if code:
            PROBLEMS.labels(code, str(status)).inc()
            if self.incoming:
                REFUSED.labels(code).inc()
        if route == SPAWN_ROUTE and method == "POST":
            SPAWN_REQUESTS.labels(code or ("accepted" if status < 400 else str(status))).inc()
        log.log(
            logging.DEBUG if path in QUIET_PATHS and status < 400 else logging.INFO,
            "%s %s %d",
            method,
            path,
            status,
            extra={
                "method": method,
                "path": path,
                "status": status,
                "durationMs": round(elapsed * 1000, 2),
                **({"code": code} if code else {}),
            },
        )
