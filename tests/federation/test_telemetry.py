"""Traces in one process, read from the OpenTelemetry SDK's in-memory exporter: a peer message
continues the trace its signed envelope names, not the one its HTTP headers name; with the OTEL_*
settings unset or the SDK disabled, nothing is installed and nothing is exported."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from activities.federation import PeerMessenger
from api import spawner
from api.spawner import SpawnStarter
from federation import telemetry, tracing
from federation.envelope import MessageType, generate_signing_key, parse_envelope, sign_envelope
from federation.errors import PeerUnreachable
from federation.identity import Identity, KeyRecord
from federation.peer import PeerLink
from federation.settings import Settings
from federation.states import AgentState
from tests.e2e.otlp_receiver import OtlpReceiver
from worker.reconciler import Reconciler
from workflows.models import KillRequest, KillResult

KEY = generate_signing_key()
CONNECTION = "0b9f1a52-3c1e-4d8e-9a57-6c2f1e0d7a11"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert telemetry.setup("api", "memory", exporter=exporter)
    try:
        yield exporter
    finally:
        telemetry.reset()


def ingress_app() -> FastAPI:
    """An ingress shaped like the peer ingress: the same dependency, `receive` once the
    envelope is read, a step of its own, and the traceparent a reply would carry."""
    router = APIRouter(dependencies=[Depends(tracing.ingress_spans)])

    @router.post("/incoming")
    async def incoming(body: dict[str, Any]) -> dict[str, Any]:
        envelope = parse_envelope(body)
        tracing.receive(envelope, {"connection_id": CONNECTION})
        with tracing.span("start workflow", agent_id=envelope.payload["agentId"]):
            pass
        return {"outgoing": tracing.outgoing()}

    app = FastAPI()
    app.include_router(router)
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=telemetry.provider(), exclude_spans=["receive", "send"]
    )
    return app


def spawn_envelope(traceparent: str, agent_id: str = "a-1") -> dict[str, Any]:
    return sign_envelope(
        KEY,
        type=MessageType.COMMAND,
        sender_id="asker",
        recipient_id="doer",
        command_type="agent.spawn",
        payload={"agentId": agent_id, "context": {"instructions": "secret plan"}},
        traceparent=traceparent,
    ).to_wire()


@pytest.fixture
async def client(spans: InMemorySpanExporter) -> AsyncIterator[httpx.AsyncClient]:
    spans.clear()
    transport = httpx.ASGITransport(app=ingress_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://doer") as http:
        yield http


@pytest.mark.parametrize("header", ["another trace", "none"])
async def test_the_ingress_continues_the_trace_of_the_signed_envelope(
    client: httpx.AsyncClient, spans: InMemorySpanExporter, header: str
) -> None:
    sender_trace, sender_span = secrets.token_hex(16), secrets.token_hex(8)
    headers = {}
    if header == "another trace":
        headers["traceparent"] = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    envelope = spawn_envelope(f"00-{sender_trace}-{sender_span}-01")
    response = await client.post("/incoming", json=envelope, headers=headers)
    assert response.status_code == 200, response.text

    finished = {span.name: span for span in spans.get_finished_spans()}
    receive = finished["receive agent.spawn"]
    assert f"{receive.context.trace_id:032x}" == sender_trace
    assert receive.parent is not None and f"{receive.parent.span_id:016x}" == sender_span
    assert receive.parent.is_remote
    assert dict(receive.attributes or {}) == {
        "fedagent.message_type": "COMMAND",
        "fedagent.command_type": "agent.spawn",
        "fedagent.message_id": envelope["messageId"],
        "fedagent.peer_instance_id": "asker",
        "fedagent.agent_id": "a-1",
        "fedagent.connection_id": CONNECTION,
    }
    # What the request does after it belongs to the sender's trace, and so does a reply.
    step = finished["start workflow"]
    assert step.parent is not None and step.parent.span_id == receive.context.span_id
    assert response.json()["outgoing"] == (f"00-{sender_trace}-{receive.context.span_id:016x}-01")
    # The HTTP span stays what the headers said, linked from the receive span.
    server = finished["POST /incoming"]
    assert [link.context.span_id for link in receive.links] == [server.context.span_id]
    if header == "another trace":
        assert f"{server.context.trace_id:032x}" != sender_trace
    assert "secret plan" not in repr([dict(s.attributes or {}) for s in finished.values()])


async def test_what_a_peer_names_is_cut_short_in_span_attributes(
    client: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    response = await client.post("/incoming", json=spawn_envelope(traceparent, "x" * 5000))
    assert response.status_code == 200, response.text
    (receive,) = [s for s in spans.get_finished_spans() if s.name == "receive agent.spawn"]
    assert (receive.attributes or {})["fedagent.agent_id"] == "x" * tracing.ATTRIBUTE_MAX


async def test_a_message_sent_in_a_span_carries_that_span(spans: InMemorySpanExporter) -> None:
    spans.clear()
    with tracing.sending("COMMAND", "agent.kill", peer_instance_id="doer", agent_id="a-2"):
        signed = sign_envelope(
            KEY,
            type=MessageType.COMMAND,
            sender_id="asker",
            recipient_id="doer",
            command_type="agent.kill",
            payload={"agentId": "a-2"},
        )
    (send,) = spans.get_finished_spans()
    assert send.name == "send agent.kill"
    context = send.context
    flags = int(context.trace_flags)
    assert signed.traceparent == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"


async def test_a_stored_trace_is_continued_where_no_span_is_current(
    spans: InMemorySpanExporter,
) -> None:
    spans.clear()
    stored = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    with tracing.trace(stored), tracing.span("agent.run", attempt=2, sandbox="bwrap"):
        pass
    (run,) = spans.get_finished_spans()
    assert run.parent is not None
    assert f"00-{run.context.trace_id:032x}-{run.parent.span_id:016x}-01" == stored
    assert dict(run.attributes or {}) == {"fedagent.attempt": 2, "fedagent.sandbox": "bwrap"}


def test_the_settings_that_turn_traces_on() -> None:
    assert telemetry.exporter_names({}) == []
    assert telemetry.exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == ["otlp"]
    assert telemetry.exporter_names({"OTEL_TRACES_EXPORTER": "console,otlp"}) == [
        "console",
        "otlp",
    ]
    assert telemetry.exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}
    assert telemetry.exporter_names(disabled) == []
    with pytest.raises(telemetry.TelemetrySettingsError, match="zipkin"):
        telemetry.exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})


# A process of its own: what an API process does at start and on a request, and what it would
# export, with the environment the test gives it.
PROCESS = """
import asyncio, json, httpx
from fastapi import FastAPI
from opentelemetry import trace
from federation import telemetry, tracing

