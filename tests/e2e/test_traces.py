"""One spawn is one trace across both instances: the requester's REST request, its workflow and
activities, the signed send, the executor's ingress (continued from the signed envelope), its
workflow, the agent's sandboxed run, and the events back. Real `fedagent serve` and `fedagent
worker` processes of two instances export OTLP/HTTP, configured only by the standard OTEL_*
settings, to a receiver on loopback."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest

from cli.devstack import DevStack, free_port_block
from tests.conftest import Instance, connect
from tests.e2e.helpers import spawn_body
from tests.e2e.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e
NAMES = ["asker", "doer"]


@dataclass
class TracedPair:
    receiver: OtlpReceiver
    asker: Instance
    doer: Instance
    connection: str


@pytest.fixture(scope="module")
async def traced(
    tmp_path_factory: pytest.TempPathFactory, http: httpx.AsyncClient
) -> AsyncIterator[TracedPair]:
    receiver = OtlpReceiver()
    await receiver.start()
    ports = free_port_block(len(NAMES))
    temporal = free_port_block(2)
    stack = DevStack(
        NAMES,
        tmp_path_factory.mktemp("traces"),
        base_port=ports,
        temporal_port=temporal,
        ui_port=temporal + 1,
        extra_env={
            # What a user sets to send traces to a collector: nothing fedagent-specific.
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=trace-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        await stack.start()
        asker, doer = (
            Instance({**stack.instances[n].info, "dataDir": str(stack.data_dir)}, http)
            for n in NAMES
        )
        yield TracedPair(receiver, asker, doer, await connect(asker, doer))
    finally:
        stack.stop()
        await receiver.stop()


class Trace:
    """The spans of one trace id, and questions about their tree."""

    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self.spans = spans
        self.by_id = {s.span_id: s for s in spans}

    def one(self, name: str, instance: str, role: str | None = None) -> ReceivedSpan:
        found = [
            s
            for s in self.spans
            if s.name == name
            and s.resource.get("service.namespace") == instance
            and (role is None or s.resource.get("service.name") == f"fedagent-{role}")
        ]
        assert found, f"no span {name!r} of {instance} in\n{self.tree()}"
        return found[0]

    def tree(self) -> str:
        """The spans as an indented tree (what a trace viewer shows)."""
        children: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans:
            children.setdefault(span.parent_id, []).append(span)
        lines: list[str] = []

        def walk(span: ReceivedSpan, depth: int) -> None:
            where = f"{span.resource.get('service.namespace')}/{span.resource.get('service.name')}"
            lines.append(f"{'  ' * depth}{span.name} [{span.kind}] {where}")
            for child in children.get(span.span_id, []):
                walk(child, depth + 1)

        for span in self.spans:
            if span.parent_id not in self.by_id:
                walk(span, 0)
        return "\n".join(lines)

    def where(self, test: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        return [s for s in self.spans if test(s)]

    def descends(self, span: ReceivedSpan, ancestor: ReceivedSpan) -> bool:
        seen = span
        while seen.parent_id in self.by_id:
            seen = self.by_id[seen.parent_id]
            if seen.span_id == ancestor.span_id:
                return True
        return False


async def wait_trace(receiver: OtlpReceiver, trace_id: str, names: set[str]) -> Trace:
    deadline = time.monotonic() + 30
    while True:
        spans = [s for s in receiver.spans if s.trace_id == trace_id]
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return Trace(spans)
        await asyncio.sleep(0.2)


async def test_one_spawn_is_one_trace_across_both_instances(traced: TracedPair) -> None:
    asker, doer = traced.asker, traced.doer
    user_trace, user_span = secrets.token_hex(16), secrets.token_hex(8)
    body = spawn_body(traced.connection, "$ echo traced > out.txt", task_id="trace-1")
    response = await asker.call(
        "POST",
        "/agents/spawn",
        json=body,
        headers={"traceparent": f"00-{user_trace}-{user_span}-01"},
    )
    assert response.status_code == 202, response.text
    assert (await asker.wait_agent(body["agentId"]))["state"] == "completed"

    trace = await wait_trace(
        traced.receiver,
        user_trace,
        {"agent.run", "RunActivity:notify_requester", "receive agent.state"},
    )
    # The user's request on the requester's API, its workflow and the activity that sends.
    rest = trace.one("POST /api/v1/federation/agents/spawn", "asker", "api")
    assert rest.kind == "server" and rest.parent_id == user_span
    started = trace.one("StartWorkflow:RemoteAgentWorkflow", "asker", "api")
    assert trace.descends(started, rest)
    # Temporal's interceptor hangs a workflow's run and its activities on its start.
    workflow = trace.one("RunWorkflow:RemoteAgentWorkflow", "asker", "worker")
    assert workflow.parent_id == started.span_id
    sending = trace.one("RunActivity:send_spawn", "asker", "worker")
    assert trace.descends(sending, started)
    send = trace.one("send agent.spawn", "asker", "worker")
    assert trace.descends(send, sending)
    assert send.attributes["fedagent.agent_id"] == body["agentId"]
    assert send.attributes["fedagent.peer_instance_id"] == doer.id
    assert send.attributes["fedagent.connection_id"] == traced.connection
    post = [s for s in trace.where(lambda s: s.parent_id == send.span_id) if s.kind == "client"]
    assert [s.name for s in post] == ["POST"]

    # The executor's ingress: its HTTP span continues the header, its receive span the
    # signed envelope; the run's workflow, activities and sandboxed agent run below it.
    server = trace.one("POST /api/v1/federation/incoming/command", "doer", "api")
    assert server.parent_id == post[0].span_id
    receive = trace.one("receive agent.spawn", "doer", "api")
    assert receive.kind == "consumer" and receive.parent_id == send.span_id
    assert receive.attributes["fedagent.connection_id"] == traced.connection
    assert receive.attributes["fedagent.agent_id"] == body["agentId"]
    run_started = trace.one("StartWorkflow:AgentRunWorkflow", "doer", "api")
    assert trace.descends(run_started, receive)
    run_workflow = trace.one("RunWorkflow:AgentRunWorkflow", "doer", "worker")
    assert run_workflow.parent_id == run_started.span_id
    for name in ("RunActivity:admit_run", "RunActivity:run_agent"):
        assert trace.descends(trace.one(name, "doer", "worker"), run_started), name
    agent_run = trace.one("agent.run", "doer", "worker")
    # temporalio's TracingInterceptor ends a workflow's spans as it opens them (a span left open
    # across workflow tasks is not replay-safe): the time is on the activities (docs say so).
    assert run_workflow.duration_ns == 0 and workflow.duration_ns == 0
    assert agent_run.duration_ns > 0
    assert trace.descends(agent_run, trace.one("RunActivity:run_agent", "doer", "worker"))
    assert agent_run.attributes == {
        "fedagent.agent_id": body["agentId"],
        "fedagent.connection_id": traced.connection,
        "fedagent.agent_type": "worker",
        "fedagent.attempt": 1,
        "fedagent.sandbox": "bwrap",
    }

    # The events back: the executor's sends, the requester's receives under them.
    event_sends = trace.where(
        lambda s: s.name == "send agent.state" and s.resource["service.namespace"] == "doer"
    )
    event_receives = trace.where(
        lambda s: s.name == "receive agent.state" and s.resource["service.namespace"] == "asker"
    )
    assert event_sends and event_receives
    assert {r.parent_id for r in event_receives} <= {s.span_id for s in event_sends}
    assert all(trace.descends(s, run_started) for s in event_sends)
    signals = trace.where(lambda s: s.name == "SignalWorkflow:on_event")
    assert signals and all(s.parent_id in {r.span_id for r in event_receives} for s in signals)

    # The standard resource settings are honoured; nothing of the instructions is recorded.
    assert {s.resource["deployment.environment.name"] for s in trace.spans} == {"trace-test"}
    everything = repr([(s.attributes, s.resource) for s in trace.spans])
    assert "echo traced" not in everything
    assert asker.info["adminToken"] not in everything


async def test_a_kill_is_in_the_spawns_trace(traced: TracedPair) -> None:
    """The kill request is a trace of its own up to its update; what the run does about it
    (the update's handling, the signed kill to the executor, its receipt) is the spawn's."""
    asker = traced.asker
    spawn_trace, kill_trace = secrets.token_hex(16), secrets.token_hex(16)
    body = spawn_body(traced.connection, "$ sleep 300", task_id="trace-kill", timeout=600)
    response = await asker.call(
        "POST",
        "/agents/spawn",
        json=body,
        headers={"traceparent": f"00-{spawn_trace}-{secrets.token_hex(8)}-01"},
    )
    assert response.status_code == 202, response.text
    deadline = time.monotonic() + 60
    while (await asker.call("GET", f"/agents/{body['agentId']}")).json()["state"] != "running":
        assert time.monotonic() < deadline, "the run never started"
        await asyncio.sleep(0.2)
    killed = await asker.call(
        "POST",
        f"/agents/{body['agentId']}/kill",
        headers={"traceparent": f"00-{kill_trace}-{secrets.token_hex(8)}-01"},
    )
    assert killed.status_code == 200, killed.text
    assert killed.json()["state"] == "killed"

    trace = await wait_trace(
        traced.receiver, spawn_trace, {"HandleUpdate:kill", "send agent.kill", "receive agent.kill"}
    )
    update = trace.one("HandleUpdate:kill", "asker", "worker")
    send = trace.one("send agent.kill", "asker", "worker")
    assert send.attributes["fedagent.connection_id"] == traced.connection
    receive = trace.one("receive agent.kill", "doer", "api")
    assert receive.parent_id == send.span_id
    request = await wait_trace(traced.receiver, kill_trace, {"StartWorkflowUpdate:kill"})
    asked = request.one("StartWorkflowUpdate:kill", "asker", "api")
    assert update.links == [asked.span_id]
