"""What an operator watches: Prometheus metrics of the API and the workers, readiness, and JSON
logs that carry the ids of a run (instance, agentId, workflowId, messageId)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio import activity, workflow
from temporalio.worker import Worker

from cli.devstack import DevStack
from federation.logs import configure_logging, log_context
from federation.settings import Settings
from federation.store import workers
from federation.store.db import create_pool
from tests.conftest import Instance, free_port_block
from tests.e2e.helpers import spawn_body
from worker.sandboxes import report_sandbox_limits

pytestmark = pytest.mark.e2e


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by (name, labels)."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


async def metrics(instance: Instance) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await instance.http.get(f"{instance.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_count_spawns_outcomes_durations_and_latency(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    await asyncio.sleep(2.1)  # agent figures are read from the store at most every 2 s
    hub_before, spoke_before = await metrics(hub), await metrics(spoke)
    body = spawn_body(hub_spoke, "$ echo measured", task_id="metrics-1")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    assert (await hub.wait_agent(body["agentId"]))["state"] == "completed"
    await asyncio.sleep(2.1)
    hub_after, spoke_after = await metrics(hub), await metrics(spoke)

    def grew(before: Any, after: Any, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(hub_after, "fedagent_metrics_store_up") == 1.0
    assert grew(hub_before, hub_after, "fedagent_spawn_requests_total", outcome="accepted") == 1
    assert (
        grew(hub_before, hub_after, "fedagent_spawns_total", role="requester", outcome="completed")
        >= 1
    )
    assert (
        grew(
            spoke_before, spoke_after, "fedagent_spawns_total", role="executor", outcome="completed"
        )
        >= 1
    )
    for page, before, role in (
        (hub_after, hub_before, "requester"),
        (spoke_after, spoke_before, "executor"),
    ):
        assert grew(before, page, "fedagent_agent_run_duration_seconds_count", role=role) >= 1
        assert value(page, "fedagent_agent_run_duration_seconds_sum", role=role) > 0
        assert ("fedagent_agents_running", frozenset({("role", role)})) in page
    spawn_route = {
        "method": "POST",
        "route": "/api/v1/federation/agents/spawn",
        "status": "202",
    }
    assert (
        grew(hub_before, hub_after, "fedagent_http_request_duration_seconds_count", **spawn_route)
        == 1
    )
    assert (
        value(hub_after, "fedagent_http_request_duration_seconds_bucket", **spawn_route, le="+Inf")
        >= 1
    )


async def test_refused_peer_messages_are_counted_by_code(spoke: Instance) -> None:
    before = await metrics(spoke)
    response = await spoke.http.post(
        f"{spoke.url}/api/v1/federation/incoming/command",
        json={"protocol": "fedagent/1", "messageId": str(uuid.uuid4()), "type": "COMMAND"},
    )
    assert response.status_code >= 400
    code = response.json()["code"]
    after = await metrics(spoke)
    assert (
        value(after, "fedagent_refused_messages_total", code=code)
        - value(before, "fedagent_refused_messages_total", code=code)
        == 1
    )
    assert value(after, "fedagent_problems_total", code=code, status=str(response.status_code)) >= 1


async def test_health_and_readiness(hub: Instance) -> None:
    health = await hub.http.get(f"{hub.url}/healthz")
    assert health.json() == {"status": "ok"}
    ready = await hub.http.get(f"{hub.url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"postgres": "ok", "temporal": "ok", "workers": "ok", "sandboxes": "ok"},
    }
    assert ready.headers["x-request-id"]


async def test_readiness_and_the_worker_log_say_which_run_limits_a_worker_cannot_hold(
    hub: Instance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker starting where no cgroup is writable: its sandboxes hold memory and CPU per
    # process only. It says so in its log (with the fix) and the API's /readyz says so.
    settings = Settings(
        sandbox="bwrap" if shutil.which("bwrap") else "process",
        sandbox_cgroups=False,
        data_dir=tmp_path,
        instance_name=hub.name,
    )
    pool = await create_pool(hub.info["databaseUrl"], max_size=1)
    worker = f"test-host:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        with caplog.at_level(logging.WARNING, logger="worker.sandboxes"):
            gaps = await report_sandbox_limits(settings, pool, worker)
        assert {gap.limit for gap in gaps} >= {"memory", "cpu"}
        said = [r for r in caplog.records if r.name == "worker.sandboxes"]
        assert any("memory limit" in r.getMessage() and "To fix" in r.getMessage() for r in said)
        assert all(r.levelno >= logging.WARNING for r in said)
        ready = await hub.http.get(f"{hub.url}/readyz")
        assert ready.status_code == 200  # the instance still serves; the gap is a warning
        warning = ready.json()["checks"]["sandboxes"]
        assert warning.startswith("warning:") and worker in warning, warning
        assert "memory limit" in warning and "pids_limit" in warning
    finally:
        await workers.forget(pool, worker)  # as the worker does when it stops
        await pool.close()
    ready = await hub.http.get(f"{hub.url}/readyz")
    assert ready.json()["checks"]["sandboxes"] == "ok"


# --- JSON logs of a real API process ------------------------------------------------------------


class ExtraProcess:
    """One more process of an instance (API or worker) with settings of the test's choosing."""

    def __init__(self, stack: DevStack, name: str, role: str, env: dict[str, str], log: Path):
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", role],
            env={**os.environ, **stack.instances[name].env, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        DevStack.stop_process(self.proc, grace=30.0)
        self._out.close()


@pytest.fixture
async def json_api(stack: DevStack, tmp_path: Path) -> AsyncIterator[tuple[str, ExtraProcess]]:
    port = free_port_block(1)
    api = ExtraProcess(
        stack,
        "hub",
        "serve",
        {"FEDAGENT_API_PORT": str(port), "FEDAGENT_LOG_FORMAT": "json"},
        tmp_path / "hub-api.jsonl",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                assert api.proc.poll() is None, api.log.read_text()
                try:
                    if (await http.get(f"{url}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "extra API never got ready"
                await asyncio.sleep(0.2)
        yield url, api
    finally:
        api.stop()


async def test_api_logs_one_json_event_per_line_with_the_run_ids(
    json_api: tuple[str, ExtraProcess], hub: Instance, hub_spoke: str
) -> None:
    url, api = json_api
    body = spawn_body(hub_spoke, "$ echo logged", task_id="logs-1")
    spawned = await hub.http.post(
        f"{url}/api/v1/federation/agents/spawn",
        json=body,
        headers={**hub.auth, "X-Request-ID": "req-logs-1"},
    )
    assert spawned.status_code == 202, spawned.text
    assert spawned.headers["x-request-id"] == "req-logs-1"
    await hub.wait_agent(body["agentId"])
    read = await hub.http.get(f"{url}/api/v1/federation/agents/{body['agentId']}", headers=hub.auth)
    assert read.status_code == 200
    message_id = str(uuid.uuid4())
    refused = await hub.http.post(
        f"{url}/api/v1/federation/incoming/event",
        json={
            "protocol": "fedagent/1",
            "messageId": message_id,
            "payload": {"agentId": body["agentId"]},
        },
    )
    assert refused.status_code >= 400

    deadline = time.monotonic() + 10
    while True:
        events = [json.loads(line) for line in api.lines()]  # every line is one JSON object
        spawn_lines = [e for e in events if e.get("requestId") == "req-logs-1"]
        message_lines = [e for e in events if e.get("messageId") == message_id]
        if spawn_lines and message_lines:
            break
        assert time.monotonic() < deadline, events[-20:]
        await asyncio.sleep(0.2)
    for event in events:
        assert {"ts", "level", "logger", "msg"} <= set(event)
        assert event["instance"] == "hub"
    access = [e for e in spawn_lines if e["logger"] == "fedagent.access"]
    assert access and access[0]["status"] == 202 and access[0]["path"].endswith("/agents/spawn")
    reads = [e for e in events if e.get("agentId") == body["agentId"] and e.get("method") == "GET"]
    assert reads and reads[0]["status"] == 200
    refusal = [e for e in message_lines if e["logger"] == "fedagent.access"][0]
    assert refusal["agentId"] == body["agentId"]
    assert refusal["code"] == refused.json()["code"]


# --- workers: Temporal SDK metrics and ids from the activity -----------------------------------


async def test_worker_serves_temporal_sdk_metrics_and_logs_json(
    stack: DevStack, tmp_path: Path
) -> None:
    port = free_port_block(1)
    worker = ExtraProcess(
        stack,
        "edge",
        "worker",
        {"FEDAGENT_METRICS_PORT": str(port), "FEDAGENT_LOG_FORMAT": "json"},
        tmp_path / "edge-worker.jsonl",
    )
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                assert worker.proc.poll() is None, worker.log.read_text()
                try:
                    response = await http.get(f"http://127.0.0.1:{port}/metrics")
                    if response.status_code == 200 and "temporal_" in response.text:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "worker metrics never appeared"
                await asyncio.sleep(0.3)
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert any(name.startswith("temporal_") for name in names), names
        assert 'instance="edge"' in response.text
    finally:
        worker.stop()
    lines = worker.lines()
    assert lines
    for line in lines:
        event = json.loads(line)
        assert event["instance"] == "edge"


@activity.defn(name="observability_probe")
async def observability_probe(text: str) -> str:
    logging.getLogger("tests.probe").info("probe says %s", text)
    with log_context(messageId="m-123"):
        logging.getLogger("tests.probe").info("inside a message")
    return text


# Not sandboxed: this test module imports what workflow code may not (subprocess, httpx).
@workflow.defn(name="ObservabilityProbeWorkflow", sandboxed=False)
class ObservabilityProbeWorkflow:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(
            observability_probe, text, start_to_close_timeout=timedelta(seconds=10)
        )


async def test_activity_logs_carry_workflow_and_agent_ids(hub: Instance) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = configure_logging("info", "json", instance="hub", stream=stream)
    try:
        client = await hub.temporal()
        agent_id = str(uuid.uuid4())
        queue = f"observability-{uuid.uuid4().hex[:8]}"
        async with Worker(
            client,
            task_queue=queue,
            workflows=[ObservabilityProbeWorkflow],
            activities=[observability_probe],
        ):
            result = await client.execute_workflow(
                ObservabilityProbeWorkflow.run,
                "hello",
                id=f"agent-run/some-requester/{agent_id}",
                task_queue=queue,
            )
        assert result == "hello"
    finally:
        root.removeHandler(handler)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    probe = [e for e in events if e["logger"] == "tests.probe"]
    assert [e["msg"] for e in probe] == ["probe says hello", "inside a message"]
    for event in probe:
        assert event["instance"] == "hub"
        assert event["workflowId"] == f"agent-run/some-requester/{agent_id}"
        assert event["agentId"] == agent_id
    assert probe[1]["messageId"] == "m-123"
    assert "messageId" not in probe[0]
