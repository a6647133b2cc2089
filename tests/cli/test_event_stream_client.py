"""The CLI's reading of an agent's Server-Sent Events (the stream as the API frames it)."""

from __future__ import annotations

import httpx
import pytest

from cli.client import Api, CliError, Target

STREAM = (
    b": keep-alive\n\n"
    b'id: 7\nevent: state\ndata: {"state": "running"}\n\n'
    b'event: transcript\ndata: {"kind": "assistant",\ndata:  "text": "hi"}\n\n'
    b"id: 9\nevent: state\ndata: not json\n\n"
)


def api_serving(handler: httpx.MockTransport) -> Api:
    api = Api(Target(url="http://instance", token="t"))
    api.http = httpx.Client(base_url="http://instance", transport=handler)
    return api


def test_events_carry_their_id_name_and_decoded_data() -> None:
    seen: list[httpx.Request] = []

    def serve(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=STREAM, headers={"content-type": "text/event-stream"})

    events = list(api_serving(httpx.MockTransport(serve)).stream_events("a1", "5"))
    assert events == [
        {"id": "7", "event": "state", "data": {"state": "running"}},
        # no id of its own: the last one seen stays the stream's position
        {"id": "7", "event": "transcript", "data": {"kind": "assistant", "text": "hi"}},
        {"id": "9", "event": "state", "data": {"raw": "not json"}},
    ]
    assert seen[0].headers["Last-Event-ID"] == "5"
    assert seen[0].headers["Accept"] == "text/event-stream"
    assert seen[0].url.path == "/api/v1/federation/agents/a1/events"


def test_a_refused_stream_is_the_problem_it_answers() -> None:
    def serve(request: httpx.Request) -> httpx.Response:
        body = {"code": "agent_not_found", "title": "Agent not found", "detail": "no such agent"}
        return httpx.Response(404, json=body, headers={"content-type": "application/problem+json"})

    with pytest.raises(CliError) as refused:
        list(api_serving(httpx.MockTransport(serve)).stream_events("a1", None))
    assert refused.value.code == "agent_not_found"