on = telemetry.setup("api", "solo")
app = FastAPI()

@app.get("/run")
async def run() -> dict:
    with tracing.span("agent.run", agent_id="a-3"):
        return {"outgoing": tracing.outgoing()}

telemetry.instrument_app(app)

async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with telemetry.instrument_client(httpx.AsyncClient(transport=transport)) as http:
        assert (await http.get("http://solo/run")).status_code == 200

asyncio.run(main())
telemetry.flush()
print(json.dumps({
    "on": on,
    "provider": type(trace.get_tracer_provider()).__name__,
    "interceptors": len(telemetry.temporal_interceptors()),
}))
"""


async def run_process(env: dict[str, str]) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROCESS,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return answer


async def test_with_the_settings_unset_or_the_sdk_disabled_nothing_is_exported() -> None:
    receiver = OtlpReceiver()
    await receiver.start()
    try:
        unset = await run_process({})
        disabled = await run_process(
            {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        )
        for answer in (unset, disabled):
            assert answer == {"on": False, "provider": "ProxyTracerProvider", "interceptors": 0}
        assert receiver.requests == 0 and receiver.spans == []

        # The same process with the endpoint set exports there, named as the settings say.
        traced = await run_process(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "api-7"}
        )
        assert traced == {"on": True, "provider": "TracerProvider", "interceptors": 1}
        names = {(s.name, s.resource["service.name"]) for s in receiver.spans}
        assert {("GET /run", "api-7"), ("agent.run", "api-7")} <= names
    finally:
        await receiver.stop()


@pytest.mark.parametrize(
    ("command", "setting", "named"),
    [
        ("serve", "OTEL_TRACES_EXPORTER", "zipkin"),
        ("worker", "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ],
)
async def test_a_process_refuses_to_start_with_an_exporter_it_lacks(
    command: str, setting: str, named: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FEDAGENT_"))}
    env = {**clean, "OTEL_TRACES_EXPORTER": "otlp", setting: named}
    # Nothing listens there: the check comes before the process reaches its database.
    env["FEDAGENT_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:9/none"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 78, (out + err).decode()
    assert named in " ".join(err.decode().split())


def _asker_identity() -> Identity:
    record = KeyRecord(
        key_id=KEY.key_id,
        algorithm=KEY.algorithm,
        public_pem="",
        created_at=datetime.now(UTC),
        retired_at=None,
        valid_until=None,
    )
    return Identity(
        instance_id="asker",
        name="asker",
        public_url="http://asker",
        keys=(record,),
        _private=("plain", KEY.private_pem),
    )


def _unavailable_peer() -> httpx.AsyncClient:
    """A peer that answers 503: the send fails after its span has every attribute."""
    return httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(503)))


CONNECTION_ROW: dict[str, Any] = {
    "connection_id": uuid.UUID(CONNECTION),
    "remote_url": "http://doer",
    "remote_instance_id": "doer",
    "remote_keys": [],
}


@pytest.mark.parametrize("sender", ["run activity", "peer link"])
async def test_the_span_of_a_signed_send_names_its_connection(
    spans: InMemorySpanExporter, sender: str
) -> None:
    """Both ways a message goes to a peer (a run's activities, the API's own asks): the
    `send` span carries the connection, like the peer's `receive` span."""
    spans.clear()
    settings = Settings()
    async with _unavailable_peer() as http:
        with pytest.raises(PeerUnreachable):
            if sender == "run activity":
                messenger = PeerMessenger(None, http, settings)  # type: ignore[arg-type]
                messenger.identity = _async_value(_asker_identity())  # type: ignore[method-assign]
                await messenger.send(
                    CONNECTION_ROW,
                    type=MessageType.COMMAND,
                    command_type="agent.kill",
                    payload={"agentId": "a-4"},
                )
            else:
                link = PeerLink.of(
                    CONNECTION_ROW, http=http, identity=_asker_identity(), settings=settings
                )
                await link.send(MessageType.COMMAND, "agent.status", {"agentId": "a-4"})
    (send,) = [s for s in spans.get_finished_spans() if s.name.startswith("send ")]
    assert (send.attributes or {})["fedagent.connection_id"] == CONNECTION
    assert (send.attributes or {})["fedagent.agent_id"] == "a-4"


