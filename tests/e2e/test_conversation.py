"""Durable agent conversations, proven by SIGKILLing the executor's worker: the retry resumes the
checkpointed conversation (no step done twice, no answered turn asked again), limits and usage
span the resume, and the requester's transcript (REST and SSE) equals the executor's."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cli.devstack import DevStack
from federation.envelope import MessageType, sign_envelope
from tests.conftest import Instance
from tests.e2e.helpers import processes_in, spawn_body
from tests.e2e.signing import craft, instance_key, post_command, refused_codes
from tests.e2e.test_durability import wait_for, workspace

pytestmark = pytest.mark.e2e
STEPS = 5
PULL = "agent.transcript"


# --- a Messages API server whose answer depends only on the conversation so far -------------


@dataclass
class StepModel:
    """Asks for `steps` run_command calls (`echo step-k >> steps.txt`), then finish. The k-th
    answer is chosen by the number of tool results in the request, as a real model's would
    follow from the conversation. `slow` adds a sleep to one step's command; `hold` keeps the
    answer to the request with that many tool results until `release` is set."""

    steps: int = STEPS
    slow: dict[int, float] = field(default_factory=dict)
    finish: bool = True
    # Set: a conversation whose task does not mention an earlier try finishes unsuccessfully
    # with this summary (the first try fails, the next one, told about it, succeeds).
    fail_first: str = ""
    hold: int | None = None
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    @staticmethod
    def results_in(body: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            block
            for message in body.get("messages", [])
            if message["role"] == "user" and isinstance(message["content"], list)
            for block in message["content"]
            if block.get("type") == "tool_result"
        ]

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        done = len(self.results_in(body))
        if done < self.steps or not self.finish:
            k = done + 1
            command = (
                slow_step(k, self.slow[k]) if k in self.slow else f"echo step-{k} >> steps.txt"
            )
            block = {
                "type": "tool_use",
                "id": f"toolu_{k}",
                "name": "run_command",
                "input": {"command": command},
            }
            text = f"Step {k}: appending to steps.txt."
        else:
            task = json.dumps(body["messages"][0]["content"])
            failing = bool(self.fail_first) and "Earlier try" not in task
            block = {
                "type": "tool_use",
                "id": "toolu_finish",
                "name": "finish",
                "input": {
                    "summary": self.fail_first if failing else f"wrote {self.steps} steps",
                    "success": not failing,
                },
            }
            text = "All steps are written."
        return {
            "id": f"msg_{done}",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-1",
            "content": [{"type": "text", "text": text}, block],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 100, "output_tokens": 10},
        }


def slow_step(k: int, seconds: float) -> str:
    """Step k, which takes `seconds` the first time it runs (a window to kill the worker in)."""
    return (
        f"echo step-{k} >> steps.txt && "
        f'if [ "$(grep -c step-{k} steps.txt)" = 1 ]; then sleep {seconds}; fi'
    )


@pytest.fixture
def step_model() -> Iterator[StepModel]:
    model = StepModel()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
            model.requests.append(body)
            if model.hold is not None and len(model.results_in(body)) == model.hold:
                model.hold = None
                model.held.set()
                model.release.wait(120)
            data = json.dumps(model.answer(body)).encode()
            try:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the worker that asked is gone

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    model.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield model
    finally:
        model.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


async def restart_spoke_worker(stack: DevStack, env: dict[str, str] | None) -> None:
    """Replace spoke's workers by one with these settings (None: its own settings again)."""
    inst = stack.instances["spoke"]
    if not hasattr(stack, "_spoke_env"):
        stack._spoke_env = dict(inst.env)  # type: ignore[attr-defined]
    stack.stop_workers("spoke")
    inst.env = {**stack._spoke_env, **(env or {})}  # type: ignore[attr-defined]
    stack.start_worker("spoke")
    await stack.wait_polling("spoke")


