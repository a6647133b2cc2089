"""Event streams (SSE) are bounded per API token and end with their token (issue 18, point 11).

Each test follows an agent of its own that stays running (its row written as a spawn writes
it, with no workflow behind it), so only the token can end its streams."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import Instance

pytestmark = pytest.mark.e2e

MAX_STREAMS = 8  # FEDAGENT_SSE_MAX_STREAMS_PER_TOKEN's default


async def running_agent(hub: Instance, spoke: Instance, connection_id: str) -> uuid.UUID:
    agent_id = uuid.uuid4()
    await hub.fetch(
        "INSERT INTO agents (agent_id, role, connection_id, peer_instance_id, workspace,"
        " task_id, agent_type, context, options, workflow_id, state)"
        " VALUES ($1, 'requester', $2, $3, 'default', 't-sse', 'worker', '{}', '{}', $4,"
        " 'running')",
        agent_id,
        uuid.UUID(connection_id),
        spoke.id,
        f"remote-agent/{agent_id}",
    )
    await hub.fetch(
        "INSERT INTO agent_events (agent_id, seq, state) VALUES ($1, 1, 'running')", agent_id
    )
    return agent_id


async def new_token(hub: Instance) -> tuple[str, dict[str, str]]:
    response = await hub.call(
        "POST", "/tokens", json={"name": f"sse-{uuid.uuid4().hex[:8]}", "role": "admin"}
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], {"Authorization": f"Bearer {response.json()['token']}"}


class Stream:
    """One open event stream and the one reader of its lines (a second reader, or the first
    one left to the garbage collector, would close it)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.lines = response.aiter_lines()

    async def first_event(self) -> dict[str, str]:
        """Read until the stream's first event (its agent's current state) has arrived."""
        assert self.status_code == 200
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line == "" and "event" in fields:
                return fields
            if ":" in line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        raise AssertionError("the stream ended before its first event")

    async def rest(self) -> list[str]:
        """Every line until the server ends the stream."""
        return [line async for line in self.lines]


@contextlib.asynccontextmanager
async def stream(hub: Instance, agent_id: uuid.UUID, auth: dict[str, str]) -> AsyncIterator[Stream]:
    url = f"{hub.url}/api/v1/federation/agents/{agent_id}/events"
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=None)) as http:
        async with http.stream("GET", url, headers=auth) as response:
            yield Stream(response)


async def test_an_api_token_holds_a_bounded_number_of_event_streams(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    agent_id = await running_agent(hub, spoke, hub_spoke)
    _, auth = await new_token(hub)
    held: list[Stream] = []  # each one referenced until the end: its reader keeps it open
    async with contextlib.AsyncExitStack() as open_streams:
        for _ in range(MAX_STREAMS):
            held.append(await open_streams.enter_async_context(stream(hub, agent_id, auth)))
            assert (await held[-1].first_event())["event"] == "state"
        async with stream(hub, agent_id, auth) as refused:
            assert refused.status_code == 429
            assert refused.response.headers["content-type"].startswith("application/problem+json")
            body = await refused.response.aread()
            assert b'"code":"too_many_streams"' in body
        # Another token is not held back by this one's streams.
        async with stream(hub, agent_id, hub.auth) as other:
            assert (await other.first_event())["event"] == "state"
    # Once its streams are closed, the token may open one again.
    for _ in range(100):
        async with stream(hub, agent_id, auth) as again:
            if again.status_code == 200:
                break
        await asyncio.sleep(0.2)
    assert again.status_code == 200


async def test_an_open_stream_ends_when_its_token_is_revoked(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    agent_id = await running_agent(hub, spoke, hub_spoke)
    token_id, auth = await new_token(hub)
    async with stream(hub, agent_id, auth) as opened:
        assert (await opened.first_event())["event"] == "state"
        revoked = await hub.call("DELETE", f"/tokens/{token_id}")
        assert revoked.status_code == 200, revoked.text

        # Ends (well within the reconciler's 30 s, which could end the agent otherwise).
        lines = await asyncio.wait_for(opened.rest(), timeout=15)
    assert not [line for line in lines if line.startswith("event:")]
    rows = await hub.fetch("SELECT state FROM agents WHERE agent_id = $1", agent_id)
    assert rows[0]["state"] == "running"  # the token ended the stream, not the agent
    async with stream(hub, agent_id, auth) as after:
        assert after.status_code == 401


async def test_an_open_stream_ends_when_its_token_expires(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    agent_id = await running_agent(hub, spoke, hub_spoke)
    token_id, auth = await new_token(hub)
    async with stream(hub, agent_id, auth) as opened:
        assert (await opened.first_event())["event"] == "state"
        # The token's time runs out (as if it was made with expiresIn and that time passed).
        await hub.fetch(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(token_id),
        )

        lines = await asyncio.wait_for(opened.rest(), timeout=15)
    assert not [line for line in lines if line.startswith("event:")]
    rows = await hub.fetch("SELECT state FROM agents WHERE agent_id = $1", agent_id)
    assert rows[0]["state"] == "running"


async def test_a_stream_sends_nothing_its_agent_said_after_its_token_was_revoked(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    agent_id = await running_agent(hub, spoke, hub_spoke)
    token_id, auth = await new_token(hub)
    async with stream(hub, agent_id, auth) as opened:
        assert (await opened.first_event())["event"] == "state"
        # The token is revoked and the agent has news in one transaction: the stream is woken
        # by both at once, and the news came after the revocation.
        await hub.fetch(
            "WITH revoked AS (UPDATE api_tokens SET revoked_at = now() WHERE id = $1"
            " RETURNING id) INSERT INTO agent_events (agent_id, seq, state, progress)"
            " SELECT $2, 2, 'running', '{\"said\": \"after the revocation\"}' FROM revoked",
            uuid.UUID(token_id),
            agent_id,
        )

        lines = await asyncio.wait_for(opened.rest(), timeout=15)
    assert not [line for line in lines if "after the revocation" in line], lines
    assert not [line for line in lines if line.startswith("event:")], lines