def _async_value(value: Any) -> Any:
    async def answer() -> Any:
        return value

    return answer


class _RecordingTemporal:
    """What a kill-with-start asks of Temporal, and in which trace it asks."""

    def __init__(self) -> None:
        self.traces: list[tuple[str | None, str | None]] = []

    async def execute_update_with_start_workflow(self, *args: Any, **kwargs: Any) -> KillResult:
        from opentelemetry import trace as otel

        context = otel.get_current_span().get_span_context()
        otel_trace = f"{context.trace_id:032x}" if context.is_valid else None
        self.traces.append((tracing.trace_id(tracing.current()), otel_trace))
        return KillResult(agent_id="a-5", state=AgentState.KILLED)


async def test_a_kill_that_starts_the_run_continues_the_spawns_trace(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workflow a kill starts is the spawn's: its start (and so its run and the kill's
    messages) belongs to the trace stored with the spawn, not to the kill request's."""
    spawn_trace = secrets.token_hex(16)
    temporal = _RecordingTemporal()
    starter = SpawnStarter(None, temporal, Settings())  # type: ignore[arg-type]

    async def arguments(row: dict[str, Any], db: Any) -> tuple[Any, dict[str, Any]]:
        return SimpleNamespace(traceparent=row["traceparent"]), {"id": "wf"}

    async def started(row: dict[str, Any], db: Any) -> None:
        return None

    monkeypatch.setattr(starter, "_start_arguments", arguments)
    monkeypatch.setattr(starter, "_mark_started", started)
    monkeypatch.setattr(spawner, "WithStartWorkflowOperation", lambda *a, **k: None)
    row = {"traceparent": f"00-{spawn_trace}-{secrets.token_hex(8)}-01"}
    kill_request = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    # Inside the kill request's own span (its HTTP server span).
    with tracing.trace(kill_request), tracing.span("DELETE /agents/{id}"):
        await starter.kill_with_start(row, KillRequest())
    assert temporal.traces == [(spawn_trace, spawn_trace)]


class _RecordingStarts:
    """What the reconciler starts, and in which trace it asks."""

    def __init__(self) -> None:
        self.traces: list[str | None] = []

    async def start_workflow(self, *args: Any, **kwargs: Any) -> None:
        from opentelemetry import trace as otel

        context = otel.get_current_span().get_span_context()
        self.traces.append(f"{context.trace_id:032x}" if context.is_valid else None)


async def test_a_kill_the_reconciler_delivers_is_in_the_spawns_trace(
    spans: InMemorySpanExporter,
) -> None:
    """The reconciler (a background round, no span of its own) starts the kill's delivery in
    the trace stored with the spawn: its workflow is not a trace of its own."""
    spawn_trace = secrets.token_hex(16)
    client = _RecordingStarts()
    reconciler = Reconciler(None, client, interval=60)  # type: ignore[arg-type]
    row = {
        "agent_id": uuid.uuid4(),
        "traceparent": f"00-{spawn_trace}-{secrets.token_hex(8)}-01",
    }
    await reconciler.tell_executor(row)
    assert client.traces == [spawn_trace]