@pytest.fixture
async def anthropic_spoke(stack: DevStack, step_model: StepModel) -> AsyncIterator[dict[str, str]]:
    """spoke's worker runs the anthropic provider against `step_model`."""
    env = {
        "FEDAGENT_MODEL_PROVIDER": "anthropic",
        "FEDAGENT_ANTHROPIC_BASE_URL": step_model.url,
        "FEDAGENT_ANTHROPIC_API_KEY": "test-key",
        "FEDAGENT_ANTHROPIC_MODEL": "claude-test-1",
        "FEDAGENT_MODEL_API_BACKOFF": "0.05",
    }
    await restart_spoke_worker(stack, env)
    try:
        yield env
    finally:
        await restart_spoke_worker(stack, None)


# --- reading both sides ----------------------------------------------------------------------


async def checkpoint(spoke: Instance, agent_id: str, attempt: int = 1) -> dict[str, Any] | None:
    rows = await spoke.fetch(
        "SELECT state, turn_count, checkpoints FROM agent_conversations"
        " WHERE agent_id = $1 AND attempt = $2",
        uuid.UUID(agent_id),
        attempt,
    )
    return dict(rows[0]) if rows else None


async def executor_transcript(spoke: Instance, agent_id: str) -> list[dict[str, Any]]:
    rows = await spoke.fetch(
        "SELECT entry FROM agent_transcript WHERE agent_id = $1 ORDER BY seq", uuid.UUID(agent_id)
    )
    return [json.loads(r["entry"]) if isinstance(r["entry"], str) else r["entry"] for r in rows]


