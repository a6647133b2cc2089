"""Hostile input: schemathesis against the OpenAPI document, and hypothesis against the signed
endpoints. Never a 5xx, every error problem+json with a code, nothing stored or started."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from federation.envelope import MessageType, generate_signing_key, sign_envelope
from tests.conftest import Instance

pytestmark = pytest.mark.e2e

# Operations that change this instance for every other test or make it call out to
# whatever URL the fuzzer invents (only loopback traffic is allowed here).
EXCLUDED = {
    ("POST", "/api/v1/federation/connections"),
    ("POST", "/api/v1/federation/incoming/connect"),
    ("PATCH", "/api/v1/federation/instance"),
    ("POST", "/api/v1/federation/instance/keys/rotate"),
}


def content_type(response: Any) -> str:
    value = response.headers.get("content-type", "")
    # schemathesis keeps every header as a list of values, httpx as one string
    return str(value[0] if isinstance(value, list) else value)


def check_problem(response: Any, seen: Counter[str]) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert content_type(response).startswith("application/problem+json"), (
            content_type(response),
            response.text[:300],
        )
        code = response.json()["code"]
        assert isinstance(code, str) and code
        seen[code] += 1
    else:
        seen[str(response.status_code)] += 1


async def totals(instance: Instance) -> tuple[int, int, int, int]:
    """Agents and workflows but local runs, messages, and local runs (a valid spawn without a
    connection is one: the fuzzer may make those, each answered 202)."""
    rows = await instance.fetch(
        "SELECT (SELECT count(*) FROM agents WHERE peer_instance_id <> '_local') AS a,"
        " (SELECT count(*) FROM messages) AS m,"
        " (SELECT count(*) FROM agents WHERE peer_instance_id = '_local') AS l"
    )
    local_workflows = await instance.count_workflows("PeerInstance = '_local'")
    workflows = await instance.count_workflows("") - local_workflows
    return rows[0]["a"], rows[0]["m"], workflows, rows[0]["l"]


async def test_openapi_operations_never_fail_with_5xx(hub: Instance) -> None:
    schema = await asyncio.to_thread(schemathesis.openapi.from_url, f"{hub.url}/openapi.json")
    seen: Counter[str] = Counter()
    tried = 0
    before = await totals(hub)

    def run() -> int:
        count = 0
        for result in schema.get_all_operations():
            operation = result.ok()
            if (operation.method.upper(), operation.path) in EXCLUDED:
                continue

            @settings(
                max_examples=30,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(
                case=operation.as_strategy(GenerationMode.POSITIVE)
                | operation.as_strategy(GenerationMode.NEGATIVE)
            )
            def fuzz(case: Any) -> None:
                nonlocal count
                count += 1
                response = case.call(headers=hub.auth, timeout=30)
                check_problem(response, seen)

            fuzz()
        return count

    tried = await asyncio.to_thread(run)
    after = await totals(hub)
    assert after[0] == before[0], "a fuzzed request stored an agent"
    assert after[2] == before[2], "a fuzzed request started a workflow"
    assert after[3] - before[3] <= seen["202"], "a local run was stored without a 202"
    assert tried > 50
    print(f"\nschemathesis: {tried} requests, 0 server errors, answers: {dict(seen)}")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


async def test_fuzzed_envelopes_are_refused_with_a_code_and_leave_nothing(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    stranger = generate_signing_key()
    base_command = sign_envelope(
        stranger,
        type=MessageType.COMMAND,
        sender_id=hub.id,
        recipient_id=spoke.id,
        command_type="agent.spawn",
        payload={
            "agentId": str(uuid.uuid4()),
            "taskId": "fuzz",
            "agentType": "worker",
            "context": {"instructions": "$ echo fuzz"},
            "options": {"timeout": 10, "maxRetries": 0},
        },
    ).to_wire()
    fields = sorted(base_command)
    seen: Counter[str] = Counter()
    before = await totals(spoke)
    loop = asyncio.get_running_loop()

    async def post(path: str, body: Any) -> httpx.Response:
        return await spoke.http.post(f"{spoke.url}/api/v1/federation/incoming/{path}", json=body)

    mutation = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(fields), json_values),
        st.tuples(st.just("drop"), st.sampled_from(fields), st.none()),
        st.tuples(st.just("add"), st.text(min_size=1, max_size=12), json_values),
    )

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        kind=st.sampled_from(["raw", "mutated"]),
        raw=json_values,
        mutations=st.lists(mutation, min_size=1, max_size=3),
        path=st.sampled_from(["command", "event"]),
    )
    def fuzz(kind: str, raw: Any, mutations: list[tuple[str, str, Any]], path: str) -> None:
        body: Any = raw
        if kind == "mutated":
            body = copy.deepcopy(base_command)
            for op, name, value in mutations:
                if op == "drop":
                    body.pop(name, None)
                else:
                    body[name] = value
        response = asyncio.run_coroutine_threadsafe(post(path, body), loop).result()
        check_problem(response, seen)
        assert 400 <= response.status_code < 500

    await asyncio.to_thread(fuzz)
    after = await totals(spoke)
    assert after == before, f"fuzzing left something behind: {before} -> {after}"
    print(f"\nenvelope fuzz: {sum(seen.values())} inputs, refusals by code: {dict(seen)}, losses 0")


# Sent as JSON text (json.dumps escapes them: "\u0000", "\ud800"), as any client would.
UNSTORABLE_TEXT: list[tuple[str, str, Any]] = [
    ("POST", "/tokens", {"name": "a\x00b"}),
    ("POST", "/tokens", {"name": "\ud800"}),
    ("POST", "/tokens", {"name": "two\nlines"}),
    ("POST", "/tokens", {"name": "ok", "workspace": "esc\x1b[31m"}),
    ("PATCH", "/instance", {"metadata": {"key\x00": "value"}}),
    ("PATCH", "/instance", {"name": "tab\tname"}),
    ("GET", "/agents?taskId=a%00b", None),
    ("GET", "/audit?actor=user:a%00b", None),
    ("GET", "/hosted?peer=a%00b", None),
]


async def test_text_that_cannot_be_stored_is_refused_with_its_own_code(
    hub: Instance, hub_spoke: str
) -> None:
    spawn = {
        "connectionId": hub_spoke,
        "taskId": "t",
        "agentType": "worker",
        "context": {"instructions": "a\x00b"},
    }
    grants = {"grants": {"repositories": ["github.com/\x00/*"]}}
    cases = [
        *UNSTORABLE_TEXT,
        ("POST", "/agents/spawn", spawn),
        ("PATCH", f"/connections/{hub_spoke}", grants),
    ]
    before = await totals(hub)
    tokens_before = await hub.fetch("SELECT count(*) AS n FROM api_tokens")
    for method, path, body in cases:
        content = json.dumps(body) if body is not None else None
        headers = {"content-type": "application/json"}
        response = await hub.call(method, path, content=content, headers=headers)
        assert response.status_code == 422, (method, path, response.status_code, response.text)
        assert content_type(response).startswith("application/problem+json")
        assert response.json()["code"] == "text_invalid", (path, response.text)
    assert await totals(hub) == before
    assert await hub.fetch("SELECT count(*) AS n FROM api_tokens") == tokens_before
    connection = (await hub.call("GET", f"/connections/{hub_spoke}")).json()
    assert all("\x00" not in p for p in connection["grants"].get("repositories", []))
