"""The A2A 1.0 server face (issue 23, point 2), driven by the official a2a-sdk client over
loopback against the real stack: card, spawn, stream, diff artifact, cancel, exactly-once
messageId, member isolation, bad input (nothing stored on a refusal)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.client import Client
from a2a.types import a2a_pb2 as pb
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError
from google.protobuf.json_format import MessageToDict, ParseDict

from api.a2a_server.tasks import agent_id_for
from cli.devstack import DevStack
from federation.users import User
from tests.conftest import Instance
from tests.e2e.test_users import bearer, cli_token

pytestmark = pytest.mark.e2e


async def a2a_client(
    instance: Instance, headers: dict[str, str] | None = None, *, streaming: bool = True
) -> AsyncIterator[Client]:
    async with httpx.AsyncClient(headers=headers or instance.auth, timeout=120) as http:
        client = await create_client(
            instance.url, client_config=ClientConfig(httpx_client=http, streaming=streaming)
        )
        yield client


async def client_of(instance: Instance, headers: dict[str, str] | None = None, **kw: Any) -> Any:
    gen = a2a_client(instance, headers, **kw)
    return gen, await gen.__anext__()


def message(text: str, fields: dict[str, Any] | None = None, **kw: Any) -> pb.Message:
    msg = pb.Message(
        message_id=kw.pop("message_id", str(uuid.uuid4())),
        role=pb.ROLE_USER,
        parts=[pb.Part(text=text)],
        **kw,
    )
    if fields is not None:
        part = msg.parts.add()
        ParseDict(fields, part.data)
    return msg


def send(msg: pb.Message, *, immediately: bool = False) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        message=msg, configuration=pb.SendMessageConfiguration(return_immediately=immediately)
    )


async def first(client: Client, request: pb.SendMessageRequest) -> pb.Task:
    async for event in client.send_message(request):
        assert event.HasField("task"), event
        return event.task
    raise AssertionError("no answer")


async def rpc(
    instance: Instance, method: str, params: Any, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    answer = await instance.http.post(
        f"{instance.url}/a2a",
        json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
        headers={"A2A-Version": "1.0", **(headers or instance.auth)},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["A2A-Version"] == "1.0"
    return dict(answer.json())


async def rows_of(instance: Instance, agent_id: str) -> list[Any]:
    return await instance.fetch("SELECT * FROM agents WHERE agent_id = $1", uuid.UUID(agent_id))


async def test_the_agent_card_is_public_and_says_what_the_instance_offers(hub: Instance) -> None:
    answer = await hub.http.get(f"{hub.url}/.well-known/agent-card.json")
    assert answer.status_code == 200
    assert "public" in answer.headers["cache-control"]
    card = answer.json()
    assert card["name"] == hub.name
    interface = card["supportedInterfaces"][0]
    assert interface == {
        "url": f"{hub.url}/a2a",
        "protocolBinding": "JSONRPC",
        "protocolVersion": "1.0",
    }
    assert card["capabilities"]["streaming"] is True
    assert {s["id"] for s in card["skills"]} == {"worker", "reviewer", "tester"}
    assert card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
    assert card["securityRequirements"] == [{"schemes": {"bearer": {}}}]


async def test_an_a2a_client_spawns_streams_reads_the_diff_and_the_run_is_a_local_run(
    hub: Instance,
) -> None:
    gen, client = await client_of(hub)
    msg = message("$ echo hello > a2a.txt", {"agentType": "worker", "timeout": 60})
    events = [e async for e in client.send_message(send(msg))]
    assert events[0].HasField("task")  # the snapshot first
    task_id = events[0].task.id
    assert events[0].task.status.state in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING)
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert states[-1] == pb.TASK_STATE_COMPLETED and events[-1].HasField("status_update")
    artifacts = {
        e.artifact_update.artifact.artifact_id: e.artifact_update.artifact
        for e in events
        if e.HasField("artifact_update")
    }
    assert set(artifacts) == {"summary", "diff", "changed-files"}
    diff = artifacts["diff"].parts[0]
    assert diff.media_type == "text/x-diff" and b"a2a.txt" in diff.raw
    assert "a2a.txt" in json.dumps(MessageToDict(artifacts["changed-files"].parts[0].data))
    got = await client.get_task(pb.GetTaskRequest(id=task_id))
    assert got.status.state == pb.TASK_STATE_COMPLETED and len(got.artifacts) == 3
    # The same run through the REST views: a local run of this user.
    agent = (await hub.call("GET", f"/agents/{task_id}")).json()
    assert agent["state"] == "completed" and agent["peerInstanceId"] == "_local"
    await gen.aclose()


async def test_a_blocking_send_answers_the_terminal_task(hub: Instance) -> None:
    gen, client = await client_of(hub, streaming=False)
    task = await first(client, send(message("$ echo blocking", {"timeout": 60})))
    assert task.status.state == pb.TASK_STATE_COMPLETED
    # The conformance mode is off: a TCK prefix is a message like any other, a run.
    tck = await first(client, send(message("$ echo tck", message_id="tck-message-response-1")))
    assert tck.status.state == pb.TASK_STATE_COMPLETED
    failed = await first(client, send(message("$ exit 3", {"timeout": 60})))
    assert failed.status.state == pb.TASK_STATE_FAILED
    assert failed.status.message.parts[0].text.startswith("failed")
    await gen.aclose()


async def test_cancel_is_a_kill_answered_once_the_sandbox_is_gone(hub: Instance) -> None:
    gen, client = await client_of(hub, streaming=False)
    task = await first(client, send(message("$ sleep 30", {"timeout": 60}), immediately=True))
    assert task.status.state in (pb.TASK_STATE_SUBMITTED, pb.TASK_STATE_WORKING)
    await hub.wait_agent(task.id, {"running"})
    canceled = await client.cancel_task(pb.CancelTaskRequest(id=task.id))
    assert canceled.status.state == pb.TASK_STATE_CANCELED
    with pytest.raises(TaskNotCancelableError):
        await client.cancel_task(pb.CancelTaskRequest(id=task.id))
    with pytest.raises(TaskNotFoundError):
        await client.cancel_task(pb.CancelTaskRequest(id=str(uuid.uuid4())))
    await gen.aclose()


async def test_the_same_message_id_from_the_same_user_is_the_same_task(
    stack: DevStack, hub: Instance
) -> None:
    gen, client = await client_of(hub, streaming=False)
    msg = message("$ echo once", {"timeout": 60})
    one, two = await asyncio.gather(
        first(client, send(msg, immediately=True)), first(client, send(msg, immediately=True))
    )
    assert one.id == two.id
    assert len(await rows_of(hub, one.id)) == 1
    temporal = await hub.temporal()
    assert len([w async for w in temporal.list_workflows(f"AgentId = '{one.id}'")]) == 1
    # Another user's message with the same id is another task.
    erin = bearer(await cli_token(stack, "hub", "member", "ws-erin", "erin"))
    other_gen, other = await client_of(hub, erin, streaming=False)
    theirs = await first(other, send(msg, immediately=True))
    assert theirs.id != one.id
    await other_gen.aclose()
    await gen.aclose()


async def test_a_member_sees_lists_and_cancels_its_workspace_tasks_only(
    stack: DevStack, hub: Instance
) -> None:
    frank = bearer(await cli_token(stack, "hub", "member", "ws-frank", "frank"))
    grace = bearer(await cli_token(stack, "hub", "member", "ws-grace", "grace"))
    f_gen, f = await client_of(hub, frank, streaming=False)
    g_gen, g = await client_of(hub, grace, streaming=False)
    context = str(uuid.uuid4())
    task = await first(
        f, send(message("$ sleep 20", {"timeout": 60}, context_id=context), immediately=True)
    )
    with pytest.raises(TaskNotFoundError):
        await g.get_task(pb.GetTaskRequest(id=task.id))
    with pytest.raises(TaskNotFoundError):
        await g.cancel_task(pb.CancelTaskRequest(id=task.id))
    listed = await g.list_tasks(pb.ListTasksRequest(context_id=context))
    assert list(listed.tasks) == [] and listed.total_size == 0
    mine = await f.list_tasks(pb.ListTasksRequest(context_id=context))
    assert [t.id for t in mine.tasks] == [task.id]
    assert (await f.cancel_task(pb.CancelTaskRequest(id=task.id))).status.state == (
        pb.TASK_STATE_CANCELED
    )
    await f_gen.aclose()
    await g_gen.aclose()


async def test_list_tasks_pages_by_context_and_state(hub: Instance) -> None:
    gen, client = await client_of(hub, streaming=False)
    context = str(uuid.uuid4())
    ids = [
        (await first(client, send(message(f"$ echo {n}", {"timeout": 60}, context_id=context)))).id
        for n in range(3)
    ]
    page = await client.list_tasks(pb.ListTasksRequest(context_id=context, page_size=2))
    assert len(page.tasks) == 2 and page.total_size == 3 and page.next_page_token
    rest = await client.list_tasks(
        pb.ListTasksRequest(context_id=context, page_size=2, page_token=page.next_page_token)
    )
    assert len(rest.tasks) == 1 and not rest.next_page_token
    assert {t.id for t in [*page.tasks, *rest.tasks]} == set(ids)
    done = await client.list_tasks(
        pb.ListTasksRequest(context_id=context, status=pb.TASK_STATE_COMPLETED)
    )
    assert done.total_size == 3
    working = await client.list_tasks(
        pb.ListTasksRequest(context_id=context, status=pb.TASK_STATE_WORKING)
    )
    assert working.total_size == 0
    await gen.aclose()


async def sse(
    instance: Instance, params: dict[str, Any], last_event_id: str | None = None
) -> list[tuple[str | None, dict[str, Any]]]:
    headers = {**instance.auth, "A2A-Version": "1.0", "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    out: list[tuple[str | None, dict[str, Any]]] = []
    body = {"jsonrpc": "2.0", "id": 7, "method": "SubscribeToTask", "params": params}
    async with instance.http.stream(
        "POST", f"{instance.url}/a2a", json=body, headers=headers, timeout=120
    ) as answer:
        assert answer.status_code == 200
        event_id: str | None = None
        async for line in answer.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("data:"):
                out.append((event_id, json.loads(line[5:])))
                event_id = None
    return out


async def test_subscribe_streams_to_the_end_and_resumes_after_last_event_id(
    hub: Instance,
) -> None:
    gen, client = await client_of(hub, streaming=False)
    task = await first(
        client, send(message("$ sleep 2; echo x > sub.txt", {"timeout": 60}), immediately=True)
    )
    events = await sse(hub, {"id": task.id})
    assert "task" in events[0][1]["result"]  # the snapshot first
    last = events[-1][1]["result"]["statusUpdate"]["status"]["state"]
    assert last == "TASK_STATE_COMPLETED"
    ids = [int(i) for i, _ in events if i is not None]
    assert len(ids) == len(events) and ids == sorted(ids) and len(set(ids)) == len(ids)
    # Resumed after the first event: exactly the events after it, no snapshot again.
    resumed = await sse(hub, {"id": task.id}, last_event_id=events[0][0])
    assert [i for i, _ in resumed] == [i for i, _ in events[1:]]
    # Resumed in the middle of the end (after the first artifact): the rest of it.
    artifact_at = next(n for n, (_, e) in enumerate(events) if "artifactUpdate" in e["result"])
    tail = await sse(hub, {"id": task.id}, last_event_id=events[artifact_at][0])
    assert [i for i, _ in tail] == [i for i, _ in events[artifact_at + 1 :]]
    # A finished task with no cursor: nothing more will happen (the spec's error).
    refused = await rpc(hub, "SubscribeToTask", {"id": task.id})
    assert refused["error"]["code"] == -32004
    await gen.aclose()


async def test_bad_input_is_refused_as_the_spec_says_and_nothing_is_stored(
    hub: Instance, edge: Instance
) -> None:
    message_id = str(uuid.uuid4())
    before = await hub.fetch("SELECT count(*) AS n FROM agents")
    params = {
        "message": {
            "messageId": message_id,
            "role": "ROLE_USER",
            "parts": [{"text": "$ echo no"}],
        }
    }
    unknown = await rpc(hub, "SendMessage", {**params, "surprise": True})
    assert unknown["error"]["code"] == -32602
    too_long = {**params["message"], "parts": [{"text": "x" * 100_001}]}
    long_answer = await rpc(hub, "SendMessage", {"message": too_long})
    assert long_answer["error"]["code"] == -32602
    bad_context = {**params["message"], "metadata": {"fedagent": {"timeout": 0, "x": 1}}}
    bad_answer = await rpc(hub, "SendMessage", {"message": bad_context})
    assert bad_answer["error"]["code"] == -32602
    error_info = bad_answer["error"]["data"][0]
    assert error_info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    file_part = {**params["message"], "parts": [{"url": "https://x.test/f", "mediaType": "a/b"}]}
    assert (await rpc(hub, "SendMessage", {"message": file_part}))["error"]["code"] == -32005
    missing = await rpc(hub, "GetTask", {"id": str(uuid.uuid4())})
    assert missing["error"]["code"] == -32001
    # No A2A-Version header: 0.3, which this server does not speak.
    old = await hub.http.post(
        f"{hub.url}/a2a",
        json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}},
        headers=hub.auth,
    )
    assert old.json()["error"]["code"] == -32009
    # A body that is not JSON by its Content-Type: the spec's ContentTypeNotSupportedError.
    plain = await hub.http.post(
        f"{hub.url}/a2a",
        content=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": params}),
        headers={**hub.auth, "A2A-Version": "1.0", "Content-Type": "text/plain"},
    )
    assert plain.json()["error"]["code"] == -32005
    # The interface URL with a trailing "/" answers too (no redirect).
    slash = await hub.http.post(
        f"{hub.url}/a2a/",
        json={"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}},
        headers={**hub.auth, "A2A-Version": "1.0"},
    )
    assert slash.status_code == 200 and slash.json()["error"]["code"] == -32001
    # No token: 401, as the REST API.
    anonymous = await hub.http.post(f"{hub.url}/a2a", json={"jsonrpc": "2.0", "id": 1})
    assert anonymous.status_code == 401
    assert await hub.fetch("SELECT count(*) AS n FROM agents") == before
    # Refused by the limits of local runs (edge offers no tester here): REJECTED, not kept.
    rejected = await rpc(
        edge,
        "SendMessage",
        {"message": {**params["message"], "metadata": {"fedagent": {"agentType": "tester"}}}},
    )
    task = rejected["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_REJECTED"
    assert await rows_of(edge, task["id"]) == []


async def test_a2a_streams_are_bounded_per_token_and_end_when_it_is_revoked(hub: Instance) -> None:
    """The REST event streams' rules hold for A2A streams too (FEDAGENT_SSE_*)."""
    made = await hub.call(
        "POST", "/tokens", json={"name": f"a2a-{uuid.uuid4().hex[:8]}", "role": "admin"}
    )
    token_id, auth = made.json()["id"], {"Authorization": f"Bearer {made.json()['token']}"}
    gen, client = await client_of(hub, streaming=False)
    task = await first(client, send(message("$ sleep 40", {"timeout": 60}), immediately=True))
    await hub.wait_agent(task.id, {"running"})
    headers = {**auth, "A2A-Version": "1.0"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "SubscribeToTask", "params": {"id": task.id}}
    async with contextlib.AsyncExitStack() as held, httpx.AsyncClient(timeout=60) as http:
        opened = []
        for _ in range(8):  # FEDAGENT_SSE_MAX_STREAMS_PER_TOKEN's default
            answer = await held.enter_async_context(
                http.stream("POST", f"{hub.url}/a2a", json=body, headers=headers)
            )
            assert answer.headers["content-type"].startswith("text/event-stream")
            opened.append(answer)
        refused = await http.post(f"{hub.url}/a2a", json=body, headers=headers)
        assert refused.json()["error"]["data"][0]["metadata"]["reason"] == "too_many_streams"
        revoked = await hub.call("DELETE", f"/tokens/{token_id}")
        assert revoked.status_code == 200
        lines = await asyncio.wait_for(_drain(opened[0]), timeout=20)
        assert not any("TASK_STATE_COMPLETED" in line for line in lines)
    await client.cancel_task(pb.CancelTaskRequest(id=task.id))
    await gen.aclose()