async def requester_transcript(hub: Instance, agent_id: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await hub.call(
            "GET", f"/agents/{agent_id}/transcript", params={"after": after, "limit": 3}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        entries += page["entries"]
        if not page["entries"]:
            return {**page, "entries": entries}
        after = page["next"]


def steps_written(ws: Path) -> list[str]:
    return (ws / "steps.txt").read_text().split()


def step_running(ws: Path, k: int) -> Callable[[], Awaitable[bool]]:
    """A condition: step k was written and its command still runs in the sandbox."""

    async def running() -> bool:
        path = ws / "steps.txt"
        return path.exists() and f"step-{k}" in steps_written(ws) and bool(processes_in(ws))

    return running


async def crash_spoke_worker(stack: DevStack, ws: Path) -> float:
    """SIGKILL spoke's worker (its sandbox dies with it), start a new one; when it was killed."""
    stack.stop_workers("spoke", signal.SIGKILL)
    killed = time.monotonic()
    await wait_for(lambda: _now(not processes_in(ws)), 10, "the sandbox to die with its worker")
    stack.start_worker("spoke")
    return killed


async def _now(value: bool) -> bool:
    return value


async def resumed_after(spoke: Instance, agent_id: str, killed: float) -> float:
    """Seconds from the kill until the new worker wrote its first checkpoint (the resume)."""

    async def resumed() -> bool:
        row = await checkpoint(spoke, agent_id)
        return row is not None and state_of(row).get("resumes", 0) >= 1

    await wait_for(resumed, 90, "the resumed run's first checkpoint")
    return time.monotonic() - killed


def state_of(row: dict[str, Any]) -> dict[str, Any]:
    state = row["state"]
    return json.loads(state) if isinstance(state, str) else state


# --- the tests -----------------------------------------------------------------------------


async def test_anthropic_run_resumes_after_its_worker_is_killed_mid_command(
    hub: Instance,
    spoke: Instance,
    hub_spoke: str,
    stack: DevStack,
    step_model: StepModel,
    anthropic_spoke: dict[str, str],
) -> None:
    step_model.slow = {3: 30}
    body = spawn_body(hub_spoke, "write the steps", task_id="resume-anthropic-a", timeout=300)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    ws = workspace(stack, spoke, hub, body["agentId"])

    await wait_for(step_running(ws, 3), 90, "the third step's command")
    killed = await crash_spoke_worker(stack, ws)
    resume_seconds = await resumed_after(spoke, body["agentId"], killed)

    agent = await hub.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", agent
    assert agent["attempt"] == 1
    # Every step once, except the interrupted one, which ran again once.
    assert steps_written(ws) == ["step-1", "step-2", "step-3", "step-3", "step-4", "step-5"]
    # No checkpointed answer was asked for again: as many model calls as without the crash.
    assert len(step_model.requests) == STEPS + 1
    result = agent["result"]
    assert (result["turns"], result["modelCalls"], result["resumes"]) == (6, 6, 1)
    assert result["usage"] == {"claude-test-1": {"input": 600, "output": 60}}
    # The model was told the re-run call had been interrupted.
    after_rerun = step_model.results_in(step_model.requests[3])
    assert (
        "interrupted" in after_rerun[2]["content"]
        and "partial effects" in after_rerun[2]["content"]
    )
    assert "interrupted" not in after_rerun[1]["content"]
    interrupted = [c for c in result["commands"] if c.get("interrupted")]
    assert [c["command"] for c in interrupted] == [slow_step(3, 30)]
    print(f"\nanthropic, killed mid-command: resumed {resume_seconds:.1f} s after the kill")


async def test_anthropic_run_resumes_after_its_worker_is_killed_between_turns(
    hub: Instance,
    spoke: Instance,
    hub_spoke: str,
    stack: DevStack,
    step_model: StepModel,
    anthropic_spoke: dict[str, str],
) -> None:
    step_model.hold = 3  # the model is thinking about turn 4 when the worker dies
    body = spawn_body(hub_spoke, "write the steps", task_id="resume-anthropic-b", timeout=300)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    ws = workspace(stack, spoke, hub, body["agentId"])
    await wait_for(lambda: _now(step_model.held.is_set()), 90, "the request for turn 4")
    killed = await crash_spoke_worker(stack, ws)
    step_model.release.set()
    resume_seconds = await resumed_after(spoke, body["agentId"], killed)

    agent = await hub.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", agent
    assert steps_written(ws) == [f"step-{k}" for k in range(1, STEPS + 1)]
    # The unanswered turn was asked again; nothing else was.
    assert len(step_model.requests) == STEPS + 2
    asked = [len(step_model.results_in(r)) for r in step_model.requests]
    assert asked == [0, 1, 2, 3, 3, 4, 5]
    result = agent["result"]
    assert (result["turns"], result["modelCalls"], result["resumes"]) == (6, 6, 1)
    # Usage counts the answers the conversation holds: the lost one never arrived.
    assert result["usage"] == {"claude-test-1": {"input": 600, "output": 60}}
    assert not [c for c in result["commands"] if c.get("interrupted")]
    print(f"\nanthropic, killed between turns: resumed {resume_seconds:.1f} s after the kill")


async def test_scripted_run_resumes_after_its_worker_is_killed_mid_command(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    script = "\n".join(
        "$ " + (slow_step(k, 30) if k == 3 else f"echo step-{k} >> steps.txt")
        for k in range(1, STEPS + 1)
    )
    body = spawn_body(hub_spoke, script, task_id="resume-scripted-a", timeout=300)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    ws = workspace(stack, spoke, hub, body["agentId"])

    await wait_for(step_running(ws, 3), 90, "the third step's command")
    killed = await crash_spoke_worker(stack, ws)
    resume_seconds = await resumed_after(spoke, body["agentId"], killed)

    agent = await hub.wait_agent(body["agentId"], timeout=150)
    assert agent["state"] == "completed", agent
    assert steps_written(ws) == ["step-1", "step-2", "step-3", "step-3", "step-4", "step-5"]
    result = agent["result"]
    assert (result["turns"], result["modelCalls"], result["resumes"]) == (6, 6, 1)
    assert result["exitCodes"] == [0] * STEPS
    assert [c["command"] for c in result["commands"] if c.get("interrupted")] == [slow_step(3, 30)]
    transcript = await executor_transcript(spoke, body["agentId"])
    reruns = [e for e in transcript if e["kind"] == "tool_result" and e["interrupted"]]
    assert len(reruns) == 1 and "interrupted" in reruns[0]["output"]
    assert [e["kind"] for e in transcript].count("resumed") == 1
    print(f"\nscripted, killed mid-command: resumed {resume_seconds:.1f} s after the kill")


async def test_scripted_run_resumes_after_its_worker_is_killed_between_turns(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    script = "\n".join(
        f"$ echo step-{k} >> steps.txt" + (" && sleep 2" if k == 2 else "")
        for k in range(1, STEPS + 1)
    )
    body = spawn_body(hub_spoke, script, task_id="resume-scripted-b", timeout=300)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    ws = workspace(stack, spoke, hub, body["agentId"])
    agent_id = uuid.UUID(body["agentId"])

    async def second_step_running() -> bool:
        row = await checkpoint(spoke, body["agentId"])
        return row is not None and state_of(row).get("runningCall") == "call-1"

    await wait_for(second_step_running, 90, "the second step's command")
    # Hold the run's record: the worker saves step 2's result and turn 3's answer, then
    # stops where it reports progress, before step 3 starts. Kill it there.
    conn = await spoke.db()
    try:
        lock = conn.transaction()
        await lock.start()
        await conn.execute(
            "SELECT 1 FROM agents WHERE role = 'executor' AND agent_id = $1 FOR UPDATE", agent_id
        )

        async def third_answer_saved() -> bool:
            row = await checkpoint(spoke, body["agentId"])
            return row is not None and row["turn_count"] == 3

        await wait_for(third_answer_saved, 60, "turn 3's answer in the checkpoint")
        assert steps_written(ws) == ["step-1", "step-2"]
        killed = await crash_spoke_worker(stack, ws)
        await lock.rollback()
    finally:
        await conn.close()
    resume_seconds = await resumed_after(spoke, body["agentId"], killed)

    agent = await hub.wait_agent(body["agentId"], timeout=120)
    assert agent["state"] == "completed", agent
    assert steps_written(ws) == [f"step-{k}" for k in range(1, STEPS + 1)]
    result = agent["result"]
    assert (result["turns"], result["modelCalls"], result["resumes"]) == (6, 6, 1)
    assert not [c for c in result["commands"] if c.get("interrupted")]
    print(f"\nscripted, killed between turns: resumed {resume_seconds:.1f} s after the kill")


async def read_sse(
    hub: Instance, agent_id: str, last_event_id: str | None, stop_after: int | None = None
) -> list[tuple[int, str, dict[str, Any]]]:
    """The stream's events (id, event, data); with `stop_after`, hang up after that many
    transcript entries."""
    events: list[tuple[int, str, dict[str, Any]]] = []
    headers = {**hub.auth, **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    async with hub.http.stream(
        "GET", f"{hub.url}/api/v1/federation/agents/{agent_id}/events", headers=headers
    ) as response:
        assert response.status_code == 200
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "" and "data" in fields:
                events.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
                fields = {}
                seen = sum(1 for e in events if e[1] == "transcript")
                if stop_after is not None and seen >= stop_after:
                    return events
            elif ":" in line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    return events


async def test_requester_transcript_equals_the_executors_and_sse_resumes_without_loss(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    script = "\n".join(
        [
            "$ echo hello from the agent",
            "$ sleep 1 && seq 1 5000",
            "$ echo second && sleep 1",
            "$ printf 'a\\nb\\n' > notes.txt && cat notes.txt",
            "$ sh -c 'echo oops >&2; exit 0'",
        ]
    )
    body = spawn_body(hub_spoke, script, task_id="transcript-1")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    first = await read_sse(hub, body["agentId"], None, stop_after=4)
    last_id = str(first[-1][0])
    rest = await read_sse(hub, body["agentId"], last_id)
    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "completed", agent
    assert rest[-1][1] == "state" and rest[-1][2]["state"] == "completed"

    streamed = [data for _, kind, data in first + rest if kind == "transcript"]
    ids = [event_id for event_id, _, _ in first + rest]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    executor = await executor_transcript(spoke, body["agentId"])
    requester = await requester_transcript(hub, body["agentId"])
    assert requester["complete"] and requester["total"] == len(executor)
    assert requester["entries"] == executor
    # The stream missed none and repeated none.
    assert [{k: v for k, v in e.items() if k != "agentId"} for e in streamed] == executor
    assert [e["seq"] for e in executor] == list(range(1, len(executor) + 1))
    results = [e for e in executor if e["kind"] == "tool_result"]
    assert [r["exitCode"] for r in results] == [0] * 5
    long_output = results[1]
    assert long_output["outputCut"] and long_output["output"].startswith("1\n")
    assert "5000" in long_output["output"]  # head and tail kept
    assert agent["result"]["transcript"]["entries"] == len(executor)


async def test_transcript_lost_in_transit_is_pulled_by_the_requester(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, "$ echo one\n$ echo two", task_id="transcript-pull")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "completed"
    executor = await executor_transcript(spoke, body["agentId"])
    # Lose what the requester had: it must get all of it back from the executor on demand.
    conn = await hub.db()
    try:
        await conn.execute(
            "DELETE FROM requested_transcript WHERE agent_id = $1 AND seq > 2",
            uuid.UUID(body["agentId"]),
        )
    finally:
        await conn.close()
    requester = await requester_transcript(hub, body["agentId"])
    assert requester["complete"]
    assert requester["entries"] == executor


@pytest.mark.parametrize(
    ("limit_env", "stop_reason"),
    [
        ({"FEDAGENT_AGENT_MAX_TURNS": "4", "FEDAGENT_AGENT_TOKEN_BUDGET": "0"}, "max_turns"),
        ({"FEDAGENT_AGENT_TOKEN_BUDGET": "350"}, "token_budget"),
    ],
)
async def test_limits_end_a_resumed_run_where_an_uninterrupted_run_ends(
    hub: Instance,
    spoke: Instance,
    hub_spoke: str,
    stack: DevStack,
    step_model: StepModel,
    anthropic_spoke: dict[str, str],
    limit_env: dict[str, str],
    stop_reason: str,
) -> None:
    step_model.finish = False  # the model never finishes: only the limit ends the run
    step_model.steps = 100
    await restart_spoke_worker(stack, {**anthropic_spoke, **limit_env})
    results = []
    for crash in (False, True):
        step_model.slow = {2: 30} if crash else {}
        body = spawn_body(hub_spoke, "go on forever", task_id=f"limits-{stop_reason}-{crash}")
        assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
        ws = workspace(stack, spoke, hub, body["agentId"])
        if crash:
            await wait_for(step_running(ws, 2), 90, "the second step's command")
            await crash_spoke_worker(stack, ws)
        agent = await hub.wait_agent(body["agentId"], timeout=150)
        assert agent["state"] == "failed", agent
        results.append(agent["result"])
    plain, resumed = results
    assert resumed["resumes"] == 1 and plain["resumes"] == 0
    assert plain["stopReason"] == resumed["stopReason"] == stop_reason
    assert plain["turns"] == resumed["turns"] == 4
    assert plain["usage"] == resumed["usage"] == {"claude-test-1": {"input": 400, "output": 40}}
    assert plain["summary"] == resumed["summary"]


async def test_a_new_try_is_told_what_the_previous_try_did(
    hub: Instance,
    spoke: Instance,
    hub_spoke: str,
    stack: DevStack,
    step_model: StepModel,
    anthropic_spoke: dict[str, str],
) -> None:
    step_model.steps = 1
    step_model.fail_first = "the build needs a config file that is not there"
    body = spawn_body(hub_spoke, "write the steps", task_id="new-try", max_retries=1)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"], timeout=120)
    assert (agent["state"], agent["attempt"]) == ("completed", 2), agent
    ws = workspace(stack, spoke, hub, body["agentId"])
    # Try 2 ran in the workspace try 1 left: both tries' steps are in the file.
    assert steps_written(ws) == ["step-1", "step-1"]
    firsts = [r for r in step_model.requests if not step_model.results_in(r)]
    assert len(firsts) == 2
    told = firsts[1]["messages"][0]["content"]
    told = told if isinstance(told, str) else " ".join(b.get("text", "") for b in told)
    assert "Try 1 failed (finished) after 2 turn(s)" in told
    assert "the build needs a config file that is not there" in told
    assert "Earlier try" not in str(firsts[0]["messages"][0]["content"])
    transcript = await requester_transcript(hub, body["agentId"])
    assert [e["attempt"] for e in transcript["entries"]][-1] == 2
    assert any(e["kind"] == "try" for e in transcript["entries"])


async def refused(executor: Instance, envelope: dict[str, Any], status: int, code: str) -> None:
    """Refused with this problem, audited, and the message not kept (the agent itself exists)."""
    response = await post_command(executor, envelope)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert await refused_codes(executor, envelope["messageId"]) == [code]
    kept = await executor.fetch(
        "SELECT 1 FROM messages WHERE message_id = $1", envelope["messageId"]
    )
    assert kept == []


async def test_transcript_pull_is_granted_with_agent_status_and_refuses_bad_pages(
    hub: Instance, spoke: Instance, edge: Instance, hub_spoke: str, edge_spoke_request: str
) -> None:
    body = spawn_body(hub_spoke, "$ echo pulled", task_id="transcript-grants")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    assert (await hub.wait_agent(body["agentId"]))["state"] == "completed"
    hub_key = await instance_key(hub)

    page = await post_command(
        spoke,
        craft(hub_key, hub, spoke, {"agentId": body["agentId"], "after": 1}, command_type=PULL),
    )
    assert page.status_code == 200, page.text
    payload = page.json()["payload"]
    executor = await executor_transcript(spoke, body["agentId"])
    assert payload["entries"] == executor[1:] and payload["total"] == len(executor)

    bad = craft(hub_key, hub, spoke, {"agentId": body["agentId"], "limit": 0}, command_type=PULL)
    await refused(spoke, bad, 422, "payload_invalid")

    # A peer without agent.status may not read transcripts either.
    accepted = await spoke.call(
        "POST",
        f"/connections/{edge_spoke_request}/accept",
        json={"grants": {"commandTypes": ["agent.spawn"]}},
    )
    assert accepted.status_code == 200, accepted.text
    edge_key = await instance_key(edge)
    denied = craft(edge_key, edge, spoke, {"agentId": body["agentId"]}, command_type=PULL)
    await refused(spoke, denied, 403, "grant_command_type")

    # A transcript event that does not follow the contract is refused; nothing is kept.
    spoke_key = await instance_key(spoke)
    before = await hub.fetch(
        "SELECT count(*) AS n FROM requested_transcript WHERE agent_id = $1",
        uuid.UUID(body["agentId"]),
    )
    event = sign_envelope(
        spoke_key,
        type=MessageType.EVENT,
        sender_id=spoke.id,
        recipient_id=hub.id,
        command_type=PULL,
        payload={"agentId": body["agentId"], "entries": [{"seq": 0, "kind": "assistant"}]},
    ).to_wire()
    response = await hub.http.post(f"{hub.url}/api/v1/federation/incoming/event", json=event)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "payload_invalid"
    after = await hub.fetch(
        "SELECT count(*) AS n FROM requested_transcript WHERE agent_id = $1",
        uuid.UUID(body["agentId"]),
    )
    assert after[0]["n"] == before[0]["n"]


async def test_the_transcript_survives_a_restart_of_both_instances(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    body = spawn_body(hub_spoke, "$ echo kept\n$ echo across restarts", task_id="transcript-keep")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    assert (await hub.wait_agent(body["agentId"]))["state"] == "completed"
    before = await requester_transcript(hub, body["agentId"])
    for name in ("hub", "spoke"):
        stack.stop_api(name)
        stack.start_api(name)
    await stack.wait_ready("hub")
    await stack.wait_ready("spoke")
    after = await requester_transcript(hub, body["agentId"])
    assert after["complete"] and after["entries"] == before["entries"]
    assert after["entries"] == await executor_transcript(spoke, body["agentId"])
    outputs = [e["output"] for e in after["entries"] if e["kind"] == "tool_result"]
    assert "kept" in outputs[0] and "across restarts" in outputs[1]