async def _drain(response: httpx.Response) -> list[str]:
    return [line async for line in response.aiter_lines()]


async def test_a_send_asking_for_push_notifications_is_refused_and_nothing_is_stored(
    hub: Instance,
) -> None:
    """The card says no push notifications: a send that asks for them gets the spec's
    PushNotificationNotSupportedError (-32003), not a task whose callbacks never come."""
    message_id = str(uuid.uuid4())
    before = await hub.fetch("SELECT count(*) AS n FROM agents")
    msg = {"messageId": message_id, "role": "ROLE_USER", "parts": [{"text": "$ echo push"}]}
    push = {"url": "https://callback.example.org/a2a", "token": "t"}
    for method in ("SendMessage", "SendStreamingMessage"):
        answer = await rpc(
            hub,
            method,
            {
                "message": msg,
                "configuration": {"returnImmediately": True, "taskPushNotificationConfig": push},
            },
        )
        assert answer["error"]["code"] == -32003, answer
    assert await hub.fetch("SELECT count(*) AS n FROM agents") == before


async def test_list_tasks_filters_by_status_timestamp_and_ids_not_given_are_invalid_params(
    hub: Instance,
) -> None:
    gen, client = await client_of(hub, streaming=False)
    context = str(uuid.uuid4())
    task = await first(client, send(message("$ echo ts", {"timeout": 60}, context_id=context)))
    assert task.status.state == pb.TASK_STATE_COMPLETED
    listed = await rpc(hub, "ListTasks", {"contextId": context})
    assert [t["id"] for t in listed["result"]["tasks"]] == [task.id]
    # Artifacts only when asked (includeArtifacts, false by default: the spec's payload rule).
    assert "artifacts" not in listed["result"]["tasks"][0], listed
    full = await rpc(hub, "ListTasks", {"contextId": context, "includeArtifacts": True})
    assert "summary" in [a["name"] for a in full["result"]["tasks"][0]["artifacts"]], full
    # Only the tasks whose status changed after the given time (the spec's filter).
    later = await rpc(
        hub, "ListTasks", {"contextId": context, "statusTimestampAfter": "2999-01-01T00:00:00Z"}
    )
    assert later["result"].get("tasks", []) == [] and later["result"]["totalSize"] == 0
    earlier = await rpc(
        hub, "ListTasks", {"contextId": context, "statusTimestampAfter": "2000-01-01T00:00:00Z"}
    )
    assert [t["id"] for t in earlier["result"]["tasks"]] == [task.id]
    # A page token (or a Last-Event-ID) past what this server gives: invalid params, not an
    # internal error.
    huge = await rpc(hub, "ListTasks", {"contextId": context, "pageToken": "9" * 30})
    assert huge["error"]["code"] == -32602, huge
    other = await first(client, send(message("$ echo other", {"timeout": 60})))
    its_events = await sse(hub, {"id": other.id}, last_event_id="0")
    another_tasks = its_events[0][0]
    assert another_tasks is not None
    subscribe = {"jsonrpc": "2.0", "id": 1, "method": "SubscribeToTask", "params": {"id": task.id}}
    # Too large for a log id; an id of another task's stream; one past this log's end.
    for event_id in ("9" * 30, another_tasks, str(int(another_tasks) + (1 << 40))):
        headers = {**hub.auth, "A2A-Version": "1.0", "Last-Event-ID": event_id}
        resumed = await hub.http.post(f"{hub.url}/a2a", json=subscribe, headers=headers)
        assert resumed.json()["error"]["code"] == -32602, (event_id, resumed.text)
    await gen.aclose()


async def test_answers_held_open_are_bounded_per_token_and_a_refused_one_starts_nothing(
    hub: Instance,
) -> None:
    """A blocking SendMessage and a SendStreamingMessage hold their answer open as a stream
    does: past the token's bound they are refused before anything is stored or started, and
    a blocking send ends when its token is revoked."""
    name = f"a2a-{uuid.uuid4().hex[:8]}"
    made = await hub.call("POST", "/tokens", json={"name": name, "role": "admin"})
    token_id, token = made.json()["id"], made.json()["token"]
    headers = {"Authorization": f"Bearer {token}", "A2A-Version": "1.0"}
    msg = message("$ sleep 40", {"timeout": 60})
    task_id = str(agent_id_for(User(name, "admin", "default"), msg.message_id))

    def call(method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}

    async with contextlib.AsyncExitStack() as held, httpx.AsyncClient(timeout=60) as http:
        # A blocking send: its answer is held open until the task ends, in one place.
        blocking = asyncio.ensure_future(
            http.post(
                f"{hub.url}/a2a",
                json=call("SendMessage", {"message": MessageToDict(msg)}),
                headers=headers,
            )
        )
        while not await rows_of(hub, task_id):  # the send is under way
            await asyncio.sleep(0.1)
        await hub.wait_agent(task_id, {"running"})
        for _ in range(7):  # FEDAGENT_SSE_MAX_STREAMS_PER_TOKEN's default, with the send
            answer = await held.enter_async_context(
                http.stream(
                    "POST",
                    f"{hub.url}/a2a",
                    json=call("SubscribeToTask", {"id": task_id}),
                    headers=headers,
                )
            )
            assert answer.headers["content-type"].startswith("text/event-stream")
        assert not blocking.done()
        before = await hub.fetch("SELECT count(*) AS n FROM agents")
        for method in ("SendMessage", "SendStreamingMessage"):
            new = {"message": MessageToDict(message("$ echo past the bound", {"timeout": 60}))}
            refused = await http.post(f"{hub.url}/a2a", json=call(method, new), headers=headers)
            reason = refused.json()["error"]["data"][0]["metadata"]["reason"]
            assert reason == "too_many_streams", refused.text
        assert await hub.fetch("SELECT count(*) AS n FROM agents") == before
        revoked = await hub.call("DELETE", f"/tokens/{token_id}")
        assert revoked.status_code == 200
        ended = await asyncio.wait_for(blocking, timeout=30)
        assert "error" in ended.json() and "TASK_STATE_COMPLETED" not in ended.text, ended.text
    gen, client = await client_of(hub, streaming=False)
    await client.cancel_task(pb.CancelTaskRequest(id=task_id))
    await gen.aclose()


async def test_a_client_of_another_version_is_told_so_before_its_params_are_read(
    hub: Instance,
) -> None:
    """The version is negotiated first: a client of A2A 2.0 (or of 0.3: no A2A-Version)
    whose params hold fields 1.0 does not know is told VersionNotSupportedError (-32009),
    not that its params are invalid; nothing is stored."""
    before = await hub.fetch("SELECT count(*) AS n FROM agents")
    msg = {
        "messageId": str(uuid.uuid4()),
        "role": "ROLE_USER",
        "parts": [{"text": "$ echo from the future"}],
        "futureField": {"x": 1},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": msg}}
    for version in ({"A2A-Version": "2.0"}, {}):
        answer = await hub.http.post(f"{hub.url}/a2a", json=body, headers={**hub.auth, **version})
        assert answer.json()["error"]["code"] == -32009, (version, answer.text)
        assert answer.headers["A2A-Version"] == "1.0"
    # Of this version, the same params are invalid (-32602).
    assert (await rpc(hub, "SendMessage", {"message": msg}))["error"]["code"] == -32602
    assert await hub.fetch("SELECT count(*) AS n FROM agents") == before
